//! The AUTOMATIC1111 routes (`/sdapi/v1/...`): `txt2img`, `img2img`, `sd-models`, `loras` and
//! `options`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

use super::queueing::run_images;
use super::{Media, b64, read_validated, ready_limits};
use crate::api::sdapi::{
    self, A1111Img2ImgRequest, A1111Options, A1111OptionsUpdate, A1111Txt2ImgRequest,
};
use crate::api::{self, ApiError, Limits, Output};
use crate::backend::GenParams;
use crate::encode;
use crate::state::AppState;

/// `POST /sdapi/v1/txt2img`.
pub(crate) async fn sdapi_txt2img(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (head, (resolved, output, prompt)) =
        read_validated(&state, req, Media::Json, |body, limits, _| {
            let req: A1111Txt2ImgRequest = api::parse_json(&body)?;
            let resolved = req.resolve(limits, rand::random)?;
            Ok((resolved, req.output()?, req.prompt))
        })
        .await?;
    a1111_images(&state, &head.id, resolved, output, &prompt).await
}

/// `POST /sdapi/v1/img2img`.
pub(crate) async fn sdapi_img2img(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (head, (resolved, output, prompt)) =
        read_validated(&state, req, Media::Json, |body, limits, _| {
            let req: A1111Img2ImgRequest = api::parse_json(&body)?;
            drop(body);
            let output = req.output()?;
            let resolved = req.resolve(limits, rand::random)?;
            Ok((resolved, output, req.prompt))
        })
        .await?;
    a1111_images(&state, &head.id, resolved, output, &prompt).await
}

/// Makes the images of an AUTOMATIC1111 request (`(images, batch_size, n_iter)`) and answers
/// them with their `info` (the prompt as the request sent it, its `<lora:…>` tags kept).
async fn a1111_images(
    state: &AppState,
    id: &str,
    (params, batch, iterations): (Vec<GenParams>, u32, u32),
    output: Output,
    prompt: &str,
) -> Result<Response, ApiError> {
    let pngs = run_images(state, params.clone(), id).await?;
    let images = encode::transcode_all(pngs, output).await?;
    let model = &ready_limits(state)?.model;
    let (parameters, info) = sdapi::describe(&params, batch, iterations, model, prompt);
    Ok(axum::Json(sdapi::A1111Txt2ImgResponse {
        images: images.iter().map(|p| b64(p)).collect(),
        parameters,
        info: serde_json::to_string(&info).unwrap_or_default(),
    })
    .into_response())
}

/// `GET /sdapi/v1/loras`: the served LoRA adapters, in AUTOMATIC1111's shape.
pub(crate) async fn sdapi_loras(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let limits = ready_limits(&state)?;
    Ok(axum::Json(sdapi::loras(&limits.model)).into_response())
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
    let (_, update) = read_validated(&state, req, Media::Json, |body, _, _| {
        api::parse_json::<A1111OptionsUpdate>(&body)
    })
    .await?;
    let limits = ready_limits(&state)?;
    if let Some(name) = &update.sd_model_checkpoint {
        sdapi::check_checkpoint(name, &limits.model, "sd_model_checkpoint")?;
        let served = limits
            .model
            .served
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
