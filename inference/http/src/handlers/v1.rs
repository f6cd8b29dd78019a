//! `POST /v1/txt2img` and `POST /v1/img2img`: one image, answered as its bytes (the seed and a
//! stored copy's URL in headers) or as JSON with `Accept: application/json`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::artifact::{no_storage, store_images};
use super::queueing::run_images;
use super::{Media, accept, b64, read_validated};
use crate::api::{
    self, ApiError, Img2ImgRequest, Output, Txt2ImgRequest, Txt2ImgResponse, UsedParameters,
};
use crate::backend::GenParams;
use crate::encode;
use crate::state::AppState;

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"))
}

/// `POST /v1/txt2img`.
pub(crate) async fn txt2img(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (head, (params, store, output)) =
        read_validated(&state, req, Media::Json, |body, limits, headers| {
            let req: Txt2ImgRequest = api::parse_json(&body)?;
            let params = req.resolve(limits, rand::random)?;
            Ok((
                params,
                req.store == Some(true),
                req.output(accept(headers))?,
            ))
        })
        .await?;
    one_image(&state, &head.headers, &head.id, params, store, output).await
}

/// `POST /v1/img2img`: `/v1/txt2img`'s answer for an edit.
pub(crate) async fn img2img(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (head, (params, store, output)) =
        read_validated(&state, req, Media::Json, |body, limits, headers| {
            let req: Img2ImgRequest = api::parse_json(&body)?;
            drop(body);
            let output = req.output(accept(headers))?;
            let store = req.store == Some(true);
            Ok((req.resolve(limits, rand::random)?, store, output))
        })
        .await?;
    one_image(&state, &head.headers, &head.id, params, store, output).await
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
