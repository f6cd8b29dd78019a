//! LoRA adapters against diffusers + PEFT on the tiny models: one adapter, two with different
//! scales (on the transformer and both CLIP encoders), an sd-scripts (kohya) file, and an
//! adapter over the fp8_scaled checkpoint. The adapters and goldens were made by
//! `inference/reference/make_lora_goldens.py`.

#![allow(clippy::unwrap_used)]

mod common;

use candle_core::Tensor;
use common::{golden, golden_json, image_of as image, load, psnr, rel_err, testdata};
use sd35_pipeline::{GenerateRequest, Pipeline, Precision, op_graph};
use serde_json::Value;

fn request(p: &Pipeline, m: &Value) -> GenerateRequest {
    let mut req = p.default_request(m["prompt"].as_str().unwrap());
    req.negative_prompt = m["negative_prompt"].as_str().unwrap().to_owned();
    req.width = m["width"].as_u64().unwrap() as usize;
    req.height = m["height"].as_u64().unwrap() as usize;
    req.steps = m["steps"].as_u64().unwrap() as usize;
    req.guidance = m["guidance"].as_f64().unwrap();
    req.slg = None;
    req.init_latents = Some(golden(m["init"].as_str().unwrap())["latents"].clone());
    req
}

#[test]
fn adapters_match_the_reference() {
    let m = golden_json("loras.json");
    for case in m["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let model = case["model"].as_str().unwrap();
        let precision = if model.ends_with("fp8") {
            Precision::Fp8
        } else {
            Precision::F32
        };
        let mut p = load(model, precision);
        let mut req = request(&p, &m);
        for lora in case["loras"].as_array().unwrap() {
            let file = lora["file"].as_str().unwrap();
            let name = file.trim_end_matches(".safetensors");
            p.add_lora(name, &testdata().join("lora").join(file))
                .unwrap();
            req.loras
                .push((name.to_owned(), lora["scale"].as_f64().unwrap()));
        }
        let latents = p.sample(&req, &mut |_, _| {}).unwrap();
        let img = image(&p, &latents);
        let g = golden(&format!("lora_{id}.safetensors"));
        let (e_lat, e_img) = (rel_err(&latents, &g["latents"]), rel_err(&img, &g["image"]));
        let db = psnr(&img, &g["image"]);
        eprintln!(
            "lora {id}: latents {e_lat:.2e}, image {e_img:.2e} relative, PSNR {db:.1} dB ({} op \
             graph)",
            op_graph::current().name()
        );
        assert!(
            e_lat <= 1e-3 && e_img <= 1e-3,
            "{id}: {e_lat:.2e} {e_img:.2e}"
        );
        assert!(db >= 45.0, "{id}: PSNR {db:.1} dB");
        // The adapter visibly changes the image: the same request without it is far away.
        let mut base = req.clone();
        base.loras.clear();
        let without = p.sample(&base, &mut |_, _| {}).unwrap();
        assert!(
            rel_err(&without, &latents) > 1e-2,
            "{id}: the adapter did nothing"
        );
    }
}

#[test]
fn a_request_without_adapters_is_exactly_the_base_model_whatever_ran_before() {
    let m = golden_json("loras.json");
    let mut p = load("sd35-tiny-large", Precision::F32);
    p.add_lora("style", &testdata().join("lora/style.safetensors"))
        .unwrap();
    p.add_lora("detail", &testdata().join("lora/detail.safetensors"))
        .unwrap();
    let base_req = request(&p, &m);
    let before = p.sample(&base_req, &mut |_, _| {}).unwrap();
    let mut adapted = base_req.clone();
    adapted.loras = vec![("style".into(), 1.5), ("detail".into(), -0.4)];
    p.sample(&adapted, &mut |_, _| {}).unwrap();
    let after = p.sample(&base_req, &mut |_, _| {}).unwrap();
    let bits = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&before), bits(&after));
}

#[test]
fn adapters_that_do_not_fit_are_refused_at_load_naming_the_file_and_module() {
    let mut p = load("sd35-tiny-large", Precision::F32);
    let medium = testdata().join("lora/medium.safetensors");
    let err = p.add_lora("medium", &medium).unwrap_err().to_string();
    assert!(
        err.contains("medium.safetensors")
            && err.contains("transformer_blocks.0.attn.to_q")
            && err.contains("another model"),
        "{err}"
    );
    let junk = std::env::temp_dir().join(format!("sd35-junk-{}.safetensors", std::process::id()));
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let err = p.add_lora("junk", &junk).unwrap_err().to_string();
    std::fs::remove_file(&junk).unwrap();
    assert!(
        err.contains("junk") && err.contains("not a safetensors file"),
        "{err}"
    );
    // An unknown adapter in a request is named with what is served.
    p.add_lora("style", &testdata().join("lora/style.safetensors"))
        .unwrap();
    let mut req = p.default_request("x");
    (req.width, req.height, req.steps) = (32, 32, 1);
    req.loras = vec![("nope".into(), 1.0)];
    let err = p.sample(&req, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("`nope`") && err.contains("`style`"), "{err}");
}
