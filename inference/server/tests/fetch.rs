//! `sd35-server fetch` against local HTTP servers: an HTTP mirror and a fake Hub API serving
//! the tiny diffusers model, with cut, corrupted, stalled and refused transfers.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use common::{Server, State, read_tree, server, sha256_hex, stderr, testdata};
use sd35_contract::{COMPLETE_MARKER, ExitReason};

const MODEL: &str = "sd35-tiny-large";
const SHARD: &str = "transformer/diffusion_pytorch_model-00002-of-00003.safetensors";
const VAE: &str = "vae/diffusion_pytorch_model.safetensors";

/// The tiny model plus files a fetch must skip (another layout's checkpoint, a README).
fn model_tree() -> BTreeMap<String, Vec<u8>> {
    let mut tree = read_tree(&testdata(MODEL));
    tree.insert("sd3.5_large.safetensors".into(), vec![7u8; 4096]);
    tree.insert("README.md".into(), b"# tiny".to_vec());
    tree
}

/// A mirror at `/mirror/` with its `sha256sums.txt`.
fn mirror() -> Server {
    let mut state = State::default();
    let mut sums = String::new();
    for (path, body) in model_tree() {
        sums.push_str(&format!("{}  {path}\n", sha256_hex(&body)));
        state.files.insert(format!("/mirror/{path}"), body);
    }
    state
        .files
        .insert("/mirror/sha256sums.txt".into(), sums.into_bytes());
    Server::start(state)
}

fn fetch(
    cache: &Path,
    source: &[&str],
    extra: &[&str],
    envs: &[(&str, &str)],
) -> std::process::Output {
    let root = cache.to_str().unwrap();
    let mut args = vec![
        "fetch",
        "--variant=large",
        "--cache-root",
        root,
        "--cache-key=k1",
        "--retry-backoff-ms=20",
        "--progress-seconds=1",
    ];
    args.extend_from_slice(source);
    args.extend_from_slice(extra);
    server(&args, envs)
}

/// The cache holds exactly the diffusers files of the tiny model, byte for byte, and a marker
/// listing them.
fn assert_complete(cache: &Path) {
    let dir = cache.join("models/k1");
    let got = read_tree(&dir);
    let want = read_tree(&testdata(MODEL));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "fetched files"
    );
    for (k, v) in &want {
        assert!(got[k] == *v, "{k} differs from the source");
    }
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(COMPLETE_MARKER)).unwrap()).unwrap();
    let files = marker["files"].as_array().unwrap();
    assert_eq!(files.len(), want.len());
    for f in files {
        let path = f["path"].as_str().unwrap();
        assert_eq!(f["sha256"].as_str().unwrap(), sha256_hex(&want[path]));
        assert_eq!(f["size"].as_u64().unwrap(), want[path].len() as u64);
    }
}

#[test]
fn mirror_download_is_complete_and_a_second_run_is_a_no_op() {
    let srv = mirror();
    let cache = tempfile::tempdir().unwrap();
    let url = format!("--http-url={}/mirror/", srv.base);
    let out = fetch(cache.path(), &[&url], &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_complete(cache.path());
    assert!(srv.requests_for("sd3.5_large.safetensors").is_empty());
    assert!(srv.requests_for("README.md").is_empty());

    let before = srv.request_count();
    let started = Instant::now();
    let out = fetch(cache.path(), &[&url], &[], &[]);
    let secs = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already complete"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        srv.request_count(),
        before,
        "a complete cache makes no requests"
    );
    assert!(secs < 1.0, "second run took {secs:.2} s");
}

