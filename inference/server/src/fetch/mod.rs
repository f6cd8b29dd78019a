//! `sd35-server fetch`: fills `<cache-root>/models/<cache-key>/` from a Hugging Face
//! repository, an HTTP mirror or a mounted directory.
//!
//! Guarantees: only the files the variant needs are fetched; every file is verified (sha256
//! from the mirror's manifest or the Hub's LFS metadata, sizes where known) before it is moved
//! into place; interrupted transfers resume from their partial file; the completion marker
//! (with the manifest of every file) is written last, atomically, so a second run on a complete
//! cache returns at once. Failures exit with the codes of [`sd35_contract::ExitReason`].

pub mod adapter;
mod download;
pub mod error;
pub mod manifest;
mod select;
mod source;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use sd35_contract::{COMPLETE_MARKER, ExitReason, FetchArgs, TOKEN_ENV, model_dir};
use sha2::Digest;

use self::download::{Progress, TransferPolicy, download, get_bytes, partial_path};
use self::error::{ExitError, exit_on_error};
use self::manifest::{
    CacheManifest, FileRecord as CachedFile, SourceRecord, read_marker, write_marker,
};
use self::source::{
    RemoteFile, SHA256SUMS, list_dir, not_found_or_io, parse_hub_info, parse_hub_tree,
    parse_sha256sums,
};

/// `sd35-server fetch`: the contract's flags plus tuning knobs the operator leaves at their
/// defaults.
#[derive(Debug, clap::Args)]
pub struct FetchCommand {
    #[command(flatten)]
    pub args: FetchArgs,

    #[command(flatten)]
    pub transfer: TransferOptions,
}

/// How `fetch` and `fetch-adapter` transfer files: knobs the operator leaves at their
/// defaults.
#[derive(Debug, clap::Args)]
pub struct TransferOptions {
    /// File holding the source's access token (used when the token variable is unset).
    #[arg(long, env = "SD35_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Files transferred at the same time.
    #[arg(long, env = "SD35_FETCH_PARALLEL", default_value_t = 4)]
    pub parallel: usize,

    /// Seconds without data after which a transfer is abandoned and retried.
    #[arg(long, env = "SD35_STALL_TIMEOUT_SECONDS", default_value_t = 60)]
    pub stall_timeout_seconds: u64,

    /// Retries of a failed transfer (network errors, 5xx, checksum mismatches).
    #[arg(long, env = "SD35_FETCH_RETRIES", default_value_t = 5)]
    pub retries: u32,

    /// Milliseconds before the first retry; doubled for each further one.
    #[arg(long, env = "SD35_RETRY_BACKOFF_MS", default_value_t = 1000)]
    pub retry_backoff_ms: u64,

    /// Seconds between progress lines.
    #[arg(long, env = "SD35_PROGRESS_SECONDS", default_value_t = 10)]
    pub progress_seconds: u64,
}

/// Runs `fetch` and exits with its documented exit code.
pub fn main(cmd: &FetchCommand) -> ! {
    let result = runtime().and_then(|rt| rt.block_on(run(cmd)));
    exit_on_error(
        "fetch",
        result,
        cmd.args.termination_message_path.as_deref(),
    )
}

/// The tokio runtime `fetch` and `fetch-adapter` run on.
fn runtime() -> Result<tokio::runtime::Runtime, ExitError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ExitError::new(ExitReason::Network, format!("tokio runtime: {e}")))
}

/// The transfer policy and HTTP client of `options`.
fn transfers(options: &TransferOptions) -> Result<(TransferPolicy, reqwest::Client), ExitError> {
    let policy = TransferPolicy {
        token: read_token(options)?,
        stall_timeout: Duration::from_secs(options.stall_timeout_seconds.max(1)),
        retries: options.retries,
        backoff: Duration::from_millis(options.retry_backoff_ms),
    };
    let client = reqwest::Client::builder()
        .connect_timeout(policy.stall_timeout)
        .user_agent(concat!("sd35-server/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ExitError::new(ExitReason::Network, format!("HTTP client: {e}")))?;
    Ok((policy, client))
}

/// Reads the marker of `dir`: `true` when it is complete (nothing to do); otherwise removes a
/// stale marker, so an incomplete directory never looks complete, and creates the directory.
fn prepare_dir(dir: &Path) -> Result<bool, ExitError> {
    if let Some(m) = read_marker(dir)?
        && m.files_present(dir)
    {
        tracing::info!(
            dir = %dir.display(),
            files = m.files.len(),
            "cache already complete, nothing to do"
        );
        return Ok(true);
    }
    match std::fs::remove_file(dir.join(COMPLETE_MARKER)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ExitError::io(dir, &e));
        }
        _ => {}
    }
    std::fs::create_dir_all(dir).map_err(|e| ExitError::io(dir, &e))?;
    Ok(false)
}

