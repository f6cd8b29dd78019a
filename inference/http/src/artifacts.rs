//! Artifact storage: where generated images go when a client asks for URLs instead of bytes
//! (`response_format: "url"`, `store: true`). One trait, [`ArtifactStore`], with two
//! implementations:
//!
//! - [`LocalStore`]: a directory on the server's disk. The server serves the files back itself
//!   at `GET /v1/artifacts/<name>?expires=<unix>&signature=<hex>`, where the signature is an
//!   HMAC-SHA256 over the path and the expiry, keyed by a secret from a file or the
//!   environment (or one drawn at start, so URLs die with the process). Files older than the
//!   URL lifetime are swept.
//! - [`S3Store`]: a bucket of an S3-compatible object store, path-style or virtual-host
//!   addressing, written with one signed `PUT` per image and handed out as presigned `GET`
//!   URLs. Names under `.localhost` resolve to loopback without asking DNS (RFC 6761), so a
//!   virtual-host endpoint such as `http://localhost:9000` works on one machine.
//!
//! A store that fails answers a [`StoreError`] naming the bucket or directory; the handler
//! turns it into a 502 for the client and counts it, so no accepted request is lost silently.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use hmac::{Hmac, Mac};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use sd35_contract::{ArtifactArgs, S3UrlStyle};
use sha2::Sha256;

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

/// The route the local store's files are served at (`/v1/artifacts/<name>`).
pub const LOCAL_ROUTE: &str = "/v1/artifacts";

/// A stored image: where to fetch it, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// A URL anyone holding it can `GET` until it expires.
    pub url: String,
    /// When the URL stops working, Unix seconds.
    pub expires_at: u64,
}

/// Why an image could not be stored; the message names the bucket or directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

/// The future a store's `put` returns.
pub type PutFuture<'a> = Pin<Box<dyn Future<Output = Result<Stored, StoreError>> + Send + 'a>>;

/// Where generated images are stored.
pub trait ArtifactStore: Send + Sync + fmt::Debug {
    /// Where the images go, for logs and errors (`bucket images at http://…`, `directory …`).
    fn describe(&self) -> String;

    /// Stores one image under `name` (letters, digits, `-`, `_` and `.`; its extension says
    /// its format) and returns its URL.
    /// `origin` is this server's base URL as the client reached it (`http://host:port`); a
    /// store that hands out its own URLs ignores it.
    fn put<'a>(&'a self, name: &'a str, png: Vec<u8>, origin: &'a str) -> PutFuture<'a>;
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh, unguessable artifact name for image `index` of a request, with the extension of
/// its format (`.png`, `.jpg`, `.webp`).
pub fn new_name(index: usize, format: crate::api::OutputFormat) -> String {
    let a: u64 = rand::random();
    let b: u64 = rand::random();
    let ext = match format {
        crate::api::OutputFormat::Png => "png",
        crate::api::OutputFormat::Jpeg => "jpg",
        crate::api::OutputFormat::Webp => "webp",
    };
    format!("{}-{a:016x}{b:016x}-{index}.{ext}", unix_now())
}

/// The media type of an artifact, from its name's extension.
pub fn media_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("jpg") => "image/jpeg",
        Some("webp") => "image/webp",
        _ => "image/png",
    }
}

/// Whether `name` is one this server could have made (no path separators, no dot files).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// What the server was told about storage, beyond the operator's flags.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// The local store's signing key (from a file or the environment); `None` draws one.
    pub signing_key: Option<Vec<u8>>,
    /// An AWS shared credentials file to read the S3 credentials from when the environment
    /// has none.
    pub credentials_file: Option<PathBuf>,
}

/// An opened store, of either kind.
#[derive(Debug, Clone)]
pub enum Opened {
    /// A directory served back by this server.
    Local(Arc<LocalStore>),
    /// An S3 bucket.
    S3(Arc<S3Store>),
}

