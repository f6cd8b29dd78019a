//! The official `openai` Python client's `images.edit(...)`, unchanged, against
//! `sd35-server serve` with the tiny model over loopback: plain (an image and a mask, our
//! sampling fields through `extra_body`), and streamed (`stream=True`, `partial_images=2`),
//! whose previews come as `image_edit.partial_image` events and whose image is the plain
//! request's; JPEG output through `output_format`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use base64::Engine as _;
use common::serving::{Server, tiny};
use sd35_http::sample_images;

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

fn b64(s: &serde_json::Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s.as_str().unwrap())
        .unwrap()
}

const OPENAI_EDIT: &str = r#"
import json, sys
import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
extra = {"seed": 11, "steps": 4, "strength": 0.8}
out = {}
with open(sys.argv[2], "rb") as image, open(sys.argv[3], "rb") as mask:
    r = client.images.edit(image=image, mask=mask, prompt="a lighthouse at dusk",
                           extra_body=extra)
    out["plain"] = {"class": type(r).__name__, "n": len(r.data), "b64_json": r.data[0].b64_json}
with open(sys.argv[2], "rb") as image, open(sys.argv[3], "rb") as mask:
    stream = client.images.edit(image=image, mask=mask, prompt="a lighthouse at dusk",
                                stream=True, partial_images=2, extra_body=extra)
    out["events"] = [{
        "class": type(e).__name__,
        "type": e.type,
        "index": getattr(e, "partial_image_index", None),
        "size": e.size,
        "output_format": e.output_format,
        "b64_json": e.b64_json,
    } for e in stream]
with open(sys.argv[2], "rb") as image:
    r = client.images.edit(image=image, prompt="a lighthouse at dusk", size="32x32",
                           output_format="jpeg", output_compression=60, extra_body=extra)
    out["jpeg"] = r.data[0].b64_json
print(json.dumps(out))
"#;

#[test]
fn the_official_openai_client_edits_plain_and_streamed() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = tiny("golden/edit_image.png");
    // The golden mask, white where to repaint, as OpenAI draws masks: transparent there.
    let grey = sd35_http::api::picture::decode(
        "mask",
        &std::fs::read(tiny("golden/edit_mask.png")).unwrap(),
    )
    .unwrap();
    let (w, h) = (grey.picture.width, grey.picture.height);
    let levels = grey.picture.grey();
    let mask = dir.path().join("mask.png");
    std::fs::write(
        &mask,
        sample_images::transparent_mask(w, h, |x, y| levels[(y * w + x) as usize] >= 128),
    )
    .unwrap();
    let s = Server::start("sd35-tiny-large", &["--no-warmup"]);
    let out = Command::new(python)
        .arg("-c")
        .arg(OPENAI_EDIT)
        .arg(format!("http://{}/v1", s.addr))
        .arg(&image)
        .arg(&mask)
        .stderr(Stdio::inherit())
        .output()
        .expect("python");
    assert!(out.status.success(), "the openai client failed");
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["plain"]["class"], "ImagesResponse");
    assert_eq!(got["plain"]["n"], 1);
    let plain = b64(&got["plain"]["b64_json"]);
    assert_eq!(&plain[..8], b"\x89PNG\r\n\x1a\n");
    let events = got["events"].as_array().unwrap();
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
                "ImageEditPartialImageEvent",
                "image_edit.partial_image",
                Some(0)
            ),
            (
                "ImageEditPartialImageEvent",
                "image_edit.partial_image",
                Some(1)
            ),
            ("ImageEditCompletedEvent", "image_edit.completed", None),
        ]
    );
    for e in events {
        assert_eq!(
            (e["size"].as_str(), e["output_format"].as_str()),
            (Some(format!("{w}x{h}").as_str()), Some("png"))
        );
    }
    assert!(
        b64(&events[2]["b64_json"]) == plain,
        "the streamed edit differs from the plain one"
    );
    assert!(b64(&events[0]["b64_json"]) != plain);
    let jpeg = b64(&got["jpeg"]);
    assert_eq!(&jpeg[..3], b"\xff\xd8\xff");
    // 4 steps at 0.8 run 3 (the first of diffusers' cut), 2 previews: after steps 1 and 2.
    assert_eq!(s.metric("sd35_partial_images_total"), 2.0);
    assert_eq!(s.metric("sd35_images_generated_total"), 3.0);
}

/// The scripts of `examples/editing/`, run as the README tells a person to run them.
#[test]
fn the_editing_examples_run_against_the_server() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/editing");
    let dir = tempfile::tempdir().unwrap();
    let image = tiny("golden/edit_image.png");
    let mask = dir.path().join("mask.png");
    std::fs::write(
        &mask,
        sample_images::transparent_mask(64, 48, |x, y| x > 20 && y > 10),
    )
    .unwrap();
    let s = Server::start("sd35-tiny-large", &["--no-warmup", "--variant=large-turbo"]);
    let url = format!("http://{}", s.addr);
    let ran = Command::new("bash")
        .arg(examples.join("edit-curl.sh"))
        .arg(&image)
        .arg(&mask)
        .env("SD35_URL", &url)
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(ran.success(), "edit-curl.sh failed");
    let png = std::fs::read(dir.path().join("edited.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let jpeg = std::fs::read(dir.path().join("edited-img2img.jpg")).unwrap();
    assert_eq!(&jpeg[..3], b"\xff\xd8\xff");
    let Some(python) = python() else { return };
    let ran = Command::new(python)
        .arg(examples.join("edit_openai.py"))
        .arg(&image)
        .arg(&mask)
        .env("SD35_URL", &url)
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(ran.success(), "edit_openai.py failed");
    let plain = std::fs::read(dir.path().join("edited.png")).unwrap();
    let streamed = std::fs::read(dir.path().join("edited-streamed.png")).unwrap();
    assert!(
        plain == streamed,
        "the streamed edit differs from the plain one"
    );
    assert!(
        plain == png,
        "the Python client and curl made different images"
    );
    assert!(dir.path().join("preview-0.png").is_file());
}
