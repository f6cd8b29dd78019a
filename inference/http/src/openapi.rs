//! The OpenAPI 3.1 document — the contract: its paths and statuses come from the route table
//! ([`crate::routes::ROUTES`]) the router is built from, its schemas and their bounds from
//! `sd35-api` (the values validation enforces) — and the self-contained playground page.

use serde_json::{Map, Value, json};

use crate::api::Bounds;
use crate::api::schema::{components, reference};
use crate::routes::{Body, ROUTES, RequestBody, Route, status_description};

/// A binary image body.
fn binary() -> Value {
    json!({"schema": {"type": "string", "format": "binary"}})
}

fn ok_response(body: Body) -> Value {
    let (description, content) = match body {
        Body::ImageOrJson(schema) => (
            "The image — PNG, JPEG or WebP as `output_format` (else the `Accept` header) asks — \
             or JSON with `Accept: application/json`",
            json!({
                "image/png": binary(),
                "image/jpeg": binary(),
                "image/webp": binary(),
                "application/json": {"schema": reference(schema)},
            }),
        ),
        Body::Json(schema) => (
            "OK",
            json!({"application/json": {"schema": reference(schema)}}),
        ),
        Body::JsonList(schema) => (
            "OK",
            json!({"application/json": {"schema": {"type": "array", "items": reference(schema)}}}),
        ),
        Body::JsonOrEvents(schema, event, names) => (
            match names.partial {
                crate::api::PARTIAL_IMAGE_EVENT => {
                    "The images as JSON; with `stream: true`, server-sent events (`event: \
                     <type>`, `data: <ImageStreamEvent>`): `image_generation.partial_image` \
                     previews, then `image_generation.completed` (or `error` with an ErrorBody)"
                }
                _ => {
                    "The images as JSON; with `stream: true`, server-sent events (`event: \
                     <type>`, `data: <ImageStreamEvent>`): `image_edit.partial_image` \
                     previews, then `image_edit.completed` (or `error` with an ErrorBody)"
                }
            },
            json!({
                "application/json": {"schema": reference(schema)},
                // OpenAPI 3.1 reads the schema of an event stream as the schema of each event:
                // its `event` name and `data`, a JSON text of the event's body.
                "text/event-stream": {"schema": stream_event(event, names)},
            }),
        ),
        Body::Image => (
            "The stored image (PNG, JPEG or WebP, as it was asked for)",
            json!({
                "image/png": binary(),
                "image/jpeg": binary(),
                "image/webp": binary(),
            }),
        ),
        Body::AnyJson => (
            "OK",
            json!({"application/json": {"schema": {"type": "object"}}}),
        ),
        Body::Text => ("OK", json!({"text/plain": {"schema": {"type": "string"}}})),
        Body::Metrics => (
            "Prometheus text exposition",
            json!({"application/openmetrics-text": {"schema": {"type": "string"}}}),
        ),
        Body::Html => ("OK", json!({"text/html": {"schema": {"type": "string"}}})),
    };
    json!({"description": description, "content": content})
}

/// One server-sent event of a streamed generation: previews and the image carry `event`
/// (an `ImageStreamEvent`), a failure after the stream began an `ErrorBody`.
fn stream_event(event: &str, names: crate::api::StreamEvents) -> Value {
    let one = |names: Value, body: Value| {
        json!({
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"enum": names},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": body,
                },
            },
            "additionalProperties": false,
        })
    };
    json!({"oneOf": [
        one(json!([names.partial, names.completed]), reference(event)),
        one(json!(["error"]), reference("ErrorBody")),
    ]})
}

fn error_response(status: u16) -> Value {
    let mut r = json!({
        "description": status_description(status),
        "content": {"application/json": {"schema": reference("ErrorBody")}},
    });
    let seconds = json!({"schema": {"type": "integer", "minimum": 1}});
    match status {
        429 => r["headers"] = json!({"Retry-After": seconds}),
        503 => {
            r["headers"] = json!({"Retry-After": {
                "description": "Seconds to wait, when the server knows",
                "schema": {"type": "integer", "minimum": 1},
            }})
        }
        401 => {
            r["headers"] =
                json!({"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}})
        }
        _ => {}
    }
    r
}

/// The path parameters (`{name}`) and the route's query parameters.
fn parameters(route: &Route) -> Vec<Value> {
    let mut out: Vec<Value> = route
        .path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| {
            json!({
                "name": name, "in": "path", "required": true,
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]*$"},
            })
        })
        .collect();
    for (name, kind) in route.query {
        let schema = match *kind {
            "integer" => json!({"type": "integer", "minimum": 0}),
            _ => json!({"type": "string"}),
        };
        out.push(json!({"name": name, "in": "query", "required": true, "schema": schema}));
    }
    out
}

fn operation(route: &Route) -> Value {
    let mut responses = Map::new();
    responses.insert("200".into(), ok_response(route.ok));
    for &status in route.errors {
        responses.insert(status.to_string(), error_response(status));
    }
    let mut op = json!({"summary": route.summary, "responses": responses});
    let params = parameters(route);
    if !params.is_empty() {
        op["parameters"] = Value::Array(params);
    }
    match route.request {
        Some(RequestBody::Json(schema)) => {
            let mut content = json!({"schema": reference(schema)});
            if let Some(example) = example(schema) {
                content["example"] = example;
            }
            op["requestBody"] = json!({
                "required": true,
                "content": {"application/json": content},
            });
        }
        Some(RequestBody::Form(schema)) => {
            op["requestBody"] = json!({
                "required": true,
                "content": {"multipart/form-data": {
                    "schema": reference(schema),
                    "encoding": {
                        "image": {"contentType": "image/png, image/jpeg, image/webp"},
                        "mask": {"contentType": "image/png"},
                    },
                }},
            });
        }
        None => {}
    }
    if route.auth {
        // Bearer token when the server has tokens, nothing when it has none.
        op["security"] = json!([{"bearer": []}, {}]);
    }
    op
}

