//! `sd35-server serve` as a process, over real HTTP on loopback, with the tiny SD3.5 models:
//! endpoints, parity with `generate`, batching, SIGTERM and start-up failures. (The playground
//! in a browser: tests/playground.rs.)

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sd35_http::backend::{decode_png, pixel_difference};
use sd35_http::client;

use common::serving::{BIN, Server, tiny};

fn txt2img(addr: SocketAddr, body: &str) -> client::Response {
    client::post_json(addr, "/v1/txt2img", body).expect("txt2img")
}

#[test]
fn serves_the_tiny_model_with_the_images_generate_makes() {
    let s = Server::start("sd35-tiny-large", &["--no-warmup"]);
    assert_eq!(
        client::get(s.addr, "/healthz").expect("healthz").status,
        200
    );
    let models = client::get(s.addr, "/v1/models").expect("models").json();
    let m = &models["data"][0];
    // Nothing says which variant a bare diffusers folder is: large is assumed, and said.
    assert_eq!(
        (m["id"].as_str(), m["variant"].as_str()),
        (Some("large"), Some("large"))
    );
    assert_eq!(m["variant_source"], "assumed");
    assert_eq!(m["device"], "cpu");
    assert_eq!(m["precision"], "f32");
    let warnings = m["warnings"].to_string();
    assert!(
        warnings.contains("running on the CPU") && warnings.contains("pass --variant"),
        "{warnings}"
    );
    assert_eq!(m["defaults"]["steps"], 28);
    assert_eq!(m["defaults"]["classifier_free_guidance"], true);
    assert_eq!(m["limits"]["max_size"], 256);
    let openapi = client::get(s.addr, "/openapi.json")
        .expect("openapi")
        .json();
    assert!(openapi["paths"]["/v1/txt2img"]["post"].is_object());
    assert!(
        client::get(s.addr, "/")
            .expect("page")
            .text()
            .contains("v1/images/generations")
    );

    let body = r#"{"prompt":"a red cube","width":32,"height":48,"steps":2,"seed":11}"#;
    let r = txt2img(s.addr, body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("image/png"));
    assert_eq!(&r.body[..8], b"\x89PNG\r\n\x1a\n");

    // The same request through `generate` gives the same bytes.
    let out = std::env::temp_dir().join(format!("sd35-serve-parity-{}.png", std::process::id()));
    let status = Command::new(BIN)
        .args(["generate", "--model"])
        .arg(tiny("sd35-tiny-large"))
        .args(["--prompt", "a red cube", "--width", "32", "--height", "48"])
        .args(["--steps", "2", "--seed", "11", "--out"])
        .arg(&out)
        .stderr(Stdio::null())
        .status()
        .expect("generate");
    assert!(status.success());
    let cli_png = std::fs::read(&out).expect("generated png");
    let _ = std::fs::remove_file(&out);
    assert!(r.body == cli_png, "server and generate differ");

    let r = client::request(
        s.addr,
        "POST",
        "/v1/txt2img",
        &[
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
        ],
        br#"{"prompt":"a red cube","width":16,"height":16,"steps":1}"#,
    )
    .expect("json");
    let j = r.json();
    assert_eq!(j["parameters"]["guidance_scale"], 3.5);
    assert!(j["parameters"]["seed"].is_u64());
    assert!(
        j["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("iVBORw0KGgo"))
    );

    let r = client::post_json(
        s.addr,
        "/v1/images/generations",
        r#"{"prompt":"a red cube","n":2,"size":"16x16","steps":1,"seed":3}"#,
    )
    .expect("images");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"].as_array().map(Vec::len), Some(2));

    let r = txt2img(s.addr, r#"{"prompt":"x","width":272}"#);
    assert_eq!(
        (r.status, r.json()["error"]["field"].as_str()),
        (422, Some("width"))
    );

    assert_eq!(s.metric("sd35_images_generated_total"), 4.0);
    assert!(s.metric("sd35_model_load_seconds") > 0.0);
    // Every request log line carries its request id; prompts are not logged by default.
    let log = s.log();
    let done: Vec<_> = log
        .iter()
        .filter(|l| l["fields"]["message"] == "request done")
        .collect();
    assert!(done.len() >= 8);
    assert!(done.iter().all(|l| l["span"]["request_id"].is_string()));
    assert!(!log.iter().any(|l| l.to_string().contains("a red cube")));
}

fn batch_of_three(s: &Server) -> Vec<Vec<u8>> {
    let addr = s.addr;
    // A different-shape request holds the model while the three same-shape ones queue.
    let blocker = std::thread::spawn(move || {
        txt2img(
            addr,
            r#"{"prompt":"hold","width":64,"height":64,"steps":4,"seed":1}"#,
        )
    });
    let start = Instant::now();
    while s.metric("sd35_steps_total") < 1.0 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let threads: Vec<_> = (0..3)
        .map(|i| {
            std::thread::spawn(move || {
                txt2img(
                    addr,
                    &format!(
                        r#"{{"prompt":"thing {i}","negative_prompt":"blur","width":32,"height":32,"steps":2,"seed":{i}}}"#
                    ),
                )
            })
        })
        .collect();
    let images = threads
        .into_iter()
        .map(|t| {
            let r = t.join().expect("client");
            assert_eq!(r.status, 200, "{}", r.text());
            r.body
        })
        .collect();
    assert_eq!(blocker.join().expect("client").status, 200);
    images
}

#[test]
fn batched_and_unbatched_generation_give_identical_images() {
    let batched = Server::start(
        "sd35-tiny-medium",
        &["--max-batch-size", "4", "--no-warmup"],
    );
    let a = batch_of_three(&batched);
    // The three requests ran as one batch (sum of batch sizes 1 + 3 over 2 batches).
    assert_eq!(batched.metric("sd35_batch_size_count"), 2.0);
    assert_eq!(batched.metric("sd35_batch_size_sum"), 4.0);
    drop(batched);
    let single = Server::start(
        "sd35-tiny-medium",
        &["--max-batch-size", "1", "--no-warmup"],
    );
    let b = batch_of_three(&single);
    assert_eq!(single.metric("sd35_batch_size_count"), 4.0);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let (x, y) = (decode_png(x).expect("png"), decode_png(y).expect("png"));
        // f32 GEMM blocking depends on the batch size: a last-bit rounding difference in a
        // few 8-bit pixels is allowed, nothing visible.
        let (max, count) = pixel_difference(&x, &y);
        assert!(
            max <= 2 && count * 100 <= x.len(),
            "image {i}: max difference {max}, {count} bytes differ"
        );
    }
    assert!(a[0] != a[1]);
}

#[test]
fn sigterm_finishes_accepted_requests_and_exits_zero() {
    let mut s = Server::start("sd35-tiny-large", &["--queue-size", "8"]);
    let addr = s.addr;
    let threads: Vec<_> = (0..3)
        .map(|i| {
            std::thread::spawn(move || {
                txt2img(
                    addr,
                    &format!(r#"{{"prompt":"p{i}","width":32,"height":32,"steps":3}}"#),
                )
            })
        })
        .collect();
    let start = Instant::now();
    while s.metric("sd35_queue_depth") < 3.0 && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
    s.sigterm();
    for t in threads {
        assert_eq!(t.join().expect("client").status, 200);
    }
    assert_eq!(s.wait_exit(Duration::from_secs(60)), Some(0));
    assert!(client::get(addr, "/healthz").is_err());
}

fn run_ok(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serves_a_prebuilt_engine() {
    let cache = tempfile::tempdir().expect("tmp");
    let root = cache.path().to_str().expect("utf-8 path");
    let import = format!("--import-dir={}", tiny("sd35-tiny-large").display());
    run_ok(&[
        "fetch",
        "--variant=large",
        "--cache-root",
        root,
        "--cache-key=c",
        &import,
    ]);
    run_ok(&[
        "build-engine",
        "--cache-root",
        root,
        "--cache-key=c",
        "--engine-key=e1",
        "--precision=bf16",
    ]);
    let model = cache.path().join("models/c");
    let engine = cache.path().join("engines/e1");
    let (model, engine) = (
        model.to_str().expect("path"),
        engine.to_str().expect("path"),
    );
    let mut child = Command::new(BIN)
        .args(["serve", "--model", model, "--engine", engine])
        .args(["--host", "127.0.0.1", "--port", "0", "--log-format", "json"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
    let addr: SocketAddr = lines
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l).ok()?;
            (v["fields"]["message"] == "listening")
                .then(|| v["fields"]["addr"].as_str()?.parse().ok())?
        })
        .expect("listening");
    std::thread::spawn(move || lines.for_each(drop));
    let mut server = Server {
        child,
        addr,
        lines: mpsc::channel().1,
        early: Vec::new(),
    };
    for _ in 0..600 {
        if client::get(addr, "/readyz").is_ok_and(|r| r.status == 200) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let models = client::get(addr, "/v1/models").expect("models").json();
    let m = &models["data"][0];
    assert_eq!(m["engine_key"], "e1");
    assert_eq!(m["cache_key"], "c");
    assert_eq!(m["precision"], "bf16");
    // The engine says what it is: the variant the cache was fetched as.
    assert_eq!(
        (m["variant"].as_str(), m["variant_source"].as_str()),
        (Some("large"), Some("engine"))
    );
    assert_eq!(m["id"], "large");
    let r = txt2img(
        addr,
        r#"{"prompt":"a red cube","width":32,"height":32,"steps":2}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    server.sigterm();
    assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0));
}

#[test]
fn start_up_failures_say_what_to_change() {
    let engine = Command::new(BIN)
        .args(["serve", "--model"])
        .arg(tiny("sd35-tiny-large"))
        .args([
            "--engine",
            "/nonexistent-engine",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
        ])
        .output()
        .expect("run");
    assert!(!engine.status.success());
    assert!(String::from_utf8_lossy(&engine.stderr).contains("--engine"));
    let missing = Command::new(BIN)
        .args([
            "serve",
            "--model",
            "/nonexistent-model",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
        ])
        .output()
        .expect("run");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent-model"));
    let too_wide = Command::new(BIN)
        .args(["serve", "--model"])
        .arg(tiny("sd35-tiny-large"))
        .args([
            "--default-width",
            "1024",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
        ])
        .args(["--no-warmup", "--drain-seconds", "5"])
        .output()
        .expect("run");
    assert!(!too_wide.status.success());
    let text = String::from_utf8_lossy(&too_wide.stderr);
    assert!(
        text.contains("--default-width") && text.contains("256"),
        "{text}"
    );
}
