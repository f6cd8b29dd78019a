//! The route handlers: read the body within its deadline and limit, validate it (off the
//! async threads: a body may carry images to decode), queue, wait for the images within the
//! request's deadline (or until the drain deadline), store them when asked, answer — as one
//! body, or as server-sent events while the images are sampled.
//!
//! Every handler that takes a body opens with [`read_validated`]; the routes' families are in
//! [`v1`] (`/v1/txt2img`, `/v1/img2img`), [`openai`] (with [`stream`]), [`sdapi`]
//! (AUTOMATIC1111) and [`artifact`] (stored images); [`queueing`] hands images to the model.

mod artifact;
mod openai;
mod queueing;
mod sdapi;
mod stream;
mod v1;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine as _;

pub(crate) use artifact::artifact;
pub(crate) use openai::{edits, images};
pub(crate) use sdapi::{
    sdapi_img2img, sdapi_loras, sdapi_models, sdapi_options, sdapi_set_options, sdapi_txt2img,
};
pub(crate) use v1::{img2img, txt2img};

use crate::api::{self, ApiError, Limits, multipart};
use crate::state::{AppState, BodyLimit, RequestId};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
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

/// The OpenAPI document, with the loaded model's bounds (before loading: the bounds known
/// without it).
pub(crate) async fn openapi(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(state.openapi()).into_response()
}

/// The playground page: a form for every generation and editing route, in one HTML file.
pub(crate) async fn playground() -> Html<&'static str> {
    Html(include_str!("../playground.html"))
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

/// How a route's body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Media {
    /// `application/json`.
    Json,
    /// `multipart/form-data` with a boundary.
    Form,
}

/// The opening every handler that takes a body shares: the head kept, the body read within
/// its deadline and limit, its media type checked, the model ready; then `validate` (parsing
/// and validation against the loaded model's limits, with the request's headers) runs on a
/// blocking thread once a decoding slot is free.
async fn read_validated<T: Send + 'static>(
    state: &AppState,
    req: Request,
    media: Media,
    validate: impl FnOnce(Bytes, &Limits, &HeaderMap) -> Result<T, ApiError> + Send + 'static,
) -> Result<(Head, T), ApiError> {
    let head = head(&req);
    let body = read_body(state, req).await?;
    match media {
        Media::Json => json_body(&head.headers)?,
        Media::Form => drop(multipart::boundary(content_type(&head.headers))?),
    }
    let limits = ready_limits(state)?.clone();
    let headers = head.headers.clone();
    let value = blocking(state, move || validate(body, &limits, &headers)).await?;
    Ok((head, value))
}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn accept(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok())
}
