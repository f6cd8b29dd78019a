//! The route handlers: read the body within its deadline, validate, queue, wait for the
//! images within the request's deadline (or until the drain deadline), store them when asked,
//! answer — as one body, or as server-sent events while the images are sampled.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine as _;
use tokio::sync::oneshot;

use crate::api::sdapi::{
    self, A1111Img2ImgRequest, A1111Options, A1111OptionsUpdate, A1111Txt2ImgRequest,
};
use crate::api::{
    self, ApiError, Bounds, Delivery, EDIT_EVENTS, GENERATION_EVENTS, ImageData, ImageEditRequest,
    ImageStreamEvent, ImagesRequest, ImagesResponse, Img2ImgRequest, Limits, Output,
    ResponseFormat, StreamEvents, Txt2ImgRequest, Txt2ImgResponse, UsedParameters, multipart,
};
use crate::artifacts::{self, Refusal, Stored};
use crate::backend::GenParams;
use crate::encode;
use crate::queue::{ImageResult, Partial, PreviewRequest, QueueError, retry_after};
use crate::routes::{AppState, BodyLimit, RequestId};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if state.limits.get().is_none() {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is loading").into_response()
    } else {
        "ready".into_response()
    }
}

pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.queue_depth.set(state.queue.depth() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// The document, with the loaded model's bounds (before loading: the bounds known without it).
pub(crate) async fn openapi(State(state): State<Arc<AppState>>) -> Response {
    let bounds = state.limits.get().map_or_else(
        || Bounds::before_load(state.max_prompt_bytes),
        Limits::bounds,
    );
    axum::Json(crate::openapi::document(&bounds)).into_response()
}

pub(crate) async fn playground() -> Html<&'static str> {
    Html(crate::openapi::PLAYGROUND)
}

pub(crate) async fn models(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let limits = ready_limits(&state)?;
    let list = api::ModelList::describe(
        limits,
        state.started_unix,
        state.max_batch_size,
        state.max_body_bytes,
    );
    Ok(axum::Json(list).into_response())
}

fn ready_limits(state: &AppState) -> Result<&Limits, ApiError> {
    if state.draining.load(Ordering::SeqCst) {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down").retry_after(5));
    }
    state.limits.get().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is loading").retry_after(5)
    })
}

fn json_body(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the body as `Content-Type: application/json`",
        ))
    }
}

/// Reads the whole body within `--body-read-timeout-seconds` (a client trickling its body
/// byte by byte is cut off, not waited for) and the route's body limit (`--max-body-bytes`,
/// or `--max-upload-bytes` for the routes that take images).
async fn read_body(state: &AppState, req: Request) -> Result<Bytes, ApiError> {
    let BodyLimit { bytes: limit, flag } =
        req.extensions()
            .get::<BodyLimit>()
            .copied()
            .unwrap_or(BodyLimit {
                bytes: state.max_body_bytes,
                flag: "--max-body-bytes",
            });
    // A body announced too large is refused before a byte of it is read.
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = announced
        && length > limit as u64
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is {length} bytes; this route accepts at most {limit} (see {flag})"),
        ));
    }
    let read = Bytes::from_request(req, &());
    match tokio::time::timeout(state.body_read_timeout, read).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body did not arrive within {} s",
                state.body_read_timeout.as_secs()
            ),
        )),
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) => {
            let status = e.status();
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!("the body is larger than the server accepts (see {flag})")
            } else {
                e.body_text()
            };
            Err(ApiError::new(status, message))
        }
    }
}

/// Runs `work` (decoding uploads, resizing them) on a blocking thread, once one of the
/// server's decoding slots is free.
async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let failed = |e: String| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the request failed: {e}"),
        )
    };
    let _slot = state
        .decoding
        .acquire()
        .await
        .map_err(|e| failed(e.to_string()))?;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| failed(e.to_string()))?
}

/// The parts of a request the handlers need besides the body.
struct Head {
    headers: HeaderMap,
    id: String,
}