/// A body that works, for the routes whose bodies a schema cannot describe well enough to
/// generate one (an image in base64 must decode).
fn example(schema: &str) -> Option<Value> {
    static PNG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let png = PNG.get_or_init(|| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(crate::sample_images::png(16, 16))
    });
    match schema {
        "Img2ImgRequest" => Some(json!({"prompt": "a lighthouse", "image": png})),
        "A1111Img2ImgRequest" => Some(json!({"prompt": "a lighthouse", "init_images": [png]})),
        _ => None,
    }
}

/// The OpenAPI document of the server with `bounds` (the loaded model's, or those known
/// before it is loaded).
pub fn document(bounds: &Bounds) -> Value {
    let mut paths = Map::new();
    for r in ROUTES {
        let entry = paths.entry(r.path.to_owned()).or_insert_with(|| json!({}));
        entry[r.method.to_ascii_lowercase()] = operation(r);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "sd35-server",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Stable Diffusion 3.5 text-to-image and image editing (img2img, \
                inpainting). Every error answers `{\"error\": {\"message\", \"field\"}}`; a \
                wrong method gets 405 with `Allow`.",
        },
        "components": {
            "schemas": components(bounds),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_with_its_statuses() {
        let doc = document(&Bounds::for_model(256, 100, 4096));
        for r in ROUTES {
            let op = &doc["paths"][r.path][r.method.to_ascii_lowercase()];
            assert!(op.is_object(), "{} {}", r.method, r.path);
            for s in r.errors {
                assert!(op["responses"][s.to_string()].is_object(), "{} {s}", r.path);
            }
        }
        let images = &doc["paths"]["/v1/images/generations"]["post"]["responses"];
        assert!(images["404"].is_object() && images["502"].is_object());
        let events = &images["200"]["content"]["text/event-stream"]["schema"]["oneOf"];
        assert_eq!(
            events[0]["properties"]["event"]["enum"],
            json!([
                "image_generation.partial_image",
                "image_generation.completed"
            ])
        );
        assert_eq!(
            events[0]["properties"]["data"]["contentSchema"],
            reference("ImageStreamEvent")
        );
        assert_eq!(events[1]["properties"]["event"]["enum"], json!(["error"]));
        let artifact = &doc["paths"]["/v1/artifacts/{name}"]["get"];
        let names: Vec<&str> = artifact["parameters"]
            .as_array()
            .map(|p| p.iter().filter_map(|v| v["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(names, ["name", "expires", "signature"]);
        assert!(
            artifact.get("security").is_none(),
            "the signature is the credential"
        );
        let loras = &doc["paths"]["/sdapi/v1/loras"]["get"]["responses"]["200"];
        assert_eq!(
            loras["content"]["application/json"]["schema"]["items"],
            reference("A1111Lora")
        );
        let options = &doc["paths"]["/sdapi/v1/options"];
        assert!(options["get"].is_object() && options["post"].is_object());
        let w = &doc["components"]["schemas"]["Txt2ImgRequest"]["properties"]["width"];
        assert_eq!((&w["maximum"], &w["multipleOf"]), (&json!(256), &json!(16)));
        // The edit routes: a form with a binary image, JSON with base64, their own events.
        let edits = &doc["paths"]["/v1/images/edits"]["post"];
        let form = &edits["requestBody"]["content"]["multipart/form-data"];
        assert_eq!(form["schema"], reference("ImageEditRequest"));
        let fields = &doc["components"]["schemas"]["ImageEditRequest"];
        assert_eq!(fields["properties"]["image"]["format"], "binary");
        assert_eq!(fields["properties"]["n"]["type"], "integer");
        let required = fields["required"].as_array().cloned().unwrap_or_default();
        assert!(required.contains(&json!("image")) && required.contains(&json!("prompt")));
        let names: Vec<&str> = fields["properties"]
            .as_object()
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let mut expected = crate::api::edit_form::EDIT_FORM_FIELDS.to_vec();
        expected.sort_unstable();
        let mut names = names;
        names.sort_unstable();
        assert_eq!(
            names, expected,
            "the form's documented fields are the parsed ones"
        );
        let events = &edits["responses"]["200"]["content"]["text/event-stream"]["schema"];
        assert_eq!(
            events["oneOf"][0]["properties"]["event"]["enum"],
            json!(["image_edit.partial_image", "image_edit.completed"])
        );
        for path in ["/v1/img2img", "/sdapi/v1/img2img", "/v1/images/edits"] {
            let op = &doc["paths"][path]["post"];
            assert!(op["responses"]["413"].is_object() && op["responses"]["415"].is_object());
        }
        let txt2img = &doc["paths"]["/v1/txt2img"]["post"]["responses"]["200"]["content"];
        assert!(txt2img["image/jpeg"].is_object() && txt2img["image/webp"].is_object());
    }
}
