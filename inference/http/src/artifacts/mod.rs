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

mod local;
mod s3;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sd35_contract::ArtifactArgs;

use crate::unix_now;

pub use local::{LocalStore, Refusal};
pub use s3::{S3Config, S3Store, s3_credentials};
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
