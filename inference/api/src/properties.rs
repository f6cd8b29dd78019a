//! What every request body satisfies, whatever its bytes: checked by the fuzz target
//! (`inference/api/fuzz`, coverage-guided with `cargo fuzz`) and by the replay of its
//! committed corpus in the unit tests.
//!
//! For the three generation endpoints: parsing either fails with a 400 or yields a request that validation
//! either refuses with a 4xx naming a field, or turns into images whose every value lies
//! inside [`Bounds`]; the same body always gives the same answer; an accepted request,
//! written back as JSON, is accepted again with the same images; seeds never wrap.
//!
//! For the editing endpoints (the bytes as a `multipart/form-data` body of
//! `/v1/images/edits`, and as the JSON of `/v1/img2img` and `/sdapi/v1/img2img`): the
//! multipart parser either refuses with a 400 or yields parts that are pieces of the body,
//! each named once; every refusal is a 4xx with a message; an accepted edit's image (and mask)
//! has exactly the request's size, its strength lies in (0, 1] and at least one step runs.
//!
//! For every accepted image: its adapters are served ones, each once, with scales in bounds;
//! a ControlNet condition has a served mode, its picture the request's size, and no edit
//! beside it.

use http::StatusCode;
use sd35_contract::ControlMode;

use crate::bounds::{Bounds, Limits, MAX_CONTROL_SCALE, MAX_LORA_SCALE, max_first_seed};
use crate::edit_form::ImageEditRequest;
use crate::error::ApiError;
use crate::multipart;
use crate::openai::ImagesRequest;
use crate::params::{AdapterInfo, GenParams, ModelInfo};
use crate::parse::parse_json;
use crate::request::{Img2ImgRequest, Txt2ImgRequest};
use crate::sdapi::{A1111Img2ImgRequest, A1111Txt2ImgRequest, MAX_RANDOM_SEED};

/// The limits the properties are checked against: [`ModelInfo::small`] (256 px at most) with
/// two adapters and the canny and blur ControlNets, 50 steps, 100-byte prompts (small limits,
/// so the fuzzer reaches them).
pub fn limits() -> Limits {
    let mut model = ModelInfo::small(&["fuzz", "large"]);
    model.served.adapters = ["style", "detail"]
        .into_iter()
        .map(|name| AdapterInfo {
            name: name.into(),
            scale: 0.8,
            text_encoders: name == "detail",
            path: format!("/cache/adapters/{name}/adapter.safetensors"),
            metadata: Default::default(),
        })
        .collect();
    model.served.control_modes = vec![ControlMode::Canny, ControlMode::Blur];
    Limits {
        defaults: model.defaults.clone(),
        model,
        max_steps: 50,
        max_prompt_bytes: 100,
        max_size: None,
    }
}

fn check_error(e: &ApiError, parsed: bool) {
    assert!(!e.message.is_empty(), "an error without a message: {e:?}");
    if parsed {
        // Validation: out of range (422, the field named), an unknown model (404), or a
        // control picture that is not a PNG, JPEG or WebP it can decode (400 or 415, as an
        // upload is answered).
        let picture = e.field.as_deref() == Some("control.image");
        assert!(
            e.status == StatusCode::UNPROCESSABLE_ENTITY
                || e.status == StatusCode::NOT_FOUND
                || (picture
                    && (e.status == StatusCode::BAD_REQUEST
                        || e.status == StatusCode::UNSUPPORTED_MEDIA_TYPE)),
            "validation answered {e:?}"
        );
        assert!(
            e.field.is_some(),
            "validation did not name the field: {e:?}"
        );
    } else {
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "parsing answered {e:?}");
    }
}

