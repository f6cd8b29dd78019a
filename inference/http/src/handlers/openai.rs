//! The OpenAI Images API routes: `POST /v1/images/generations` and the `POST /v1/images/edits`
//! form, answered inline, as stored URLs, or streamed ([`super::stream`]).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

use super::artifact::{no_storage, store_images};
use super::queueing::run_images;
use super::stream::{Streamed, stream_image};
use super::{Head, Media, b64, content_type, read_validated};
use crate::api::{
    self, ApiError, Delivery, EDIT_EVENTS, GENERATION_EVENTS, ImageData, ImageEditRequest,
    ImagesRequest, ImagesResponse, Output, ResponseFormat, StreamEvents, multipart,
};
use crate::backend::GenParams;
use crate::encode;
use crate::state::AppState;
use crate::unix_now;

/// `POST /v1/images/generations`.
pub(crate) async fn images(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (head, validated) = read_validated(&state, req, Media::Json, |body, limits, _| {
        let req: ImagesRequest = api::parse_json(&body)?;
        let params = req.resolve(limits, rand::random)?;
        Ok((params, req.delivery()?, req.output()?))
    })
    .await?;
    openai_images(state, &head, validated, GENERATION_EVENTS).await
}

/// `POST /v1/images/edits`: the OpenAI edit form.
pub(crate) async fn edits(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (head, validated) = read_validated(&state, req, Media::Form, |body, limits, headers| {
        let boundary = multipart::boundary(content_type(headers))?;
        let parts = multipart::parse(&boundary, &body)?;
        let req = ImageEditRequest::from_form(&parts)?;
        drop(parts);
        let params = req.resolve(limits, rand::random)?;
        Ok((params, req.delivery()?, req.output()?))
    })
    .await?;
    openai_images(state, &head, validated, EDIT_EVENTS).await
}

/// Answers an OpenAI images request (its images, how they are delivered and in which format):
/// streamed, inline or stored.
async fn openai_images(
    state: Arc<AppState>,
    head: &Head,
    (params, delivery, output): (Vec<GenParams>, Delivery, Output),
    events: StreamEvents,
) -> Result<Response, ApiError> {
    let (headers, id) = (&head.headers, head.id.as_str());
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
