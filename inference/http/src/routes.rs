//! The axum edge: one table of routes ([`ROUTES`]) that both the router and the OpenAPI
//! document are built from, request ids, auth, request metrics, and JSON for the answers axum
//! makes itself (404, 405).
//!
//! A route added to [`ROUTES`] is served, guarded by the token when it says so, and
//! documented with every status it lists; nothing else is needed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use tracing::Instrument;

use crate::api::{ApiError, EDIT_EVENTS, GENERATION_EVENTS, StreamEvents};
use crate::handlers;
use crate::metrics::RequestLabels;
use crate::state::{AppState, BodyLimit, RequestId};

/// What a 200 answer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// An image (PNG, JPEG or WebP, as asked), or with `Accept: application/json` the named
    /// JSON schema.
    ImageOrJson(&'static str),
    /// JSON of the named schema.
    Json(&'static str),
    /// A JSON array of the named schema.
    JsonList(&'static str),
    /// JSON of the first named schema, or with `stream: true` server-sent events whose data
    /// are the second, with these event names.
    JsonOrEvents(&'static str, &'static str, StreamEvents),
    /// A stored image (PNG, JPEG or WebP).
    Image,
    /// Any JSON object (the OpenAPI document itself).
    AnyJson,
    /// Plain text.
    Text,
    /// The Prometheus/OpenMetrics text exposition.
    Metrics,
    /// An HTML page.
    Html,
}

/// One route: how it is served and what the OpenAPI document says about it.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// `GET` or `POST`.
    pub method: &'static str,
    /// The path.
    pub path: &'static str,
    /// One line for the document.
    pub summary: &'static str,
    /// Whether the route needs the bearer token when tokens are configured.
    pub auth: bool,
    /// The schema of the request body, for routes that take one.
    pub request: Option<RequestBody>,
    /// Whether the body may carry images: it is held to `--max-upload-bytes` instead of
    /// `--max-body-bytes`.
    pub upload: bool,
    /// Required query parameters: name and JSON type (`integer`, `string`). Path parameters
    /// (`{name}`) are read from the path.
    pub query: &'static [(&'static str, &'static str)],
    /// What a 200 carries.
    pub ok: Body,
    /// Every other status the route can answer, each with the JSON error body.
    pub errors: &'static [u16],
    /// The handler.
    pub handler: fn() -> MethodRouter<Arc<AppState>>,
}

/// A request body: its media type and the name of its schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// `application/json`.
    Json(&'static str),
    /// `multipart/form-data`, the schema's properties its fields.
    Form(&'static str),
}

/// The statuses of a generation route (502: the image could not be stored).
const GENERATION_ERRORS: &[u16] = &[400, 401, 408, 413, 415, 422, 429, 500, 502, 503, 504];
/// The statuses of the OpenAI and AUTOMATIC1111 image routes: a generation route's plus 404
/// for a model name that is not served.
const IMAGES_ERRORS: &[u16] = &[400, 401, 404, 408, 413, 415, 422, 429, 500, 502, 503, 504];

/// Every route the server has.
pub const ROUTES: &[Route] = &[
    Route {
        method: "POST",
        path: "/v1/txt2img",
        summary: "Generate one image",
        auth: true,
        request: Some(RequestBody::Json("Txt2ImgRequest")),
        upload: true,
        query: &[],
        ok: Body::ImageOrJson("Txt2ImgResponse"),
        errors: GENERATION_ERRORS,
        handler: || post(handlers::txt2img),
    },
    Route {
        method: "POST",
        path: "/v1/img2img",
        summary: "Edit one image: img2img, or inpainting with a mask",
        auth: true,
        request: Some(RequestBody::Json("Img2ImgRequest")),
        upload: true,
        query: &[],
        ok: Body::ImageOrJson("Txt2ImgResponse"),
        errors: GENERATION_ERRORS,
        handler: || post(handlers::img2img),
    },
    Route {
        method: "POST",
        path: "/v1/images/generations",
        summary: "Generate images (OpenAI Images API shape)",
        auth: true,
        request: Some(RequestBody::Json("ImagesRequest")),
        upload: true,
        query: &[],
        ok: Body::JsonOrEvents("ImagesResponse", "ImageStreamEvent", GENERATION_EVENTS),
        errors: IMAGES_ERRORS,
        handler: || post(handlers::images),
    },
    Route {
        method: "POST",
        path: "/v1/images/edits",
        summary: "Edit an image, with a mask to inpaint (OpenAI Images API shape)",
        auth: true,
        request: Some(RequestBody::Form("ImageEditRequest")),
        upload: true,
        query: &[],
        ok: Body::JsonOrEvents("ImagesResponse", "ImageStreamEvent", EDIT_EVENTS),
        errors: IMAGES_ERRORS,
        handler: || post(handlers::edits),
    },
    Route {
        method: "GET",
        path: "/v1/artifacts/{name}",
        summary: "A stored image, on the signed URL a generation answered with (local storage)",
        auth: false,
        request: None,
        upload: false,
        query: &[("expires", "integer"), ("signature", "string")],
        ok: Body::Image,
        errors: &[403, 404],
        handler: || get(handlers::artifact),
    },
    Route {
        method: "POST",
        path: "/sdapi/v1/txt2img",
        summary: "Generate images (AUTOMATIC1111 web API shape)",
        auth: true,
        request: Some(RequestBody::Json("A1111Txt2ImgRequest")),
        upload: false,
        query: &[],
        ok: Body::Json("A1111Txt2ImgResponse"),
        errors: IMAGES_ERRORS,
        handler: || post(handlers::sdapi_txt2img),
    },
    Route {
        method: "POST",
        path: "/sdapi/v1/img2img",
        summary: "Edit images, with a mask to inpaint (AUTOMATIC1111 web API shape)",
        auth: true,
        request: Some(RequestBody::Json("A1111Img2ImgRequest")),
        upload: true,
        query: &[],
        ok: Body::Json("A1111Txt2ImgResponse"),
        errors: IMAGES_ERRORS,
        handler: || post(handlers::sdapi_img2img),
    },
    Route {
        method: "GET",
        path: "/sdapi/v1/sd-models",
        summary: "The served model under each served name (AUTOMATIC1111 shape)",
        auth: true,
        request: None,
        upload: false,
        query: &[],
        ok: Body::JsonList("A1111Model"),
        errors: &[401, 503],
        handler: || get(handlers::sdapi_models),
    },
    Route {
        method: "GET",
        path: "/sdapi/v1/loras",
        summary: "The LoRA adapters a prompt may name as <lora:NAME:WEIGHT> (AUTOMATIC1111 shape)",
        auth: true,
        request: None,
        upload: false,
        query: &[],
        ok: Body::JsonList("A1111Lora"),
        errors: &[401, 503],
        handler: || get(handlers::sdapi_loras),
    },
    Route {
        method: "GET",
        path: "/sdapi/v1/options",
        summary: "The model name (the only AUTOMATIC1111 option here)",
        auth: true,
        request: None,
        upload: false,
        query: &[],
        ok: Body::Json("A1111Options"),
        errors: &[401, 503],
        handler: || get(handlers::sdapi_options),
    },
    Route {
        method: "POST",
        path: "/sdapi/v1/options",
        summary: "Choose the model name (one of the served names)",
        auth: true,
        request: Some(RequestBody::Json("A1111OptionsUpdate")),
        upload: false,
        query: &[],
        ok: Body::Json("A1111Options"),
        errors: &[400, 401, 404, 408, 413, 415, 503],
        handler: || post(handlers::sdapi_set_options),
    },
    Route {
        method: "GET",
        path: "/v1/models",
        summary: "The served model under each served name, its defaults and limits",
        auth: true,
        request: None,
        upload: false,
        query: &[],
        ok: Body::Json("ModelList"),
        errors: &[401, 503],
        handler: || get(handlers::models),
    },
    Route {
        method: "GET",
        path: "/healthz",
        summary: "Liveness",
        auth: false,
        request: None,
        upload: false,
        query: &[],
        ok: Body::Text,
        errors: &[],
        handler: || get(|| async { "ok" }),
    },
    Route {
        method: "GET",
        path: "/readyz",
        summary: "Readiness: model loaded and warmed up, not shutting down",
        auth: false,
        request: None,
        upload: false,
        query: &[],
        ok: Body::Text,
        errors: &[503],
        handler: || get(handlers::readyz),
    },
    Route {
        method: "GET",
        path: "/metrics",
        summary: "Prometheus metrics",
        auth: false,
        request: None,
        upload: false,
        query: &[],
        ok: Body::Metrics,
        errors: &[],
        handler: || get(handlers::metrics),
    },
    Route {
        method: "GET",
        path: "/openapi.json",
        summary: "This document",
        auth: false,
        request: None,
        upload: false,
        query: &[],
        ok: Body::AnyJson,
        errors: &[],
        handler: || get(handlers::openapi),
    },
    Route {
        method: "GET",
        path: "/",
        summary: "The playground page",
        auth: false,
        request: None,
        upload: false,
        query: &[],
        ok: Body::Html,
        errors: &[],
        handler: || get(handlers::playground),
    },
];

/// What each error status means, for the document.
pub fn status_description(status: u16) -> &'static str {
    match status {
        400 => {
            "Malformed body: not one JSON object or form, a wrong type or an unknown field; an \
             upload that is not an image, or is truncated or damaged (the field is named)"
        }
        401 => "Missing or wrong bearer token",
        403 => "The artifact URL's signature is wrong or it expired",
        404 => {
            "Not found: a model name that is not served (the message lists the served names), or an artifact that does not exist"
        }
        408 => "The body did not arrive in time (--body-read-timeout-seconds)",
        413 => "Body too large (--max-body-bytes; --max-upload-bytes for routes that take images)",
        415 => {
            "The body is not sent as the route's media type (application/json, or \
             multipart/form-data), or an upload is an image format other than PNG, JPEG or WebP"
        }
        422 => {
            "A field is out of range (the field is named): an image claiming more pixels than \
             are decoded, a mask of another size than its image, a strength outside (0, 1], an \
             adapter or a ControlNet mode that is not served (the message lists the served \
             ones)"
        }
        429 => "Queue full; retry after Retry-After seconds",
        500 => "The model failed on this request",
        502 => {
            "The images were made but could not be stored (the message names the bucket or directory)"
        }
        503 => "Model loading, or the server is shutting down",
        504 => "The request deadline passed (--request-timeout-seconds)",
        _ => "Error",
    }
}

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
    let path = req.uri().path().to_owned();
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id, %method, %route);
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
        resp = method_not_allowed(&method, &path, &route, resp);
    }
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

