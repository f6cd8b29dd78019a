//! Parity with diffusers on tiny random-weight SD3.5 models.
//!
//! The models and the golden outputs under `inference/testdata/` were made by
//! `inference/reference/make_tiny_models.py`. Tolerances: relative L2 error ≤ 1e-4 per
//! component and ≤ 1e-3 end to end in f32, ≤ 2e-2 with bf16 weights; fp8 is held to the
//! reference's own fp8 output and to a PSNR floor against f32 (see `fp8_*`).

// Test helpers panic on broken fixtures; that is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use candle_core::Tensor;
use sd35_pipeline::op_graph;
use sd35_pipeline::scheduler::FlowMatchSchedule;
use sd35_pipeline::{
    GenerateRequest, Pipeline, PipelineOptions, Precision, SkipLayerGuidance, Variant,
    VariantSource, model_card,
};
use serde_json::Value;

use common::{golden, load, psnr, rel_err, testdata};

fn manifest() -> Value {
    let text = std::fs::read_to_string(testdata().join("golden/manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f64) -> f64 {
    let e = rel_err(ours, reference);
    eprintln!("{what}: relative error {e:.3e} (bound {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    e
}

/// The floor every f32 (and fp8-file) end-to-end image holds against the reference's, on
/// either op graph.
const PSNR_FLOOR_DB: f64 = 45.0;

const LAYOUTS: [(&str, &str); 4] = [
    ("large", "sd35-tiny-large"),
    ("large", "sd35-tiny-large-single"),
    ("medium", "sd35-tiny-medium"),
    ("medium", "sd35-tiny-medium-single"),
];

#[test]
fn scheduler_matches_reference_exactly() {
    let text = std::fs::read_to_string(testdata().join("golden/scheduler.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    for (steps, s) in v.as_object().unwrap() {
        let ours = FlowMatchSchedule::new(steps.parse().unwrap(), 3.0);
        let f = |k: &str| -> Vec<f32> {
            s[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        };
        assert_eq!(ours.sigmas, f("sigmas"), "sigmas for {steps} steps");
        assert_eq!(
            ours.timesteps,
            f("timesteps"),
            "timesteps for {steps} steps"
        );
    }
}

#[test]
fn tokenizers_match_reference_ids() {
    let text = std::fs::read_to_string(testdata().join("golden/tokens.json")).unwrap();
    let tokens: Value = serde_json::from_str(&text).unwrap();
    let prompts = manifest()["prompts"].clone();
    for (_, model) in LAYOUTS {
        let p = load(model, Precision::F32);
        for (name, prompt) in prompts.as_object().unwrap() {
            let ids_of = p.tokenize(prompt.as_str().unwrap()).unwrap();
            let (l, g, t5) = (ids_of.clip_l, ids_of.clip_g, ids_of.t5);
            let ids = |k: &str| -> Vec<u32> {
                tokens[name][k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            };
            assert_eq!(l, ids("clip_l"), "{model} CLIP-L ids of `{name}`");
            assert_eq!(g, ids("clip_g"), "{model} CLIP-G ids of `{name}`");
            assert_eq!(t5.unwrap(), ids("t5"), "{model} T5 ids of `{name}`");
        }
    }
    // T5 at its longest sequence length.
    let opts = PipelineOptions {
        t5_max_length: 512,
        ..PipelineOptions::default()
    };
    let p = Pipeline::load(&testdata().join("sd35-tiny-large"), &opts).unwrap();
    let t5 = p.tokenize(prompts["long"].as_str().unwrap()).unwrap().t5;
    let want: Vec<u32> = tokens["long"]["t5_512"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(t5.unwrap(), want);
}

#[test]
fn text_encoders_match_reference() {
    let g = golden("encoders.safetensors");
    let prompts = manifest()["prompts"].clone();
    for model in ["sd35-tiny-large", "sd35-tiny-large-single"] {
        let p = load(model, Precision::F32);
        for (name, prompt) in prompts.as_object().unwrap() {
            let parts = p.encode_parts(prompt.as_str().unwrap()).unwrap();
            let check = |k: &str, t: &Tensor| {
                if let Some(r) = g.get(&format!("{name}.{k}")) {
                    assert_close(&format!("{model} {name} {k}"), t, r, 1e-4);
                }
            };
            check("clip_l.hidden", &parts.clip_l.penultimate);
            check("clip_l.pooled", &parts.clip_l.pooled);
            check("clip_g.hidden", &parts.clip_g.penultimate);
            check("clip_g.pooled", &parts.clip_g.pooled);
            check("t5.hidden", &parts.t5);
        }
    }
}

#[test]
fn transformers_match_reference() {
    for (kind, model) in LAYOUTS {
        let g = golden(&format!("transformer_{kind}.safetensors"));
        let p = load(model, Precision::F32);
        let run = |skip: &[usize]| {
            p.mmdit()
                .forward(
                    &g["hidden_states"],
                    &g["timestep"],
                    &g["encoder_hidden_states"],
                    &g["pooled_projections"],
                    skip,
                )
                .unwrap()
        };
        assert_close(
            &format!("{model} transformer"),
            &run(&[]),
            &g["output"],
            1e-4,
        );
        assert_close(
            &format!("{model} transformer, block 1 skipped"),
            &run(&[1]),
            &g["output_skip1"],
            1e-4,
        );
    }
}

#[test]
fn vae_decoder_matches_reference() {
    let g = golden("vae_decode.safetensors");
    for model in ["sd35-tiny-large", "sd35-tiny-large-single"] {
        let p = load(model, Precision::F32);
        let img = p.vae().decode(&g["latents"]).unwrap();
        assert_close(&format!("{model} VAE decode"), &img, &g["image"], 1e-4);
    }
}

fn request(p: &Pipeline, case: &Value) -> GenerateRequest {
    let init = golden(&format!(
        "e2e_{}.init.safetensors",
        case["id"].as_str().unwrap()
    ));
    let mut req = p.default_request(case["prompt"].as_str().unwrap());
    req.negative_prompt = case["negative_prompt"].as_str().unwrap().to_string();
    req.width = case["width"].as_u64().unwrap() as usize;
    req.height = case["height"].as_u64().unwrap() as usize;
    req.steps = case["steps"].as_u64().unwrap() as usize;
    req.guidance = case["guidance"].as_f64().unwrap();
    req.slg = case.get("slg_layers").map(|l| SkipLayerGuidance {
        layers: l
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect(),
        scale: case["slg_scale"].as_f64().unwrap(),
        start: case["slg_start"].as_f64().unwrap(),
        stop: case["slg_stop"].as_f64().unwrap(),
    });
    req.init_latents = Some(init["latents"].clone());
    req
}

/// Runs a manifest case; returns (latents, image) with their relative errors checked.
fn run_case(model: &str, case_id: &str, precision: Precision, tol: f64) -> (Tensor, Tensor) {
    let m = manifest();
    let case = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == case_id)
        .unwrap()
        .clone();
    let p = load(model, precision);
    let req = request(&p, &case);
    let latents = p.sample(&req, &mut |_, _| {}).unwrap();
    let image = (p.decode(&latents).unwrap() / 2.0).unwrap();
    let image = (image + 0.5).unwrap().clamp(0f32, 1f32).unwrap();
    let g = golden(&format!("e2e_{case_id}.safetensors"));
    let what = format!("{model} {case_id} {precision}");
    assert_close(&format!("{what} latents"), &latents, &g["latents"], tol);
    assert_close(&format!("{what} image"), &image, &g["image"], tol);
    let db = psnr(&image, &g["image"]);
    eprintln!(
        "{what} image: PSNR {db:.1} dB ({} op graph)",
        op_graph::current().name()
    );
    if precision != Precision::Bf16 {
        assert!(
            db >= PSNR_FLOOR_DB,
            "{what}: PSNR {db:.1} dB < {PSNR_FLOOR_DB} dB"
        );
    }
    (latents, image)
}

#[test]
fn end_to_end_f32_matches_reference() {
    for (model, case) in [
        ("sd35-tiny-large", "large_cfg"),
        ("sd35-tiny-large-single", "large_cfg"),
        ("sd35-tiny-large", "large_noguidance"),
        ("sd35-tiny-medium", "medium_cfg"),
        ("sd35-tiny-medium-single", "medium_noguidance"),
        ("sd35-tiny-medium", "medium_slg"),
        ("sd35-tiny-medium-single", "medium_slg"),
        ("sd35-tiny-large", "turbo_default"),
        ("sd35-tiny-medium", "medium_default"),
    ] {
        run_case(model, case, Precision::F32, 1e-3);
    }
}

#[test]
fn skip_layer_guidance_at_the_model_card_defaults_is_really_active() {
    // The model card's layers 7, 8, 9 exist in the tiny medium model, and the default case
    // has steps where they are skipped: leaving SLG out must change the result visibly.
    let m = manifest();
    let case = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "medium_default")
        .unwrap()
        .clone();
    let p = load("sd35-tiny-medium", Precision::F32);
    let mut req = request(&p, &case);
    assert_eq!(
        req.slg,
        p.default_request("x").slg,
        "the case is the model card"
    );
    req.slg = None;
    let without = p.sample(&req, &mut |_, _| {}).unwrap();
    let g = golden("e2e_medium_default.safetensors");
    let err = rel_err(&without, &g["latents"]);
    eprintln!("medium_default without SLG: relative error {err:.3e}");
    assert!(err > 1e-2, "SLG made no difference ({err:.3e})");
}

#[test]
fn end_to_end_pixels_match_reference() {
    let m = manifest();
    let case = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "large_cfg")
        .unwrap()
        .clone();
    let p = load("sd35-tiny-large", Precision::F32);
    let img = p.generate(&request(&p, &case), &mut |_, _| {}).unwrap();
    let want = golden("e2e_large_cfg.safetensors")["pixels"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let worst = img
        .pixels
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    let exact = img.pixels.iter().zip(&want).filter(|(a, b)| a == b).count();
    eprintln!(
        "pixels: {exact}/{} identical, worst difference {worst}",
        want.len()
    );
    assert!(worst <= 1, "pixel difference {worst}");
}

#[test]
fn end_to_end_bf16_within_2e2() {
    run_case("sd35-tiny-large", "large_cfg", Precision::Bf16, 2e-2);
    run_case(
        "sd35-tiny-medium-single",
        "medium_slg",
        Precision::Bf16,
        2e-2,
    );
}

/// The reference's own fp8 degradation (diffusers on the dequantised fp8 file vs f32),
/// recorded by the generator; ours may not be more than 1 dB worse.
fn reference_fp8_psnr() -> f64 {
    let m = manifest();
    let case = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "large_fp8_cfg")
        .unwrap()
        .clone();
    case["reference_psnr_vs_f32_db"].as_f64().unwrap()
}

#[test]
fn fp8_scaled_checkpoint_matches_reference() {
    // Same arithmetic as the reference once dequantised: the f32 end-to-end bound applies.
    let (_, image) = run_case("sd35-tiny-large-fp8", "large_fp8_cfg", Precision::Fp8, 1e-3);
    let f32_image = golden("e2e_large_cfg.safetensors")["image"].clone();
    let ours = psnr(&image, &f32_image);
    let floor = reference_fp8_psnr() - 1.0;
    eprintln!(
        "fp8_scaled file: PSNR vs f32 {ours:.2} dB (reference {:.2} dB)",
        reference_fp8_psnr()
    );
    assert!(ours >= floor, "PSNR {ours:.2} dB < {floor:.2} dB");
}

#[test]
fn fp8_quantised_at_load_keeps_psnr() {
    // Per-output-channel F8E4M3 quantisation of the f32 weights at load time.
    let m = manifest();
    let case = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "large_cfg")
        .unwrap()
        .clone();
    let p = load("sd35-tiny-large", Precision::Fp8);
    let latents = p.sample(&request(&p, &case), &mut |_, _| {}).unwrap();
    let image = ((p.decode(&latents).unwrap() / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    let f32_image = golden("e2e_large_cfg.safetensors")["image"].clone();
    let ours = psnr(&image, &f32_image);
    let floor = reference_fp8_psnr() - 1.0;
    eprintln!(
        "fp8 quantised at load: PSNR vs f32 {ours:.2} dB (reference per-tensor fp8 {:.2} dB)",
        reference_fp8_psnr()
    );
    assert!(ours >= floor, "PSNR {ours:.2} dB < {floor:.2} dB");
}

#[test]
fn same_seed_gives_identical_images() {
    let p = load("sd35-tiny-medium", Precision::F32);
    let mut req = p.default_request("a red fox in the snow");
    req.width = 64;
    req.height = 48;
    req.steps = 3;
    req.seed = 42;
    req.slg = None;
    let a = p.generate(&req, &mut |_, _| {}).unwrap();
    let b = p.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(a, b);
    req.seed = 43;
    let c = p.generate(&req, &mut |_, _| {}).unwrap();
    assert_ne!(a, c);
}

#[test]
fn variants_come_from_the_caller_or_the_structure_and_contradictions_are_refused() {
    let large = load("sd35-tiny-large", Precision::F32);
    assert_eq!(
        (large.variant(), large.variant_source()),
        (Variant::Large, VariantSource::Assumed)
    );
    let medium = load("sd35-tiny-medium-single", Precision::F32);
    assert_eq!(
        (medium.variant(), medium.variant_source()),
        (Variant::Medium, VariantSource::Structure)
    );
    let req = medium.default_request("x");
    assert_eq!((req.steps, req.guidance), (40, 4.5));
    assert_eq!(req.slg.unwrap().layers, vec![7, 8, 9]);
    assert_eq!(model_card(Variant::LargeTurbo).steps, 4);

    let with_variant = |model: &str, variant| {
        let opts = PipelineOptions {
            variant: Some(variant),
            ..PipelineOptions::default()
        };
        Pipeline::load(&testdata().join(model), &opts)
    };
    // The same MMDiT weights serve as turbo when the caller says so: 4 steps, no guidance.
    let turbo = with_variant("sd35-tiny-large", Variant::LargeTurbo).unwrap();
    assert_eq!(turbo.variant_source(), VariantSource::Requested);
    let req = turbo.default_request("x");
    assert_eq!((req.steps, req.guidance, req.slg), (4, 0.0, None));
    for (model, variant) in [
        ("sd35-tiny-large", Variant::Medium),
        ("sd35-tiny-medium", Variant::Large),
    ] {
        let err = with_variant(model, variant).unwrap_err();
        assert_eq!(err.exit_reason(), sd35_contract::ExitReason::EngineMismatch);
        assert!(err.to_string().contains("transformer"), "{err}");
    }
}

#[test]
fn bad_sizes_are_rejected_with_the_field_name() {
    let p = load("sd35-tiny-large", Precision::F32);
    let mut req = p.default_request("x");
    req.steps = 1;
    req.width = 72;
    let err = p.sample(&req, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("width"), "{err}");
    req.width = 64;
    req.height = p.max_size() + 16;
    let err = p.sample(&req, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("height"), "{err}");
}

#[test]
fn t5_can_be_left_out() {
    let opts = PipelineOptions {
        load_t5: false,
        ..PipelineOptions::default()
    };
    let p = Pipeline::load(&testdata().join("sd35-tiny-large"), &opts).unwrap();
    let parts = p.encode_parts("a fox").unwrap();
    assert_eq!(parts.t5.dims(), &[1, 256, 192]);
    assert_eq!(
        parts
            .t5
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

#[test]
fn t5_tokenizer_from_spiece_model_matches_reference_ids() {
    let src = testdata().join("sd35-tiny-large/tokenizer_3");
    let dir = std::env::temp_dir().join(format!("sd35-spiece-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["spiece.model", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let tok = sd35_pipeline::tokenizer::PromptTokenizer::t5(&dir, 256).unwrap();
    let text = std::fs::read_to_string(testdata().join("golden/tokens.json")).unwrap();
    let tokens: Value = serde_json::from_str(&text).unwrap();
    for (name, prompt) in manifest()["prompts"].as_object().unwrap() {
        let want: Vec<u32> = tokens[name]["t5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.encode(prompt.as_str().unwrap()).unwrap(),
            want,
            "T5 ids of `{name}` from spiece.model"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_generic_graph_takes_the_chunked_routes_on_the_tiny_models() {
    // Under `SD35_GENERIC_OPS=1` with a small `SD35_OP_CHUNK_ELEMENTS` (as `make test` runs
    // this file a second time), the tiny models' attention, convolutions and norms must really
    // be split, or the chunked routes would go untested.
    let graph = op_graph::current();
    eprintln!("op graph: {graph:?}");
    if !graph.generic || graph.chunk_elements >= op_graph::DEFAULT_CHUNK_ELEMENTS {
        eprintln!("fused graph or production chunk size: nothing is split on tiny models");
        return;
    }
    let before = op_graph::chunked_calls();
    let p = load("sd35-tiny-large", Precision::F32);
    let mut req = p.default_request("a lighthouse");
    (req.width, req.height, req.steps) = (64, 64, 1);
    p.generate(&req, &mut |_, _| {}).unwrap();
    let after = op_graph::chunked_calls();
    assert!(after > before, "no operation was chunked");
}
