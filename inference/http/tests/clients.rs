//! What the newer clients get, over real HTTP on loopback against the server in this process
//! with the fake backend: images stored in a local directory and fetched back on signed URLs
//! that refuse tampering and expiry; OpenAI's streamed generation with partial images, and a
//! client leaving a stream stopping its work; the AUTOMATIC1111 routes.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{TestServer, events, wait_until};
use sd35_http::artifacts::LocalStore;
use sd35_http::backend::{GenParams, fake_png};
use sd35_http::client;

fn params(prompt: &str, size: u32, steps: u32, guidance: f64, seed: u64) -> GenParams {
    GenParams {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        width: size,
        height: size,
        steps,
        guidance_scale: guidance,
        seed,
        ..Default::default()
    }
}

fn b64(s: &serde_json::Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s.as_str().unwrap_or(""))
        .unwrap_or_default()
}

/// The path and query of a URL the server handed out (its origin is this server).
fn path_of(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    rest.find('/')
        .map_or_else(String::new, |i| rest[i..].to_owned())
}

#[test]
fn stored_images_come_back_on_signed_urls_that_refuse_tampering_and_expiry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store_dir = dir.path().join("artifacts");
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "0123456789abcdef0123456789abcdef\n").expect("key");
    let store = store_dir.to_string_lossy().into_owned();
    let key = key_file.to_string_lossy().into_owned();
    let s = TestServer::start(
        1,
        &[
            "--artifacts-dir",
            &store,
            "--artifacts-signing-key-file",
            &key,
            "--artifacts-url-seconds",
            "600",
        ],
    );
    let r = s.post(
        "/v1/images/generations",
        r#"{"prompt":"a cat","n":2,"size":"16x16","steps":2,"seed":4,"response_format":"url"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let data = r.json()["data"].as_array().cloned().unwrap_or_default();
    assert_eq!(data.len(), 2);
    let now = sd35_http::unix_now();
    for (i, d) in data.iter().enumerate() {
        assert!(d.get("b64_json").is_none(), "{d}");
        let url = d["url"].as_str().unwrap_or_default();
        assert!(
            url.starts_with(&format!("http://{}/v1/artifacts/", s.addr)),
            "{url}"
        );
        let expires = d["expires_at"].as_u64().unwrap_or(0);
        assert!(expires > now && expires <= now + 601, "{expires}");
        let got = client::get(s.addr, &path_of(url)).expect("fetch");
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(got.header("content-type"), Some("image/png"));
        assert_eq!(
            got.body,
            fake_png(&params("a cat", 16, 2, 3.5, 4 + i as u64))
        );
    }
    let url = data[0]["url"].as_str().unwrap_or_default();
    let path = path_of(url);
    // A changed signature, or the signature moved to another name: refused.
    let tampered = format!("{}0000", &path[..path.len() - 4]);
    let r = client::get(s.addr, &tampered).expect("tampered");
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("signature"))
    );
    let other = path_of(data[1]["url"].as_str().unwrap_or_default());
    let (other_name, _) = other.split_once('?').unwrap_or_default();
    let (_, query) = path.split_once('?').unwrap_or_default();
    let moved = client::get(s.addr, &format!("{other_name}?{query}")).expect("moved");
    assert_eq!(moved.status, 403);
    // A URL signed with the server's key but already expired.
    let signer = LocalStore::new(
        &store_dir,
        b"0123456789abcdef0123456789abcdef".to_vec(),
        Duration::from_secs(600),
    )
    .expect("signer");
    let name = path
        .strip_prefix("/v1/artifacts/")
        .and_then(|p| p.split('?').next())
        .unwrap_or_default();
    let expired = client::get(s.addr, &signer.signed_path(name, now - 1)).expect("expired");
    assert_eq!(expired.status, 403);
    assert!(expired.text().contains("expired"), "{}", expired.text());
    // The same signer makes a valid URL: the key came from the file.
    let fresh = client::get(s.addr, &signer.signed_path(name, now + 60)).expect("fresh");
    assert_eq!(fresh.status, 200);
    let missing = client::get(s.addr, &signer.signed_path("1-ab-0.png", now + 60)).expect("404");
    assert_eq!(missing.status, 404);

    // `/v1/txt2img` still answers the PNG, and stores it when asked.
    let r = s.post(
        "/v1/txt2img",
        r#"{"prompt":"a dog","width":16,"height":16,"steps":1,"seed":2,"store":true}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, fake_png(&params("a dog", 16, 1, 3.5, 2)));
    let url = r.header("x-artifact-url").unwrap_or_default().to_owned();
    assert!(r.header("x-artifact-expires").is_some());
    assert_eq!(
        client::get(s.addr, &path_of(&url)).expect("fetch").body,
        r.body
    );
    let r = client::request(
        s.addr,
        "POST",
        "/v1/txt2img",
        &[
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
        ],
        br#"{"prompt":"a dog","width":16,"height":16,"steps":1,"seed":2,"store":true}"#,
    )
    .expect("json");
    let j = r.json();
    assert!(
        j["url"]
            .as_str()
            .is_some_and(|u| u.contains("/v1/artifacts/")),
        "{j}"
    );
    assert_eq!(b64(&j["image"]), fake_png(&params("a dog", 16, 1, 3.5, 2)));
    assert_eq!(s.metric("sd35_artifacts_stored_total"), 4.0);

    // The directory goes away (a file where it was): the client hears which, with a 502.
    std::fs::remove_dir_all(&store_dir).expect("remove");
    std::fs::write(&store_dir, b"not a directory").expect("file");
    let r = s.post(
        "/v1/images/generations",
        r#"{"prompt":"a cat","size":"16x16","steps":1,"response_format":"url"}"#,
    );
    assert_eq!(r.status, 502, "{}", r.text());
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains(&store), "{message}");
    assert_eq!(s.metric("sd35_artifact_store_failures_total"), 1.0);
}