/// axum answers a wrong method with an empty 405; give it the JSON error body every other
/// error has, keeping the `Allow` header (from the route table when axum set none).
fn method_not_allowed(method: &Method, path: &str, route: &str, resp: Response) -> Response {
    let allow = resp
        .headers()
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let methods: Vec<&str> = ROUTES
                .iter()
                .filter(|r| r.path == route)
                .map(|r| r.method)
                .collect();
            methods.join(",")
        });
    let mut out = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{path} does not take {method}; it takes {allow}"),
    )
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&allow) {
        out.headers_mut().insert(header::ALLOW, v);
    }
    out
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

/// The router: every route of [`ROUTES`], the token on those that need it, and the layers.
pub fn router(state: Arc<AppState>) -> Router {
    let mut router = Router::new();
    for r in ROUTES {
        let mut methods = (r.handler)();
        if r.upload {
            // Inside the router's own limit, so this one is the limit the body is read with.
            methods = methods.layer(DefaultBodyLimit::max(state.max_upload_bytes));
            methods = methods.layer(axum::Extension(BodyLimit {
                bytes: state.max_upload_bytes,
                flag: "--max-upload-bytes",
            }));
        }
        if r.auth {
            methods =
                methods.route_layer(middleware::from_fn_with_state(state.clone(), require_token));
        }
        router = router.route(r.path, methods);
    }
    router
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}
