//! Editing and output formats over real HTTP on loopback, against the server in this process
//! with the fake backend (whose images are a hash of everything that decides them, the image
//! and mask to edit included): the OpenAI edit form, plain and streamed with its own events;
//! `/v1/img2img` answering like `/v1/txt2img`; the AUTOMATIC1111 `img2img`; JPEG and WebP
//! answers on every route; and every bad upload refused with a 4xx before any work is queued.

mod common;

use base64::Engine as _;
use common::{TestServer, events};
use sd35_http::client::{self, Response};
use sd35_http::sample_images as samples;

fn b64(s: &serde_json::Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s.as_str().unwrap_or(""))
        .unwrap_or_default()
}

fn b64_text(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The size of an image answer, whatever its format.
fn size_of(bytes: &[u8]) -> (u32, u32) {
    let img = image::load_from_memory(bytes).unwrap_or_else(|e| panic!("not an image: {e}"));
    (img.width(), img.height())
}

fn edit(s: &TestServer, fields: &[client::FormField<'_>]) -> Response {
    client::post_form(s.addr, "/v1/images/edits", fields).expect("edit")
}

#[test]
fn openai_edits_answer_like_generations_with_their_own_events() {
    let s = TestServer::start(1, &[]);
    let image = samples::png(64, 48);
    let mask = samples::transparent_mask(64, 48, |x, _| x < 32);
    let r = edit(
        &s,
        &[
            ("image", Some("in.png"), &image),
            ("prompt", None, b"a fox"),
            ("n", None, b"2"),
            ("seed", None, b"3"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["output_format"], "png");
    let data = j["data"].as_array().cloned().unwrap_or_default();
    assert_eq!(data.len(), 2);
    assert_eq!(
        (data[0]["seed"].as_u64(), data[1]["seed"].as_u64()),
        (Some(3), Some(4))
    );
    // The size is the image's.
    assert_eq!(size_of(&b64(&data[0]["b64_json"])), (64, 48));
    let plain = b64(&data[0]["b64_json"]);

    // The mask (and the default strength it brings) is part of the request.
    let r = edit(
        &s,
        &[
            ("image", Some("in.png"), &image),
            ("mask", Some("mask.png"), &mask),
            ("prompt", None, b"a fox"),
            ("seed", None, b"3"),
            ("size", None, b"32x32"),
            ("output_format", None, b"jpeg"),
            ("output_compression", None, b"40"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let masked = b64(&r.json()["data"][0]["b64_json"]);
    assert_eq!(&masked[..3], b"\xff\xd8\xff", "a JPEG");
    assert_eq!(size_of(&masked), (32, 32));
    assert_ne!(masked, plain);

    // Streamed: image_edit.* events, previews carrying their step, WebP images.
    let r = edit(
        &s,
        &[
            ("image", Some("in.png"), &image),
            ("prompt", None, b"a fox"),
            ("stream", None, b"true"),
            ("partial_images", None, b"2"),
            ("steps", None, b"8"),
            ("strength", None, b"0.5"),
            ("output_format", None, b"webp"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let evs = events(&r.body);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "image_edit.partial_image",
            "image_edit.partial_image",
            "image_edit.completed"
        ]
    );
    // 8 steps at 0.5 run 4: previews after steps 1 and 3 of them.
    assert_eq!(
        evs.iter()
            .map(|(_, e)| (e["step"].as_u64(), e["steps"].as_u64()))
            .collect::<Vec<_>>(),
        [(Some(1), Some(4)), (Some(3), Some(4)), (None, None)]
    );
    for (_, e) in &evs {
        assert_eq!(e["output_format"], "webp");
        assert_eq!(&b64(&e["b64_json"])[..4], b"RIFF");
        assert_eq!(e["size"], "64x48");
    }
    assert_eq!(evs[2].1["usage"]["total_tokens"], 0);
}

#[test]
fn img2img_answers_the_image_in_the_format_asked_for() {
    let s = TestServer::start(1, &[]);
    let body = serde_json::json!({
        "prompt": "a fox",
        "image": b64_text(&samples::jpeg(80, 40)),
        "mask": b64_text(&samples::white_mask(80, 40, |_, y| y < 20)),
        "seed": 7,
        "strength": 0.7,
    })
    .to_string();
    let r = client::post_json(s.addr, "/v1/img2img", &body).expect("img2img");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("image/png"));
    assert_eq!(r.header("x-seed"), Some("7"));
    // 80x40 rounds down to 80x32.
    assert_eq!(size_of(&r.body), (80, 32));
    let png = r.body.clone();
    let again = client::request(
        s.addr,
        "POST",
        "/v1/img2img",
        &[
            ("Content-Type", "application/json"),
            ("Accept", "image/webp, image/png;q=0.5"),
        ],
        body.as_bytes(),
    )
    .expect("webp");
    assert_eq!(again.header("content-type"), Some("image/webp"));
    let (a, b) = (
        image::load_from_memory(&again.body).map(|i| i.into_rgb8().into_raw()),
        image::load_from_memory(&png).map(|i| i.into_rgb8().into_raw()),
    );
    assert_eq!(a.ok(), b.ok(), "lossless WebP has the PNG's pixels");
    let json = client::request(
        s.addr,
        "POST",
        "/v1/img2img",
        &[
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
        ],
        body.as_bytes(),
    )
    .expect("json")
    .json();
    assert_eq!(json["parameters"]["strength"], 0.7);
    assert_eq!(json["parameters"]["width"], 80);
    assert_eq!(json["output_format"], "png");
    assert_eq!(b64(&json["image"]), png);
}

#[test]
fn the_automatic1111_img2img_inpaints_and_says_how() {
    let s = TestServer::start(1, &[]);
    let image = b64_text(&samples::png(48, 48));
    let mask = b64_text(&samples::white_mask(48, 48, |x, _| x >= 24));
    let body = |extra: &str| {
        format!(
            r#"{{"prompt":"a fox","init_images":["data:image/png;base64,{image}"],"mask":"{mask}","seed":5,"batch_size":2{extra}}}"#
        )
    };
    let r = client::post_json(s.addr, "/sdapi/v1/img2img", &body("")).expect("img2img");
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["images"].as_array().map(Vec::len), Some(2));
    assert_eq!(j["parameters"]["denoising_strength"], 0.75);
    let info: serde_json::Value =
        serde_json::from_str(j["info"].as_str().unwrap_or("")).unwrap_or_default();
    assert!(
        info["infotexts"][0]
            .as_str()
            .is_some_and(|t| t.contains("Denoising strength: 0.75")),
        "{info}"
    );
    // The inverted mask is another request, and so another image.
    let inverted = client::post_json(
        s.addr,
        "/sdapi/v1/img2img",
        &body(r#","inpainting_mask_invert":1,"output_format":"jpeg""#),
    )
    .expect("inverted")
    .json();
    let a = b64(&j["images"][0]);
    let b = b64(&inverted["images"][0]);
    assert_eq!(&b[..3], b"\xff\xd8\xff");
    assert_ne!(
        image::load_from_memory(&a)
            .map(|i| i.into_rgb8().into_raw())
            .ok(),
        image::load_from_memory(&b)
            .map(|i| i.into_rgb8().into_raw())
            .ok()
    );
}

#[test]
fn txt2img_and_generations_answer_jpeg_and_webp() {
    let s = TestServer::start(1, &[]);
    let r = client::request(
        s.addr,
        "POST",
        "/v1/txt2img",
        &[
            ("Content-Type", "application/json"),
            ("Accept", "image/jpeg"),
        ],
        br#"{"prompt":"a","width":32,"height":16,"steps":1}"#,
    )
    .expect("jpeg");
    assert_eq!(r.header("content-type"), Some("image/jpeg"));
    assert_eq!(size_of(&r.body), (32, 16));
    let r = s.post(
        "/v1/txt2img",
        r#"{"prompt":"a","width":32,"height":16,"steps":1,"output_format":"webp"}"#,
    );
    assert_eq!(r.header("content-type"), Some("image/webp"));
    let r = s.post(
        "/v1/images/generations",
        r#"{"prompt":"a","size":"16x16","steps":1,"output_format":"jpeg","output_compression":10}"#,
    );
    assert_eq!(r.json()["output_format"], "jpeg");
    assert_eq!(&b64(&r.json()["data"][0]["b64_json"])[..3], b"\xff\xd8\xff");
    let r = s.post(
        "/v1/images/generations",
        r#"{"prompt":"a","output_compression":101}"#,
    );
    assert_eq!(
        (r.status, r.json()["error"]["field"].as_str()),
        (422, Some("output_compression"))
    );
}

/// One bad upload: where it goes, what it is, and the answer it must get.
struct Bad {
    case: &'static str,
    status: u16,
    field: Option<&'static str>,
    response: Response,
}

#[test]
fn bad_uploads_are_refused_with_a_4xx_and_cost_nothing() {
    let s = TestServer::start(1, &["--max-upload-bytes", "300K"]);
    let image = samples::png(64, 48);
    let form = |s: &TestServer, image: &[u8], mask: Option<&[u8]>| {
        let mut fields: Vec<client::FormField<'_>> =
            vec![("image", Some("in"), image), ("prompt", None, b"a fox")];
        if let Some(m) = mask {
            fields.push(("mask", Some("mask.png"), m));
        }
        edit(s, &fields)
    };
    let json = |path: &str, image: &[u8], extra: &str| {
        let field = if path.starts_with("/sdapi") {
            format!(r#""init_images":["{}"]"#, b64_text(image))
        } else {
            format!(r#""image":"{}""#, b64_text(image))
        };
        client::post_json(
            s.addr,
            path,
            &format!(r#"{{"prompt":"a fox",{field}{extra}}}"#),
        )
        .expect("request")
    };
    let big = vec![0x42u8; 400 * 1024];
    let mut cases = vec![
        Bad {
            case: "not an image",
            status: 400,
            field: Some("image"),
            response: form(&s, b"this is not an image", None),
        },
        Bad {
            case: "an image format other than PNG, JPEG, WebP (GIF)",
            status: 415,
            field: Some("image"),
            response: form(&s, &samples::gif(), None),
        },
        Bad {
            case: "a mask of another size than the image",
            status: 422,
            field: Some("mask"),
            response: form(
                &s,
                &image,
                Some(&samples::transparent_mask(32, 32, |_, _| true)),
            ),
        },
        Bad {
            case: "an OpenAI mask without an alpha channel",
            status: 422,
            field: Some("mask"),
            response: form(&s, &image, Some(&samples::png(64, 48))),
        },
        Bad {
            case: "a truncated file",
            status: 400,
            field: Some("image"),
            response: form(&s, &samples::truncated_png(64, 48), None),
        },
        Bad {
            case: "a decompression bomb (50 000 x 50 000 claimed in 70 bytes)",
            status: 422,
            field: Some("image"),
            response: form(&s, &samples::bomb_png(50_000), None),
        },
        Bad {
            case: "a body over --max-upload-bytes",
            status: 413,
            field: None,
            response: form(&s, &big, None),
        },
        Bad {
            case: "an image too large for the model at its own size",
            status: 422,
            field: Some("size"),
            response: form(&s, &samples::png(512, 512), None),
        },
        Bad {
            case: "a form without the image",
            status: 400,
            field: Some("image"),
            response: edit(&s, &[("prompt", None, b"a fox")]),
        },
        Bad {
            case: "an edit sent as JSON to the form route",
            status: 415,
            field: None,
            response: s.post("/v1/images/edits", r#"{"prompt":"a"}"#),
        },
        Bad {
            case: "img2img: an image that is not base64",
            status: 400,
            field: Some("image"),
            response: client::post_json(
                s.addr,
                "/v1/img2img",
                r#"{"prompt":"a","image":"%%% not base64"}"#,
            )
            .expect("request"),
        },
        Bad {
            case: "img2img: a decompression bomb",
            status: 422,
            field: Some("image"),
            response: json("/v1/img2img", &samples::bomb_png(50_000), ""),
        },
        Bad {
            case: "img2img: a strength of 0",
            status: 422,
            field: Some("strength"),
            response: json("/v1/img2img", &image, r#","strength":0"#),
        },
        Bad {
            case: "A1111 img2img: a truncated file",
            status: 400,
            field: Some("init_images"),
            response: json("/sdapi/v1/img2img", &samples::truncated_png(64, 48), ""),
        },
        Bad {
            case: "A1111 img2img: a mask of another size",
            status: 422,
            field: Some("mask"),
            response: json(
                "/sdapi/v1/img2img",
                &image,
                &format!(
                    r#","mask":"{}""#,
                    b64_text(&samples::white_mask(16, 16, |_, _| true))
                ),
            ),
        },
    ];
    // A body over the limit is refused on its Content-Length, before it is read.
    cases.push(Bad {
        case: "a Content-Length over --max-upload-bytes, the body never sent",
        status: 413,
        field: None,
        response: head_only(s.addr, 999_999_999),
    });
    let mut table = String::new();
    for c in &cases {
        let err = c.response.json();
        table.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            c.case,
            c.response.status,
            err["error"]["field"].as_str().unwrap_or("-"),
            err["error"]["message"].as_str().unwrap_or("")
        ));
    }
    eprintln!("{table}");
    for c in &cases {
        let err = c.response.json();
        assert_eq!(
            c.response.status,
            c.status,
            "{}: {}",
            c.case,
            c.response.text()
        );
        assert_eq!(err["error"]["field"].as_str(), c.field, "{}", c.case);
        assert!(
            err["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            c.case
        );
    }
    // Nothing reached the model.
    assert_eq!(s.metric("sd35_steps_total"), 0.0);
    assert_eq!(s.metric("sd35_images_generated_total"), 0.0);
    assert_eq!(s.metric("sd35_queue_depth"), 0.0);
    // And the server still edits.
    assert_eq!(form(&s, &image, None).status, 200);
}

/// Sends only the head of an edit whose `Content-Length` is `length`, and reads the answer.
fn head_only(addr: std::net::SocketAddr, length: usize) -> Response {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; \
         boundary=x\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    .expect("head");
    client::read_response(stream).expect("answer")
}

#[test]
fn the_exif_orientation_decides_the_size() {
    let s = TestServer::start(1, &[]);
    // Stored 48 wide and 32 high, shot turned a quarter: displayed 32 x 48.
    let jpeg = samples::jpeg_with_orientation(48, 32, 6);
    let r = edit(
        &s,
        &[
            ("image", Some("photo.jpg"), &jpeg),
            ("prompt", None, b"a fox"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(size_of(&b64(&r.json()["data"][0]["b64_json"])), (32, 48));
}
