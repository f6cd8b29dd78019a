//! One file over HTTP: resumable (a `.<name>.partial` file continued with a Range request),
//! with a stall timeout between chunks, sha256 and size verification, and retries with
//! exponential backoff for failures a retry can fix.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use sd35_contract::ExitReason;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::error::ExitError;
use super::source::{RemoteFile, status_error};

/// How transfers behave.
#[derive(Clone, Debug)]
pub struct TransferPolicy {
    /// Bearer token sent with every request.
    pub token: Option<String>,
    /// A transfer with no data for this long is abandoned (and retried).
    pub stall_timeout: Duration,
    /// Attempts after the first, for network errors, 5xx/429 and checksum mismatches.
    pub retries: u32,
    /// Delay before the first retry; doubled each time, capped at 30 s.
    pub backoff: Duration,
}

/// Bytes received so far and bytes expected in all, shared by the transfers and the progress
/// log. Sizes a source does not list are learned from the first response.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes received in this run.
    pub received: AtomicU64,
    /// Bytes expected in this run.
    pub total: AtomicU64,
}

/// The temporary name a file is downloaded under, next to its final place.
pub fn partial_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    dest.with_file_name(format!(".{name}.partial"))
}

/// Lower-case hex sha256 of a file's content (async, chunked).
pub async fn hash_file(path: &Path) -> std::io::Result<(u64, Sha256)> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n_total = 0u64;
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        n_total += n as u64;
    }
    Ok((n_total, h))
}

/// Performs `GET url` with the token; maps statuses other than 200/206/416 to failures.
pub async fn get(
    client: &reqwest::Client,
    url: &str,
    policy: &TransferPolicy,
    range_from: Option<u64>,
) -> Result<reqwest::Response, ExitError> {
    let mut req = client.get(url);
    if let Some(t) = &policy.token {
        req = req.bearer_auth(t);
    }
    if let Some(from) = range_from {
        req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
    }
    let resp = tokio::time::timeout(policy.stall_timeout, req.send())
        .await
        .map_err(|_| {
            ExitError::new(
                ExitReason::Network,
                format!(
                    "{url}: no response within {} s",
                    policy.stall_timeout.as_secs_f64()
                ),
            )
        })?
        .map_err(|e| ExitError::new(ExitReason::Network, format!("{url}: {}", chain(&e))))?;
    let status = resp.status().as_u16();
    if matches!(status, 200 | 206 | 416) {
        Ok(resp)
    } else {
        Err(status_error(status, url))
    }
}