fn check_image(params: &GenParams, bounds: &Bounds) {
    assert!(
        bounds.size.contains(params.width) && bounds.size.contains(params.height),
        "{params:?}"
    );
    assert!(bounds.steps.contains(params.steps), "{params:?}");
    assert!(
        bounds.check_guidance(params.guidance_scale).is_ok(),
        "{params:?}"
    );
    assert!(
        !params.prompt.trim().is_empty() && params.prompt.len() <= bounds.prompt_bytes,
        "{params:?}"
    );
    assert!(params.negative_prompt.len() <= bounds.prompt_bytes && !params.prompt.contains('\0'));
    for (i, (name, scale)) in params.loras.iter().enumerate() {
        assert!(bounds.adapter_names.contains(name), "{name} is not served");
        assert!(
            scale.is_finite() && scale.abs() <= MAX_LORA_SCALE,
            "{scale}"
        );
        assert!(
            params.loras[..i].iter().all(|(n, _)| n != name),
            "{name} twice"
        );
    }
    if let Some(c) = &params.control {
        assert!(
            bounds.control_modes.contains(&c.mode),
            "{:?} is not served",
            c.mode
        );
        assert_eq!(
            (c.image.width, c.image.height),
            (params.width, params.height)
        );
        assert_eq!(
            c.image.rgb.len(),
            (params.width * params.height * 3) as usize
        );
        assert!(c.scale.is_finite() && (0.0..=MAX_CONTROL_SCALE).contains(&c.scale));
        assert!(0.0 <= c.start && c.start < c.end && c.end <= 1.0);
        assert!(params.edit.is_none(), "a condition with an edit");
    }
}

/// The body as `POST /v1/txt2img` would take it.
pub fn txt2img(body: &[u8], seed: u64) {
    let limits = limits();
    let bounds = limits.bounds();
    let first = parse_json::<Txt2ImgRequest>(body).map(|r| (r.resolve(&limits, || seed), r));
    let again = parse_json::<Txt2ImgRequest>(body).map(|r| r.resolve(&limits, || seed));
    match first {
        Err(e) => {
            check_error(&e, false);
            assert_eq!(again.err(), Some(e), "the same body, another answer");
        }
        Ok((Err(e), _)) => {
            check_error(&e, true);
            assert_eq!(again.ok().and_then(Result::err), Some(e));
        }
        Ok((Ok(p), req)) => {
            check_image(&p, &bounds);
            assert!(serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v.is_object()));
            let written = serde_json::to_vec(&req).unwrap_or_default();
            let round =
                parse_json::<Txt2ImgRequest>(&written).and_then(|r| r.resolve(&limits, || seed));
            assert_eq!(round.as_ref().ok(), Some(&p), "written back: {round:?}");
        }
    }
}

/// The body as `POST /v1/images/generations` would take it.
pub fn images(body: &[u8], seed: u64) {
    let limits = limits();
    let bounds = limits.bounds();
    match parse_json::<ImagesRequest>(body).map(|r| (r.resolve(&limits, || seed), r)) {
        Err(e) => check_error(&e, false),
        Ok((Err(e), _)) => check_error(&e, true),
        Ok((Ok(images), req)) => {
            let n = req.n.unwrap_or(1);
            assert_eq!(images.len(), n as usize);
            let first = images.first().map_or(0, |p| p.seed);
            assert!(first <= max_first_seed(n), "seed {first} wraps for n = {n}");
            for (i, p) in images.iter().enumerate() {
                check_image(p, &bounds);
                assert_eq!(p.seed, first + i as u64, "seeds are consecutive");
            }
            let written = serde_json::to_vec(&req).unwrap_or_default();
            let round =
                parse_json::<ImagesRequest>(&written).and_then(|r| r.resolve(&limits, || seed));
            assert_eq!(
                round.as_ref().ok(),
                Some(&images),
                "written back: {round:?}"
            );
        }
    }
}

/// The body as `POST /sdapi/v1/txt2img` would take it.
pub fn sdapi_txt2img(body: &[u8], seed: u64) {
    let limits = limits();
    let bounds = limits.bounds();
    match parse_json::<A1111Txt2ImgRequest>(body).map(|r| (r.resolve(&limits, || seed), r)) {
        Err(e) => check_error(&e, false),
        Ok((Err(e), _)) => check_error(&e, true),
        Ok((Ok((images, batch, iterations)), req)) => {
            assert_eq!(images.len(), (batch * iterations) as usize);
            assert!(images.len() <= crate::bounds::MAX_IMAGES_PER_REQUEST as usize);
            let first = images.first().map_or(0, |p| p.seed);
            if matches!(req.seed, None | Some(-1)) {
                assert!(
                    first <= MAX_RANDOM_SEED,
                    "a drawn seed {first} cannot be sent back"
                );
            }
            for (i, p) in images.iter().enumerate() {
                check_image(p, &bounds);
                assert_eq!(p.seed, first + i as u64, "seeds are consecutive");
            }
        }
    }
}