impl Opened {
    /// The store behind the trait.
    pub fn store(&self) -> Arc<dyn ArtifactStore> {
        match self {
            Opened::Local(s) => s.clone(),
            Opened::S3(s) => s.clone(),
        }
    }

    /// The local store, whose files this server serves.
    pub fn local(&self) -> Option<Arc<LocalStore>> {
        match self {
            Opened::Local(s) => Some(s.clone()),
            Opened::S3(_) => None,
        }
    }
}

/// The store the flags ask for, if any; an error says which flag or variable to fix.
pub fn open(args: &ArtifactArgs, options: &StoreOptions) -> Result<Option<Opened>, String> {
    let ttl = Duration::from_secs(u64::from(args.artifacts_url_seconds.max(1)));
    if let Some(dir) = &args.artifacts_dir {
        let key = match &options.signing_key {
            Some(k) if k.len() >= 16 => k.clone(),
            Some(_) => {
                return Err(
                    "the artifact signing key is shorter than 16 bytes; use 32 random bytes"
                        .to_owned(),
                );
            }
            None => {
                let k: [u8; 32] = rand::random();
                k.to_vec()
            }
        };
        return Ok(Some(Opened::Local(Arc::new(LocalStore::new(
            dir, key, ttl,
        )?))));
    }
    let Some(bucket) = &args.artifacts_s3_bucket else {
        return Ok(None);
    };
    let credentials = s3_credentials(options.credentials_file.as_deref())?;
    let endpoint = args
        .artifacts_s3_endpoint
        .clone()
        .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", args.artifacts_s3_region));
    Ok(Some(Opened::S3(Arc::new(S3Store::new(&S3Config {
        endpoint,
        bucket: bucket.clone(),
        region: args.artifacts_s3_region.clone(),
        prefix: args.artifacts_s3_prefix.clone(),
        style: args.artifacts_s3_url_style,
        credentials,
        ttl,
    })?))))
}

/// The local directory store.
#[derive(Debug)]
pub struct LocalStore {
    dir: PathBuf,
    key: Vec<u8>,
    ttl: Duration,
    last_sweep: Mutex<Option<Instant>>,
}

/// Why a local artifact URL is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The signature is missing or does not match.
    BadSignature,
    /// The URL expired.
    Expired,
    /// No such artifact (never made, or swept).
    NotFound,
}

type HmacSha256 = Hmac<Sha256>;

