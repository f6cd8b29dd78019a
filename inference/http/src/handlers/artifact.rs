//! Stored images: storing a request's images (a 502 naming the store when it fails), and
//! serving a locally stored one on its signed URL.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::api::{ApiError, Output};
use crate::artifacts::{self, Refusal, Stored};
use crate::state::AppState;
use crate::unix_now;

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
pub(super) fn no_storage(field: &str) -> ApiError {
    ApiError::invalid(
        field,
        "this server stores no images: it runs without --artifacts-dir or \
         --artifacts-s3-bucket (spec.server.artifacts); ask for the image inline",
    )
}

/// Stores the PNGs of one request; a failure is a 502 naming the bucket or directory, logged
/// and counted (the images were made: the client is told, not left with a partial answer).
pub(super) async fn store_images(
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
