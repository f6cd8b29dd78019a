//! The playground at `/` in headless Chromium, driven through the DevTools protocol as a person
//! uses it (`tests/browser/playground.py`): the page shows the served model, variant,
//! precision and device and fills its fields from the model's defaults, with no console
//! error; a text-to-image run shows at least one live preview before the final image and
//! fills the progress bar; an edit of an uploaded image with a mask painted by mouse strokes
//! returns an image; the history offers the request as curl and as Python (openai). The
//! screenshots are written to `target/playground/` for review.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use common::serving::{Server, tiny};

/// The browser: `$SD35_CHROMIUM`, else `chromium` on the PATH (Debian's `chromium` package).
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SD35_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("chromium"))
            .find(|p| p.is_file())
    })
}

/// A Python 3 for the driver (it needs the standard library only): `$SD35_PYTHON`, else
/// `python3`.
fn interpreter() -> PathBuf {
    std::env::var_os("SD35_PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from)
}

/// `target/playground`, where the screenshots go.
fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        PathBuf::from,
    );
    target.join("playground")
}

#[test]
fn a_person_generates_and_edits_in_the_playground_in_headless_chromium() {
    let Some(browser) = chromium() else {
        // CI installs Chromium (.ci/run), so there a missing browser is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "no chromium on the PATH; .ci/run installs Debian's `chromium`"
        );
        eprintln!("SKIPPED: no chromium on the PATH (install Debian's `chromium` package)");
        return;
    };
    let s = Server::start("sd35-tiny-medium", &["--no-warmup", "--variant=medium"]);
    let shots = screenshot_dir();
    let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/playground.py");
    let out = Command::new(interpreter())
        .arg(&driver)
        .arg(&browser)
        .arg(format!("http://{}/", s.addr))
        .arg(tiny("golden/edit_image.png").canonicalize().unwrap())
        .arg(&shots)
        .stderr(Stdio::inherit())
        .output()
        .expect("run the driver");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the driver failed ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    assert!(out.status.success(), "the driver failed: {report}");
    assert_eq!(report["problems"], serde_json::json!([]), "console errors");
    let model = report["model"].as_str().unwrap();
    for word in ["medium", "f32", "cpu"] {
        assert!(model.contains(word), "{model}");
    }
    // The model card's defaults fill the form (tiny models are at most 256 px).
    assert_eq!(report["defaults"], serde_json::json!([256, 256, 40, 4.5]));
    // Previews first, then the final image.
    let seen: Vec<&str> = report["txt2img_seen"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        seen.first() == Some(&"preview") && seen.last() == Some(&"final"),
        "{seen:?}"
    );
    assert_eq!(report["progress"], 1.0);
    assert!(
        report["txt2img_status"]
            .as_str()
            .unwrap()
            .starts_with("Seed 5, 48x32, 6 steps"),
        "{report}"
    );
    assert!(
        report["txt2img_image"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,iVBORw0KGgo")
    );
    // The edit: the image's size, a painted mask, an image back.
    assert_eq!(report["edit_size"], serde_json::json!([64, 48]));
    assert!(report["painted"].as_f64().unwrap() > 0.05, "{report}");
    assert!(
        report["edit_entry"]
            .as_str()
            .unwrap()
            .contains("inpainting (painted mask), strength 0.8"),
        "{report}"
    );
    assert!(
        report["edit_image"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,iVBORw0KGgo")
    );
    let curl = report["curl"].as_str().unwrap();
    assert!(
        curl.contains("/v1/images/edits") && curl.contains("-F mask=@mask.png"),
        "{curl}"
    );
    let python = report["python"].as_str().unwrap();
    assert!(
        python.contains("client.images.edit(") && python.contains("\"strength\":0.8"),
        "{python}"
    );
    // The snippets, run as a person would run them beside the image and the mask, make the
    // image the page showed.
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    };
    let shown = b64(&report["edit_image_b64"]);
    let work = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny("golden/edit_image.png"),
        work.path().join("edit_image.png"),
    )
    .unwrap();
    std::fs::write(work.path().join("mask.png"), b64(&report["mask_b64"])).unwrap();
    if std::env::var_os("SD35_PYTHON").is_some() {
        let ran = Command::new(interpreter())
            .args(["-c", python])
            .current_dir(work.path())
            .status()
            .unwrap();
        assert!(ran.success(), "the Python snippet failed:\n{python}");
        let made = std::fs::read(work.path().join("image-0.png")).unwrap();
        assert!(made == shown, "the Python snippet made another image");
    }
    let ran = Command::new("sh")
        .args(["-c", curl])
        .current_dir(work.path())
        .status()
        .unwrap();
    assert!(ran.success(), "the curl snippet failed:\n{curl}");
    let made = std::fs::read(work.path().join("edited.png")).unwrap();
    assert!(made == shown, "the curl snippet made another image");
    let key = "sd35_http_requests_total{route=\"/v1/images/edits\",status=\"200\"}";
    let snippets = if std::env::var_os("SD35_PYTHON").is_some() {
        3.0
    } else {
        2.0
    };
    assert_eq!(s.metric(key), snippets);
    for shot in ["loaded_shot", "txt2img_shot", "edit_shot"] {
        let path = report[shot].as_str().unwrap();
        let png = std::fs::read(path).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{path}");
    }
}
