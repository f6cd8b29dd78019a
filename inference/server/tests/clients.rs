//! The clients people run, against `sd35-server serve` with the tiny model over loopback:
//! - the official `openai` Python client's streamed generation (`stream=True`,
//!   `partial_images=2`) reads previews, then the image — the very image the same request
//!   makes without streaming;
//! - a client that leaves a stream stops its image at the next step;
//! - the AUTOMATIC1111 API makes the image `/v1/txt2img` makes for the same parameters.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::serving::Server;
use sd35_http::client;

/// The interpreter with the test clients (`tools/python-env.sh`), from `SD35_PYTHON`.
fn python() -> Option<PathBuf> {
    match std::env::var_os("SD35_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "SD35_PYTHON is unset; `make unit` sets it from tools/python-env.sh"
            );
            eprintln!("SKIPPED: SD35_PYTHON is unset (run through `make unit`)");
            None
        }
    }
}

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

const OPENAI_STREAM: &str = r#"
import json, sys
import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
stream = client.images.generate(model="large-turbo", prompt="a red cube", size="64x64",
                                stream=True, partial_images=2, extra_body={"seed": 5})
events = []
for event in stream:
    events.append({
        "class": type(event).__name__,
        "type": event.type,
        "index": getattr(event, "partial_image_index", None),
        "size": event.size,
        "output_format": event.output_format,
        "b64_json": event.b64_json,
        "usage": event.usage.total_tokens if event.type == "image_generation.completed" else None,
    })
print(json.dumps(events))
"#;

#[test]
fn the_official_openai_client_streams_partial_images_then_the_image() {
    let Some(python) = python() else { return };
    let s = Server::start("sd35-tiny-large", &["--variant=large-turbo", "--no-warmup"]);
    let out = Command::new(python)
        .arg("-c")
        .arg(OPENAI_STREAM)
        .arg(format!("http://{}/v1", s.addr))
        .stderr(Stdio::inherit())
        .output()
        .expect("python");
    assert!(out.status.success(), "the openai client failed");
    let events: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<(&str, &str, Option<u64>)> = events
        .iter()
        .map(|e| {
            (
                e["class"].as_str().unwrap(),
                e["type"].as_str().unwrap(),
                e["index"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (
                "ImageGenPartialImageEvent",
                "image_generation.partial_image",
                Some(0)
            ),
            (
                "ImageGenPartialImageEvent",
                "image_generation.partial_image",
                Some(1)
            ),
            ("ImageGenCompletedEvent", "image_generation.completed", None),
        ]
    );
    for e in &events {
        assert_eq!(
            (e["size"].as_str(), e["output_format"].as_str()),
            (Some("64x64"), Some("png"))
        );
        assert_eq!(
            &b64(e["b64_json"].as_str().unwrap())[..8],
            b"\x89PNG\r\n\x1a\n"
        );
    }
    assert_eq!(events[2]["usage"], 0);
    // The streamed image is the image of the same request unstreamed; the previews differ.
    let r = client::post_json(
        s.addr,
        "/v1/images/generations",
        r#"{"prompt":"a red cube","size":"64x64","seed":5}"#,
    )
    .unwrap();
    let plain = b64(r.json()["data"][0]["b64_json"].as_str().unwrap());
    let streamed = b64(events[2]["b64_json"].as_str().unwrap());
    assert!(
        streamed == plain,
        "the streamed image differs from the unstreamed one"
    );
    assert!(b64(events[0]["b64_json"].as_str().unwrap()) != plain);
    // Four steps: previews after steps 1 and 3.
    assert_eq!(s.metric("sd35_partial_images_total"), 2.0);
}

#[test]
fn a_client_leaving_a_stream_stops_its_image() {
    let s = Server::start("sd35-tiny-large", &["--variant=large", "--no-warmup"]);
    let mut stream = client::send(
        s.addr,
        "POST",
        "/v1/images/generations",
        &[("Content-Type", "application/json")],
        br#"{"prompt":"a red cube","size":"64x64","steps":60,"stream":true,"partial_images":3}"#,
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    while !String::from_utf8_lossy(&seen).contains("image_generation.partial_image") {
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the stream ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    let started = Instant::now();
    while s.metric("sd35_images_cancelled_total") < 1.0 {
        assert!(started.elapsed() < Duration::from_secs(60), "not cancelled");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(s.metric("sd35_steps_total") < 60.0);
    assert_eq!(s.metric("sd35_images_generated_total"), 0.0);
    assert_eq!(s.metric("sd35_steps_outstanding"), 0.0);
}

#[test]
fn the_automatic1111_api_makes_the_txt2img_image() {
    let s = Server::start("sd35-tiny-large", &["--variant=large", "--no-warmup"]);
    let r = client::post_json(
        s.addr,
        "/sdapi/v1/txt2img",
        r#"{"prompt":"a red cube","negative_prompt":"blurry","width":32,"height":32,"steps":3,"cfg_scale":4.5,"seed":11,"batch_size":2,"sampler_name":"Euler a"}"#,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let images: Vec<Vec<u8>> = j["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| b64(i.as_str().unwrap()))
        .collect();
    for (i, img) in images.iter().enumerate() {
        let same = client::post_json(
            s.addr,
            "/v1/txt2img",
            &format!(
                r#"{{"prompt":"a red cube","negative_prompt":"blurry","width":32,"height":32,"steps":3,"guidance_scale":4.5,"seed":{}}}"#,
                11 + i
            ),
        )
        .unwrap();
        assert!(same.body == *img, "image {i} differs from /v1/txt2img's");
    }
    let info: serde_json::Value = serde_json::from_str(j["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], serde_json::json!([11, 12]));
    assert_eq!(info["sd_model_name"], "large");
    let models = client::get(s.addr, "/sdapi/v1/sd-models").unwrap().json();
    assert_eq!(models[0]["title"], "large");
}
