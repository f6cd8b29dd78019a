//! JSON Schemas (draft 2020-12) of the request and response bodies, with every bound written
//! from [`Bounds`] — the values validation enforces — so the OpenAPI document is the contract.

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::bounds::{
    Bounds, IntRange, MAX_BLUR_SIGMA, MAX_CANNY_THRESHOLD, MAX_CONTROL_SCALE, MAX_LORA_SCALE,
};
use crate::edit::MAX_MASK_BLUR;
use crate::edit_form::ImageEditRequest;
use crate::error::ErrorBody;
use crate::openai::{ImagesRequest, MAX_PARTIAL_IMAGES, SIZE_PATTERN};
use crate::output::OUTPUT_FORMATS;
use crate::request::{Img2ImgRequest, Txt2ImgRequest};
use crate::response::{ImageStreamEvent, ImagesResponse, ModelList, Txt2ImgResponse};
use crate::sampling::{MAX_SLG_LAYERS, NO_NUL_PATTERN, PROMPT_PATTERN, model_name_pattern};
use crate::sdapi::{
    A1111Img2ImgRequest, A1111Info, A1111Lora, A1111Model, A1111Options, A1111OptionsUpdate,
    A1111Txt2ImgRequest, A1111Txt2ImgResponse,
};

/// The request bodies with the sampling fields.
const GENERATION_BODIES: [&str; 6] = [
    "Txt2ImgRequest",
    "ImagesRequest",
    "A1111Txt2ImgRequest",
    "Img2ImgRequest",
    "ImageEditRequest",
    "A1111Img2ImgRequest",
];
/// The AUTOMATIC1111 generation bodies.
const A1111_BODIES: [&str; 2] = ["A1111Txt2ImgRequest", "A1111Img2ImgRequest"];
/// The OpenAI bodies (`n`, `size`, `response_format`, streaming).
const OPENAI_BODIES: [&str; 2] = ["ImagesRequest", "ImageEditRequest"];

/// Where the schemas live in the OpenAPI document.
pub const COMPONENTS: &str = "/components/schemas";

/// A `$ref` to the schema `name` of [`components`].
pub fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#{COMPONENTS}/{name}") })
}

fn int_range(r: &IntRange) -> Vec<(&'static str, Value)> {
    let mut out = vec![("minimum", json!(r.min))];
    if let Some(max) = r.max {
        out.push(("maximum", json!(max)));
    }
    if r.multiple_of > 1 {
        out.push(("multipleOf", json!(r.multiple_of)));
    }
    out
}

fn set(defs: &mut Map<String, Value>, schema: &str, field: &str, kv: &[(&str, Value)]) {
    if let Some(Value::Object(prop)) = defs
        .get_mut(schema)
        .and_then(|s| s.get_mut("properties"))
        .and_then(|p| p.get_mut(field))
    {
        for (k, v) in kv {
            prop.insert((*k).to_owned(), v.clone());
        }
    }
}

fn describe(defs: &mut Map<String, Value>, schema: &str, field: &str, more: &str) {
    if let Some(Value::Object(prop)) = defs
        .get_mut(schema)
        .and_then(|s| s.get_mut("properties"))
        .and_then(|p| p.get_mut(field))
    {
        let old = prop
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim_end_matches('.')
            .to_owned();
        let mut chars = more.chars();
        let more: String = chars
            .next()
            .map(|c| c.to_uppercase().chain(chars).collect())
            .unwrap_or_default();
        let text = if old.is_empty() {
            format!("{more}.")
        } else {
            format!("{old}. {more}.")
        };
        prop.insert("description".into(), Value::String(text));
    }
}

