//! The local directory store: images written atomically into a directory, served back by the
//! server itself on URLs signed with HMAC-SHA256 over the path and the expiry; files older
//! than the URL lifetime are swept.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{ArtifactStore, LOCAL_ROUTE, PutFuture, StoreError, Stored, valid_name};
use crate::unix_now;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::{media_type, new_name};

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
}
