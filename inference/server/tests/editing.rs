//! Image editing end to end with the tiny models, as processes over real HTTP on loopback:
//! - `generate --image [--mask] --strength --init-latents <golden noise>` makes diffusers'
//!   img2img and inpainting images (`inference/reference/make_edit_goldens.py`), each pixel
//!   within one 8-bit level;
//! - the server's three editing routes make, for the same seed, the very PNG `generate` makes;
//! - a medium-architecture model with fewer blocks than the model card's skip-layer guidance
//!   names serves (skip-layer guidance off by default, said in `/v1/models`), and a request
//!   naming a block it lacks is a 422.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use candle_core::{DType, Device, Tensor};
use common::serving::{BIN, Server, generate, generate_from, tiny};
use sd35_http::backend::decode_png;
use sd35_http::{client, sample_images};

fn golden(name: &str) -> PathBuf {
    tiny("golden").join(name)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(v: &serde_json::Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or(""))
        .unwrap()
}

#[test]
fn generate_edits_are_the_reference_images_within_one_level() {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden("edits.json")).unwrap()).unwrap();
    let image = golden(manifest["image"].as_str().unwrap());
    let mask = golden(manifest["mask"].as_str().unwrap());
    let mut worst: HashMap<String, u8> = HashMap::new();
    for case in manifest["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let init = golden(&format!("edit_{id}.init.safetensors"));
        let (steps, guidance, strength) = (
            case["steps"].to_string(),
            case["guidance"].to_string(),
            case["strength"].to_string(),
        );
        let mut args: Vec<&str> = vec![
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--negative-prompt",
            case["negative_prompt"].as_str().unwrap(),
            "--steps",
            &steps,
            "--guidance",
            &guidance,
            "--strength",
            &strength,
            // diffusers' edit pipelines have no skip-layer guidance.
            "--slg-layers",
            "none",
            "--precision",
            "f32",
        ];
        let (image, mask, init) = (
            image.to_str().unwrap(),
            mask.to_str().unwrap(),
            init.to_str().unwrap(),
        );
        args.extend(["--image", image, "--init-latents", init]);
        if case["kind"] == "inpaint" {
            args.extend(["--mask", mask]);
        }
        let png = generate(case["model"].as_str().unwrap(), &args);
        let pixels = decode_png(&png).unwrap();
        // The reference's image, [1, 3, H, W] in [0, 1], as 8-bit pixels row by row.
        let tensors =
            candle_core::safetensors::load(golden(&format!("edit_{id}.safetensors")), &Device::Cpu)
                .unwrap();
        let reference: Vec<u8> = (&tensors["image"] * 255.0)
            .and_then(|t| t.round())
            .and_then(|t| t.squeeze(0))
            .and_then(|t| t.permute((1, 2, 0)))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t: Tensor| t.to_vec1::<f32>())
            .unwrap()
            .into_iter()
            .map(|v| v.clamp(0.0, 255.0) as u8)
            .collect();
        assert_eq!(pixels.len(), reference.len(), "{id}");
        let max = pixels
            .iter()
            .zip(&reference)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        worst.insert(id.to_owned(), max);
        assert!(max <= 1, "{id}: a pixel is {max} levels from the reference");
    }
    eprintln!("largest difference per case, in 8-bit levels: {worst:?}");
    assert_eq!(worst.len(), 12);
}

#[test]
fn served_edits_are_the_png_generate_makes_for_the_same_seed() {
    let model = tiny("sd35-tiny-large");
    let image = std::fs::read(golden("edit_image.png")).unwrap();
    let white = std::fs::read(golden("edit_mask.png")).unwrap();
    // The same mask as OpenAI draws it: transparent where the grey mask is white.
    let grey = sd35_http::api::picture::decode("mask", &white).unwrap();
    let (w, h) = (grey.picture.width, grey.picture.height);
    let levels = grey.picture.grey();
    let transparent =
        sample_images::transparent_mask(w, h, |x, y| levels[(y * w + x) as usize] >= 128);
    let cli = |mask: bool| {
        let (img, msk) = (golden("edit_image.png"), golden("edit_mask.png"));
        let mut args = vec![
            "--prompt",
            "a lighthouse at dusk",
            "--steps",
            "4",
            "--seed",
            "11",
            "--strength",
            "0.8",
            "--image",
            img.to_str().unwrap(),
        ];
        if mask {
            args.extend(["--mask", msk.to_str().unwrap()]);
        }
        generate_from(&model, &args)
    };
    let (plain, inpainted) = (cli(false), cli(true));
    assert_ne!(plain, inpainted);

    let s = Server::start("sd35-tiny-large", &["--no-warmup"]);
    let json = serde_json::json!({
        "prompt": "a lighthouse at dusk",
        "image": b64(&image),
        "mask": b64(&white),
        "steps": 4,
        "seed": 11,
        "strength": 0.8,
    });
    let r = client::post_json(s.addr, "/v1/img2img", &json.to_string()).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == inpainted, "/v1/img2img differs from generate");
    let mut unmasked = json.clone();
    unmasked.as_object_mut().unwrap().remove("mask");
    let r = client::post_json(s.addr, "/v1/img2img", &unmasked.to_string()).unwrap();
    assert!(
        r.body == plain,
        "/v1/img2img without a mask differs from generate"
    );

    let r = client::post_form(
        s.addr,
        "/v1/images/edits",
        &[
            ("image", Some("image.png"), &image),
            ("mask", Some("mask.png"), &transparent),
            ("prompt", None, b"a lighthouse at dusk"),
            ("steps", None, b"4"),
            ("seed", None, b"11"),
            ("strength", None, b"0.8"),
        ],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        unb64(&r.json()["data"][0]["b64_json"]) == inpainted,
        "/v1/images/edits differs from generate"
    );

    let a1111 = serde_json::json!({
        "prompt": "a lighthouse at dusk",
        "init_images": [b64(&image)],
        "mask": b64(&white),
        "mask_blur": 0,
        "steps": 4,
        "seed": 11,
        "denoising_strength": 0.8,
    });
    let r = client::post_json(s.addr, "/sdapi/v1/img2img", &a1111.to_string()).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        unb64(&r.json()["images"][0]) == inpainted,
        "/sdapi/v1/img2img differs from generate"
    );
    assert_eq!(s.metric("sd35_images_generated_total"), 4.0);
}

