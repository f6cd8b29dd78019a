//! The route handlers: read the body within its deadline, validate, queue, wait for the
//! images within the request's deadline (or until the drain deadline), answer.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine as _;

use crate::api::{
    self, ApiError, Bounds, ImageData, ImagesRequest, ImagesResponse, Limits, Txt2ImgRequest,
    Txt2ImgResponse, UsedParameters,
};
use crate::backend::GenParams;
use crate::queue::{QueueError, retry_after};
use crate::routes::{AppState, RequestId};

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
/// byte by byte is cut off, not waited for) and `--max-body-bytes`.
async fn read_body(state: &AppState, req: Request) -> Result<Bytes, ApiError> {
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
                "the body is larger than the server accepts (see --max-body-bytes)".to_owned()
            } else {
                e.body_text()
            };
            Err(ApiError::new(status, message))
        }
    }
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
        Ok(_) = expired.wait_for(|e| *e) => {
            state.cut_at_drain.fetch_add(1, Ordering::SeqCst);
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server shut down before this request finished (--drain-seconds ran out); \
                 send it again",
            )
            .retry_after(1))
        }
    }
}

async fn wait_images(
    state: &AppState,
    images: Vec<GenParams>,
    request_id: &str,
) -> Result<Vec<Vec<u8>>, ApiError> {
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
    let steps = images.first().map_or(1, |p| p.steps);
    let rxs = state
        .queue
        .submit(images, deadline, request_id)
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
    let mut out = Vec::with_capacity(rxs.len());
    for rx in rxs {
        let result = tokio::time::timeout_at(deadline.into(), rx).await;
        let png = match result {
            Err(_) | Ok(Ok(Err(QueueError::Timeout))) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the request did not finish within {} s",
                        state.request_timeout.as_secs()
                    ),
                ));
            }
            Ok(Ok(Ok(png))) => png,
            Ok(Ok(Err(QueueError::Failed(msg)))) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg));
            }
            Ok(Ok(Err(_)) | Err(_)) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the model stopped before finishing the request",
                ));
            }
        };
        out.push(png);
    }
    Ok(out)
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"))
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
    let used = UsedParameters::from(&params);
    let png = run_images(&state, vec![params], &id)
        .await?
        .pop()
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no image"))?;
    if wants_json(&headers) {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        return Ok(axum::Json(Txt2ImgResponse {
            image: b64,
            parameters: used,
        })
        .into_response());
    }
    let mut resp = Response::new(Body::from(png));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    if let Ok(v) = HeaderValue::from_str(&used.seed.to_string()) {
        h.insert("x-seed", v);
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
    let seeds: Vec<u64> = params.iter().map(|p| p.seed).collect();
    let pngs = run_images(&state, params, &id).await?;
    let created = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let data = pngs
        .iter()
        .zip(seeds)
        .map(|(png, seed)| ImageData {
            b64_json: base64::engine::general_purpose::STANDARD.encode(png),
            seed,
        })
        .collect();
    Ok(axum::Json(ImagesResponse { created, data }).into_response())
}
