//! What every request body satisfies, whatever its bytes: checked by the fuzz target
//! (`inference/api/fuzz`, coverage-guided with `cargo fuzz`) and by the replay of its
//! committed corpus in the unit tests.
//!
//! For the three generation endpoints: parsing either fails with a 400 or yields a request that validation
//! either refuses with a 4xx naming a field, or turns into images whose every value lies
//! inside [`Bounds`]; the same body always gives the same answer; an accepted request,
//! written back as JSON, is accepted again with the same images; seeds never wrap.

use http::StatusCode;
use sd35_contract::{DeviceKind, Precision, Variant};

use crate::bounds::{Bounds, Limits, max_first_seed};
use crate::error::ApiError;
use crate::params::{Defaults, GenParams, ModelInfo};
use crate::request::{ImagesRequest, Txt2ImgRequest, parse_json};
use crate::sdapi::{A1111Txt2ImgRequest, MAX_RANDOM_SEED};

/// The limits the properties are checked against: a model of 256 px at most, 50 steps,
/// 100-byte prompts (small limits, so the fuzzer reaches them).
pub fn limits() -> Limits {
    let defaults = Defaults {
        steps: 4,
        guidance_scale: 3.5,
        width: 64,
        height: 64,
    };
    Limits {
        model: ModelInfo {
            id: "fuzz".into(),
            served_names: vec!["fuzz".into(), "large".into()],
            variant: Variant::Large,
            variant_source: "requested".into(),
            precision: Precision::F32,
            device: DeviceKind::Cpu,
            gpu_name: None,
            compute_capability: None,
            fp8_tensor_cores: false,
            fp8_path: "cpu".into(),
            engine_key: None,
            cache_key: None,
            t5_loaded: false,
            max_size: 256,
            defaults: defaults.clone(),
            skip_layer_guidance: None,
            warnings: Vec::new(),
            op_graph: "fused-cpu".into(),
            memory: None,
        },
        defaults,
        max_steps: 50,
        max_prompt_bytes: 100,
        max_size: None,
    }
}

fn check_error(e: &ApiError, parsed: bool) {
    assert!(!e.message.is_empty(), "an error without a message: {e:?}");
    if parsed {
        // Validation: out of range (422, the field named) or an unknown model (404).
        assert!(
            e.status == StatusCode::UNPROCESSABLE_ENTITY || e.status == StatusCode::NOT_FOUND,
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

fn check_image(p: &GenParams, b: &Bounds) {
    assert!(
        b.size.contains(p.width) && b.size.contains(p.height),
        "{p:?}"
    );
    assert!(b.steps.contains(p.steps), "{p:?}");
    assert!(b.check_guidance(p.guidance_scale).is_ok(), "{p:?}");
    assert!(
        !p.prompt.trim().is_empty() && p.prompt.len() <= b.prompt_bytes,
        "{p:?}"
    );
    assert!(p.negative_prompt.len() <= b.prompt_bytes && !p.prompt.contains('\0'));
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

/// Every endpoint, with a random seed taken from the input's length (any value will do).
pub fn request(body: &[u8]) {
    let seed = u64::MAX - body.len() as u64;
    txt2img(body, seed);
    images(body, seed);
    sdapi_txt2img(body, seed);
}
