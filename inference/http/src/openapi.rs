//! The OpenAPI 3.1 document, its schemas generated from the request and response types, and
//! the self-contained playground page.

use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

use crate::api::{ErrorBody, ImagesRequest, ImagesResponse, Txt2ImgRequest, Txt2ImgResponse};

/// The playground page served at `/` (no external resources).
pub const PLAYGROUND: &str = include_str!("playground.html");

fn error_responses() -> Value {
    let err = json!({"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}});
    json!({
        "400": {"description": "Malformed body, wrong type or unknown field", "content": err},
        "401": {"description": "Missing or wrong bearer token", "content": err},
        "413": {"description": "Body too large", "content": err},
        "415": {"description": "Body is not JSON", "content": err},
        "422": {"description": "A field is out of range", "content": err},
        "429": {"description": "Queue full; see Retry-After", "content": err},
        "503": {"description": "Model loading or server shutting down", "content": err},
        "504": {"description": "Request deadline passed", "content": err},
    })
}

/// The OpenAPI document of the server.
pub fn document() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    let txt2img = generator.subschema_for::<Txt2ImgRequest>();
    let txt2img_resp = generator.subschema_for::<Txt2ImgResponse>();
    let images = generator.subschema_for::<ImagesRequest>();
    let images_resp = generator.subschema_for::<ImagesResponse>();
    generator.subschema_for::<ErrorBody>();
    let schemas = generator.take_definitions(true);
    let plain = |d: &str| json!({"200": {"description": d}});
    let mut txt2img_responses = error_responses();
    txt2img_responses["200"] = json!({
        "description": "The image (PNG), or JSON with `Accept: application/json`",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": txt2img_resp},
        }
    });
    let mut images_responses = error_responses();
    images_responses["200"] = json!({
        "description": "The images, base64",
        "content": {"application/json": {"schema": images_resp}}
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "sd35-server",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Stable Diffusion 3.5 text-to-image",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/txt2img": {"post": {
                "summary": "Generate one image",
                "security": [{"bearer": []}, {}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": txt2img}}},
                "responses": txt2img_responses,
            }},
            "/v1/images/generations": {"post": {
                "summary": "Generate images (OpenAI Images API shape)",
                "security": [{"bearer": []}, {}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": images}}},
                "responses": images_responses,
            }},
            "/v1/models": {"get": {"summary": "The served model, its defaults and limits", "responses": plain("Model list")}},
            "/healthz": {"get": {"summary": "Liveness", "responses": plain("Alive")}},
            "/readyz": {"get": {"summary": "Readiness: model loaded and warmed up", "responses": plain("Ready")}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": plain("Metrics")}},
        },
    })
}