#[test]
fn transfer_cut_halfway_resumes_with_a_range_request() {
    let srv = mirror();
    let shard_len = srv.state.lock().unwrap().files[&format!("/mirror/{SHARD}")].len();
    srv.state
        .lock()
        .unwrap()
        .cut_once
        .insert(format!("/mirror/{SHARD}"));
    let cache = tempfile::tempdir().unwrap();
    let url = format!("--http-url={}/mirror", srv.base);
    let out = fetch(cache.path(), &[&url], &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_complete(cache.path());
    let seen = srv.requests_for(SHARD);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].range, None);
    assert_eq!(
        seen[1].range.as_deref(),
        Some(format!("bytes={}-", shard_len / 2).as_str()),
        "the retry continues where the cut left off"
    );
}

#[test]
fn partial_file_of_a_killed_run_is_continued() {
    let srv = mirror();
    let body = srv.state.lock().unwrap().files[&format!("/mirror/{VAE}")].clone();
    let cache = tempfile::tempdir().unwrap();
    let vae_dir = cache.path().join("models/k1/vae");
    std::fs::create_dir_all(&vae_dir).unwrap();
    let third = body.len() / 3;
    std::fs::write(
        vae_dir.join(".diffusion_pytorch_model.safetensors.partial"),
        &body[..third],
    )
    .unwrap();
    let url = format!("--http-url={}/mirror", srv.base);
    let out = fetch(cache.path(), &[&url], &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_complete(cache.path());
    let seen = srv.requests_for(VAE);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].range.as_deref(),
        Some(format!("bytes={third}-").as_str())
    );
    assert!(stderr(&out).contains("resuming"), "{}", stderr(&out));
}

