//! The axum edge: routes, the error→status table, request ids, auth and request metrics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use tracing::Instrument;

use crate::api::{
    self, ApiError, ImageData, ImagesRequest, ImagesResponse, Limits, Txt2ImgRequest,
    Txt2ImgResponse, UsedParameters,
};
use crate::auth::Tokens;
use crate::backend::GenParams;
use crate::metrics::{Metrics, RequestLabels};
use crate::queue::{Queue, QueueError, retry_after};

/// Shared state of the handlers.
#[derive(Debug)]
pub struct AppState {
    /// The model queue.
    pub queue: Queue,
    /// Set once the model is loaded and warmed up.
    pub limits: OnceLock<Limits>,
    /// Set when shutdown began: readiness fails and new work is refused.
    pub draining: AtomicBool,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Accepted bearer tokens.
    pub tokens: Tokens,
    /// Per-request deadline.
    pub request_timeout: Duration,
    /// Images per batch at most.
    pub max_batch_size: usize,
    /// Log prompts.
    pub log_prompts: bool,
    /// Largest body.
    pub max_body_bytes: usize,
    /// When the server started, in Unix seconds (the models' `created`).
    pub started_unix: u64,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// The request id of the current request, put in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn new_request_id() -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let salt: u32 = rand::random();
    format!("{salt:08x}-{n:06}")
}

fn incoming_request_id(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("x-request-id")?.to_str().ok()?;
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then(|| v.to_owned())
}

/// Gives every request an id (kept from `X-Request-Id` when sane), a span carrying it,
/// the id on the response, a completion log line and the request counter.
async fn observe(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let id = incoming_request_id(req.headers()).unwrap_or_else(new_request_id);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().clone();
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id, %method, %route);
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status();
    span.in_scope(|| {
        tracing::info!(
            status = status.as_u16(),
            seconds = started.elapsed().as_secs_f64(),
            "request done"
        );
    });
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            status: status.as_u16(),
        })
        .inc();
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn require_token(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.tokens.enabled() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        if !state.tokens.accepts(given) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "a valid `Authorization: Bearer <token>` header is required",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// The router with every route and layer.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/txt2img", post(txt2img))
        .route("/v1/images/generations", post(images))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(api)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/", get(|| async { Html(crate::openapi::PLAYGROUND) }))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if state.limits.get().is_none() {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is loading").into_response()
    } else {
        "ready".into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
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

async fn openapi() -> Response {
    axum::Json(crate::openapi::document()).into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let limits = ready_limits(&state)?;
    let m = &limits.model;
    let describe = |id: &str| {
        serde_json::json!({
            "id": id,
            "object": "model",
            "created": state.started_unix,
            "owned_by": "sd35",
            "root": m.id,
            "served_names": m.served_names,
            "variant": m.variant,
            "variant_source": m.variant_source,
            "precision": m.precision,
            "device": m.device,
            "gpu_name": m.gpu_name,
            "engine_key": m.engine_key,
            "cache_key": m.cache_key,
            "t5_loaded": m.t5_loaded,
            "defaults": {
                "steps": limits.defaults.steps,
                "guidance_scale": limits.defaults.guidance_scale,
                "width": limits.defaults.width,
                "height": limits.defaults.height,
                "classifier_free_guidance": limits.defaults.guidance_scale > 1.0,
                "skip_layer_guidance": m.skip_layer_guidance,
            },
            "warnings": m.warnings,
            "limits": {
                "max_size": m.max_size,
                "size_multiple": api::SIZE_MULTIPLE,
                "max_steps": limits.max_steps,
                "max_guidance_scale": api::MAX_GUIDANCE,
                "max_prompt_bytes": limits.max_prompt_bytes,
                "max_images_per_request": api::MAX_IMAGES_PER_REQUEST,
                "max_batch_size": state.max_batch_size,
                "max_body_bytes": state.max_body_bytes,
            },
        })
    };
    let data: Vec<serde_json::Value> = m.served_names.iter().map(|n| describe(n)).collect();
    Ok(axum::Json(serde_json::json!({"object": "list", "data": data})).into_response())
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

fn body_bytes(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the body is larger than the server accepts (see --max-body-bytes)".to_owned()
        } else {
            e.body_text()
        };
        ApiError::new(status, message)
    })
}

/// Queues the images and waits for all of them within the request's deadline.
async fn run_images(
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

async fn txt2img(
    State(state): State<Arc<AppState>>,
    axum::Extension(RequestId(id)): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
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

async fn images(
    State(state): State<Arc<AppState>>,
    axum::Extension(RequestId(id)): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
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