/// An error with its causes, `: `-separated (reqwest's own message omits them).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Fetches a small document (a listing) whole, retrying what a retry can fix.
pub async fn get_bytes(
    client: &reqwest::Client,
    url: &str,
    policy: &TransferPolicy,
) -> Result<Vec<u8>, ExitError> {
    let mut attempt = 0u32;
    loop {
        let result =
            match get(client, url, policy, None).await {
                Ok(resp) => resp.bytes().await.map(|b| b.to_vec()).map_err(|e| {
                    ExitError::new(ExitReason::Network, format!("{url}: {}", chain(&e)))
                }),
                Err(e) => Err(e),
            };
        match result {
            Err(e) if e.retriable() && attempt < policy.retries => {
                let delay = backoff(policy, attempt);
                attempt += 1;
                tracing::warn!(url, attempt, "request failed, retrying: {}", e.message);
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}

fn backoff(policy: &TransferPolicy, attempt: u32) -> Duration {
    policy
        .backoff
        .saturating_mul(1 << attempt.min(16))
        .min(Duration::from_secs(30))
}

/// Downloads `file` from `url` to `dest` (verified, then renamed into place), retrying what a
/// retry can fix. Returns the size and sha256.
pub async fn download(
    client: &reqwest::Client,
    url: &str,
    file: &RemoteFile,
    dest: &Path,
    policy: &TransferPolicy,
    progress: &Progress,
) -> Result<(u64, String), ExitError> {
    let mut attempt = 0u32;
    let mut sized = file.size.is_some();
    loop {
        match attempt_once(client, url, file, dest, policy, progress, &mut sized).await {
            Ok(done) => return Ok(done),
            Err(e) if e.retriable() && attempt < policy.retries => {
                let delay = backoff(policy, attempt);
                attempt += 1;
                tracing::warn!(
                    file = %file.path,
                    attempt,
                    retries = policy.retries,
                    delay_ms = delay.as_millis() as u64,
                    "transfer failed, retrying: {}",
                    e.message
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn attempt_once(
    client: &reqwest::Client,
    url: &str,
    file: &RemoteFile,
    dest: &Path,
    policy: &TransferPolicy,
    progress: &Progress,
    sized: &mut bool,
) -> Result<(u64, String), ExitError> {
    let part = partial_path(dest);
    // Continue a partial file: hash what is there, ask for the rest.
    let (mut have, mut hash) = match hash_file(&part).await {
        Ok(x) => x,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, Sha256::new()),
        Err(e) => return Err(ExitError::io(&part, &e)),
    };
    if file.size.is_some_and(|s| have > s) {
        have = 0;
        hash = Sha256::new();
    }
    let resp = get(client, url, policy, (have > 0).then_some(have)).await?;
    let status = resp.status().as_u16();
    if !*sized && let Some(len) = resp.content_length() {
        let before = if status == 206 { have } else { 0 };
        progress.total.fetch_add(before + len, Ordering::Relaxed);
        *sized = true;
    }
    let mut out = match status {
        206 => {
            tracing::info!(file = %file.path, from = have, "resuming partial download");
            tokio::fs::OpenOptions::new()
                .append(true)
                .open(&part)
                .await
                .map_err(|e| ExitError::io(&part, &e))?
        }
        416 => {
            // The partial file already holds every byte; verify it below.
            drop(resp);
            return finish(file, dest, &part, have, hash).await;
        }
        _ => {
            have = 0;
            hash = Sha256::new();
            tokio::fs::File::create(&part)
                .await
                .map_err(|e| ExitError::io(&part, &e))?
        }
    };
    let mut stream = resp.bytes_stream();
    loop {
        let next = tokio::time::timeout(policy.stall_timeout, stream.next())
            .await
            .map_err(|_| {
                ExitError::new(
                    ExitReason::Network,
                    format!(
                        "{url}: transfer stalled for {} s at byte {have}",
                        policy.stall_timeout.as_secs_f64()
                    ),
                )
            })?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| {
            ExitError::new(
                ExitReason::Network,
                format!("{url}: connection lost at byte {have}: {}", chain(&e)),
            )
        })?;
        out.write_all(&chunk)
            .await
            .map_err(|e| ExitError::io(&part, &e))?;
        hash.update(&chunk);
        have += chunk.len() as u64;
        progress
            .received
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    out.flush().await.map_err(|e| ExitError::io(&part, &e))?;
    out.sync_all().await.map_err(|e| ExitError::io(&part, &e))?;
    drop(out);
    if let Some(size) = file.size
        && have < size
    {
        return Err(ExitError::new(
            ExitReason::Network,
            format!("{url}: connection closed after {have} of {size} bytes"),
        ));
    }
    finish(file, dest, &part, have, hash).await
}

/// Verifies a complete partial file and moves it into place; a mismatch deletes it, so the
/// retry starts over.
async fn finish(
    file: &RemoteFile,
    dest: &Path,
    part: &Path,
    size: u64,
    hash: Sha256,
) -> Result<(u64, String), ExitError> {
    let sum = sd35_contract::hex(&hash.finalize());
    let size_ok = file.size.is_none_or(|s| s == size);
    let sum_ok = file.sha256.as_deref().is_none_or(|s| s == sum);
    if !(size_ok && sum_ok) {
        let _ = tokio::fs::remove_file(part).await;
        return Err(ExitError::new(
            ExitReason::ChecksumMismatch,
            format!(
                "{}: got {size} bytes with sha256 {sum}, expected {} bytes with sha256 {}",
                file.path,
                file.size.map_or("any".to_owned(), |s| s.to_string()),
                file.sha256.as_deref().unwrap_or("any"),
            ),
        ));
    }
    tokio::fs::rename(part, dest)
        .await
        .map_err(|e| ExitError::io(dest, &e))?;
    Ok((size, sum))
}