fn head(req: &Request) -> Head {
    Head {
        headers: req.headers().clone(),
        id: req
            .extensions()
            .get::<RequestId>()
            .map_or_else(String::new, |r| r.0.clone()),
    }
}

/// The 503 of a request still unanswered when the drain deadline passed.
fn cut_at_drain(state: &AppState) -> ApiError {
    state.cut_at_drain.fetch_add(1, Ordering::SeqCst);
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the server shut down before this request finished (--drain-seconds ran out); \
         send it again",
    )
    .retry_after(1)
}

fn timed_out(state: &AppState) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "the request did not finish within {} s",
            state.request_timeout.as_secs()
        ),
    )
}

/// Queues the images of one request (with previews when asked); returns the receivers and
/// the request's deadline.
fn submit_images(
    state: &AppState,
    images: Vec<GenParams>,
    request_id: &str,
    previews: Option<PreviewRequest>,
) -> Result<(Vec<oneshot::Receiver<ImageResult>>, Instant), ApiError> {
    let deadline = Instant::now() + state.request_timeout;
    if state.log_prompts
        && let Some(p) = images.first()
    {
        tracing::info!(prompt = %p.prompt, negative_prompt = %p.negative_prompt, "prompt");
    }
    if let Some(p) = images.first() {
        tracing::info!(
            images = images.len(),
            width = p.width,
            height = p.height,
            steps = p.steps,
            seed = p.seed,
            "queued"
        );
    }
    let steps = images.first().map_or(1, GenParams::sampled_steps);
    let rxs = state
        .queue
        .submit_with_previews(images, deadline, request_id, previews)
        .map_err(|e| match e {
            QueueError::Full => {
                let step = state.metrics.recent_step_seconds();
                let secs = retry_after(state.queue.depth(), state.max_batch_size, step, steps);
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "the queue is full; retry later",
                )
                .retry_after(secs)
            }
            _ => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is not running"),
        })?;
    Ok((rxs, deadline))
}

/// One image's result as the client's error, or its PNG.
fn image_result(
    state: &AppState,
    result: Result<Result<ImageResult, oneshot::error::RecvError>, tokio::time::error::Elapsed>,
) -> Result<Vec<u8>, ApiError> {
    match result {
        Err(_) | Ok(Ok(Err(QueueError::Timeout))) => Err(timed_out(state)),
        Ok(Ok(Ok(png))) => Ok(png),
        Ok(Ok(Err(QueueError::Failed(msg)))) => {
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg))
        }
        Ok(Ok(Err(_)) | Err(_)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model stopped before finishing the request",
        )),
    }
}

/// Queues the images and waits for all of them within the request's deadline; when the drain
/// deadline passes first, answers 503 (and dropping the receivers stops the work).
async fn run_images(
    state: &AppState,
    images: Vec<GenParams>,
    request_id: &str,
) -> Result<Vec<Vec<u8>>, ApiError> {
    let mut expired = state.drain_expired.subscribe();
    tokio::select! {
        r = wait_images(state, images, request_id) => r,
        Ok(_) = expired.wait_for(|e| *e) => Err(cut_at_drain(state)),
    }
}

async fn wait_images(
    state: &AppState,
    images: Vec<GenParams>,
    request_id: &str,
) -> Result<Vec<Vec<u8>>, ApiError> {
    let (rxs, deadline) = submit_images(state, images, request_id, None)?;
    let mut out = Vec::with_capacity(rxs.len());
    for rx in rxs {
        let result = tokio::time::timeout_at(deadline.into(), rx).await;
        out.push(image_result(state, result)?);
    }
    Ok(out)
}

/// This server's base URL as the client reached it, for locally stored images.
fn origin(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        })
        .map_or_else(String::new, |h| format!("http://{h}"))
}

/// The 422 of a request that asks to store images on a server without storage.
fn no_storage(field: &str) -> ApiError {
    ApiError::invalid(
        field,
        "this server stores no images: it runs without --artifacts-dir or \
         --artifacts-s3-bucket (spec.server.artifacts); ask for the image inline",
    )
}

