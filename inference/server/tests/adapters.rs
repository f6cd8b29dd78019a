//! LoRA adapters and ControlNets with the tiny models, from the command line and served:
//! - `generate --lora FILE[:SCALE]` and `generate --controlnet … --control-image …` reproduce
//!   diffusers' goldens (every case of `golden/loras.json` and `golden/controlnets.json`, from
//!   their initial latents) within one 8-bit level;
//! - `serve --lora NAME[:SCALE]=PATH --controlnet MODE=PATH` serves them: a LoRA request and a
//!   ControlNet request (as sent, and preprocessed into Canny edges) answer `generate`'s image
//!   byte for byte; AUTOMATIC1111's `<lora:NAME:WEIGHT>` tags are the `loras` field;
//!   `/v1/models` and `/sdapi/v1/loras` list what is served, and the memory plan counts it;
//!   an unknown adapter or an unserved mode is a 422 naming it and listing what is served;
//! - an adapter file that is missing, not an adapter, or made for another model fails start-up
//!   with its exit code and a one-line termination message naming the file and the mismatch.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use candle_core::Device;
use common::serving::{BIN, Server, generate, tiny};
use sd35_contract::ExitReason;
use sd35_http::backend::decode_png;
use sd35_http::client;

fn temp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sd35-adapters-{}-{name}", std::process::id()))
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn manifest(name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(tiny(&format!("golden/{name}"))).unwrap()).unwrap()
}

/// The largest per-byte difference between a PNG's pixels and a golden's `image` (f32 in
/// [0, 1], `[1, 3, H, W]`) as 8-bit levels.
fn worst_level_difference(png: &[u8], golden: &str) -> u8 {
    let tensors =
        candle_core::safetensors::load(tiny(&format!("golden/{golden}")), &Device::Cpu).unwrap();
    let image = tensors["image"]
        .squeeze(0)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let got = decode_png(png).expect("a PNG");
    assert_eq!(got.len(), image.len(), "{golden}: image size");
    got.iter()
        .zip(&image)
        .map(|(&p, &v)| p.abs_diff((v * 255.0).round().clamp(0.0, 255.0) as u8))
        .max()
        .unwrap_or(0)
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|&a| a.to_owned()).collect()
}

#[test]
fn generate_with_adapters_and_controlnets_matches_the_reference() {
    let m = manifest("loras.json");
    for case in m["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let model = case["model"].as_str().unwrap();
        let precision = if model.ends_with("fp8") { "fp8" } else { "f32" };
        let mut args = owned(&[
            "--precision",
            precision,
            "--prompt",
            m["prompt"].as_str().unwrap(),
            "--negative-prompt",
            m["negative_prompt"].as_str().unwrap(),
            "--width",
            &m["width"].to_string(),
            "--height",
            &m["height"].to_string(),
            "--steps",
            &m["steps"].to_string(),
            "--guidance",
            &m["guidance"].to_string(),
            "--slg-layers",
            "none",
            "--init-latents",
            &path(&tiny(&format!("golden/{}", m["init"].as_str().unwrap()))),
        ]);
        for lora in case["loras"].as_array().unwrap() {
            let file = tiny(&format!("lora/{}", lora["file"].as_str().unwrap()));
            args.push("--lora".into());
            args.push(format!("{}:{}", file.display(), lora["scale"]));
        }
        let worst =
            worst_level_difference(&generate(model, &args), &format!("lora_{id}.safetensors"));
        eprintln!("lora {id}: worst difference from diffusers {worst} levels");
        assert!(worst <= 1, "lora {id}: {worst} levels from diffusers");
    }

    let m = manifest("controlnets.json");
    for case in m["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let field = |k: &str| case[k].to_string();
        let args = owned(&[
            "--precision",
            "f32",
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--negative-prompt",
            case["negative_prompt"].as_str().unwrap(),
            "--width",
            &field("width"),
            "--height",
            &field("height"),
            "--steps",
            &field("steps"),
            "--guidance",
            &field("guidance"),
            "--init-latents",
            &path(&tiny(&format!("golden/controlnet_{id}.init.safetensors"))),
            "--controlnet",
            &path(&tiny(case["controlnet"].as_str().unwrap())),
            "--control-mode",
            case["mode"].as_str().unwrap(),
            "--control-image",
            &path(&tiny(&format!(
                "golden/{}",
                case["control_image"].as_str().unwrap()
            ))),
            "--control-scale",
            &field("scale"),
            "--control-start",
            &field("control_guidance_start"),
            "--control-end",
            &field("control_guidance_end"),
        ]);
        let worst = worst_level_difference(
            &generate(case["model"].as_str().unwrap(), &args),
            &format!("controlnet_{id}.safetensors"),
        );
        eprintln!("controlnet {id}: worst difference from diffusers {worst} levels");
        assert!(worst <= 1, "controlnet {id}: {worst} levels from diffusers");
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &serde_json::Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text.as_str().expect("base64"))
        .expect("base64")
}