/// A copy of the tiny medium model whose transformer keeps `blocks` of its 10 blocks (the
/// first `blocks − 1` and the last, which has no context output), in `dir`.
fn fewer_blocks(dir: &Path, blocks: usize) -> PathBuf {
    let source = tiny("sd35-tiny-medium");
    let root = dir.join("medium-short");
    std::fs::create_dir_all(root.join("transformer")).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "transformer" {
            std::os::unix::fs::symlink(entry.path(), root.join(entry.file_name())).unwrap();
        }
    }
    let transformer = source.join("transformer");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(transformer.join("config.json")).unwrap()).unwrap();
    let depth = config["num_layers"].as_u64().unwrap() as usize;
    config["num_layers"] = serde_json::json!(blocks);
    std::fs::write(
        root.join("transformer/config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    let mut kept: HashMap<String, Tensor> = HashMap::new();
    for entry in std::fs::read_dir(&transformer).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            for (name, t) in candle_core::safetensors::load(&path, &Device::Cpu).unwrap() {
                let renamed = match name
                    .strip_prefix("transformer_blocks.")
                    .and_then(|rest| rest.split_once('.'))
                {
                    Some((i, rest)) => {
                        let i: usize = i.parse().unwrap();
                        if i + 1 == depth {
                            Some(format!("transformer_blocks.{}.{rest}", blocks - 1))
                        } else if i + 1 < blocks {
                            Some(name.clone())
                        } else {
                            None
                        }
                    }
                    None => Some(name.clone()),
                };
                if let Some(n) = renamed {
                    kept.insert(n, t);
                }
            }
        }
    }
    candle_core::safetensors::save(
        &kept,
        root.join("transformer/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    root
}

#[test]
fn a_medium_model_with_fewer_blocks_than_the_card_names_serves_without_skip_layer_guidance() {
    let dir = tempfile::tempdir().unwrap();
    let model = fewer_blocks(dir.path(), 6);
    // With the warm-up, which samples the default request (guidance 4.5: skip-layer guidance
    // would run).
    let s = Server::start(model.to_str().unwrap(), &["--variant=medium"]);
    let models = client::get(s.addr, "/v1/models").unwrap().json();
    let m = &models["data"][0];
    assert_eq!(m["variant"], "medium");
    assert!(m["defaults"]["skip_layer_guidance"].is_null(), "{m}");
    let warnings = m["warnings"].to_string();
    assert!(
        warnings.contains("skip-layer guidance is off by default")
            && warnings.contains("[7, 8, 9]"),
        "{warnings}"
    );
    let body = |extra: &str| {
        // Ten steps: skip-layer guidance runs at step 1 (0.01 · 10 < 1 < 0.2 · 10).
        format!(r#"{{"prompt":"a fox","width":32,"height":32,"steps":10,"seed":1{extra}}}"#)
    };
    let plain = client::post_json(s.addr, "/v1/txt2img", &body("")).unwrap();
    assert_eq!(plain.status, 200, "{}", plain.text());
    let r = client::post_json(s.addr, "/v1/txt2img", &body(r#","slg_layers":[7]"#)).unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["field"].as_str()),
        (422, Some("slg_layers")),
        "{}",
        r.text()
    );
    assert!(r.text().contains("6 blocks"), "{}", r.text());
    let with = client::post_json(s.addr, "/v1/txt2img", &body(r#","slg_layers":[3]"#)).unwrap();
    assert_eq!(with.status, 200, "{}", with.text());
    // Naming a block that exists turns skip-layer guidance on: another image.
    assert!(with.body != plain.body);
    let openapi = client::get(s.addr, "/openapi.json").unwrap().json();
    assert_eq!(
        openapi["components"]["schemas"]["Txt2ImgRequest"]["properties"]["slg_layers"]["items"]["maximum"],
        5
    );

    // `generate` falls back the same way, and refuses a block that does not exist.
    let png = generate_from(
        &model,
        &[
            "--prompt", "a fox", "--width", "32", "--height", "32", "--steps", "10", "--seed", "1",
        ],
    );
    assert!(
        png == plain.body,
        "generate and serve differ on the fallback"
    );
    let refused = Command::new(BIN)
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .args([
            "--prompt", "a", "--width", "32", "--height", "32", "--steps", "2",
        ])
        .args(["--slg-layers", "7", "--out", "/dev/null"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("layer 7 does not exist"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
