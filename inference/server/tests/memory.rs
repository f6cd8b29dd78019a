//! The memory plan as served: `/v1/models` reports it, and a request planned over the memory
//! the device has left is refused with 422 before it runs, naming what to lower.

mod common;

use sd35_http::client;

use common::serving::Server;

#[test]
fn requests_over_the_memory_left_are_refused_and_the_plan_is_reported() {
    let s = Server::start("sd35-tiny-large", &["--no-warmup"]);
    let models = client::get(s.addr, "/v1/models").expect("models").json();
    let m = &models["data"][0];
    let memory = &m["memory"];
    assert_eq!(memory["computed"], true, "{m}");
    assert_eq!(m["op_graph"], "fused-cpu");
    let weights = memory["weights_bytes"].as_u64().expect("weights");
    assert!(weights > 1 << 20, "{memory}");
    assert!(memory["device_free_bytes"].as_u64().is_some_and(|f| f > 0));
    let default = &memory["default_request"];
    assert_eq!(default["width"], 256);
    let at_default = default["activation_bytes"].as_u64().expect("activations");
    assert!(default["peak_bytes"].as_u64().expect("peak") > weights + at_default);
    drop(s);

    // A device that has room for the weights and a little less than a 256x256 image. The
    // default size must fit (a default that cannot be served fails start-up, naming the flag).
    let limit = (weights + (256 << 20) + at_default - 1).to_string();
    let mut refused = std::process::Command::new(common::serving::BIN)
        .args([
            "serve",
            "--no-warmup",
            "--port",
            "0",
            "--memory-limit",
            &limit,
            "--model",
        ])
        .arg(common::serving::tiny("sd35-tiny-large"))
        .output()
        .expect("serve");
    refused.stderr.extend_from_slice(&refused.stdout);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(
        said.contains("--default-width does not suit the model: 256x256 needs"),
        "{said}"
    );
    let s = Server::start(
        "sd35-tiny-large",
        &[
            "--no-warmup",
            "--memory-limit",
            &limit,
            "--default-width",
            "64",
            "--default-height",
            "64",
        ],
    );
    let models = client::get(s.addr, "/v1/models").expect("models").json();
    let memory = &models["data"][0]["memory"];
    assert_eq!(memory["activation_budget_bytes"], at_default - 1);
    assert_eq!(memory["default_request"]["width"], 64);
    assert_eq!(memory["max_batch_at_default_size"], 1);
    let largest = memory["largest_square_size"]
        .as_u64()
        .expect("a square fits");
    assert!((64..256).contains(&largest), "{memory}");

    let small = r#"{"prompt":"a lighthouse","width":64,"height":64,"steps":1,"seed":3}"#;
    let r = client::post_json(s.addr, "/v1/txt2img", small).expect("txt2img");
    assert_eq!(r.status, 200, "{}", r.text());

    let big = r#"{"prompt":"a lighthouse","width":256,"height":256,"steps":1,"seed":3}"#;
    let r = client::post_json(s.addr, "/v1/txt2img", big).expect("txt2img");
    assert_eq!(r.status, 422, "{}", r.text());
    let err = r.json();
    assert_eq!(err["error"]["field"], "width", "{err}");
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("256x256")
            && message.contains(&format!(
                "the largest square that fits is {largest}x{largest}"
            )),
        "{message}"
    );
    // The OpenAI route names its own field.
    let openai = r#"{"prompt":"a lighthouse","size":"256x256","response_format":"b64_json"}"#;
    let r = client::post_json(s.addr, "/v1/images/generations", openai).expect("openai");
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["error"]["field"], "size");
    // Nothing ran for the refused requests: one image, one step.
    assert_eq!(s.metric("sd35_steps_total"), 1.0);
}