/// What an accepted edit satisfies.
fn check_edit(params: &GenParams, bounds: &Bounds) {
    check_image(params, bounds);
    let Some(e) = &params.edit else {
        panic!("an edit without its image: {params:?}");
    };
    assert_eq!(
        (e.image.width, e.image.height),
        (params.width, params.height)
    );
    assert_eq!(
        e.image.rgb.len(),
        (params.width * params.height * 3) as usize
    );
    if let Some(m) = &e.mask {
        assert_eq!((m.width, m.height), (params.width, params.height));
        assert_eq!(m.grey.len(), (params.width * params.height) as usize);
    }
    assert!(e.strength > 0.0 && e.strength <= 1.0, "{}", e.strength);
    assert!(params.sampled_steps() >= 1 && params.sampled_steps() <= params.steps);
}

/// Any refusal: a 4xx with a message.
fn check_refusal(e: &ApiError) {
    assert!(!e.message.is_empty(), "an error without a message: {e:?}");
    assert!(e.status.is_client_error(), "answered {e:?}");
}

/// The boundary a body opens with (`--BOUNDARY` up to its line break), else `fuzz`.
fn boundary_of(body: &[u8]) -> String {
    body.strip_prefix(b"--")
        .and_then(|rest| rest.split(|&b| b == b'\r').next())
        .and_then(|b| std::str::from_utf8(b).ok())
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .unwrap_or("fuzz")
        .to_owned()
}

/// The body as the `multipart/form-data` form of `POST /v1/images/edits`.
pub fn edit_form(body: &[u8], seed: u64) {
    let limits = limits();
    let bounds = limits.bounds();
    let content_type = format!("multipart/form-data; boundary={}", boundary_of(body));
    let parts = match multipart::boundary(&content_type).and_then(|b| multipart::parse(&b, body)) {
        Err(e) => {
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{e:?}");
            assert!(!e.message.is_empty());
            return;
        }
        Ok(parts) => parts,
    };
    let range = body.as_ptr_range();
    for (i, part) in parts.iter().enumerate() {
        let r = part.data.as_ptr_range();
        assert!(
            range.start <= r.start && r.end <= range.end,
            "a part outside the body"
        );
        assert!(!part.name.is_empty());
        assert!(
            parts[..i].iter().all(|p| p.name != part.name),
            "{} twice",
            part.name
        );
    }
    let answer = |parts: &[multipart::Part<'_>]| {
        ImageEditRequest::from_form(parts).and_then(|r| r.resolve(&limits, || seed))
    };
    match answer(&parts) {
        Err(e) => {
            check_refusal(&e);
            assert!(e.field.is_some(), "no field named: {e:?}");
            assert_eq!(
                answer(&parts).err(),
                Some(e),
                "the same body, another answer"
            );
        }
        Ok(images) => {
            let first = images.first().map_or(0, |p| p.seed);
            for (i, p) in images.iter().enumerate() {
                check_edit(p, &bounds);
                assert_eq!(p.seed, first + i as u64);
            }
        }
    }
}

/// The body as the JSON of `POST /v1/img2img` and `POST /sdapi/v1/img2img`.
pub fn img2img(body: &[u8], seed: u64) {
    let limits = limits();
    let bounds = limits.bounds();
    match parse_json::<Img2ImgRequest>(body).map(|r| r.resolve(&limits, || seed)) {
        Err(e) => check_error(&e, false),
        Ok(Err(e)) => check_refusal(&e),
        Ok(Ok(p)) => check_edit(&p, &bounds),
    }
    match parse_json::<A1111Img2ImgRequest>(body).map(|r| r.resolve(&limits, || seed)) {
        Err(e) => check_error(&e, false),
        Ok(Err(e)) => check_refusal(&e),
        Ok(Ok((images, batch, iterations))) => {
            assert_eq!(images.len(), (batch * iterations) as usize);
            for p in &images {
                check_edit(p, &bounds);
            }
        }
    }
}

/// Every endpoint, with a random seed taken from the input's length (any value will do).
pub fn request(body: &[u8]) {
    let seed = u64::MAX - body.len() as u64;
    txt2img(body, seed);
    images(body, seed);
    sdapi_txt2img(body, seed);
    img2img(body, seed);
    edit_form(body, seed);
}
