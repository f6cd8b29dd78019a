//! A streamed generation (`stream: true`): the image queued at once, then server-sent events —
//! each preview as it is made, the image last, or an `error` event.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use tokio::sync::oneshot;

use super::b64;
use super::queueing::{cut_at_drain, image_result, submit_images};
use crate::api::{ApiError, ImageStreamEvent, Output, StreamEvents};
use crate::backend::GenParams;
use crate::encode;
use crate::queue::{ImageResult, Partial, PreviewRequest};
use crate::state::AppState;
use crate::unix_now;

/// One server-sent event.
fn sse(event: &str, data: &impl serde::Serialize) -> Bytes {
    let json = serde_json::to_string(data).unwrap_or_else(|_| "{}".to_owned());
    Bytes::from(format!("event: {event}\ndata: {json}\n\n"))
}

/// How a streamed generation is sent: previews wanted, event names, image format.
#[derive(Debug, Clone, Copy)]
pub(super) struct Streamed {
    pub(super) partials: u32,
    pub(super) events: StreamEvents,
    pub(super) output: Output,
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
pub(super) fn stream_image(
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
