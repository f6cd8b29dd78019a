//! The OpenAPI document is the contract: schemathesis (tests/python/requirements.txt) reads
//! `/openapi.json` from `sd35-server serve` running the tiny model and sends what the document
//! allows and what it forbids, checking that no answer is a server error, every status is
//! documented for its route, every JSON answer matches its schema (each server-sent event of
//! `stream: true` included), everything the document forbids is refused, and no warning says
//! that validation refuses most of what the document allows (but for the editing routes,
//! whose images no schema can make decodable). The server stores
//! images in a local directory, so every route is reached: `/v1/txt2img` (`store`),
//! `/v1/images/generations` (`b64_json`, `url`, `stream`), the editing routes, `/sdapi/v1/*`;
//! it serves a LoRA, so requests naming it are generated.
//! A fixed seed, 100 s of budget.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::serving::Server;

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

/// The schemathesis command line, without a console script (any interpreter with the
/// package works).
const RUN: &str = "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())";

/// The seed of the run: the same cases every time on the same schema.
const SEED: &str = "20261201";
/// Seconds of generated cases at most; the whole test stays under two minutes of them.
const BUDGET_SECONDS: &str = "100";

#[test]
fn schemathesis_finds_the_server_true_to_its_openapi_document() {
    let Some(python) = python() else { return };
    // Small images and few steps keep a generation near a second on a CPU, so the budget
    // buys many cases; the document states these very limits.
    // With a local store, `response_format: "url"` and `store: true` are served (not
    // refused), so their answers are held to the document too.
    let artifacts = tempfile::tempdir().expect("temp dir");
    let store = format!("--artifacts-dir={}", artifacts.path().display());
    // A LoRA served, so the document's `loras` (its served names and scales) is held to what
    // the server does too.
    let lora = format!(
        "--lora=style={}",
        common::testdata("lora/style.safetensors").display()
    );
    let s = Server::start(
        "sd35-tiny-large",
        &[
            &store,
            &lora,
            "--no-warmup",
            "--max-size",
            "64",
            "--default-width",
            "64",
            "--default-height",
            "64",
            "--max-steps",
            "2",
            "--default-steps",
            "1",
            "--queue-size",
            "8",
        ],
    );
    let work = tempfile::tempdir().expect("temp dir");
    let url = format!("http://{}/openapi.json", s.addr);
    let mut child = Command::new(&python)
        .args(["-c", RUN, "run", &url])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,response_schema_conformance,negative_data_rejection",
            "--phases",
            "examples,coverage,fuzzing",
            "--seed",
            SEED,
            "--max-time",
            BUDGET_SECONDS,
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--generation-database",
            "none",
            "--no-color",
        ])
        .current_dir(work.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run schemathesis");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    // The budget bounds the cases; this bounds everything else (start-up, a stuck request).
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(240) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    // The summary goes to the test's output, so `make unit` logs show what was run.
    let summary = out
        .find("SUMMARY")
        .map_or(out.as_str(), |i| &out[i.saturating_sub(40)..]);
    eprintln!("schemathesis (seed {SEED}, {BUDGET_SECONDS} s budget):\n{summary}");
    let status = status.expect("schemathesis did not finish within 240 s");
    assert!(
        status.success() && !out.contains("FAILURES"),
        "schemathesis found issues ({status}):\n{out}\n{err}"
    );
    // Two warnings are expected. A generated case cannot hold a valid artifact URL signature,
    // so `GET /v1/artifacts/{name}` answers only 403 (the signature is its credential; the
    // served URLs are fetched in tests/artifacts.rs). And a generated string or file is
    // almost never a decodable image, so the three editing routes refuse most generated
    // bodies with a 400 naming the image (the documented answer; their examples, sent in the
    // examples phase, are edited, and tests/editing.rs and the http crate's tests/edits.rs
    // edit real images). Any other warning is an issue.
    let warnings: Vec<&str> = summary
        .lines()
        .filter(|l| l.trim_start().starts_with('⚠'))
        .collect();
    let only_artifact_403 =
        out.contains("403 Forbidden (1 operation):\n  - GET /v1/artifacts/{name}\n");
    let image_routes = [
        "POST /sdapi/v1/img2img",
        "POST /v1/images/edits",
        "POST /v1/img2img",
    ];
    let only_image_routes = out
        .split_once("mostly rejected generated data")
        .is_some_and(|(_, rest)| {
            rest.lines()
                .skip_while(|l| !l.starts_with("  - "))
                .take_while(|l| l.starts_with("  - "))
                .all(|l| image_routes.contains(&l.trim_start_matches("  - ")))
        });
    assert!(
        warnings
            .iter()
            .all(
                |w| (w.contains("Authentication failed: 1 operation") && only_artifact_403)
                    || (w.contains("Schema validation mismatch") && only_image_routes)
            ),
        "schemathesis warned ({warnings:?}):\n{out}"
    );
    assert!(
        !out.contains(" 0 generated"),
        "schemathesis generated no case:\n{out}"
    );
    // Images were stored (`url`, `store`), not only refused.
    assert!(
        s.metric("sd35_artifacts_stored_total") > 0.0,
        "no image was stored"
    );
    // The server stayed healthy throughout.
    assert_eq!(s.metric("sd35_queue_depth"), 0.0);
}