#[test]
fn a_server_without_storage_refuses_to_store_naming_the_field() {
    let s = TestServer::start(1, &[]);
    for (path, body, field) in [
        (
            "/v1/images/generations",
            r#"{"prompt":"a","response_format":"url"}"#,
            "response_format",
        ),
        ("/v1/txt2img", r#"{"prompt":"a","store":true}"#, "store"),
    ] {
        let r = s.post(path, body);
        assert_eq!(r.status, 422, "{}", r.text());
        assert_eq!(r.json()["error"]["field"], field);
    }
    assert_eq!(s.metric("sd35_steps_total"), 0.0, "no compute was spent");
    let r = client::get(s.addr, "/v1/artifacts/x.png?expires=1&signature=00").expect("get");
    assert_eq!(r.status, 404);
}

#[test]
fn a_stream_sends_openai_partial_images_then_the_image() {
    let s = TestServer::start(1, &[]);
    let r = s.post(
        "/v1/images/generations",
        r#"{"prompt":"a cat","size":"16x16","steps":4,"seed":3,"stream":true,"partial_images":2}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let ev = events(&r.body);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed"
        ]
    );
    // Previews after steps 1 and 3 of 4 (spread evenly, never the last step).
    for (i, step) in [(0usize, 1u64), (1, 3)] {
        let d = &ev[i].1;
        assert_eq!(d["type"], "image_generation.partial_image");
        assert_eq!(d["partial_image_index"], i);
        assert_eq!(
            (d["size"].as_str(), d["output_format"].as_str()),
            (Some("16x16"), Some("png"))
        );
        assert_eq!(
            b64(&d["b64_json"]),
            fake_png(&params("a cat", 16, 4, 3.5, 3 + step))
        );
    }
    let done = &ev[2].1;
    assert_eq!(done["type"], "image_generation.completed");
    assert_eq!(
        b64(&done["b64_json"]),
        fake_png(&params("a cat", 16, 4, 3.5, 3))
    );
    assert_eq!(done["usage"]["total_tokens"], 0);
    assert!(done.get("partial_image_index").is_none());
    assert_eq!(s.metric("sd35_partial_images_total"), 2.0);

    // No partial images asked for, or too few steps for them: the image alone.
    for body in [
        r#"{"prompt":"a","size":"16x16","steps":3,"stream":true}"#,
        r#"{"prompt":"a","size":"16x16","steps":1,"stream":true,"partial_images":3}"#,
    ] {
        let ev = events(&s.post("/v1/images/generations", body).body);
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["image_generation.completed"], "{body}");
    }
    // A stream that cannot be served is an ordinary error answer, before any event.
    let r = s.post(
        "/v1/images/generations",
        r#"{"prompt":"a","stream":true,"n":2}"#,
    );
    assert_eq!(
        (r.status, r.json()["error"]["field"].as_str()),
        (422, Some("n"))
    );
}