const PROMPT: &str = "a lighthouse on a cliff at dawn, watercolour";

#[test]
fn served_adapters_and_controlnets_make_generates_images() {
    let style = tiny("lora/style.safetensors");
    let detail = tiny("lora/detail.safetensors");
    let canny = tiny("controlnet/canny");
    let flags = [
        "--no-warmup".to_owned(),
        format!("--lora=style:0.7={}", style.display()),
        format!("--lora=detail={}", detail.display()),
        format!("--controlnet=canny={}", canny.display()),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let s = Server::start("sd35-tiny-large", &flags);

    // What is served, as the APIs list it.
    let models = client::get(s.addr, "/v1/models").unwrap().json();
    let entry = &models["data"][0];
    assert_eq!(
        entry["adapters"],
        serde_json::json!([
            {"name": "style", "scale": 0.7, "text_encoders": false},
            {"name": "detail", "scale": 1.0, "text_encoders": true},
        ])
    );
    assert_eq!(entry["control_modes"], serde_json::json!(["canny"]));
    let loras = client::get(s.addr, "/sdapi/v1/loras").unwrap().json();
    assert_eq!(loras[0]["name"], "style");
    assert_eq!(loras[0]["alias"], "style");
    assert_eq!(loras[0]["path"], path(&style));
    assert!(loras[0]["metadata"].is_object(), "{loras}");
    assert_eq!(loras[1]["name"], "detail");

    // A LoRA request on the seed's route: the default scale of `style`, `detail` at 1.3.
    let body = serde_json::json!({
        "prompt": PROMPT, "width": 64, "height": 48, "steps": 4, "seed": 5,
        "loras": [{"name": "style"}, {"name": "detail", "scale": 1.3}],
    });
    let served = client::post_json(s.addr, "/v1/txt2img", &body.to_string()).unwrap();
    assert_eq!(served.status, 200, "{}", served.text());
    let base = owned(&[
        "--prompt", PROMPT, "--width", "64", "--height", "48", "--steps", "4",
    ]);
    let mut args = base.clone();
    args.extend(owned(&["--seed", "5", "--lora"]));
    args.push(format!("{}:0.7", style.display()));
    args.push("--lora".into());
    args.push(format!("{}:1.3", detail.display()));
    let with_loras = generate("sd35-tiny-large", &args);
    assert!(
        served.body == with_loras,
        "the served LoRA image differs from generate's"
    );

    // The same adapters as AUTOMATIC1111 prompt tags: the same image; the prompt is reported
    // as sent.
    let tagged = format!("{PROMPT} <lora:style:0.7> <lora:detail:1.3>");
    let body = serde_json::json!({
        "prompt": tagged, "width": 64, "height": 48, "steps": 4, "seed": 5,
    });
    let a1111 = client::post_json(s.addr, "/sdapi/v1/txt2img", &body.to_string()).unwrap();
    assert_eq!(a1111.status, 200, "{}", a1111.text());
    let a1111 = a1111.json();
    assert!(
        unb64(&a1111["images"][0]) == with_loras,
        "the tags are `loras`"
    );
    assert_eq!(a1111["parameters"]["prompt"], tagged.as_str());

    // A ControlNet request (OpenAI route, the control image as sent) and one whose picture is
    // made into Canny edges here.
    let control = std::fs::read(tiny("golden/controlnet_canny.png")).unwrap();
    let body = serde_json::json!({
        "prompt": PROMPT, "size": "64x48", "steps": 4, "seed": 9,
        "control": {"mode": "canny", "image": b64(&control), "scale": 0.5, "end": 0.8},
    });
    let r = client::post_json(s.addr, "/v1/images/generations", &body.to_string()).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let served = unb64(&r.json()["data"][0]["b64_json"]);
    let mut args = base.clone();
    args.extend(owned(&[
        "--seed",
        "9",
        "--controlnet",
        &path(&canny),
        "--control-mode",
        "canny",
        "--control-image",
        &path(&tiny("golden/controlnet_canny.png")),
        "--control-scale",
        "0.5",
        "--control-end",
        "0.8",
    ]));
    let controlled = generate("sd35-tiny-large", &args);
    assert!(
        served == controlled,
        "the served ControlNet image differs from generate's"
    );
    let picture = std::fs::read(tiny("golden/controlnet_blur.png")).unwrap();
    let body = serde_json::json!({
        "prompt": PROMPT, "width": 64, "height": 48, "steps": 4, "seed": 9,
        "control": {"mode": "canny", "image": b64(&picture),
                    "preprocess": {"low": 50, "high": 150}},
    });
    let served = client::post_json(s.addr, "/v1/txt2img", &body.to_string()).unwrap();
    assert_eq!(served.status, 200, "{}", served.text());
    let mut args = base.clone();
    args.extend(owned(&[
        "--seed",
        "9",
        "--controlnet",
        &path(&canny),
        "--control-mode",
        "canny",
        "--control-image",
        &path(&tiny("golden/controlnet_blur.png")),
        "--control-preprocess",
        "50,150",
    ]));
    assert!(
        served.body == generate("sd35-tiny-large", &args),
        "the served preprocessed ControlNet image differs from generate's"
    );
    assert!(served.body != controlled, "the condition matters");

    // What is not served is a 422 naming it and what is.
    for (route, body, field, named) in [
        (
            "/v1/txt2img",
            serde_json::json!({"prompt": "a", "loras": [{"name": "anime"}]}),
            "loras",
            vec!["`anime`", "`style`", "`detail`"],
        ),
        (
            "/v1/images/generations",
            serde_json::json!({"prompt": "a", "control": {"mode": "depth", "image": b64(&control)}}),
            "control.mode",
            vec!["`depth`", "`canny`"],
        ),
        (
            "/sdapi/v1/txt2img",
            serde_json::json!({"prompt": "a <lora:anime:0.5>"}),
            "prompt",
            vec!["`anime`", "`style`"],
        ),
    ] {
        let r = client::post_json(s.addr, route, &body.to_string()).unwrap();
        assert_eq!(r.status, 422, "{route}: {}", r.text());
        let error = &r.json()["error"];
        assert_eq!(error["field"], field, "{route}: {error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            named.iter().all(|n| message.contains(n)),
            "{route}: {message}"
        );
    }

    // The memory plan counts what is served beside the model.
    let weights = |s: &Server| {
        client::get(s.addr, "/v1/models").unwrap().json()["data"][0]["memory"]["weights_bytes"]
            .as_u64()
    };
    let with_adapters = weights(&s);
    drop(s);
    let plain = Server::start("sd35-tiny-large", &["--no-warmup"]);
    if let (Some(with), Some(without)) = (with_adapters, weights(&plain)) {
        assert!(with > without, "{with} <= {without}");
    }
}

/// Runs `serve` expecting it to fail at start-up; returns its exit code and termination
/// message.
fn failed_start(flags: &[String]) -> (Option<i32>, String) {
    let message = temp_file("termination-log");
    let _ = std::fs::remove_file(&message);
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--model")
        .arg(tiny("sd35-tiny-large"))
        .args(["--host", "127.0.0.1", "--port", "0", "--no-warmup"])
        .arg(format!("--termination-message-path={}", message.display()))
        .args(flags)
        .output()
        .expect("serve");
    let text = std::fs::read_to_string(&message).unwrap_or_default();
    let _ = std::fs::remove_file(&message);
    assert_eq!(text.lines().count(), 1, "one line: {text:?}");
    (out.status.code(), text)
}

#[test]
fn an_adapter_that_cannot_be_served_fails_start_up_naming_the_file_and_the_mismatch() {
    let medium = tiny("lora/medium.safetensors");
    let (code, text) = failed_start(&[format!("--lora=medium={}", medium.display())]);
    assert_eq!(code, Some(ExitReason::InvalidModel.code()), "{text}");
    assert!(
        text.starts_with("InvalidModel: --lora medium=")
            && text.contains("medium.safetensors")
            && text.contains("transformer_blocks.0.attn.to_q")
            && text.contains("another model"),
        "{text}"
    );
    let (code, text) = failed_start(&["--lora=gone=/nonexistent/gone.safetensors".to_owned()]);
    assert_eq!(code, Some(ExitReason::NotFound.code()), "{text}");
    assert!(text.contains("/nonexistent/gone.safetensors"), "{text}");
    let style = tiny("lora/style.safetensors");
    let (code, text) = failed_start(&[format!("--controlnet=canny={}", style.display())]);
    assert_eq!(code, Some(ExitReason::InvalidModel.code()), "{text}");
    assert!(
        text.contains("--controlnet canny=") && text.contains("style.safetensors"),
        "{text}"
    );
}
