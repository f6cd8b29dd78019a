//! The S3-compatible bucket store: one signed `PUT` per image (retried on a transient
//! failure), handed out as presigned `GET` URLs; path-style or virtual-host addressing.

use std::path::Path;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use sd35_contract::S3UrlStyle;

use super::{ArtifactStore, PutFuture, StoreError, Stored, media_type};
use crate::unix_now;

/// A transport error without its URL, with its causes: a presigned URL carries the access key
/// id and a signature that is valid for a minute, neither of which belongs in an answer or a
/// log line.
fn transport(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How to reach a bucket.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// `http(s)://host[:port]`.
    pub endpoint: String,
    /// The bucket.
    pub bucket: String,
    /// Its region.
    pub region: String,
    /// Prepended to every object key.
    pub prefix: String,
    /// Path-style or virtual-host addressing.
    pub style: S3UrlStyle,
    /// Who signs.
    pub credentials: Credentials,
    /// How long presigned GET URLs live.
    pub ttl: Duration,
}

/// S3 credentials from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// optionally `AWS_SESSION_TOKEN`), else from an AWS shared credentials file (the profile of
/// `AWS_PROFILE`, else `default`).
pub fn s3_credentials(file: Option<&Path>) -> Result<Credentials, String> {
    if let Some(c) = Credentials::from_env() {
        return Ok(c);
    }
    let Some(file) = file else {
        return Err(
            "artifact storage in S3 needs credentials: set AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY, or --artifacts-s3-credentials-file"
                .to_owned(),
        );
    };
    let text = std::fs::read_to_string(file).map_err(|e| {
        format!(
            "--artifacts-s3-credentials-file {}: cannot read it: {e}",
            file.display()
        )
    })?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".to_owned());
    shared_credentials(&text, &profile).ok_or_else(|| {
        format!(
            "--artifacts-s3-credentials-file {}: no profile [{profile}] with aws_access_key_id \
             and aws_secret_access_key",
            file.display()
        )
    })
}