impl LocalStore {
    /// A store in `dir` (created when missing) signing URLs that live `ttl` with `key`.
    pub fn new(dir: &Path, key: Vec<u8>, ttl: Duration) -> Result<Self, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("--artifacts-dir {}: cannot create it: {e}", dir.display()))?;
        let probe = dir.join(".sd35-write-probe");
        std::fs::write(&probe, b"")
            .map_err(|e| format!("--artifacts-dir {}: not writable: {e}", dir.display()))?;
        let _ = std::fs::remove_file(&probe);
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
            ttl,
            last_sweep: Mutex::new(None),
        })
    }

    fn mac(&self, name: &str, expires: u64) -> HmacSha256 {
        #[allow(clippy::expect_used)]
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(format!("GET\n{LOCAL_ROUTE}/{name}\n{expires}").as_bytes());
        mac
    }

    /// The signature of `name` until `expires`, lower-case hex.
    pub fn signature(&self, name: &str, expires: u64) -> String {
        sd35_contract::hex(&self.mac(name, expires).finalize().into_bytes())
    }

    /// The path and query of `name`'s URL until `expires`.
    pub fn signed_path(&self, name: &str, expires: u64) -> String {
        format!(
            "{LOCAL_ROUTE}/{name}?expires={expires}&signature={}",
            self.signature(name, expires)
        )
    }

    /// Checks a request for `name` with the query's `expires` and `signature` at `now`, and
    /// returns the file's bytes.
    pub fn fetch(
        &self,
        name: &str,
        expires: Option<u64>,
        signature: Option<&str>,
        now: u64,
    ) -> Result<Vec<u8>, Refusal> {
        let (Some(expires), Some(signature)) = (expires, signature) else {
            return Err(Refusal::BadSignature);
        };
        if !valid_name(name) {
            return Err(Refusal::NotFound);
        }
        let given = decode_hex(signature).ok_or(Refusal::BadSignature)?;
        // Constant-time comparison.
        self.mac(name, expires)
            .verify_slice(&given)
            .map_err(|_| Refusal::BadSignature)?;
        if now >= expires {
            return Err(Refusal::Expired);
        }
        std::fs::read(self.dir.join(name)).map_err(|_| Refusal::NotFound)
    }

    /// Deletes files older than the URL lifetime, at most once a minute.
    fn sweep(&self) {
        {
            let Ok(mut last) = self.last_sweep.lock() else {
                return;
            };
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
                return;
            }
            *last = Some(Instant::now());
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > self.ttl + Duration::from_secs(60));
            if old && e.file_name().to_str().is_some_and(valid_name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    fn write_error(&self, e: impl fmt::Display) -> StoreError {
        StoreError(format!(
            "cannot store the image in the directory {}: {e}",
            self.dir.display()
        ))
    }

    #[cfg(test)]
    fn write(&self, name: &str, png: &[u8]) -> Result<(), StoreError> {
        sd35_contract::write_atomic(&self.dir.join(name), png).map_err(|e| self.write_error(e))
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl ArtifactStore for LocalStore {
    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }

    fn put<'a>(&'a self, name: &'a str, png: Vec<u8>, origin: &'a str) -> PutFuture<'a> {
        Box::pin(async move {
            self.sweep();
            let expires_at = unix_now() + self.ttl.as_secs();
            let path = self.dir.join(name);
            tokio::task::spawn_blocking(move || sd35_contract::write_atomic(&path, &png))
                .await
                .map_err(|e| self.write_error(e))?
                .map_err(|e| self.write_error(e))?;
            Ok(Stored {
                url: format!(
                    "{}{}",
                    origin.trim_end_matches('/'),
                    self.signed_path(name, expires_at)
                ),
                expires_at,
            })
        })
    }
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
mod tests {
    use super::*;

    fn local(dir: &Path) -> LocalStore {
        LocalStore::new(dir, vec![7; 32], Duration::from_secs(600))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn local_urls_are_refused_when_tampered_with_or_expired() {
        let dir = std::env::temp_dir().join(format!("sd35-artifacts-{}", std::process::id()));
        let store = local(&dir);
        let name = new_name(0, crate::api::OutputFormat::Png);
        assert!(valid_name(&name));
        store.write(&name, b"png").unwrap_or_else(|e| panic!("{e}"));
        let sig = store.signature(&name, 1000);
        assert_eq!(
            store.fetch(&name, Some(1000), Some(&sig), 999),
            Ok(b"png".to_vec())
        );
        assert_eq!(
            store.fetch(&name, Some(1000), Some(&sig), 1000),
            Err(Refusal::Expired)
        );
        // A later expiry with the old signature, another name, another key: all refused.
        assert_eq!(
            store.fetch(&name, Some(5000), Some(&sig), 999),
            Err(Refusal::BadSignature)
        );
        let other = LocalStore::new(&dir, vec![8; 32], Duration::from_secs(600))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            other.fetch(&name, Some(1000), Some(&sig), 999),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            store.fetch(&name, Some(1000), None, 999),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            store.fetch(&name, Some(1000), Some("zz"), 999),
            Err(Refusal::BadSignature)
        );
        let missing = new_name(1, crate::api::OutputFormat::Webp);
        assert_eq!(media_type(&missing), "image/webp");
        let sig = store.signature(&missing, 1000);
        assert_eq!(
            store.fetch(&missing, Some(1000), Some(&sig), 999),
            Err(Refusal::NotFound)
        );
        for bad in ["../x.png", "a/b.png", ".hidden", ""] {
            assert!(!valid_name(bad), "{bad}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

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