#[test]
fn corrupted_transfer_and_corrupted_cache_file_are_fetched_again() {
    let srv = mirror();
    srv.state
        .lock()
        .unwrap()
        .corrupt_once
        .insert(format!("/mirror/{VAE}"));
    let cache = tempfile::tempdir().unwrap();
    let url = format!("--http-url={}/mirror", srv.base);
    let out = fetch(cache.path(), &[&url], &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("sha256"), "{}", stderr(&out));
    assert_eq!(srv.requests_for(VAE).len(), 2);
    assert_complete(cache.path());

    // A file damaged on the volume (marker gone, as after an interrupted run) is re-verified
    // and fetched again; intact files are kept.
    let dir = cache.path().join("models/k1");
    std::fs::remove_file(dir.join(COMPLETE_MARKER)).unwrap();
    let mut bytes = std::fs::read(dir.join(VAE)).unwrap();
    bytes[100] ^= 1;
    std::fs::write(dir.join(VAE), bytes).unwrap();
    let before_shard = srv.requests_for(SHARD).len();
    let out = fetch(cache.path(), &[&url], &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(srv.requests_for(VAE).len(), 3);
    assert_eq!(srv.requests_for(SHARD).len(), before_shard);
    assert_complete(cache.path());
}

#[test]
fn a_mirror_that_always_corrupts_fails_with_checksum_mismatch() {
    let srv = mirror();
    let cache = tempfile::tempdir().unwrap();
    // Serve a wrong file under the right name.
    srv.state
        .lock()
        .unwrap()
        .files
        .insert(format!("/mirror/{VAE}"), vec![0u8; 64]);
    let url = format!("--http-url={}/mirror", srv.base);
    let out = fetch(cache.path(), &[&url], &["--retries=1"], &[]);
    assert_eq!(
        out.status.code(),
        Some(ExitReason::ChecksumMismatch.code()),
        "{}",
        stderr(&out)
    );
    assert!(
        !cache
            .path()
            .join("models/k1")
            .join(COMPLETE_MARKER)
            .exists()
    );
}

#[test]
fn not_found_and_unauthorized_exit_with_their_codes() {
    let srv = mirror();
    let cache = tempfile::tempdir().unwrap();
    let url = format!("--http-url={}/nothing-here", srv.base);
    let out = fetch(cache.path(), &[&url], &[], &[]);
    assert_eq!(
        out.status.code(),
        Some(ExitReason::NotFound.code()),
        "{}",
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("HTTP 404") && err.contains("spec.model.source"),
        "{err}"
    );
    // The cause on one line, where Kubernetes takes the container's termination message from.
    let log = cache.path().join("termination-log");
    let flag = format!("--termination-message-path={}", log.display());
    let out = fetch(cache.path(), &[&url], &[&flag], &[]);
    assert_eq!(out.status.code(), Some(ExitReason::NotFound.code()));
    let said = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        said,
        format!(
            "fetch failed: {}/nothing-here/sha256sums.txt: HTTP 404: no such repository, revision or file\n",
            srv.base
        )
    );

    srv.state.lock().unwrap().token = Some("s3cret".into());
    let url = format!("--http-url={}/mirror", srv.base);
    let out = fetch(cache.path(), &[&url], &[], &[]);
    assert_eq!(
        out.status.code(),
        Some(ExitReason::Unauthorized.code()),
        "{}",
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(err.contains("HTTP 401") && err.contains("token"), "{err}");

    let out = fetch(
        cache.path(),
        &[&url],
        &[],
        &[("SD35_SOURCE_TOKEN", "wrong")],
    );
    assert_eq!(out.status.code(), Some(ExitReason::Unauthorized.code()));
    let out = fetch(
        cache.path(),
        &[&url],
        &[],
        &[("SD35_SOURCE_TOKEN", "s3cret")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_complete(cache.path());
}

#[test]
fn stalled_transfer_hits_the_timeout() {
    let srv = mirror();
    srv.state
        .lock()
        .unwrap()
        .stall
        .insert(format!("/mirror/{VAE}"));
    let cache = tempfile::tempdir().unwrap();
    let url = format!("--http-url={}/mirror", srv.base);
    let started = Instant::now();
    let out = fetch(
        cache.path(),
        &[&url],
        &["--stall-timeout-seconds=1", "--retries=1"],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(ExitReason::Network.code()),
        "{}",
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(err.contains("stalled"), "{err}");
    // The run lasts over a second: progress lines with bytes, rate and ETA were logged.
    assert!(
        err.contains("progress: ") && err.contains(" MB/s, ETA "),
        "{err}"
    );
    assert!(started.elapsed().as_secs() < 20);
    assert_eq!(srv.requests_for(VAE).len(), 2, "one retry");
}

/// A fake Hub: `/api/models/{repo}/revision/{rev}` (with LFS sha256 for weights when
/// `lfs_in_info`), the tree API, files under `/{repo}/resolve/{commit}/`, behind a token.
fn hub_with(lfs_in_info: bool) -> (Server, String) {
    let commit = "0123456789abcdef0123456789abcdef01234567".to_owned();
    let mut state = State {
        token: Some("hf_test".into()),
        ..State::default()
    };
    let (mut siblings, mut tree) = (Vec::new(), Vec::new());
    for (path, body) in model_tree() {
        let lfs = path
            .ends_with(".safetensors")
            .then(|| serde_json::json!({"sha256": sha256_hex(&body), "size": body.len()}));
        let tree_lfs = path.ends_with(".safetensors").then(|| {
            serde_json::json!({"oid": sha256_hex(&body), "size": body.len(), "pointerSize": 134})
        });
        siblings.push(if lfs_in_info {
            serde_json::json!({"rfilename": path, "size": body.len(), "lfs": lfs})
        } else {
            serde_json::json!({"rfilename": path})
        });
        tree.push(
            serde_json::json!({"type": "file", "path": path, "size": body.len(), "lfs": tree_lfs}),
        );
        state
            .files
            .insert(format!("/org/tiny/resolve/{commit}/{path}"), body);
    }
    let info = serde_json::json!({"id": "org/tiny", "sha": commit, "siblings": siblings});
    state.files.insert(
        "/api/models/org/tiny/revision/main".into(),
        serde_json::to_vec(&info).unwrap(),
    );
    state.files.insert(
        format!("/api/models/org/tiny/tree/{commit}"),
        serde_json::to_vec(&tree).unwrap(),
    );
    (Server::start(state), commit)
}

fn hub() -> (Server, String) {
    hub_with(true)
}

#[test]
fn hub_without_lfs_metadata_falls_back_to_the_tree_api() {
    let (srv, commit) = hub_with(false);
    let endpoint = format!("--hf-endpoint={}", srv.base);
    let token = [("SD35_SOURCE_TOKEN", "hf_test")];
    let cache = tempfile::tempdir().unwrap();
    let out = fetch(
        cache.path(),
        &["--hf-repo=org/tiny", &endpoint],
        &[],
        &token,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_complete(cache.path());
    assert_eq!(srv.requests_for(&format!("tree/{commit}")).len(), 1);

    // The hashes from the tree are enforced: same size, other content.
    srv.state
        .lock()
        .unwrap()
        .corrupt_once
        .insert(format!("/org/tiny/resolve/{commit}/{VAE}"));
    let other = tempfile::tempdir().unwrap();
    let out = fetch(
        other.path(),
        &["--hf-repo=org/tiny", &endpoint],
        &["--retries=0"],
        &token,
    );
    assert_eq!(
        out.status.code(),
        Some(ExitReason::ChecksumMismatch.code()),
        "{}",
        stderr(&out)
    );
}

#[test]
fn hub_source_uses_the_api_listing_token_file_and_pinned_commit() {
    let (srv, commit) = hub();
    let cache = tempfile::tempdir().unwrap();
    let token = cache.path().join("token");
    std::fs::write(&token, "hf_test\n").unwrap();
    let endpoint = format!("--hf-endpoint={}", srv.base);
    let token_arg = format!("--token-file={}", token.display());
    let out = fetch(
        cache.path(),
        &["--hf-repo=org/tiny", &endpoint],
        &[&token_arg],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_complete(cache.path());
    let marker: serde_json::Value = serde_json::from_slice(
        &std::fs::read(cache.path().join("models/k1").join(COMPLETE_MARKER)).unwrap(),
    )
    .unwrap();
    assert_eq!(marker["resolvedRevision"], commit.as_str());
    assert_eq!(marker["source"]["kind"], "huggingFace");
    assert!(srv.requests_for(SHARD)[0].path.contains(&commit));
    assert!(
        srv.state
            .lock()
            .unwrap()
            .log
            .iter()
            .all(|s| s.auth.as_deref() == Some("Bearer hf_test"))
    );

    let other = tempfile::tempdir().unwrap();
    let out = fetch(other.path(), &["--hf-repo=org/tiny", &endpoint], &[], &[]);
    assert_eq!(out.status.code(), Some(ExitReason::Unauthorized.code()));
    let out = fetch(
        other.path(),
        &["--hf-repo=org/missing", &endpoint],
        &[],
        &[("SD35_SOURCE_TOKEN", "hf_test")],
    );
    assert_eq!(
        out.status.code(),
        Some(ExitReason::NotFound.code()),
        "{}",
        stderr(&out)
    );
}

#[test]
fn import_dir_copies_and_verifies() {
    let cache = tempfile::tempdir().unwrap();
    let src = testdata(MODEL);
    let arg = format!("--import-dir={}", src.display());
    let out = fetch(cache.path(), &[&arg], &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_complete(cache.path());

    let missing = format!("--import-dir={}", cache.path().join("nope").display());
    let other = tempfile::tempdir().unwrap();
    let out = fetch(other.path(), &[&missing], &[], &[]);
    assert_eq!(
        out.status.code(),
        Some(ExitReason::NotFound.code()),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unwritable_cache_is_permission_denied() {
    let cache = tempfile::tempdir().unwrap();
    // A file where the models directory should be: nothing can be created below it.
    std::fs::write(cache.path().join("models"), b"").unwrap();
    let arg = format!("--import-dir={}", testdata(MODEL).display());
    let out = fetch(cache.path(), &[&arg], &[], &[]);
    assert_eq!(
        out.status.code(),
        Some(ExitReason::PermissionDenied.code()),
        "{}",
        stderr(&out)
    );
}

#[test]
fn full_volume_is_disk_full() {
    // `/dev/full` fails every write with ENOSPC: put it where a file is being written.
    let cache = tempfile::tempdir().unwrap();
    let vae_dir = cache.path().join("models/k1/vae");
    std::fs::create_dir_all(&vae_dir).unwrap();
    std::os::unix::fs::symlink(
        "/dev/full",
        vae_dir.join(".diffusion_pytorch_model.safetensors.partial"),
    )
    .unwrap();
    let arg = format!("--import-dir={}", testdata(MODEL).display());
    let out = fetch(cache.path(), &[&arg], &["--parallel=1"], &[]);
    assert_eq!(
        out.status.code(),
        Some(ExitReason::DiskFull.code()),
        "{}",
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("no space left") && err.contains("spec.cache.size"),
        "{err}"
    );
}

#[test]
fn fetch_killed_mid_transfer_resumes_on_the_next_run() {
    let srv = mirror();
    let shard = format!("/mirror/{SHARD}");
    let shard_len = srv.state.lock().unwrap().files[&shard].len();
    srv.state.lock().unwrap().stall.insert(shard.clone());
    let cache = tempfile::tempdir().unwrap();
    let root = cache.path().to_str().unwrap().to_owned();
    let url = format!("--http-url={}/mirror", srv.base);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sd35-server"))
        .args([
            "fetch",
            "--variant=large",
            "--cache-root",
            &root,
            "--cache-key=k1",
            &url,
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until half the shard sits in its partial file, then kill the process.
    let part = cache
        .path()
        .join("models/k1/transformer/.diffusion_pytorch_model-00002-of-00003.safetensors.partial");
    let started = Instant::now();
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < (shard_len / 2) as u64 {
        assert!(started.elapsed().as_secs() < 20, "no partial file appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !cache
            .path()
            .join("models/k1")
            .join(COMPLETE_MARKER)
            .exists()
    );

    srv.state.lock().unwrap().stall.clear();
    let out = fetch(cache.path(), &[&url], &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_complete(cache.path());
    let seen = srv.requests_for(SHARD);
    assert_eq!(
        seen.last().unwrap().range.as_deref(),
        Some(format!("bytes={}-", shard_len / 2).as_str())
    );
}

#[test]
fn single_file_layout_from_a_mirror() {
    let mut state = State::default();
    let mut sums = String::new();
    let tree = read_tree(&testdata("sd35-tiny-large-single"));
    for (path, body) in &tree {
        sums.push_str(&format!("{}  {path}\n", sha256_hex(body)));
        state.files.insert(format!("/m/{path}"), body.clone());
    }
    state
        .files
        .insert("/m/sha256sums.txt".into(), sums.into_bytes());
    let srv = Server::start(state);
    let cache = tempfile::tempdir().unwrap();
    let url = format!("--http-url={}/m", srv.base);
    let out = fetch(cache.path(), &[&url], &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = read_tree(&cache.path().join("models/k1"));
    assert_eq!(got, tree);
}

/// A safetensors file of zero-filled tensors (`name`, dtype, shape) with 2-byte elements.
fn safetensors_bytes(tensors: &[(&str, &str, &[usize])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for (name, dtype, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, at + bytes]}),
        );
        at += bytes;
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(std::iter::repeat_n(1u8, at));
    out
}

/// A LoRA as diffusers saves one (PEFT keys), of some 40 kB.
fn lora_bytes() -> Vec<u8> {
    safetensors_bytes(&[
        (
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
            "BF16",
            &[4, 2432],
        ),
        (
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
            "BF16",
            &[2432, 4],
        ),
    ])
}

fn fetch_adapter(
    cache: &Path,
    kind: &str,
    name: &str,
    source: &[&str],
    envs: &[(&str, &str)],
) -> std::process::Output {
    let root = cache.to_str().unwrap();
    let kind = format!("--kind={kind}");
    let name = format!("--name={name}");
    let termination = cache.join("termination-log");
    let termination = format!("--termination-message-path={}", termination.display());
    let mut args = vec![
        "fetch-adapter",
        &kind,
        &name,
        "--variant=large",
        "--cache-root",
        root,
        "--adapter-key=a1",
        "--retry-backoff-ms=20",
        "--progress-seconds=1",
        &termination,
    ];
    args.extend_from_slice(source);
    server(&args, envs)
}

fn adapter_marker(cache: &Path) -> Option<serde_json::Value> {
    std::fs::read(cache.join("adapters/a1").join(COMPLETE_MARKER))
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap())
}

#[test]
fn an_adapter_url_is_verified_stored_as_the_adapter_file_and_resumed_when_cut() {
    let body = lora_bytes();
    let mut state = State::default();
    state
        .files
        .insert("/loras/detail-v1.safetensors".into(), body.clone());
    state.cut_once.insert("/loras/detail-v1.safetensors".into());
    let srv = Server::start(state);
    let cache = tempfile::tempdir().unwrap();
    let url = format!(
        "--http-url={}/loras/detail-v1.safetensors?download=1",
        srv.base
    );
    let sha = format!("--sha256={}", sha256_hex(&body));
    let out = fetch_adapter(cache.path(), "lora", "detail", &[&url, &sha], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stored = cache.path().join("adapters/a1/adapter.safetensors");
    assert!(
        std::fs::read(&stored).unwrap() == body,
        "stored bytes differ"
    );
    let seen = srv.requests_for("detail-v1.safetensors");
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[1].range.as_deref(),
        Some(format!("bytes={}-", body.len() / 2).as_str()),
        "the retry continues where the cut left off"
    );
    let marker = adapter_marker(cache.path()).expect("a completion marker");
    assert_eq!(marker["files"][0]["path"], "adapter.safetensors");
    assert_eq!(marker["files"][0]["sha256"], sha256_hex(&body));
    assert_eq!(marker["source"]["kind"], "http");

    // Complete: a second run asks for nothing.
    let before = srv.request_count();
    let out = fetch_adapter(cache.path(), "lora", "detail", &[&url, &sha], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(srv.request_count(), before);

    // Another digest than the file's: a checksum mismatch, and no marker.
    let other = tempfile::tempdir().unwrap();
    let wrong = format!("--sha256={}", "0".repeat(64));
    let out = fetch_adapter(
        other.path(),
        "lora",
        "detail",
        &[&url, &wrong, "--retries=0"],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(ExitReason::ChecksumMismatch.code()),
        "{}",
        stderr(&out)
    );
    assert!(adapter_marker(other.path()).is_none());
}

#[test]
fn a_file_that_is_not_safetensors_is_refused_at_fetch_and_named() {
    let page = b"<!DOCTYPE html><html><body>Sign in to download</body></html>".to_vec();
    let mut state = State::default();
    state
        .files
        .insert("/loras/styled.safetensors".into(), page.clone());
    let srv = Server::start(state);
    let cache = tempfile::tempdir().unwrap();
    let url = format!("--http-url={}/loras/styled.safetensors", srv.base);
    let sha = format!("--sha256={}", sha256_hex(&page));
    let out = fetch_adapter(cache.path(), "lora", "styled", &[&url, &sha], &[]);
    assert_eq!(
        out.status.code(),
        Some(ExitReason::InvalidModel.code()),
        "{}",
        stderr(&out)
    );
    let said = std::fs::read_to_string(cache.path().join("termination-log")).unwrap();
    assert!(
        said.starts_with(
            "fetch-adapter failed: lora styled: styled.safetensors is not a valid safetensors file: "
        ),
        "{said}"
    );
    assert!(adapter_marker(cache.path()).is_none(), "never served");
    // A second run neither downloads it again (it matches its sha256) nor accepts it.
    let before = srv.request_count();
    let out = fetch_adapter(cache.path(), "lora", "styled", &[&url, &sha], &[]);
    assert_eq!(out.status.code(), Some(ExitReason::InvalidModel.code()));
    assert_eq!(srv.request_count(), before);
}

/// A Hub with a LoRA repository (`org/loras`: one weights file at the root, a README and a
/// second LoRA in a folder) and a ControlNet repository in diffusers' layout (`org/canny`).
fn adapter_hub() -> Server {
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let mut state = State::default();
    type Files = Vec<(&'static str, Vec<u8>)>;
    let repos: [(&str, Files); 3] = [
        (
            "org/loras",
            vec![
                ("pytorch_lora_weights.safetensors", lora_bytes()),
                ("README.md", b"# loras".to_vec()),
                ("v2/pytorch_lora_weights.safetensors", lora_bytes()),
            ],
        ),
        (
            "org/canny",
            vec![
                (
                    "config.json",
                    br#"{"_class_name": "SD3ControlNetModel"}"#.to_vec(),
                ),
                (
                    "diffusion_pytorch_model.safetensors",
                    safetensors_bytes(&[("pos_embed.proj.weight", "F16", &[64, 16, 2, 2])]),
                ),
                ("README.md", b"# canny".to_vec()),
                ("images/example.png", vec![0u8; 32]),
            ],
        ),
        (
            "org/two",
            vec![
                ("a.safetensors", lora_bytes()),
                ("b.safetensors", lora_bytes()),
            ],
        ),
    ];
    for (repo, files) in repos {
        let mut siblings = Vec::new();
        for (path, body) in files {
            let lfs = path
                .ends_with(".safetensors")
                .then(|| serde_json::json!({"sha256": sha256_hex(&body), "size": body.len()}));
            siblings.push(serde_json::json!({"rfilename": path, "size": body.len(), "lfs": lfs}));
            state
                .files
                .insert(format!("/{repo}/resolve/{commit}/{path}"), body);
        }
        let info = serde_json::json!({"id": repo, "sha": commit, "siblings": siblings});
        state.files.insert(
            format!("/api/models/{repo}/revision/main"),
            serde_json::to_vec(&info).unwrap(),
        );
    }
    Server::start(state)
}

#[test]
fn hub_adapters_take_the_named_file_the_one_at_the_root_or_a_controlnet_folder() {
    let srv = adapter_hub();
    let endpoint = format!("--hf-endpoint={}", srv.base);
    let hub = |repo: &str| format!("--hf-repo={repo}");

    // A LoRA without a file name: the one .safetensors at the root, stored as the adapter file.
    let cache = tempfile::tempdir().unwrap();
    let out = fetch_adapter(
        cache.path(),
        "lora",
        "detail",
        &[&hub("org/loras"), &endpoint],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let tree = read_tree(&cache.path().join("adapters/a1"));
    assert_eq!(tree.keys().collect::<Vec<_>>(), ["adapter.safetensors"]);
    assert!(tree["adapter.safetensors"] == lora_bytes());
    assert_eq!(
        adapter_marker(cache.path()).unwrap()["resolvedRevision"],
        "89abcdef0123456789abcdef0123456789abcdef"
    );
    // A named file in a folder of the repository.
    let cache = tempfile::tempdir().unwrap();
    let out = fetch_adapter(
        cache.path(),
        "lora",
        "v2",
        &[
            &hub("org/loras"),
            &endpoint,
            "--hf-file=v2/pytorch_lora_weights.safetensors",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        srv.requests_for("v2/pytorch_lora_weights.safetensors")
            .len()
            == 1
    );

    // A ControlNet folder keeps its config and weights, and nothing else of the repository.
    let cache = tempfile::tempdir().unwrap();
    let out = fetch_adapter(
        cache.path(),
        "controlnet",
        "canny",
        &[&hub("org/canny"), &endpoint],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let tree = read_tree(&cache.path().join("adapters/a1"));
    assert_eq!(
        tree.keys().collect::<Vec<_>>(),
        ["config.json", "diffusion_pytorch_model.safetensors"]
    );
    assert!(srv.requests_for("README.md").is_empty());

    // What cannot be decided or is not there is named.
    for (kind, repo, extra, code, said) in [
        (
            "lora",
            "org/two",
            None,
            ExitReason::InvalidModel,
            "has several .safetensors files at its root (a.safetensors, b.safetensors): name the file with huggingFace.file",
        ),
        (
            "controlnet",
            "org/loras",
            None,
            ExitReason::InvalidModel,
            "is not a ControlNet in diffusers' layout",
        ),
        (
            "lora",
            "org/loras",
            Some("--hf-file=missing.safetensors"),
            ExitReason::NotFound,
            "org/loras@main has no file missing.safetensors",
        ),
    ] {
        let cache = tempfile::tempdir().unwrap();
        let mut source = vec![hub(repo), endpoint.clone()];
        source.extend(extra.map(str::to_owned));
        let source: Vec<&str> = source.iter().map(String::as_str).collect();
        let out = fetch_adapter(cache.path(), kind, "x", &source, &[]);
        assert_eq!(out.status.code(), Some(code.code()), "{}", stderr(&out));
        let message = std::fs::read_to_string(cache.path().join("termination-log")).unwrap();
        assert!(message.contains(&format!("{kind} x: ")), "{message}");
        assert!(message.contains(said), "{said:?} not in {message}");
    }
}

#[test]
fn imported_adapters_are_a_file_or_a_controlnet_folder_as_their_path_says() {
    let volume = tempfile::tempdir().unwrap();
    let lora = volume.path().join("loras/detail.safetensors");
    std::fs::create_dir_all(lora.parent().unwrap()).unwrap();
    std::fs::write(&lora, lora_bytes()).unwrap();
    let canny = volume.path().join("controlnets/canny");
    std::fs::create_dir_all(&canny).unwrap();
    std::fs::write(canny.join("config.json"), b"{}").unwrap();
    std::fs::write(
        canny.join("diffusion_pytorch_model.safetensors"),
        safetensors_bytes(&[("w", "F16", &[2, 2])]),
    )
    .unwrap();
    let import = |p: &Path| format!("--import-path={}", p.display());

    let cache = tempfile::tempdir().unwrap();
    let out = fetch_adapter(cache.path(), "lora", "detail", &[&import(&lora)], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        cache
            .path()
            .join("adapters/a1/adapter.safetensors")
            .is_file()
    );

    let cache = tempfile::tempdir().unwrap();
    let out = fetch_adapter(cache.path(), "controlnet", "canny", &[&import(&canny)], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(cache.path().join("adapters/a1/config.json").is_file());

    // A LoRA must be named as its file; a folder without a config is no ControlNet; a
    // missing path is not found.
    std::fs::remove_file(canny.join("config.json")).unwrap();
    for (kind, path, code, said) in [
        (
            "lora",
            lora.parent().unwrap().to_path_buf(),
            ExitReason::InvalidModel,
            "a LoRA is one file",
        ),
        (
            "controlnet",
            canny.clone(),
            ExitReason::InvalidModel,
            "is not a ControlNet in diffusers' layout",
        ),
        (
            "lora",
            volume.path().join("nope.safetensors"),
            ExitReason::NotFound,
            "does not exist",
        ),
    ] {
        let cache = tempfile::tempdir().unwrap();
        let out = fetch_adapter(cache.path(), kind, "x", &[&import(&path)], &[]);
        assert_eq!(out.status.code(), Some(code.code()), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(said),
            "{said:?} not in {}",
            stderr(&out)
        );
    }
}
