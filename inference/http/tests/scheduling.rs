//! Scheduling, validation, auth and shutdown over real HTTP on loopback, against the server
//! running in this process with the fake backend (steps of a known duration).

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, wait_until};
use sd35_http::backend::{FakeBackend, fake_png};
use sd35_http::client::{self, metric};

fn params(prompt: &str, w: u32, steps: u32, seed: u64) -> sd35_http::backend::GenParams {
    sd35_http::backend::GenParams {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        width: w,
        height: w,
        steps,
        guidance_scale: 3.5,
        seed,
        ..Default::default()
    }
}

#[test]
fn endpoints_answer() {
    let s = TestServer::start(1, &[]);
    assert_eq!(
        client::get(s.addr, "/healthz").expect("healthz").status,
        200
    );
    assert_eq!(client::get(s.addr, "/readyz").expect("readyz").status, 200);
    let models = client::get(s.addr, "/v1/models").expect("models").json();
    assert_eq!(models["data"][0]["id"], "fake");
    assert_eq!(models["data"][0]["limits"]["max_size"], 256);
    let openapi = client::get(s.addr, "/openapi.json")
        .expect("openapi")
        .json();
    assert_eq!(openapi["openapi"], "3.1.0");
    for schema in ["Txt2ImgRequest", "ImagesRequest", "ErrorBody"] {
        assert!(
            openapi["components"]["schemas"][schema].is_object(),
            "{schema}"
        );
    }
    let page = client::get(s.addr, "/").expect("playground");
    assert!(page.text().contains("<form") && !page.text().contains("http://"));

    let r = s.post(
        "/v1/txt2img",
        r#"{"prompt":"a cat","width":32,"height":48,"steps":2,"seed":9}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/png"));
    assert!(r.header("x-request-id").is_some_and(|id| !id.is_empty()));
    let mut want = params("a cat", 32, 2, 9);
    want.height = 48;
    assert_eq!(r.body, fake_png(&want));

    let r = client::request(
        s.addr,
        "POST",
        "/v1/txt2img",
        &[
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
            ("X-Request-Id", "abc-123"),
        ],
        br#"{"prompt":"a cat","steps":3}"#,
    )
    .expect("json");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    let j = r.json();
    let p = &j["parameters"];
    assert_eq!(
        (p["width"].as_u64(), p["steps"].as_u64()),
        (Some(64), Some(3))
    );
    assert!(p["seed"].is_u64());
    assert!(
        j["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("iVBORw0KGgo"))
    );

    let r = s.post(
        "/v1/images/generations",
        r#"{"prompt":"a cat","n":3,"size":"16x32","response_format":"b64_json","seed":4,"model":"fake"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let data = r.json()["data"].as_array().cloned().unwrap_or_default();
    let seeds: Vec<_> = data.iter().map(|d| d["seed"].as_u64()).collect();
    assert_eq!(seeds, [Some(4), Some(5), Some(6)]);

    let m = client::get(s.addr, "/metrics").expect("metrics").text();
    for name in [
        "sd35_http_requests_total{route=\"/v1/txt2img\",status=\"200\"}",
        "sd35_images_generated_total",
        "sd35_steps_total",
        "sd35_model_load_seconds",
        "sd35_queue_depth",
        "sd35_queue_seconds_count",
        "sd35_step_seconds_count",
        "sd35_batch_size_count",
    ] {
        assert!(metric(&m, name).is_some(), "{name} missing in\n{m}");
    }
    assert_eq!(metric(&m, "sd35_images_generated_total"), Some(5.0));
    s.shutdown().expect("clean exit");
}

#[test]
fn every_validation_error_has_its_status_and_field() {
    let s = TestServer::start(
        0,
        &[
            "--max-body-bytes",
            "2048",
            "--max-upload-bytes",
            "3K",
            "--max-prompt-bytes",
            "100",
        ],
    );
    let cases: &[(&str, &str, u16, Option<&str>)] = &[
        ("/v1/txt2img", "{", 400, None),
        ("/v1/txt2img", "[1,2]", 400, None),
        (
            "/v1/txt2img",
            r#"{"prompt":"a","colour":"red"}"#,
            400,
            Some("colour"),
        ),
        ("/v1/txt2img", r#"{"prompt":7}"#, 400, Some("prompt")),
        ("/v1/txt2img", r#"{"width":64}"#, 400, Some("prompt")),
        ("/v1/txt2img", r#"{"prompt":""}"#, 422, Some("prompt")),
        (
            "/v1/txt2img",
            r#"{"prompt":"a","width":100}"#,
            422,
            Some("width"),
        ),
        (
            "/v1/txt2img",
            r#"{"prompt":"a","height":0}"#,
            422,
            Some("height"),
        ),
        (
            "/v1/txt2img",
            r#"{"prompt":"a","height":272}"#,
            422,
            Some("height"),
        ),
        (
            "/v1/txt2img",
            r#"{"prompt":"a","steps":0}"#,
            422,
            Some("steps"),
        ),
        (
            "/v1/txt2img",
            r#"{"prompt":"a","steps":101}"#,
            422,
            Some("steps"),
        ),
        (
            "/v1/txt2img",
            r#"{"prompt":"a","guidance_scale":-1}"#,
            422,
            Some("guidance_scale"),
        ),
        (
            "/v1/txt2img",
            r#"{"prompt":"a","guidance_scale":1e9}"#,
            422,
            Some("guidance_scale"),
        ),
        (
            "/v1/txt2img",
            r#"{"prompt":"a","seed":-5}"#,
            400,
            Some("seed"),
        ),
        (
            "/v1/txt2img",
            r#"{"prompt":"a","seed":1.5}"#,
            400,
            Some("seed"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt":"a","n":0}"#,
            422,
            Some("n"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt":"a","n":5}"#,
            422,
            Some("n"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt":"a","size":"1024"}"#,
            422,
            Some("size"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt":"a","size":"1024x1024"}"#,
            422,
            Some("size"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt":"a","response_format":"url"}"#,
            422,
            Some("response_format"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt":"a","model":"dall-e-3"}"#,
            404,
            Some("model"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt":"a","style":"vivid"}"#,
            400,
            Some("style"),
        ),
        ("/v1/txt2img", r#"{"prompt":"a"} trailing"#, 400, None),
        (
            "/v1/images/generations",
            r#"{"prompt":"a"}{"prompt":""}"#,
            400,
            None,
        ),
        (
            "/v1/images/generations",
            r#"{"prompt":"a","n":2,"seed":18446744073709551615}"#,
            422,
            Some("seed"),
        ),
    ];
    for (path, body, status, field) in cases {
        let r = s.post(path, body);
        assert_eq!(r.status, *status, "{path} {body}: {}", r.text());
        let err = &r.json()["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert_eq!(err["field"].as_str(), *field, "{body}");
    }
    let long = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(101));
    let r = s.post("/v1/txt2img", &long);
    assert_eq!(
        (r.status, r.json()["error"]["field"].as_str()),
        (422, Some("prompt"))
    );
    // The routes that may carry a control image are held to --max-upload-bytes, the others
    // to --max-body-bytes.
    let huge = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(4096));
    assert_eq!(s.post("/v1/txt2img", &huge).status, 413);
    let large = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(2500));
    assert_eq!(s.post("/v1/txt2img", &large).status, 422);
    assert_eq!(s.post("/sdapi/v1/txt2img", &large).status, 413);
    let r = client::request(s.addr, "POST", "/v1/txt2img", &[], br#"{"prompt":"a"}"#)
        .expect("no content type");
    assert_eq!(r.status, 415);
    assert_eq!(client::get(s.addr, "/v2/nothing").expect("404").status, 404);
    for (method, path, allow) in [
        ("GET", "/v1/txt2img", "POST"),
        ("PUT", "/v1/images/generations", "POST"),
        ("POST", "/v1/models", "GET"),
        ("DELETE", "/healthz", "GET"),
    ] {
        let r = client::request(s.addr, method, path, &[], b"").expect("405");
        assert_eq!(r.status, 405, "{method} {path}");
        let allowed = r.header("allow").unwrap_or("").split(',');
        assert!(
            allowed.map(str::trim).any(|m| m == allow),
            "{method} {path}: Allow {:?}",
            r.header("allow")
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
        let message = r.json()["error"]["message"].as_str().map(str::to_owned);
        assert!(message.is_some_and(|m| m.contains(path)), "{}", r.text());
    }
    assert_eq!(s.metric("sd35_images_generated_total"), 0.0);
}

#[test]
fn a_full_queue_answers_429_with_retry_after_and_stays_bounded() {
    // Each request takes 10 × 30 ms; two fit (one running, one waiting).
    let s = TestServer::start(30, &["--queue-size", "2"]);
    let addr = s.addr;
    let threads: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                client::post_json(
                    addr,
                    "/v1/txt2img",
                    &format!(r#"{{"prompt":"p{i}","steps":10,"width":16,"height":16}}"#),
                )
            })
        })
        .collect();
    let mut peak_depth = 0.0f64;
    for _ in 0..20 {
        peak_depth = peak_depth.max(s.metric("sd35_queue_depth"));
        std::thread::sleep(Duration::from_millis(10));
    }
    let results: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().expect("client").expect("response"))
        .collect();
    let ok = results.iter().filter(|r| r.status == 200).count();
    let busy: Vec<_> = results.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok + busy.len(), 8);
    assert!(ok >= 2 && busy.len() >= 3, "ok {ok}, 429 {}", busy.len());
    for r in &busy {
        let secs: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(secs >= 1, "Retry-After {:?}", r.header("retry-after"));
    }
    assert!(peak_depth <= 2.0, "queue depth {peak_depth}");
    let m = client::get(addr, "/metrics").expect("metrics").text();
    let key = "sd35_http_requests_total{route=\"/v1/txt2img\",status=\"429\"}";
    assert_eq!(metric(&m, key), Some(busy.len() as f64));
}

#[test]
fn a_disconnected_client_stops_its_generation_and_leaves_the_queue() {
    let s = TestServer::start(20, &["--queue-size", "4"]);
    // Running request: disconnect after a few steps.
    let running = client::send(
        s.addr,
        "POST",
        "/v1/txt2img",
        &[("Content-Type", "application/json")],
        br#"{"prompt":"slow","steps":100,"width":16,"height":16}"#,
    )
    .expect("send");
    // Queued request behind it: disconnect before it starts.
    let queued = client::send(
        s.addr,
        "POST",
        "/v1/txt2img",
        &[("Content-Type", "application/json")],
        br#"{"prompt":"queued","steps":100,"width":16,"height":16}"#,
    )
    .expect("send");
    wait_until("steps to run", || s.metric("sd35_steps_total") >= 3.0);
    wait_until("both queued", || s.metric("sd35_queue_depth") >= 2.0);
    drop(queued);
    drop(running);
    wait_until("cancellation", || {
        s.metric("sd35_images_cancelled_total") >= 2.0
    });
    let stopped_at = s.metric("sd35_steps_total");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.metric("sd35_steps_total"), stopped_at, "steps went on");
    assert!(stopped_at < 50.0, "{stopped_at} steps ran");
    assert_eq!(s.metric("sd35_queue_depth"), 0.0);
    assert_eq!(s.metric("sd35_images_generated_total"), 0.0);
    // Only the first request ever reached the model.
    assert_eq!(*s.batches.lock().expect("batches"), vec![1]);
    // The server goes on serving.
    let r = s.post(
        "/v1/txt2img",
        r#"{"prompt":"next","steps":2,"width":16,"height":16}"#,
    );
    assert_eq!(r.status, 200);
}

#[test]
fn the_deadline_answers_504_and_stops_the_work() {
    let s = TestServer::start(20, &["--request-timeout-seconds", "1"]);
    let started = Instant::now();
    let r = s.post(
        "/v1/txt2img",
        r#"{"prompt":"slow","steps":100,"width":16,"height":16}"#,
    );
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(3));
    wait_until("cancellation", || {
        s.metric("sd35_images_cancelled_total") >= 1.0
    });
    assert!(s.metric("sd35_steps_total") < 100.0);
}

#[test]
fn same_shape_requests_are_batched_with_the_images_they_get_alone() {
    let s = TestServer::start(20, &["--max-batch-size", "4", "--queue-size", "8"]);
    let addr = s.addr;
    // A different-shape request occupies the model while three same-shape ones queue up.
    let blocker = std::thread::spawn(move || {
        client::post_json(
            addr,
            "/v1/txt2img",
            r#"{"prompt":"b","steps":10,"width":32,"height":32}"#,
        )
    });
    wait_until("blocker running", || s.metric("sd35_steps_total") >= 1.0);
    let threads: Vec<_> = (0..3u64)
        .map(|i| {
            std::thread::spawn(move || {
                client::post_json(
                    addr,
                    "/v1/txt2img",
                    &format!(r#"{{"prompt":"p{i}","steps":3,"width":16,"height":16,"seed":{i}}}"#),
                )
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let r = t.join().expect("client").expect("response");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, fake_png(&params(&format!("p{i}"), 16, 3, i as u64)));
    }
    assert_eq!(
        blocker.join().expect("client").expect("response").status,
        200
    );
    assert_eq!(*s.batches.lock().expect("batches"), vec![1, 3]);
}

#[test]
fn only_requests_with_the_same_adapters_and_condition_share_a_batch() {
    use base64::Engine as _;
    use sd35_http::api::AdapterInfo;
    use sd35_http::sample_images;
    let mut fake = FakeBackend::new(Duration::from_millis(20));
    fake.adapters = ["style", "detail"]
        .into_iter()
        .map(|name| AdapterInfo {
            name: name.into(),
            scale: 1.0,
            text_encoders: false,
            path: String::new(),
            metadata: Default::default(),
        })
        .collect();
    fake.control_modes = vec![sd35_contract::ControlMode::Canny];
    let s = TestServer::start_fake(fake, &["--max-batch-size", "4", "--queue-size", "8"]);
    let addr = s.addr;
    let blocker = std::thread::spawn(move || {
        client::post_json(
            addr,
            "/v1/txt2img",
            r#"{"prompt":"b","steps":10,"width":32,"height":32}"#,
        )
    });
    wait_until("blocker running", || s.metric("sd35_steps_total") >= 1.0);
    let picture =
        |side| base64::engine::general_purpose::STANDARD.encode(sample_images::png(side, side));
    let control = |side| {
        format!(
            r#""control":{{"mode":"canny","image":"{}"}}"#,
            picture(side)
        )
    };
    // Queued in this order: the batches are (a, c), (b), (d, e), (f).
    let extras = [
        r#""loras":[{"name":"style","scale":0.5}]"#.to_owned(),
        r#""loras":[{"name":"style","scale":0.6}]"#.to_owned(),
        r#""loras":[{"name":"style","scale":0.5}]"#.to_owned(),
        control(16),
        control(32),
        r#""loras":[{"name":"style","scale":0.5},{"name":"detail"}]"#.to_owned(),
    ];
    let mut threads = Vec::new();
    for (i, extra) in extras.into_iter().enumerate() {
        threads.push(std::thread::spawn(move || {
            client::post_json(
                addr,
                "/v1/txt2img",
                &format!(r#"{{"prompt":"p{i}","steps":3,"width":16,"height":16,{extra}}}"#),
            )
        }));
        wait_until("queued", || s.metric("sd35_queue_depth") >= (i + 2) as f64);
    }
    for t in threads {
        let r = t.join().expect("client").expect("response");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        blocker.join().expect("client").expect("response").status,
        200
    );
    assert_eq!(*s.batches.lock().expect("batches"), vec![1, 2, 1, 2, 1]);
}

#[test]
fn batches_never_group_more_images_than_the_memory_plan_lets_fit() {
    use sd35_contract::plan::{MemoryGate, ModelSpec, PlanDevice, WeightSpec};
    use sd35_contract::{Precision, Variant};
    let spec = ModelSpec::published(Variant::Large, false);
    let device = PlanDevice::cuda(Precision::Bf16);
    let mut gate = MemoryGate {
        weights: WeightSpec::new(Precision::Bf16).model(&spec),
        spec,
        device,
        t5_tokens: 256,
        activation_budget_bytes: 0,
        free_bytes: None,
        total_bytes: None,
    };
    // Room for two 16x16 images with guidance, not three.
    let two = gate.plan(16, 16, 2, true).activation_bytes;
    assert!(gate.plan(16, 16, 3, true).activation_bytes > two);
    gate.activation_budget_bytes = two;
    let mut fake = FakeBackend::new(Duration::from_millis(20));
    fake.memory = Some(gate);
    let s = TestServer::start_fake(fake, &["--max-batch-size", "4", "--queue-size", "8"]);
    let addr = s.addr;
    let blocker = std::thread::spawn(move || {
        client::post_json(
            addr,
            "/v1/txt2img",
            r#"{"prompt":"b","steps":10,"width":32,"height":16}"#,
        )
    });
    wait_until("blocker running", || s.metric("sd35_steps_total") >= 1.0);
    let threads: Vec<_> = (0..3u64)
        .map(|i| {
            std::thread::spawn(move || {
                client::post_json(
                    addr,
                    "/v1/txt2img",
                    &format!(r#"{{"prompt":"p{i}","steps":3,"width":16,"height":16,"seed":{i}}}"#),
                )
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("client").expect("response").status, 200);
    }
    assert_eq!(
        blocker.join().expect("client").expect("response").status,
        200
    );
    // The blocker, then two of the three queued, then the last: never three at once.
    assert_eq!(*s.batches.lock().expect("batches"), vec![1, 2, 1]);
}

#[test]
fn auth_guards_the_api_but_not_health_or_metrics() {
    let dir = std::env::temp_dir().join(format!("sd35-http-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let file = dir.join("tokens");
    std::fs::write(&file, "# comment\nfrom-file\n").expect("token file");
    let file_arg = file.display().to_string();
    let s = TestServer::start(0, &["--auth-token-file", &file_arg, "--auth-tokens", "a,b"]);
    let body = br#"{"prompt":"a","steps":1,"width":16,"height":16}"#;
    let call = |auth: Option<&str>| {
        let mut h = vec![("Content-Type", "application/json")];
        if let Some(a) = auth {
            h.push(("Authorization", a));
        }
        client::request(s.addr, "POST", "/v1/txt2img", &h, body).expect("request")
    };
    let r = call(None);
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(call(Some("Bearer nope")).status, 401);
    assert_eq!(call(Some("Bearer # comment")).status, 401);
    assert_eq!(call(Some("Basic from-file")).status, 401);
    assert_eq!(call(Some("Bearer from-file")).status, 200);
    assert_eq!(call(Some("Bearer b")).status, 200);
    assert_eq!(
        client::get(s.addr, "/v1/models").expect("models").status,
        401
    );
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json", "/"] {
        assert_eq!(
            client::get(s.addr, open).expect("open").status,
            200,
            "{open}"
        );
    }
    drop(s);
    let _ = std::fs::remove_dir_all(dir);

    let open = TestServer::start(0, &[]);
    assert_eq!(
        open.post("/v1/txt2img", std::str::from_utf8(body).unwrap_or(""))
            .status,
        200
    );
}

#[test]
fn shutdown_finishes_every_accepted_request() {
    let s = TestServer::start(20, &["--queue-size", "8", "--drain-seconds", "30"]);
    let addr = s.addr;
    let threads: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                client::post_json(
                    addr,
                    "/v1/txt2img",
                    &format!(r#"{{"prompt":"p{i}","steps":5,"width":16,"height":16}}"#),
                )
            })
        })
        .collect();
    wait_until("all admitted", || s.metric("sd35_queue_depth") >= 4.0);
    let server = std::thread::spawn(move || s.shutdown());
    for t in threads {
        assert_eq!(t.join().expect("client").expect("response").status, 200);
    }
    server.join().expect("server").expect("exits cleanly");
    assert!(client::get(addr, "/healthz").is_err(), "still accepting");
}

#[test]
fn the_drain_deadline_answers_every_request_and_exits_cleanly() {
    // Ten requests of 100 × 50 ms: one runs, nine wait; the drain lasts 1 s.
    let s = TestServer::start(50, &["--drain-seconds", "1", "--queue-size", "16"]);
    let addr = s.addr;
    let clients: Vec<_> = (0..10)
        .map(|i| {
            std::thread::spawn(move || {
                client::post_json(
                    addr,
                    "/v1/txt2img",
                    &format!(r#"{{"prompt":"slow {i}","steps":100,"width":16,"height":16}}"#),
                )
            })
        })
        .collect();
    wait_until("all admitted", || s.metric("sd35_queue_depth") >= 10.0);
    let started = Instant::now();
    let result = s.shutdown();
    assert!(result.is_ok(), "a drain is a clean exit: {result:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    for c in clients {
        let r = c
            .join()
            .expect("client")
            .expect("every request gets an answer");
        assert_eq!(r.status, 503, "{}", r.text());
        let message = r.json()["error"]["message"].as_str().map(str::to_owned);
        assert!(
            message.is_some_and(|m| m.contains("--drain-seconds")),
            "{}",
            r.text()
        );
        assert_eq!(r.header("retry-after"), Some("1"));
    }
}

/// A JSON value from a small random grammar, biased towards the API's own field names.
fn random_json(rng: &mut rand_chacha::ChaCha8Rng, depth: u32) -> serde_json::Value {
    use rand::Rng;
    use serde_json::Value;
    const FIELDS: &[&str] = &[
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "seed",
        "n",
        "size",
        "response_format",
        "model",
        "user",
        "x",
        "",
    ];
    match rng.random_range(0..if depth == 0 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => Value::from(rng.random_range(-3i64..300)),
        3 => Value::from(rng.random::<u64>()),
        4 => Value::from(rng.random_range(-1e3f64..1e3)),
        5 => {
            let pool = [
                "a cat",
                "",
                "16x16",
                "32X48",
                "b64_json",
                "url",
                "\u{0}",
                "ünï",
                "9999999999x1",
            ];
            Value::from(pool[rng.random_range(0..pool.len())])
        }
        6 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..rng.random_range(0..6) {
                let k = FIELDS[rng.random_range(0..FIELDS.len())];
                m.insert(k.to_owned(), random_json(rng, depth - 1));
            }
            Value::Object(m)
        }
    }
}

#[test]
fn arbitrary_json_bodies_never_break_the_server() {
    use rand::{Rng, SeedableRng};
    let s = TestServer::start(0, &["--max-steps", "4", "--queue-size", "64"]);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let allowed = [200u16, 400, 404, 413, 415, 422, 429];
    // Every status the fuzzed routes may answer is one the document lists for them.
    let documented: Vec<u16> = sd35_http::routes::ROUTES
        .iter()
        .filter(|r| r.method == "POST")
        .flat_map(|r| r.errors.iter().copied())
        .collect();
    assert!(allowed.iter().all(|s| *s == 200 || documented.contains(s)));
    for i in 0..400 {
        let value = random_json(&mut rng, 3);
        let mut body = serde_json::to_vec(&value).unwrap_or_default();
        if i % 7 == 0 && !body.is_empty() {
            // Also truncated and byte-flipped bodies.
            let cut = rng.random_range(0..body.len());
            body.truncate(cut);
            if let Some(b) = body.last_mut() {
                *b ^= rng.random::<u8>();
            }
        }
        let path = match i % 3 {
            0 => "/v1/txt2img",
            1 => "/v1/images/generations",
            _ => "/sdapi/v1/txt2img",
        };
        let r = client::request(
            s.addr,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            &body,
        )
        .expect("the server answers");
        assert!(
            allowed.contains(&r.status),
            "{} for {}",
            r.status,
            String::from_utf8_lossy(&body)
        );
        if r.status != 200 {
            assert!(r.json()["error"]["message"].is_string(), "{}", r.text());
        }
    }
    assert_eq!(client::get(s.addr, "/healthz").expect("alive").status, 200);
    s.shutdown().expect("clean exit");
}