#[test]
fn a_client_leaving_a_stream_stops_its_generation() {
    use std::io::Read;
    let s = TestServer::start(20, &[]);
    let mut stream = client::send(
        s.addr,
        "POST",
        "/v1/images/generations",
        &[("Content-Type", "application/json")],
        br#"{"prompt":"slow","size":"16x16","steps":100,"stream":true,"partial_images":3}"#,
    )
    .expect("send");
    // Read until the first preview arrived, then hang up.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("image_generation.partial_image") {
        let n = stream.read(&mut buf).expect("read");
        assert!(
            n > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    wait_until("cancellation", || {
        s.metric("sd35_images_cancelled_total") >= 1.0
    });
    let stopped_at = s.metric("sd35_steps_total");
    assert!(stopped_at < 100.0, "{stopped_at} steps ran");
    assert_eq!(s.metric("sd35_images_generated_total"), 0.0);
    assert_eq!(s.metric("sd35_steps_outstanding"), 0.0);
    assert_eq!(s.metric("sd35_images_in_flight"), 0.0);
    let r = s.post(
        "/v1/txt2img",
        r#"{"prompt":"next","steps":1,"width":16,"height":16}"#,
    );
    assert_eq!(r.status, 200);
}

#[test]
fn the_automatic1111_routes_answer_like_automatic1111() {
    let s = TestServer::start(1, &[]);
    let models = client::get(s.addr, "/sdapi/v1/sd-models")
        .expect("models")
        .json();
    let titles: Vec<&str> = models
        .as_array()
        .map(|m| m.iter().filter_map(|e| e["title"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(titles, ["fake", "large"]);
    let options = client::get(s.addr, "/sdapi/v1/options")
        .expect("options")
        .json();
    assert_eq!(options, serde_json::json!({"sd_model_checkpoint": "fake"}));
    let r = s.post("/sdapi/v1/options", r#"{"sd_model_checkpoint":"LARGE"}"#);
    assert_eq!(
        r.json(),
        serde_json::json!({"sd_model_checkpoint": "large"})
    );
    let options = client::get(s.addr, "/sdapi/v1/options")
        .expect("options")
        .json();
    assert_eq!(options["sd_model_checkpoint"], "large");
    let r = s.post(
        "/sdapi/v1/options",
        r#"{"sd_model_checkpoint":"sdxl-base"}"#,
    );
    assert_eq!(
        (r.status, r.json()["error"]["field"].as_str()),
        (404, Some("sd_model_checkpoint"))
    );
    assert!(
        r.text().contains("`fake`"),
        "the 404 lists the served names: {}",
        r.text()
    );
    let r = s.post("/sdapi/v1/options", r#"{"CLIP_stop_at_last_layers":2}"#);
    assert_eq!(
        (r.status, r.json()["error"]["field"].as_str()),
        (400, Some("CLIP_stop_at_last_layers"))
    );

    let r = s.post(
        "/sdapi/v1/txt2img",
        r#"{"prompt":"a cat","seed":5,"batch_size":2,"steps":2,"width":16,"height":16,"cfg_scale":4,"sampler_name":"DPM++ 2M"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let images = j["images"].as_array().cloned().unwrap_or_default();
    assert_eq!(images.len(), 2);
    for (i, img) in images.iter().enumerate() {
        assert_eq!(
            b64(img),
            fake_png(&params("a cat", 16, 2, 4.0, 5 + i as u64))
        );
    }
    assert_eq!(j["parameters"]["seed"], 5);
    assert_eq!(j["parameters"]["cfg_scale"], 4.0);
    assert_eq!(j["parameters"]["sampler_name"], "Euler");
    let info: serde_json::Value =
        serde_json::from_str(j["info"].as_str().unwrap_or("")).unwrap_or_default();
    assert_eq!(info["all_seeds"], serde_json::json!([5, 6]));
    assert_eq!(info["sd_model_name"], "fake");

    // A random seed is reported, and sending it back makes the same image.
    let r = s.post(
        "/sdapi/v1/txt2img",
        r#"{"prompt":"x","seed":-1,"steps":1,"width":16,"height":16}"#,
    );
    let seed = r.json()["parameters"]["seed"].as_u64().unwrap_or(u64::MAX);
    assert!(seed <= u64::from(u32::MAX));
    let again = s.post(
        "/sdapi/v1/txt2img",
        &format!(r#"{{"prompt":"x","seed":{seed},"steps":1,"width":16,"height":16}}"#),
    );
    assert_eq!(again.json()["images"], r.json()["images"]);

    for (body, status, field) in [
        (r#"{"prompt":"a","cfg_scale":99}"#, 422, "cfg_scale"),
        (r#"{"prompt":"a","batch_size":5}"#, 422, "batch_size"),
        (r#"{"prompt":"a","hr_upscaler":"x"}"#, 400, "hr_upscaler"),
    ] {
        let r = s.post("/sdapi/v1/txt2img", body);
        assert_eq!(
            (r.status, r.json()["error"]["field"].as_str()),
            (status, Some(field)),
            "{body}"
        );
    }
}

#[test]
fn the_automatic1111_routes_need_the_token_like_the_others() {
    let s = TestServer::start(1, &["--auth-tokens", "sesame"]);
    for path in ["/sdapi/v1/sd-models", "/sdapi/v1/options"] {
        assert_eq!(
            client::get(s.addr, path).expect("get").status,
            401,
            "{path}"
        );
        let r = client::request(
            s.addr,
            "GET",
            path,
            &[("Authorization", "Bearer sesame")],
            b"",
        )
        .expect("get");
        assert_eq!(r.status, 200, "{path}");
    }
}