/// Stores the PNGs of one request; a failure is a 502 naming the bucket or directory, logged
/// and counted (the images were made: the client is told, not left with a partial answer).
async fn store_images(
    state: &AppState,
    headers: &HeaderMap,
    request_id: &str,
    images: &[Vec<u8>],
    output: Output,
) -> Result<Vec<Stored>, ApiError> {
    let Some(store) = &state.artifacts else {
        return Err(no_storage("response_format"));
    };
    let origin = origin(state, headers);
    let mut out = Vec::with_capacity(images.len());
    for (i, image) in images.iter().enumerate() {
        let name = artifacts::new_name(i, output.format);
        match store.put(&name, image.clone(), &origin).await {
            Ok(stored) => {
                state.metrics.artifacts_stored.inc();
                tracing::info!(artifact = %name, store = %store.describe(), "image stored");
                out.push(stored);
            }
            Err(e) => {
                state.metrics.artifact_store_failures.inc();
                tracing::error!(request_id, error = %e, "an image could not be stored");
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "the images were generated but not stored: {e}; send the request \
                         again, or ask for them inline"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"))
}

fn accept(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok())
}

pub(crate) async fn txt2img(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let Head { headers, id } = head(&req);
    let body = read_body(&state, req).await?;
    json_body(&headers)?;
    let limits = ready_limits(&state)?;
    let req: Txt2ImgRequest = api::parse_json(&body)?;
    let params = req.resolve(limits, rand::random)?;
    let output = req.output(accept(&headers))?;
    one_image(
        &state,
        &headers,
        &id,
        params,
        req.store == Some(true),
        output,
    )
    .await
}

/// `POST /v1/img2img`: `/v1/txt2img`'s answer for an edit.
pub(crate) async fn img2img(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let Head { headers, id } = head(&req);
    let body = read_body(&state, req).await?;
    json_body(&headers)?;
    let limits = ready_limits(&state)?.clone();
    let req: Img2ImgRequest = api::parse_json(&body)?;
    drop(body);
    let output = req.output(accept(&headers))?;
    let store = req.store == Some(true);
    let params = blocking(&state, move || req.resolve(&limits, rand::random)).await?;
    one_image(&state, &headers, &id, params, store, output).await
}

/// Makes one image and answers it as `/v1/txt2img` does: the image bytes (the `X-Seed`
/// header, and the artifact's URL when stored), or JSON with `Accept: application/json`.
async fn one_image(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
    params: GenParams,
    store: bool,
    output: Output,
) -> Result<Response, ApiError> {
    if store && state.artifacts.is_none() {
        return Err(no_storage("store"));
    }
    let used = UsedParameters::from(&params);
    let pngs = run_images(state, vec![params], id).await?;
    let image = encode::transcode_all(pngs, output)
        .await?
        .pop()
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no image"))?;
    let stored = if store {
        store_images(state, headers, id, std::slice::from_ref(&image), output)
            .await?
            .pop()
    } else {
        None
    };
    if wants_json(headers) {
        return Ok(axum::Json(Txt2ImgResponse {
            image: b64(&image),
            output_format: output.format.as_str().to_owned(),
            parameters: used,
            url: stored.as_ref().map(|s| s.url.clone()),
            expires_at: stored.as_ref().map(|s| s.expires_at),
        })
        .into_response());
    }
    let mut resp = Response::new(Body::from(image));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(output.format.media_type()),
    );
    if let Ok(v) = HeaderValue::from_str(&used.seed.to_string()) {
        h.insert("x-seed", v);
    }
    if let Some(s) = stored {
        if let Ok(v) = HeaderValue::from_str(&s.url) {
            h.insert("x-artifact-url", v);
        }
        h.insert("x-artifact-expires", HeaderValue::from(s.expires_at));
    }
    Ok(resp)
}

pub(crate) async fn images(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let Head { headers, id } = head(&req);
    let body = read_body(&state, req).await?;
    json_body(&headers)?;
    let limits = ready_limits(&state)?;
    let req: ImagesRequest = api::parse_json(&body)?;
    let params = req.resolve(limits, rand::random)?;
    let delivery = req.delivery()?;
    let output = req.output()?;
    openai_images(
        state,
        &headers,
        &id,
        params,
        delivery,
        output,
        GENERATION_EVENTS,
    )
    .await
}

/// `POST /v1/images/edits`: the OpenAI edit form.
pub(crate) async fn edits(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let Head { headers, id } = head(&req);
    let body = read_body(&state, req).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = multipart::boundary(content_type)?;
    let limits = ready_limits(&state)?.clone();
    let (params, delivery, output) = blocking(&state, move || {
        let parts = multipart::parse(&boundary, &body)?;
        let req = ImageEditRequest::from_form(&parts)?;
        drop(parts);
        let params = req.resolve(&limits, rand::random)?;
        Ok((params, req.delivery()?, req.output()?))
    })
    .await?;
    openai_images(state, &headers, &id, params, delivery, output, EDIT_EVENTS).await
}

/// Answers an OpenAI images request: streamed, inline or stored.
async fn openai_images(
    state: Arc<AppState>,
    headers: &HeaderMap,
    id: &str,
    params: Vec<GenParams>,
    delivery: Delivery,
    output: Output,
    events: StreamEvents,
) -> Result<Response, ApiError> {
    if delivery.format == ResponseFormat::Url && state.artifacts.is_none() {
        // Refused before any compute is spent.
        return Err(no_storage("response_format"));
    }
    if let Some(partials) = delivery.stream {
        return stream_image(
            state.clone(),
            params,
            id,
            Streamed {
                partials,
                events,
                output,
            },
        );
    }
    let seeds: Vec<u64> = params.iter().map(|p| p.seed).collect();
    let pngs = run_images(&state, params, id).await?;
    let images = encode::transcode_all(pngs, output).await?;
    let data = match delivery.format {
        ResponseFormat::B64Json => images
            .iter()
            .zip(seeds)
            .map(|(image, seed)| ImageData {
                b64_json: Some(b64(image)),
                url: None,
                expires_at: None,
                seed,
            })
            .collect(),
        ResponseFormat::Url => store_images(&state, headers, id, &images, output)
            .await?
            .into_iter()
            .zip(seeds)
            .map(|(stored, seed)| ImageData {
                b64_json: None,
                url: Some(stored.url),
                expires_at: Some(stored.expires_at),
                seed,
            })
            .collect(),
    };
    Ok(axum::Json(ImagesResponse {
        created: unix_now(),
        data,
        output_format: Some(output.format.as_str().to_owned()),
    })
    .into_response())
}

/// One server-sent event.
fn sse(event: &str, data: &impl serde::Serialize) -> Bytes {
    let json = serde_json::to_string(data).unwrap_or_else(|_| "{}".to_owned());
    Bytes::from(format!("event: {event}\ndata: {json}\n\n"))
}

/// How a streamed generation is sent: previews wanted, event names, image format.
#[derive(Debug, Clone, Copy)]
struct Streamed {
    partials: u32,
    events: StreamEvents,
    output: Output,
}

/// Where a streamed generation is.
enum Streaming {
    Running(Box<Running>),
    Done,
}

/// A streamed generation still running.
struct Running {
    state: Arc<AppState>,
    params: GenParams,
    how: Streamed,
    partials: tokio::sync::mpsc::UnboundedReceiver<Partial>,
    image: oneshot::Receiver<ImageResult>,
    deadline: Instant,
    expired: tokio::sync::watch::Receiver<bool>,
}

/// Answers a streamed generation: the image is queued now (a full queue is still a 429),
/// then the body sends each preview as it is made and the image last, or an `error` event.
/// The body owns the image's receivers: a client that goes away drops them, and the model
/// stops the image at its next step.
fn stream_image(
    state: Arc<AppState>,
    mut params: Vec<GenParams>,
    request_id: &str,
    how: Streamed,
) -> Result<Response, ApiError> {
    let one = params
        .pop()
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no image"))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let preview = PreviewRequest {
        count: how.partials,
        tx,
    };
    let (mut rxs, deadline) = submit_images(&state, vec![one.clone()], request_id, Some(preview))?;
    let image = rxs
        .pop()
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no image"))?;
    let expired = state.drain_expired.subscribe();
    let start = Streaming::Running(Box::new(Running {
        state,
        params: one,
        how,
        partials: rx,
        image,
        deadline,
        expired,
    }));
    let events = futures::stream::unfold(start, |phase| async move {
        let Streaming::Running(running) = phase else {
            return None;
        };
        let Running {
            state,
            params,
            how,
            mut partials,
            mut image,
            deadline,
            mut expired,
        } = *running;
        let event = |kind: &str, image: &[u8]| {
            ImageStreamEvent::new(
                kind,
                b64(image),
                how.output.format.as_str(),
                params.width,
                params.height,
                params.seed,
                unix_now(),
            )
        };
        let encoded = |png: Vec<u8>| async move {
            encode::transcode_all(vec![png], how.output)
                .await?
                .pop()
                .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no image"))
        };
        let error = |e: ApiError| sse("error", &e.body());
        enum Next {
            Partial(Partial),
            Image(
                Result<Result<ImageResult, oneshot::error::RecvError>, tokio::time::error::Elapsed>,
            ),
            Drained,
        }
        let next = tokio::select! {
            biased;
            Some(p) = partials.recv() => Next::Partial(p),
            r = tokio::time::timeout_at(deadline.into(), &mut image) => Next::Image(r),
            Ok(_) = expired.wait_for(|e| *e) => Next::Drained,
        };
        let bytes = match next {
            Next::Partial(p) => {
                state.metrics.partial_images.inc();
                let bytes = match encoded(p.png).await {
                    Ok(preview) => {
                        let mut e = event(how.events.partial, &preview);
                        e.partial_image_index = Some(p.index);
                        e.step = u32::try_from(p.step).ok();
                        e.steps = Some(params.sampled_steps());
                        sse(how.events.partial, &e)
                    }
                    // A preview is a courtesy: the image itself still comes.
                    Err(_) => Bytes::new(),
                };
                let running = Streaming::Running(Box::new(Running {
                    state,
                    params,
                    how,
                    partials,
                    image,
                    deadline,
                    expired,
                }));
                return Some((Ok::<_, std::convert::Infallible>(bytes), running));
            }
            Next::Image(r) => match image_result(&state, r) {
                Ok(png) => match encoded(png).await {
                    Ok(image) => sse(how.events.completed, &event(how.events.completed, &image)),
                    Err(e) => error(e),
                },
                Err(e) => error(e),
            },
            Next::Drained => error(cut_at_drain(&state)),
        };
        Some((Ok(bytes), Streaming::Done))
    });
    let mut resp = Response::new(Body::from_stream(events));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies that buffer (nginx) would hold the previews back.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// `GET /v1/artifacts/{name}?expires=…&signature=…`: a locally stored image on its signed URL.
pub(crate) async fn artifact(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let Some(store) = &state.local_artifacts else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "this server keeps no artifacts (it runs without --artifacts-dir)",
        )
        .into_response();
    };
    let uri = req.uri();
    let name = uri
        .path()
        .strip_prefix(artifacts::LOCAL_ROUTE)
        .and_then(|p| p.strip_prefix('/'))
        .unwrap_or("");
    let (mut expires, mut signature) = (None, None);
    for pair in uri.query().unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("expires", v)) => expires = v.parse::<u64>().ok(),
            Some(("signature", v)) => signature = Some(v),
            _ => {}
        }
    }
    match store.fetch(name, expires, signature, unix_now()) {
        Ok(image) => {
            let left = expires.unwrap_or(0).saturating_sub(unix_now());
            let mut resp = Response::new(Body::from(image));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(artifacts::media_type(name)),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("private, max-age={left}")) {
                h.insert(header::CACHE_CONTROL, v);
            }
            resp
        }
        Err(Refusal::BadSignature) => ApiError::new(
            StatusCode::FORBIDDEN,
            "the URL's signature does not match: use the URL exactly as the server gave it",
        )
        .into_response(),
        Err(Refusal::Expired) => ApiError::new(
            StatusCode::FORBIDDEN,
            "the URL expired; generate the image again (or ask for a longer \
             --artifacts-url-seconds)",
        )
        .into_response(),
        Err(Refusal::NotFound) => {
            ApiError::new(StatusCode::NOT_FOUND, "no such artifact").into_response()
        }
    }
}

