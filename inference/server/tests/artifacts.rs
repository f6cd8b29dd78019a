//! Artifact storage in a real S3-compatible server (SeaweedFS, started by the test on
//! loopback): `sd35-server serve` with the tiny model stores what clients ask to store and
//! hands out presigned URLs that anyone can fetch — path-style at `127.0.0.1`, virtual-host at
//! `<bucket>.localhost` (resolved to loopback without DNS) — while the objects stay private
//! without the signature; wrong credentials and a missing bucket are a 502 naming the bucket,
//! and inline images keep working.

#![allow(clippy::unwrap_used)]

mod common;

use base64::Engine as _;
use common::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
use common::serving::Server;
use sd35_http::client;

const BUCKET: &str = "sd35-images";

fn serve(endpoint: &str, bucket: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let endpoint = format!("--artifacts-s3-endpoint={endpoint}");
    let bucket = format!("--artifacts-s3-bucket={bucket}");
    let mut flags = vec![
        "--variant=large-turbo",
        "--no-warmup",
        endpoint.as_str(),
        bucket.as_str(),
        "--artifacts-s3-prefix=gen/",
        "--artifacts-url-seconds=300",
    ];
    flags.extend_from_slice(extra);
    Server::start_with_env("sd35-tiny-large", &flags, env)
}

fn images(s: &Server, format: &str) -> client::Response {
    client::post_json(
        s.addr,
        "/v1/images/generations",
        &format!(
            r#"{{"prompt":"a red cube","n":2,"size":"32x32","steps":1,"seed":9,"response_format":"{format}"}}"#
        ),
    )
    .unwrap()
}

fn inline_pngs(s: &Server) -> Vec<Vec<u8>> {
    let r = images(s, "b64_json");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            base64::engine::general_purpose::STANDARD
                .decode(d["b64_json"].as_str().unwrap())
                .unwrap()
        })
        .collect()
}

#[test]
fn images_stored_in_s3_come_back_on_presigned_urls_in_both_addressing_styles() {
    let Some(s3) = S3Server::start() else { return };
    assert!(s3.create_bucket(BUCKET));

    // Path style, credentials from the environment.
    let s = serve(&s3.endpoint(), BUCKET, &[], &S3Server::credentials_env());
    let want = inline_pngs(&s);
    let r = images(&s, "url");
    assert_eq!(r.status, 200, "{}", r.text());
    let data = r.json()["data"].as_array().unwrap().clone();
    for (d, png) in data.iter().zip(&want) {
        let url = d["url"].as_str().unwrap();
        let parsed = url::Url::parse(url).unwrap();
        assert_eq!(parsed.host_str(), Some("127.0.0.1"), "{url}");
        assert!(parsed.path().starts_with("/sd35-images/gen/"), "{url}");
        assert!(url.contains("X-Amz-Signature="), "{url}");
        let (status, body) = s3.get(url);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(&body, png, "the stored image is the inline one");
        // Without the signature the object is private.
        let bare = format!(
            "{}://{}{}",
            parsed.scheme(),
            parsed.authority(),
            parsed.path()
        );
        assert_eq!(s3.get(&bare).0, 403, "{bare} is readable unsigned");
    }
    // /v1/txt2img answers the PNG and, asked to store it, where it went.
    let r = client::post_json(
        s.addr,
        "/v1/txt2img",
        r#"{"prompt":"a red cube","width":32,"height":32,"steps":1,"seed":9,"store":true}"#,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, want[0]);
    let url = r.header("x-artifact-url").unwrap();
    assert_eq!(s3.get(url), (200, want[0].clone()));
    assert_eq!(s.metric("sd35_artifacts_stored_total"), 3.0);
    drop(s);

    // Virtual-host style at `<bucket>.localhost`, credentials from a mounted file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    std::fs::write(
        &file,
        format!(
            "[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        ),
    )
    .unwrap();
    let file_flag = format!("--artifacts-s3-credentials-file={}", file.display());
    let s = serve(
        &s3.host_endpoint(),
        BUCKET,
        &["--artifacts-s3-url-style=virtual-host", &file_flag],
        &[],
    );
    let r = images(&s, "url");
    assert_eq!(r.status, 200, "{}", r.text());
    for (d, png) in r.json()["data"].as_array().unwrap().iter().zip(&want) {
        let url = d["url"].as_str().unwrap();
        let parsed = url::Url::parse(url).unwrap();
        assert_eq!(parsed.host_str(), Some("sd35-images.localhost"), "{url}");
        assert!(parsed.path().starts_with("/gen/"), "{url}");
        assert_eq!(s3.get(url), (200, png.clone()), "{url}");
    }
}

#[test]
fn wrong_credentials_and_a_missing_bucket_are_a_502_naming_the_bucket() {
    let Some(s3) = S3Server::start() else { return };
    assert!(s3.create_bucket(BUCKET));
    let wrong = [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", "not-the-secret"),
    ];
    let missing = "sd35-no-such-bucket";
    for (bucket, env, why) in [
        (BUCKET, &wrong[..], "SignatureDoesNotMatch"),
        (missing, &S3Server::credentials_env()[..], "NoSuchBucket"),
    ] {
        let s = serve(&s3.endpoint(), bucket, &[], env);
        // The start-up check already said so.
        let warned = s.log().iter().any(|l| {
            l["fields"]["message"] == "artifact storage is not usable yet"
                && l["fields"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains(bucket))
        });
        assert!(warned, "no start-up warning naming {bucket}");
        let r = images(&s, "url");
        assert_eq!(r.status, 502, "{}", r.text());
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(
            message.contains(&format!("bucket {bucket} at {}", s3.endpoint()))
                && message.contains(why),
            "{message}"
        );
        assert_eq!(s.metric("sd35_artifact_store_failures_total"), 1.0);
        // Images the client takes inline do not need the store.
        assert_eq!(inline_pngs(&s).len(), 2);
        // Nothing of the secret reaches the client or the log.
        assert!(!r.text().contains("not-the-secret") && !r.text().contains(SECRET_KEY));
        let log = serde_json::to_string(&s.log()).unwrap();
        assert!(
            !log.contains("not-the-secret") && !log.contains(SECRET_KEY),
            "a secret in the log"
        );
    }
    // An endpoint nobody listens on: a 502 naming the bucket and the endpoint, without the
    // presigned URL it could not reach (its access key id and a signature still valid).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let s = serve(&endpoint, BUCKET, &[], &S3Server::credentials_env());
    let r = images(&s, "url");
    assert_eq!(r.status, 502, "{}", r.text());
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains(&format!("bucket {BUCKET} at {endpoint}: unreachable")),
        "{message}"
    );
    let log = serde_json::to_string(&s.log()).unwrap();
    for text in [&message, &log] {
        assert!(
            !text.contains("X-Amz-") && !text.contains(ACCESS_KEY) && !text.contains(SECRET_KEY),
            "a presigned URL or a key: {text}"
        );
    }
}
