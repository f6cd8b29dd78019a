//! Handing a request's images to the model queue and waiting for them: the request's deadline,
//! the drain deadline (a 503 then), and the queue's refusals as the client's errors.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::http::StatusCode;
use tokio::sync::oneshot;

use crate::api::ApiError;
use crate::backend::GenParams;
use crate::queue::{ImageResult, PreviewRequest, QueueError, retry_after};
use crate::state::AppState;

/// The 503 of a request still unanswered when the drain deadline passed.
pub(super) fn cut_at_drain(state: &AppState) -> ApiError {
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
pub(super) fn submit_images(
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
pub(super) fn image_result(
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
pub(super) async fn run_images(
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
