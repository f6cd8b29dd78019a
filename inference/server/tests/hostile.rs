//! `sd35-server serve` against hostile and careless clients, as a process over real HTTP on
//! loopback with the tiny model: slow request heads, more half-sent connections than it will
//! read, text after the JSON body, wrong methods, seeds at the edge of 64 bits, a drain
//! deadline shorter than the work, tokens on the command line, and an OpenAPI document that
//! must state what the server enforces.
//!
//! Settings go in as `SD35_*` variables rather than flags, so the same tests run unchanged
//! against a build that predates a setting (and show what it did).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sd35_http::client;

use common::serving::Server;

const MODEL: &str = "sd35-tiny-large";

/// A connection that has sent the start of a request head and nothing more.
fn half_sent(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"POST /v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: applic")
        .expect("write");
    s
}

/// Whatever the server sends before closing, waiting at most `limit`; `None` when the
/// connection is still open and silent then.
fn answer_within(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(limit)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (!got.is_empty()).then_some(got);
            }
            // A reset is the server closing too.
            Err(_) => return Some(got),
        }
    }
}

#[test]
fn a_slow_request_head_is_cut_off_and_connections_being_read_are_capped() {
    let s = Server::start_with_env(
        MODEL,
        &["--no-warmup"],
        &[
            ("SD35_HEADER_READ_TIMEOUT_SECONDS", "5"),
            ("SD35_MAX_CONNECTIONS_READING", "8"),
        ],
    );
    // Slowloris: one more header byte every 200 ms never completes the head.
    let mut slow = half_sent(s.addr);
    slow.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let started = Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(30) {
        if slow.write_all(b"x").is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        match slow.read(&mut buf) {
            Ok(_) => {
                closed = true; // an answer or EOF: the server gave up on the head
                break;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(
        closed,
        "a connection trickling its head was still open after 30 s"
    );

    // Eight half-sent connections fill the cap; the next four are answered 503 at once.
    let mut held: Vec<TcpStream> = (0..8).map(|_| half_sent(s.addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..4 {
        let mut extra = half_sent(s.addr);
        let answer = answer_within(&mut extra, Duration::from_secs(2))
            .unwrap_or_else(|| panic!("connection {i} beyond the cap got no answer"));
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        assert!(json["error"]["message"].is_string(), "{text}");
    }
    // The held connections are closed by the header timeout, which frees the room.
    for h in &mut held {
        assert!(
            answer_within(h, Duration::from_secs(20)).is_some(),
            "a half-sent connection outlived the header timeout"
        );
    }
    assert!(s.metric("sd35_http_connections_refused_total") >= 4.0);
    // The count follows the close by a moment (the connection's task records it).
    let counted = Instant::now();
    while s.metric("sd35_http_header_read_timeouts_total") < 9.0 {
        assert!(
            counted.elapsed() < Duration::from_secs(10),
            "header timeouts counted: {}",
            s.metric("sd35_http_header_read_timeouts_total")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = client::post_json(
        s.addr,
        "/v1/txt2img",
        r#"{"prompt":"after the storm","width":16,"height":16,"steps":1}"#,
    )
    .expect("request");
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn text_after_the_json_body_is_a_400_that_names_the_body() {
    let s = Server::start(MODEL, &["--no-warmup"]);
    for (path, body) in [
        (
            "/v1/txt2img",
            r#"{"prompt":"a","width":16,"height":16,"steps":1} trailing"#,
        ),
        (
            "/v1/txt2img",
            r#"{"prompt":"a","width":16,"height":16,"steps":1}{"prompt":""}"#,
        ),
        (
            "/v1/images/generations",
            r#"{"prompt":"a","size":"16x16","steps":1}{"prompt":""}"#,
        ),
    ] {
        let r = client::post_json(s.addr, path, body).expect("request");
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let message = r.json()["error"]["message"].as_str().map(str::to_owned);
        assert!(
            message.is_some_and(|m| m.starts_with("the body has more after its JSON object")),
            "{}",
            r.text()
        );
    }
}

#[test]
fn a_wrong_method_gets_405_with_the_json_error_and_allow() {
    let s = Server::start(MODEL, &["--no-warmup"]);
    for (method, path, allow) in [
        ("GET", "/v1/txt2img", "POST"),
        ("DELETE", "/v1/images/generations", "POST"),
        ("POST", "/readyz", "GET"),
    ] {
        let r = client::request(s.addr, method, path, &[], b"").expect("request");
        assert_eq!(r.status, 405, "{method} {path}");
        assert!(
            r.header("allow")
                .is_some_and(|a| a.split(',').any(|m| m.trim() == allow)),
            "{method} {path}: Allow {:?}",
            r.header("allow")
        );
        assert!(
            r.json()["error"]["message"].is_string(),
            "{method} {path}: {:?}",
            r.text()
        );
    }
}

#[test]
fn seeds_for_several_images_never_wrap() {
    let s = Server::start(MODEL, &["--no-warmup"]);
    let r = client::post_json(
        s.addr,
        "/v1/images/generations",
        r#"{"prompt":"a","n":2,"size":"16x16","steps":1,"seed":18446744073709551615}"#,
    )
    .expect("request");
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["error"]["field"], "seed");
    let r = client::post_json(
        s.addr,
        "/v1/images/generations",
        r#"{"prompt":"a","n":2,"size":"16x16","steps":1,"seed":18446744073709551614}"#,
    )
    .expect("request");
    assert_eq!(r.status, 200, "{}", r.text());
    let seeds: Vec<_> = r.json()["data"]
        .as_array()
        .map(|d| d.iter().map(|i| i["seed"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(
        seeds,
        [
            Some(18_446_744_073_709_551_614),
            Some(18_446_744_073_709_551_615)
        ]
    );
}

#[test]
fn the_drain_deadline_answers_every_request_with_503_and_exits_zero() {
    let mut s = Server::start(MODEL, &["--no-warmup", "--drain-seconds", "2"]);
    let addr = s.addr;
    let clients: Vec<_> = (0..10)
        .map(|i| {
            std::thread::spawn(move || {
                client::post_json(
                    addr,
                    "/v1/txt2img",
                    &format!(r#"{{"prompt":"slow {i}","width":64,"height":64,"steps":100}}"#),
                )
            })
        })
        .collect();
    let start = Instant::now();
    while s.metric("sd35_queue_depth") < 10.0 && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(10));
    }
    s.sigterm();
    let mut cut = 0;
    for c in clients {
        let r = c
            .join()
            .expect("client")
            .expect("every request gets an answer, none a closed connection");
        match r.status {
            200 => {}
            503 => {
                cut += 1;
                assert!(r.json()["error"]["message"].is_string(), "{}", r.text());
            }
            other => panic!("{other}: {}", r.text()),
        }
    }
    assert!(cut >= 1, "the work was meant to outlast the drain");
    assert_eq!(s.wait_exit(Duration::from_secs(30)), Some(0));
    let mut lines = Vec::new();
    while let Ok(l) = s.lines.recv_timeout(Duration::from_secs(5)) {
        lines.push(l);
    }
    let counted = lines.iter().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        let f = &v["fields"];
        f["message"]
            .as_str()?
            .starts_with("the drain deadline passed")
            .then(|| f["requests"].as_u64())?
    });
    assert_eq!(counted, Some(cut), "{lines:#?}");
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("panicked") || l.contains("backtrace")),
        "{lines:#?}"
    );
}

#[test]
fn tokens_on_the_command_line_are_warned_about() {
    let warned = |s: &Server| {
        s.log().iter().any(|l| {
            l["level"] == "WARN"
                && l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("--auth-token-file"))
        })
    };
    let flag = Server::start(MODEL, &["--no-warmup", "--auth-tokens", "s3cret"]);
    assert!(warned(&flag), "no warning for --auth-tokens");
    drop(flag);
    let env = Server::start_with_env(MODEL, &["--no-warmup"], &[("SD35_AUTH_TOKENS", "s3cret")]);
    assert!(!warned(&env), "the variable is the recommended way");
}

#[test]
fn the_openapi_document_states_the_bounds_the_server_enforces() {
    let s = Server::start(MODEL, &["--no-warmup", "--max-steps", "30"]);
    let doc = client::get(s.addr, "/openapi.json")
        .expect("openapi")
        .json();
    let models = client::get(s.addr, "/v1/models").expect("models").json();
    let limits = &models["data"][0]["limits"];
    let schemas = &doc["components"]["schemas"];
    let txt2img = &schemas["Txt2ImgRequest"]["properties"];
    for side in ["width", "height"] {
        assert_eq!(txt2img[side]["minimum"], 16, "{side}");
        assert_eq!(txt2img[side]["maximum"], limits["max_size"], "{side}");
        assert_eq!(
            txt2img[side]["multipleOf"], limits["size_multiple"],
            "{side}"
        );
    }
    for schema in ["Txt2ImgRequest", "ImagesRequest"] {
        let p = &schemas[schema]["properties"];
        assert_eq!(p["steps"]["minimum"], 1, "{schema}");
        assert_eq!(p["steps"]["maximum"], 30, "{schema}");
        assert_eq!(p["guidance_scale"]["maximum"], limits["max_guidance_scale"]);
        assert_eq!(p["prompt"]["maxLength"], limits["max_prompt_bytes"]);
        assert_eq!(p["prompt"]["minLength"], 1);
    }
    let images = &schemas["ImagesRequest"]["properties"];
    assert_eq!(images["n"]["minimum"], 1);
    assert_eq!(images["n"]["maximum"], limits["max_images_per_request"]);
    let responses = &doc["paths"]["/v1/images/generations"]["post"]["responses"];
    for status in [
        "200", "400", "401", "404", "413", "415", "422", "429", "503", "504",
    ] {
        assert!(responses[status].is_object(), "images: {status} not listed");
    }
    // What the server answers for a value just past a bound, it documents.
    let r =
        client::post_json(s.addr, "/v1/txt2img", r#"{"prompt":"a","steps":31}"#).expect("request");
    assert_eq!(r.status, 422);
    assert!(doc["paths"]["/v1/txt2img"]["post"]["responses"]["422"].is_object());
}