/// The credentials of `profile` in an AWS shared credentials file (`[profile]` sections of
/// `key = value` lines).
fn shared_credentials(text: &str, profile: &str) -> Option<Credentials> {
    let mut section = String::new();
    let (mut key, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_owned();
            continue;
        }
        if section != profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_owned();
            match k.trim() {
                "aws_access_key_id" => key = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    match (key, secret, token) {
        (Some(k), Some(s), Some(t)) => Some(Credentials::new_with_token(k, s, t)),
        (Some(k), Some(s), None) => Some(Credentials::new(k, s)),
        _ => None,
    }
}

/// The S3 bucket store.
#[derive(Debug)]
pub struct S3Store {
    bucket: Bucket,
    credentials: Credentials,
    prefix: String,
    ttl: Duration,
    endpoint: String,
    client: reqwest::Client,
}

/// Why one PUT failed, and whether trying again could help.
#[derive(Debug)]
struct PutFailure {
    message: String,
    transient: bool,
}

impl S3Store {
    /// A store for `config`; fails when the endpoint or bucket name cannot make URLs.
    pub fn new(config: &S3Config) -> Result<Self, String> {
        let endpoint: url::Url = config.endpoint.parse().map_err(|e| {
            format!(
                "--artifacts-s3-endpoint {}: not a URL: {e}",
                config.endpoint
            )
        })?;
        let style = match config.style {
            S3UrlStyle::Path => UrlStyle::Path,
            S3UrlStyle::VirtualHost => UrlStyle::VirtualHost,
        };
        let bucket = Bucket::new(
            endpoint,
            style,
            config.bucket.clone(),
            config.region.clone(),
        )
        .map_err(|e| {
            format!(
                "bucket {} at {} ({} addressing): {e:?}; virtual-host addressing needs a host \
                 name, not an IP address",
                config.bucket,
                config.endpoint,
                config.style.as_str()
            )
        })?;
        let mut client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        // RFC 6761: `localhost` and names under it are loopback; no DNS query leaves.
        let base = bucket.base_url();
        if let (Some(host), Some(port)) = (base.host_str(), base.port_or_known_default())
            && (host == "localhost" || host.ends_with(".localhost"))
        {
            client = client.resolve(host, std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        }
        let client = client
            .build()
            .map_err(|e| format!("cannot make the S3 HTTP client: {e}"))?;
        Ok(Self {
            bucket,
            credentials: config.credentials.clone(),
            prefix: config.prefix.clone(),
            ttl: config.ttl,
            endpoint: config.endpoint.clone(),
            client,
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn place(&self) -> String {
        format!("bucket {} at {}", self.bucket.name(), self.endpoint)
    }

    /// The presigned GET URL of `name`, valid for the configured lifetime.
    pub fn presigned_get(&self, name: &str) -> String {
        let key = self.key(name);
        rusty_s3::actions::GetObject::new(&self.bucket, Some(&self.credentials), &key)
            .sign(self.ttl)
            .to_string()
    }

    /// Whether the bucket answers a signed HEAD (the start-up check; the error says why not).
    pub async fn check(&self) -> Result<(), StoreError> {
        let url = rusty_s3::actions::HeadBucket::new(&self.bucket, Some(&self.credentials))
            .sign(Duration::from_secs(60));
        let resp =
            self.client.head(url).send().await.map_err(|e| {
                StoreError(format!("{}: unreachable: {}", self.place(), transport(e)))
            })?;
        match resp.status().as_u16() {
            200..=299 => Ok(()),
            404 => Err(StoreError(format!("{}: no such bucket", self.place()))),
            s => Err(StoreError(format!(
                "{}: HEAD answered {s} (check the credentials and the region)",
                self.place()
            ))),
        }
    }

    async fn put_once(&self, key: &str, png: &[u8]) -> Result<(), PutFailure> {
        let mut action =
            rusty_s3::actions::PutObject::new(&self.bucket, Some(&self.credentials), key);
        action.headers_mut().insert("content-type", media_type(key));
        let url = action.sign(Duration::from_secs(60));
        let resp = self
            .client
            .put(url)
            .header(reqwest::header::CONTENT_TYPE, media_type(key))
            .body(png.to_vec())
            .send()
            .await
            .map_err(|e| PutFailure {
                message: format!("unreachable: {}", transport(e)),
                transient: true,
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        let tag = |t: &str| {
            body.split(&format!("<{t}>"))
                .nth(1)
                .and_then(|r| r.split(&format!("</{t}>")).next())
                .map(str::to_owned)
        };
        let detail = match (tag("Code"), tag("Message")) {
            (Some(c), Some(m)) => format!(" ({c}: {m})"),
            (Some(c), None) => format!(" ({c})"),
            _ => String::new(),
        };
        Err(PutFailure {
            message: format!("PUT {key} answered {}{detail}", status.as_u16()),
            transient: status.is_server_error() || status.as_u16() == 429,
        })
    }
}

impl ArtifactStore for S3Store {
    fn describe(&self) -> String {
        self.place()
    }

    fn put<'a>(&'a self, name: &'a str, png: Vec<u8>, _origin: &'a str) -> PutFuture<'a> {
        Box::pin(async move {
            let key = self.key(name);
            let attempt = || self.put_once(&key, &png);
            attempt
                .retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(100))
                        .with_max_times(2),
                )
                .when(|f: &PutFailure| f.transient)
                .await
                .map_err(|f| {
                    StoreError(format!(
                        "cannot store the image in {}: {}",
                        self.place(),
                        f.message
                    ))
                })?;
            Ok(Stored {
                url: self.presigned_get(name),
                expires_at: unix_now() + self.ttl.as_secs(),
            })
        })
    }
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_credentials_files_are_read_by_profile() {
        let text = "# comment\n[default]\naws_access_key_id = AK\naws_secret_access_key=SK\n\n[other]\naws_access_key_id=OK\naws_secret_access_key=OS\naws_session_token=T\n";
        let c = shared_credentials(text, "default").unwrap_or_else(|| panic!("no default"));
        assert_eq!((c.key(), c.secret(), c.token()), ("AK", "SK", None));
        let c = shared_credentials(text, "other").unwrap_or_else(|| panic!("no other"));
        assert_eq!(c.token(), Some("T"));
        assert!(shared_credentials(text, "missing").is_none());
    }

    #[test]
    fn virtual_host_urls_put_the_bucket_in_the_host_and_sign_it() {
        let config = |style, endpoint: &str| S3Config {
            endpoint: endpoint.to_owned(),
            bucket: "images".into(),
            region: "us-east-1".into(),
            prefix: "sd35/".into(),
            style,
            credentials: Credentials::new("AK", "SK"),
            ttl: Duration::from_secs(300),
        };
        let v = S3Store::new(&config(S3UrlStyle::VirtualHost, "http://localhost:9000"))
            .unwrap_or_else(|e| panic!("{e}"));
        let url = url::Url::parse(&v.presigned_get("a.png")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(url.host_str(), Some("images.localhost"));
        assert_eq!(url.path(), "/sd35/a.png");
        let query: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("X-Amz-Expires"), Some("300"));
        assert_eq!(get("X-Amz-SignedHeaders"), Some("host"));
        assert!(get("X-Amz-Signature").is_some_and(|s| s.len() == 64));
        let p = S3Store::new(&config(S3UrlStyle::Path, "http://127.0.0.1:9000"))
            .unwrap_or_else(|e| panic!("{e}"));
        let url = url::Url::parse(&p.presigned_get("a.png")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (url.host_str(), url.path()),
            (Some("127.0.0.1"), "/images/sd35/a.png")
        );
        // An IP address cannot carry a bucket name.
        let err =
            S3Store::new(&config(S3UrlStyle::VirtualHost, "http://127.0.0.1:9000")).unwrap_err();
        assert!(
            err.contains("bucket images") && err.contains("host name"),
            "{err}"
        );
    }
}