/// `POST /sdapi/v1/txt2img`.
pub(crate) async fn sdapi_txt2img(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let Head { headers, id } = head(&req);
    let body = read_body(&state, req).await?;
    json_body(&headers)?;
    let limits = ready_limits(&state)?;
    let req: A1111Txt2ImgRequest = api::parse_json(&body)?;
    let (params, batch, iterations) = req.resolve(limits, rand::random)?;
    let output = req.output()?;
    let model = limits.model.clone();
    a1111_images(&state, &id, (params, batch, iterations), output, &model).await
}

/// `POST /sdapi/v1/img2img`.
pub(crate) async fn sdapi_img2img(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let Head { headers, id } = head(&req);
    let body = read_body(&state, req).await?;
    json_body(&headers)?;
    let limits = ready_limits(&state)?.clone();
    let req: A1111Img2ImgRequest = api::parse_json(&body)?;
    drop(body);
    let output = req.output()?;
    let model = limits.model.clone();
    let resolved = blocking(&state, move || req.resolve(&limits, rand::random)).await?;
    a1111_images(&state, &id, resolved, output, &model).await
}

/// Makes the images of an AUTOMATIC1111 request (`(images, batch_size, n_iter)`) and answers
/// them with their `info`.
async fn a1111_images(
    state: &AppState,
    id: &str,
    (params, batch, iterations): (Vec<GenParams>, u32, u32),
    output: Output,
    model: &api::ModelInfo,
) -> Result<Response, ApiError> {
    let pngs = run_images(state, params.clone(), id).await?;
    let images = encode::transcode_all(pngs, output).await?;
    let (parameters, info) = sdapi::describe(&params, batch, iterations, model);
    Ok(axum::Json(sdapi::A1111Txt2ImgResponse {
        images: images.iter().map(|p| b64(p)).collect(),
        parameters,
        info: serde_json::to_string(&info).unwrap_or_default(),
    })
    .into_response())
}