/// Every schema the API uses, keyed by name, with `bounds` applied: `Txt2ImgRequest`,
/// `Img2ImgRequest`, `ImagesRequest`, `ImageEditRequest` (the fields of the
/// `multipart/form-data` form), `Txt2ImgResponse`, `ImagesResponse`, `ImageStreamEvent`,
/// `ModelList`, `ErrorBody`, the AUTOMATIC1111 bodies (`A1111Txt2ImgRequest`,
/// `A1111Img2ImgRequest`, `A1111Txt2ImgResponse`, `A1111Info`, `A1111Model`, `A1111Options`,
/// `A1111OptionsUpdate`) and the schemas they refer to.
pub fn components(bounds: &Bounds) -> Map<String, Value> {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = COMPONENTS.into())
        .into_generator();
    generator.subschema_for::<Txt2ImgRequest>();
    generator.subschema_for::<ImagesRequest>();
    generator.subschema_for::<Txt2ImgResponse>();
    generator.subschema_for::<ImagesResponse>();
    generator.subschema_for::<ModelList>();
    generator.subschema_for::<ErrorBody>();
    generator.subschema_for::<ImageStreamEvent>();
    generator.subschema_for::<A1111Txt2ImgRequest>();
    generator.subschema_for::<A1111Txt2ImgResponse>();
    generator.subschema_for::<A1111Info>();
    generator.subschema_for::<A1111Model>();
    generator.subschema_for::<A1111Lora>();
    generator.subschema_for::<A1111Options>();
    generator.subschema_for::<A1111OptionsUpdate>();
    generator.subschema_for::<Img2ImgRequest>();
    generator.subschema_for::<ImageEditRequest>();
    generator.subschema_for::<A1111Img2ImgRequest>();
    let mut defs = generator.take_definitions(true);
    form_fields(&mut defs, "ImageEditRequest", &["image", "mask"]);

    let prompt_bytes = bounds.prompt_bytes;
    let prompt_note = format!(
        "At most {prompt_bytes} bytes of UTF-8 (so at most {prompt_bytes} characters); no NUL"
    );
    let (g_min, g_max) = bounds.guidance;
    for schema in GENERATION_BODIES {
        set(
            &mut defs,
            schema,
            "prompt",
            &[
                ("minLength", json!(1)),
                ("maxLength", json!(prompt_bytes)),
                ("pattern", json!(PROMPT_PATTERN)),
            ],
        );
        describe(&mut defs, schema, "prompt", &prompt_note);
        set(
            &mut defs,
            schema,
            "negative_prompt",
            &[
                ("maxLength", json!(prompt_bytes)),
                ("pattern", json!(NO_NUL_PATTERN)),
            ],
        );
        describe(&mut defs, schema, "negative_prompt", &prompt_note);
        set(&mut defs, schema, "steps", &int_range(&bounds.steps));
        describe(
            &mut defs,
            schema,
            "steps",
            &format!("{}; left out, the model's default", bounds.steps.describe()),
        );
        let guidance = if A1111_BODIES.contains(&schema) {
            "cfg_scale"
        } else {
            "guidance_scale"
        };
        set(
            &mut defs,
            schema,
            guidance,
            &[("minimum", json!(g_min)), ("maximum", json!(g_max))],
        );
    }
    for schema in [
        "Txt2ImgRequest",
        "ImagesRequest",
        "Img2ImgRequest",
        "ImageEditRequest",
    ] {
        set(
            &mut defs,
            schema,
            "seed",
            &[("minimum", json!(0)), ("maximum", json!(u64::MAX))],
        );
    }
    for schema in GENERATION_BODIES {
        set(
            &mut defs,
            schema,
            "output_format",
            &[("enum", json!(OUTPUT_FORMATS))],
        );
        set(
            &mut defs,
            schema,
            "output_compression",
            &[("minimum", json!(0)), ("maximum", json!(100))],
        );
    }
    for (schema, field) in [
        ("Img2ImgRequest", "strength"),
        ("ImageEditRequest", "strength"),
        ("A1111Img2ImgRequest", "denoising_strength"),
    ] {
        set(
            &mut defs,
            schema,
            field,
            &[("exclusiveMinimum", json!(0)), ("maximum", json!(1))],
        );
    }
    for schema in ["Txt2ImgRequest", "Img2ImgRequest"] {
        let mut items = json!({"type": "integer", "minimum": 0});
        if let Some(blocks) = bounds.transformer_blocks {
            items["maximum"] = json!(blocks.saturating_sub(1));
        }
        set(
            &mut defs,
            schema,
            "slg_layers",
            &[("items", items), ("maxItems", json!(MAX_SLG_LAYERS))],
        );
    }
    for schema in A1111_BODIES {
        set(
            &mut defs,
            schema,
            "seed",
            &[("minimum", json!(-1)), ("maximum", json!(i64::MAX))],
        );
    }
    for schema in [
        "Txt2ImgRequest",
        "A1111Txt2ImgRequest",
        "Img2ImgRequest",
        "A1111Img2ImgRequest",
    ] {
        for field in ["width", "height"] {
            set(&mut defs, schema, field, &int_range(&bounds.size));
            describe(&mut defs, schema, field, &bounds.size.describe());
        }
    }
    for schema in A1111_BODIES {
        for field in ["batch_size", "n_iter"] {
            set(&mut defs, schema, field, &int_range(&bounds.images));
            describe(
                &mut defs,
                schema,
                field,
                &format!(
                    "{}; batch_size × n_iter at most {}",
                    bounds.images.describe(),
                    bounds.images.max.unwrap_or(1)
                ),
            );
        }
        for field in ["enable_hr", "restore_faces", "tiling"] {
            set(&mut defs, schema, field, &[("enum", json!([false, null]))]);
        }
        set(
            &mut defs,
            schema,
            "send_images",
            &[("enum", json!([true, null]))],
        );
    }
    for field in ["mask_blur", "mask_blur_x", "mask_blur_y"] {
        set(
            &mut defs,
            "A1111Img2ImgRequest",
            field,
            &[("minimum", json!(0)), ("maximum", json!(MAX_MASK_BLUR))],
        );
    }
    set(
        &mut defs,
        "A1111Img2ImgRequest",
        "inpainting_mask_invert",
        &[("enum", json!([0, 1, null]))],
    );
    set(
        &mut defs,
        "A1111Img2ImgRequest",
        "resize_mode",
        &[("enum", json!([0, null]))],
    );
    set(
        &mut defs,
        "A1111Img2ImgRequest",
        "init_images",
        &[("minItems", json!(1)), ("maxItems", json!(1))],
    );
    // The served names, as validation compares them (ASCII case ignored, trimmed).
    let mut model_name = json!({"type": "string"});
    if let Some(pattern) = model_name_pattern(&bounds.model_names) {
        model_name["pattern"] = json!(pattern);
        let names: Vec<String> = bounds
            .model_names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect();
        model_name["description"] = json!(format!(
            "One of the served names: {} (ASCII case ignored)",
            names.join(", ")
        ));
        for schema in OPENAI_BODIES {
            set(&mut defs, schema, "model", &[("pattern", json!(pattern))]);
            describe(
                &mut defs,
                schema,
                "model",
                &format!("One of {} (ASCII case ignored)", names.join(", ")),
            );
        }
        set(
            &mut defs,
            "A1111OptionsUpdate",
            "sd_model_checkpoint",
            &[("pattern", json!(pattern))],
        );
    }
    for schema in A1111_BODIES {
        set(
            &mut defs,
            schema,
            "override_settings",
            &[
                (
                    "properties",
                    json!({"sd_model_checkpoint": model_name.clone()}),
                ),
                ("additionalProperties", json!(false)),
            ],
        );
    }
    // AUTOMATIC1111 lets the prompt be left out; here an empty prompt is refused, so the
    // document says it is required (and the image, for img2img).
    for (schema, required) in [
        ("A1111Txt2ImgRequest", json!(["prompt"])),
        ("A1111Img2ImgRequest", json!(["prompt", "init_images"])),
    ] {
        if let Some(Value::Object(a1111)) = defs.get_mut(schema) {
            a1111.insert("required".into(), required);
        }
    }
    for schema in A1111_BODIES {
        batch_pairs(&mut defs, schema, bounds);
    }
    for schema in OPENAI_BODIES {
        openai_fields(&mut defs, schema, bounds);
    }
    adapter_fields(&mut defs, bounds);
    defs
}