/// Seconds since the Unix epoch, for the markers.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_token(cmd: &TransferOptions) -> Result<Option<String>, ExitError> {
    if let Ok(t) = std::env::var(TOKEN_ENV)
        && !t.trim().is_empty()
    {
        return Ok(Some(t.trim().to_owned()));
    }
    match &cmd.token_file {
        None => Ok(None),
        Some(p) => {
            let t = std::fs::read_to_string(p).map_err(|e| {
                ExitError::new(
                    ExitReason::Unauthorized,
                    format!("cannot read the token file {}: {e}", p.display()),
                )
            })?;
            Ok(Some(t.trim().to_owned()).filter(|t| !t.is_empty()))
        }
    }
}

/// The files to fetch and where they come from.
struct Plan {
    source: SourceRecord,
    resolved_revision: Option<String>,
    files: Vec<RemoteFile>,
    /// `Ok(base URL)` for HTTP sources, `Err(directory)` for imports.
    origin: Result<String, PathBuf>,
}

/// Fetches (or confirms) the cache.
pub async fn run(cmd: &FetchCommand) -> Result<(), ExitError> {
    let args = &cmd.args;
    let dir = model_dir(&args.cache_root, &args.cache_key);
    if prepare_dir(&dir)? {
        return Ok(());
    }
    let (policy, client) = transfers(&cmd.transfer)?;

    let plan = plan(args, &client, &policy).await?;
    let paths: Vec<String> = plan.files.iter().map(|f| f.path.clone()).collect();
    let selected = select::select(&paths, args.variant)
        .map_err(|e| ExitError::new(ExitReason::InvalidModel, e))?;
    let files: Vec<RemoteFile> = plan
        .files
        .iter()
        .filter(|f| selected.contains(&f.path))
        .cloned()
        .collect();
    let total: u64 = files.iter().filter_map(|f| f.size).sum();
    tracing::info!(
        source = ?plan.source,
        revision = %args.revision,
        resolved = plan.resolved_revision.as_deref().unwrap_or("-"),
        files = files.len(),
        bytes = total,
        dir = %dir.display(),
        "fetching"
    );

    let progress = Arc::new(Progress::default());
    progress.total.store(total, Ordering::Relaxed);
    let started = Instant::now();
    let ticker = tokio::spawn(report_progress(
        progress.clone(),
        Duration::from_secs(cmd.transfer.progress_seconds.max(1)),
    ));
    let mut transfers = futures::stream::iter(files.iter())
        .map(|f| fetch_one(&client, &plan.origin, f, &dir, &policy, &progress))
        .buffer_unordered(cmd.transfer.parallel.max(1));
    let mut cached = Vec::with_capacity(files.len());
    let mut first_err: Option<ExitError> = None;
    while let Some(r) = transfers.next().await {
        match r {
            Ok(c) => cached.push(c),
            // A retry cannot fix it: stop now (dropping the other transfers keeps their
            // partial files for the next run).
            Err(e) if !e.retriable() => {
                ticker.abort();
                return Err(e);
            }
            // Let the other files finish, so the next attempt has less to do.
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    drop(transfers);
    ticker.abort();
    if let Some(e) = first_err {
        return Err(e);
    }
    cached.sort_by(|x, y| x.path.cmp(&y.path));
    let bytes: u64 = cached.iter().map(|c| c.size).sum();
    let manifest = CacheManifest {
        source: plan.source,
        revision: args.revision.clone(),
        resolved_revision: plan.resolved_revision,
        variant: args.variant,
        files: cached,
        completed_at: unix_now(),
    };
    write_marker(&manifest, &dir)?;
    tracing::info!(
        files = manifest.files.len(),
        bytes,
        downloaded = progress.received.load(Ordering::Relaxed),
        seconds = started.elapsed().as_secs_f64(),
        "cache complete"
    );
    Ok(())
}

async fn plan(
    args: &FetchArgs,
    client: &reqwest::Client,
    policy: &TransferPolicy,
) -> Result<Plan, ExitError> {
    if let Some(repo) = &args.source.hf_repo {
        let listing = hub_listing(client, policy, &args.hf_endpoint, repo, &args.revision).await?;
        Ok(Plan {
            source: SourceRecord::HuggingFace {
                endpoint: listing.endpoint,
                repo: repo.clone(),
            },
            resolved_revision: listing.commit,
            files: listing.files,
            origin: Ok(listing.base),
        })
    } else if let Some(base) = &args.source.http_url {
        let base = base.trim_end_matches('/');
        let url = format!("{base}/{SHA256SUMS}");
        let body = String::from_utf8(get_bytes(client, &url, policy).await?).map_err(|_| {
            ExitError::new(ExitReason::InvalidModel, format!("{url}: not UTF-8 text"))
        })?;
        let files = parse_sha256sums(&body)
            .map_err(|e| ExitError::new(ExitReason::InvalidModel, format!("{url}: {e}")))?;
        Ok(Plan {
            source: SourceRecord::Http {
                url: base.to_owned(),
            },
            resolved_revision: None,
            files,
            origin: Ok(base.to_owned()),
        })
    } else if let Some(dir) = &args.source.import_dir {
        let listed = list_dir(dir)?;
        let sums = match std::fs::read_to_string(dir.join(SHA256SUMS)) {
            Ok(t) => Some(parse_sha256sums(&t).map_err(|e| {
                ExitError::new(ExitReason::InvalidModel, format!("{SHA256SUMS}: {e}"))
            })?),
            Err(_) => None,
        };
        let files = listed
            .into_iter()
            .filter(|(rel, _)| rel != SHA256SUMS)
            .map(|(rel, path)| RemoteFile {
                sha256: sums
                    .as_ref()
                    .and_then(|s| s.iter().find(|f| f.path == rel))
                    .and_then(|f| f.sha256.clone()),
                size: std::fs::metadata(&path).ok().map(|m| m.len()),
                path: rel,
            })
            .collect();
        Ok(Plan {
            source: SourceRecord::Import {
                dir: dir.display().to_string(),
            },
            resolved_revision: None,
            files,
            origin: Err(dir.clone()),
        })
    } else {
        Err(ExitError::new(
            ExitReason::Usage,
            "one of --hf-repo, --http-url or --import-dir is required",
        ))
    }
}

/// A Hugging Face repository's files at a revision.
struct HubListing {
    /// The endpoint, without a trailing slash.
    endpoint: String,
    /// The commit the revision resolved to, when the Hub says.
    commit: Option<String>,
    /// Every file, with sha256 and size where known.
    files: Vec<RemoteFile>,
    /// The base URL of the files, pinned to the commit.
    base: String,
}

/// Lists `repo` at `revision` through the Hub API (the tree API fills in missing hashes).
async fn hub_listing(
    client: &reqwest::Client,
    policy: &TransferPolicy,
    endpoint: &str,
    repo: &str,
    revision: &str,
) -> Result<HubListing, ExitError> {
    let endpoint = endpoint.trim_end_matches('/');
    let url = format!(
        "{endpoint}/api/models/{repo}/revision/{}?blobs=true",
        encode(revision, false)
    );
    let body = get_bytes(client, &url, policy).await?;
    let (sha, mut files) =
        parse_hub_info(&body).map_err(|e| ExitError::new(ExitReason::Network, e))?;
    // Pin every download to the commit the revision resolved to.
    let rev = sha.clone().unwrap_or_else(|| revision.to_owned());
    // Some Hub mirrors omit LFS metadata from the model info: the tree API has it.
    let weights_unhashed = files
        .iter()
        .any(|f| f.path.ends_with(".safetensors") && f.sha256.is_none());
    if weights_unhashed {
        let url = format!(
            "{endpoint}/api/models/{repo}/tree/{}?recursive=true",
            encode(&rev, false)
        );
        match get_bytes(client, &url, policy)
            .await
            .map(|b| parse_hub_tree(&b))
        {
            Ok(Ok(tree)) => {
                for f in &mut files {
                    if let Some(t) = tree.iter().find(|t| t.path == f.path) {
                        f.sha256 = f.sha256.take().or_else(|| t.sha256.clone());
                        f.size = t.size.or(f.size);
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!("{url}: {e}; weights are checked by size only"),
            Err(e) => tracing::warn!("{}; weights are checked by size only", e.message),
        }
    }
    Ok(HubListing {
        endpoint: endpoint.to_owned(),
        commit: sha,
        files,
        base: format!("{endpoint}/{repo}/resolve/{}", encode(&rev, false)),
    })
}

async fn fetch_one(
    client: &reqwest::Client,
    origin: &Result<String, PathBuf>,
    file: &RemoteFile,
    dir: &Path,
    policy: &TransferPolicy,
    progress: &Progress,
) -> Result<CachedFile, ExitError> {
    let from = match origin {
        Ok(base) => Origin::Url(format!("{base}/{}", encode(&file.path, true))),
        Err(src_dir) => Origin::File(src_dir.join(&file.path)),
    };
    let (size, sha256) =
        fetch_file(client, &from, file, &dir.join(&file.path), policy, progress).await?;
    Ok(CachedFile {
        path: file.path.clone(),
        size,
        sha256,
    })
}

/// Where one file comes from.
enum Origin {
    /// A URL.
    Url(String),
    /// A file on a mounted volume.
    File(PathBuf),
}

/// Fetches `file` from `from` to `dest` (kept when it is already there and verifies) and
/// returns its size and sha256.
async fn fetch_file(
    client: &reqwest::Client,
    from: &Origin,
    file: &RemoteFile,
    dest: &Path,
    policy: &TransferPolicy,
    progress: &Progress,
) -> Result<(u64, String), ExitError> {
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| ExitError::io(parent, &e))?;
    }
    // A file already in place from an earlier, interrupted run: keep it if it verifies.
    if let Ok((size, hash)) = download::hash_file(dest).await {
        let sum = sd35_contract::hex(&hash.finalize());
        if file.size.is_none_or(|s| s == size) && file.sha256.as_deref().is_none_or(|s| s == sum) {
            return Ok((size, sum));
        }
        tracing::warn!(file = %file.path, "cached file does not match its checksum, fetching it again");
        tokio::fs::remove_file(dest)
            .await
            .map_err(|e| ExitError::io(dest, &e))?;
    }
    let (size, sha256) = match from {
        Origin::Url(url) => download(client, url, file, dest, policy, progress).await?,
        Origin::File(src) => import(src, file, dest, progress).await?,
    };
    tracing::info!(file = %file.path, size, "verified");
    Ok((size, sha256))
}

/// Copies a file from a mounted directory through a partial file, hashing as it goes.
async fn import(
    src: &Path,
    file: &RemoteFile,
    dest: &Path,
    progress: &Progress,
) -> Result<(u64, String), ExitError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let part = partial_path(dest);
    let mut r = tokio::fs::File::open(src)
        .await
        .map_err(|e| not_found_or_io(src, &e))?;
    let mut w = tokio::fs::File::create(&part)
        .await
        .map_err(|e| ExitError::io(&part, &e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = r.read(&mut buf).await.map_err(|e| ExitError::io(src, &e))?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n])
            .await
            .map_err(|e| ExitError::io(&part, &e))?;
        h.update(&buf[..n]);
        size += n as u64;
        progress.received.fetch_add(n as u64, Ordering::Relaxed);
    }
    // A failed write surfaces on flush; sync_all would report it less precisely.
    w.flush().await.map_err(|e| ExitError::io(&part, &e))?;
    w.sync_all().await.map_err(|e| ExitError::io(&part, &e))?;
    let sum = sd35_contract::hex(&h.finalize());
    if file.sha256.as_deref().is_some_and(|s| s != sum) {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(ExitError::new(
            ExitReason::ChecksumMismatch,
            format!(
                "{}: sha256 {sum} does not match {SHA256SUMS}",
                src.display()
            ),
        ));
    }
    tokio::fs::rename(&part, dest)
        .await
        .map_err(|e| ExitError::io(dest, &e))?;
    Ok((size, sum))
}

/// Logs bytes, rate and ETA every `every` until aborted.
async fn report_progress(progress: Arc<Progress>, every: Duration) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let done = progress.received.load(Ordering::Relaxed);
        let total = progress.total.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 && total > done {
            format!("{:.0}s", (total - done) as f64 / rate)
        } else {
            "-".to_owned()
        };
        tracing::info!(
            "progress: {} of {} ({:.1} MB/s, ETA {eta})",
            human(done),
            human(total),
            rate / 1e6
        );
    }
}

/// Percent-encodes a revision or a file path for a URL (`/` kept only in paths).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn revisions_and_paths_are_encoded() {
        assert_eq!(super::encode("refs/pr/5", false), "refs%2Fpr%2F5");
        assert_eq!(super::encode("vae/a b#1.json", true), "vae/a%20b%231.json");
        assert_eq!(super::human(1_500_000), "1.5 MB");
    }
}