/// `GET /sdapi/v1/sd-models`.
pub(crate) async fn sdapi_models(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let limits = ready_limits(&state)?;
    Ok(axum::Json(sdapi::models(&limits.model)).into_response())
}

fn current_options(state: &AppState, limits: &Limits) -> A1111Options {
    let chosen = state.checkpoint.lock().ok().and_then(|c| c.clone());
    A1111Options {
        sd_model_checkpoint: chosen.unwrap_or_else(|| limits.model.id.clone()),
    }
}

/// `GET /sdapi/v1/options`.
pub(crate) async fn sdapi_options(
    State(state): State<Arc<AppState>>,
) -> Result<Response, ApiError> {
    let limits = ready_limits(&state)?;
    Ok(axum::Json(current_options(&state, limits)).into_response())
}

/// `POST /sdapi/v1/options`: the model name only. Every served name is the same model, so the
/// choice is the name `GET` reports, per server process.
pub(crate) async fn sdapi_set_options(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let Head { headers, .. } = head(&req);
    let body = read_body(&state, req).await?;
    json_body(&headers)?;
    let limits = ready_limits(&state)?;
    let update: A1111OptionsUpdate = api::parse_json(&body)?;
    if let Some(name) = &update.sd_model_checkpoint {
        sdapi::check_checkpoint(name, &limits.model, "sd_model_checkpoint")?;
        let served = limits
            .model
            .served_names
            .iter()
            .find(|n| n.eq_ignore_ascii_case(name.trim()))
            .cloned();
        if let Ok(mut c) = state.checkpoint.lock() {
            *c = served;
        }
    }
    Ok(axum::Json(current_options(&state, limits)).into_response())
}