/// The bodies with `loras`, and those whose `control` is a condition (on the editing bodies it
/// is refused).
const LORA_BODIES: [&str; 4] = [
    "Txt2ImgRequest",
    "ImagesRequest",
    "Img2ImgRequest",
    "ImageEditRequest",
];
const CONTROL_BODIES: [&str; 2] = ["Txt2ImgRequest", "ImagesRequest"];

/// `loras` and `control`: the served adapters and modes once the model is loaded (none served:
/// `loras` empty and `control` null), the scales' and the preprocessing's bounds; on the
/// editing bodies `control` is refused.
fn adapter_fields(defs: &mut Map<String, Value>, bounds: &Bounds) {
    set(
        defs,
        "LoraRequest",
        "scale",
        &[
            ("minimum", json!(-MAX_LORA_SCALE)),
            ("maximum", json!(MAX_LORA_SCALE)),
        ],
    );
    set(
        defs,
        "ControlRequest",
        "scale",
        &[("minimum", json!(0)), ("maximum", json!(MAX_CONTROL_SCALE))],
    );
    for field in ["start", "end"] {
        set(
            defs,
            "ControlRequest",
            field,
            &[("minimum", json!(0)), ("maximum", json!(1))],
        );
    }
    if let Some(Value::Array(variants)) = defs
        .get_mut("PreprocessRequest")
        .and_then(|p| p.get_mut("anyOf"))
    {
        for variant in variants.iter_mut() {
            let Some(Value::Object(props)) = variant.get_mut("properties") else {
                continue;
            };
            for (name, prop) in props.iter_mut() {
                let range = match name.as_str() {
                    "sigma" => json!({"exclusiveMinimum": 0, "maximum": MAX_BLUR_SIGMA}),
                    _ => json!({"minimum": 0, "maximum": MAX_CANNY_THRESHOLD}),
                };
                if let (Value::Object(prop), Value::Object(range)) = (prop, range) {
                    prop.extend(range);
                }
            }
        }
    }
    for schema in ["Img2ImgRequest", "ImageEditRequest"] {
        if let Some(Value::Object(props)) =
            defs.get_mut(schema).and_then(|s| s.get_mut("properties"))
            && let Some(control) = props.get_mut("control")
        {
            let description = control.get("description").cloned();
            *control = json!({"not": {}});
            if let Some(d) = description {
                control["description"] = d;
            }
        }
    }
    // Before the model is loaded nothing is known of what it serves.
    if bounds.transformer_blocks.is_none() {
        return;
    }
    let served = |names: Vec<String>| {
        names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if bounds.adapter_names.is_empty() {
        for schema in LORA_BODIES {
            set(defs, schema, "loras", &[("maxItems", json!(0))]);
            describe(defs, schema, "loras", "this server serves no LoRA adapter");
        }
    } else {
        set(
            defs,
            "LoraRequest",
            "name",
            &[("enum", json!(bounds.adapter_names))],
        );
        for schema in LORA_BODIES {
            set(
                defs,
                schema,
                "loras",
                &[("maxItems", json!(bounds.adapter_names.len()))],
            );
            describe(
                defs,
                schema,
                "loras",
                &format!(
                    "Served: {}; each at most once",
                    served(bounds.adapter_names.clone())
                ),
            );
        }
    }
    if bounds.control_modes.is_empty() {
        for schema in CONTROL_BODIES {
            set(defs, schema, "control", &[("type", json!("null"))]);
            describe(defs, schema, "control", "this server serves no ControlNet");
        }
    } else {
        let modes: Vec<String> = bounds.control_modes.iter().map(|m| m.to_string()).collect();
        set(defs, "ControlRequest", "mode", &[("enum", json!(modes))]);
        for schema in CONTROL_BODIES {
            describe(
                defs,
                schema,
                "control",
                &format!("Served modes: {}", served(modes.clone())),
            );
        }
    }
}

/// `batch_size × n_iter` images at most: the pairs allowed, for any per-field maximum.
fn batch_pairs(defs: &mut Map<String, Value>, schema: &str, bounds: &Bounds) {
    if let (Some(Value::Object(a1111)), Some(max)) = (defs.get_mut(schema), bounds.images.max) {
        let one = json!({"anyOf": [{"type": "null"}, {"const": 1}]});
        let mut pairs = vec![
            json!({"properties": {"n_iter": one}}),
            json!({"properties": {"batch_size": one}}),
        ];
        for batch in 2..=max {
            let iterations = max / batch;
            if iterations >= 2 {
                pairs.push(json!({"properties": {
                    "batch_size": {"const": batch},
                    "n_iter": {"maximum": iterations},
                }}));
            }
        }
        a1111.insert("anyOf".into(), Value::Array(pairs));
    }
}

/// The OpenAI fields: `n`, `size`, `response_format`, `partial_images`.
fn openai_fields(defs: &mut Map<String, Value>, schema: &str, bounds: &Bounds) {
    set(defs, schema, "n", &int_range(&bounds.images));
    describe(defs, schema, "n", &bounds.images.describe());
    set(defs, schema, "size", &[("pattern", json!(SIZE_PATTERN))]);
    describe(
        defs,
        schema,
        "size",
        &format!("Each side {}", bounds.size.describe()),
    );
    let formats = if schema == "ImageEditRequest" {
        json!(["b64_json", "url"])
    } else {
        json!(["b64_json", "url", null])
    };
    set(defs, schema, "response_format", &[("enum", formats)]);
    set(
        defs,
        schema,
        "partial_images",
        &[
            ("minimum", json!(0)),
            ("maximum", json!(MAX_PARTIAL_IMAGES)),
        ],
    );
}

/// A `multipart/form-data` form's schema: no field can be null (a form sends text or a file,
/// or leaves the field out), `files` are binary.
fn form_fields(defs: &mut Map<String, Value>, schema: &str, files: &[&str]) {
    let Some(Value::Object(props)) = defs.get_mut(schema).and_then(|s| s.get_mut("properties"))
    else {
        return;
    };
    for (name, prop) in props.iter_mut() {
        if files.contains(&name.as_str()) {
            let description = prop.get("description").cloned();
            *prop = json!({"type": "string", "format": "binary"});
            if let Some(d) = description {
                prop["description"] = d;
            }
        } else if let Some(Value::Array(types)) = prop.get_mut("type") {
            types.retain(|t| t != "null");
            if types.len() == 1 {
                let one = types[0].clone();
                prop["type"] = one;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bounds::Limits;

    fn prop<'a>(defs: &'a Map<String, Value>, schema: &str, field: &str) -> &'a Value {
        &defs[schema]["properties"][field]
    }

    /// The schema's numbers are the ones validation enforces: each bound's edge values are
    /// accepted, the values just past them refused.
    #[test]
    fn schema_bounds_are_the_validated_bounds() {
        let limits: Limits = crate::properties::limits();
        let defs = components(&limits.bounds());
        let w = prop(&defs, "Txt2ImgRequest", "width");
        let (min, max, step) = (
            w["minimum"].as_u64().unwrap_or(0),
            w["maximum"].as_u64().unwrap_or(0),
            w["multipleOf"].as_u64().unwrap_or(0),
        );
        assert_eq!((min, max, step), (16, 256, 16));
        let steps = prop(&defs, "ImagesRequest", "steps");
        assert_eq!(steps["maximum"], 50);
        assert_eq!(prop(&defs, "ImagesRequest", "n")["maximum"], 4);
        assert_eq!(prop(&defs, "Txt2ImgRequest", "prompt")["maxLength"], 100);
        let accepts = |body: String| {
            crate::parse::parse_json::<Txt2ImgRequest>(body.as_bytes())
                .and_then(|r| r.resolve(&limits, || 0))
                .is_ok()
        };
        for (field, lo, hi, step) in [
            ("width", min, max, step),
            ("height", min, max, step),
            ("steps", 1, 50, 1),
        ] {
            let body = |v: u64| format!(r#"{{"prompt":"a","{field}":{v}}}"#);
            assert!(accepts(body(lo)) && accepts(body(hi)), "{field}");
            assert!(
                !accepts(body(lo - 1)) && !accepts(body(hi + step)),
                "{field}"
            );
        }
        let g = prop(&defs, "Txt2ImgRequest", "guidance_scale");
        let body = |v: &Value| format!(r#"{{"prompt":"a","guidance_scale":{v}}}"#);
        assert!(accepts(body(&g["minimum"])) && accepts(body(&g["maximum"])));
        assert!(!accepts(body(&json!(30.001))) && !accepts(body(&json!(-0.001))));
        let a1111 = prop(&defs, "A1111Txt2ImgRequest", "cfg_scale");
        assert_eq!(
            (&a1111["minimum"], &a1111["maximum"]),
            (&json!(0.0), &json!(30.0))
        );
        assert_eq!(prop(&defs, "A1111Txt2ImgRequest", "seed")["minimum"], -1);
        assert_eq!(
            prop(&defs, "A1111Txt2ImgRequest", "batch_size")["maximum"],
            4
        );
        assert_eq!(prop(&defs, "ImagesRequest", "partial_images")["maximum"], 3);
        // The served adapters and modes, and the condition refused on the editing bodies.
        assert_eq!(
            defs["LoraRequest"]["properties"]["name"]["enum"],
            json!(["style", "detail"])
        );
        assert_eq!(prop(&defs, "Txt2ImgRequest", "loras")["maxItems"], 2);
        assert_eq!(
            defs["ControlRequest"]["properties"]["mode"]["enum"],
            json!(["canny", "blur"])
        );
        assert_eq!(prop(&defs, "Img2ImgRequest", "control")["not"], json!({}));
        let mut bare = limits.clone();
        bare.model.served.adapters.clear();
        bare.model.served.control_modes.clear();
        let defs_bare = components(&bare.bounds());
        assert_eq!(prop(&defs_bare, "ImagesRequest", "loras")["maxItems"], 0);
        assert_eq!(prop(&defs_bare, "ImagesRequest", "control")["type"], "null");
        for name in [
            "A1111Lora",
            "ModelList",
            "ErrorBody",
            "ImagesResponse",
            "Txt2ImgResponse",
            "ImageStreamEvent",
            "A1111Txt2ImgResponse",
            "A1111Info",
            "A1111Model",
            "A1111Options",
            "A1111OptionsUpdate",
        ] {
            assert!(defs.contains_key(name), "{name}");
        }
    }
}
