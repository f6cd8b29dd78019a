//! [`ModelMirror`]: an `http` model source for tests, served from a directory like an
//! air-gapped mirror: the model's file tree plus a `sha256sums.txt` manifest.
//!
//! It answers `GET` and `HEAD`, honours `Range: bytes=N-` (so interrupted fetches resume),
//! can throttle one file to make a download last long enough to interrupt, and records every
//! request it served. It listens on the address it is given — loopback for local processes,
//! [`crate::HOST_ADDRESS`] for pods on the real node — and stops when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request the mirror answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorRequest {
    /// The method, `GET` or `HEAD`.
    pub method: String,
    /// The path relative to the mirror's root (no leading slash).
    pub path: String,
    /// The first byte asked for by a `Range: bytes=N-` header.
    pub range_from: Option<u64>,
    /// The HTTP status answered.
    pub status: u16,
}

/// Serves files more slowly: `bytes_per_second` for every path ending in `suffix`.
#[derive(Debug, Clone)]
pub struct Throttle {
    /// Which files (a suffix of their path, e.g. `transformer/diffusion_pytorch_model.safetensors`).
    pub suffix: String,
    /// Their transfer rate.
    pub bytes_per_second: u64,
}

#[derive(Debug, Default)]
struct Shared {
    requests: Vec<MirrorRequest>,
    bytes_sent: std::collections::BTreeMap<String, u64>,
}

/// A running mirror.
#[derive(Debug)]
pub struct ModelMirror {
    address: SocketAddr,
    root: PathBuf,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

/// Copies the model directory `model` into `mirror` and writes `mirror/sha256sums.txt`
/// (`<hex>  <relative path>` per file, as `sha256sum` prints it).
pub fn write_mirror(model: &Path, mirror: &Path) -> Result<()> {
    let mut lines = Vec::new();
    let mut stack = vec![model.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let relative = path.strip_prefix(model)?;
            let bytes = std::fs::read(&path)?;
            let target = mirror.join(relative);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&target, &bytes)?;
            let hex: String = Sha256::digest(&bytes)
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect();
            lines.push(format!("{hex}  {}", relative.display()));
        }
    }
    lines.sort();
    std::fs::write(mirror.join("sha256sums.txt"), lines.join("\n") + "\n")?;
    Ok(())
}

impl ModelMirror {
    /// Serves `root` on `address` (port 0 picks a free one). Must be called inside a tokio
    /// runtime, which then runs the server.
    pub async fn serve(
        root: &Path,
        address: SocketAddr,
        throttle: Option<Throttle>,
    ) -> Result<Self> {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the mirror to {address}"))?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let task = tokio::spawn(accept_loop(
            listener,
            root.to_path_buf(),
            Arc::clone(&shared),
            throttle,
        ));
        Ok(Self {
            address,
            root: root.to_path_buf(),
            shared,
            task,
        })
    }

    /// The mirror's base URL, `http://<address>/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.address)
    }

    /// The directory served.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<MirrorRequest> {
        self.lock().requests.clone()
    }

    /// The body bytes sent so far for paths ending in `suffix` (all requests together).
    pub fn bytes_sent(&self, suffix: &str) -> u64 {
        self.lock()
            .bytes_sent
            .iter()
            .filter(|(path, _)| path.ends_with(suffix))
            .map(|(_, bytes)| bytes)
            .sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for ModelMirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    root: PathBuf,
    shared: Arc<Mutex<Shared>>,
    throttle: Option<Throttle>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let (root, shared, throttle) = (root.clone(), Arc::clone(&shared), throttle.clone());
        tokio::spawn(async move {
            // A client that goes away mid-transfer is what interrupted fetches do.
            let _ = serve_connection(stream, &root, &shared, throttle.as_ref()).await;
        });
    }
}

/// Reads one request head (up to the blank line).
async fn read_head(stream: &mut TcpStream) -> Result<Option<String>> {
    let mut head = Vec::new();
    let mut byte = [0_u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        head.push(byte[0]);
        anyhow::ensure!(head.len() < 16 * 1024, "request head too long");
    }
    Ok(Some(String::from_utf8_lossy(&head).into_owned()))
}

async fn serve_connection(
    mut stream: TcpStream,
    root: &Path,
    shared: &Mutex<Shared>,
    throttle: Option<&Throttle>,
) -> Result<()> {
    // One request per connection keeps the server small; clients reconnect.
    let Some(head) = read_head(&mut stream).await? else {
        return Ok(());
    };
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut words = request_line.split_whitespace();
    let method = words.next().unwrap_or_default().to_owned();
    let target = words.next().unwrap_or("/");
    let path = target
        .split('?')
        .next()
        .unwrap_or("/")
        .trim_start_matches('/')
        .to_owned();
    let range_from = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("range"))
        .and_then(|(_, value)| value.trim().strip_prefix("bytes="))
        .and_then(|spec| spec.strip_suffix('-'))
        .and_then(|from| from.parse::<u64>().ok());
    let file = root.join(&path);
    let safe = !path.split('/').any(|segment| segment == "..");
    let record = |status: u16| {
        shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .requests
            .push(MirrorRequest {
                method: method.clone(),
                path: path.clone(),
                range_from,
                status,
            });
    };
    let bytes = match (
        safe && (method == "GET" || method == "HEAD"),
        file.is_file(),
    ) {
        (true, true) => tokio::fs::read(&file).await?,
        (false, _) => {
            record(405);
            stream
                .write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await?;
            return Ok(());
        }
        (true, false) => {
            record(404);
            stream
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await?;
            return Ok(());
        }
    };
    let total = bytes.len() as u64;
    let from = range_from.unwrap_or(0).min(total);
    let status = if range_from.is_some() { 206 } else { 200 };
    record(status);
    let mut response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n",
        if status == 206 {
            "Partial Content"
        } else {
            "OK"
        },
        total - from
    );
    if status == 206 {
        response.push_str(&format!(
            "Content-Range: bytes {from}-{}/{total}\r\n",
            total.saturating_sub(1)
        ));
    }
    response.push_str("\r\n");
    stream.write_all(response.as_bytes()).await?;
    if method == "HEAD" {
        return Ok(());
    }
    let body = &bytes[usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len())..];
    let rate = throttle
        .filter(|throttle| path.ends_with(&throttle.suffix))
        .map(|throttle| throttle.bytes_per_second.max(1));
    let chunk_size = rate.map_or(64 * 1024, |rate| {
        usize::try_from(rate / 10).unwrap_or(1).max(1)
    });
    for chunk in body.chunks(chunk_size) {
        stream.write_all(chunk).await?;
        *shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bytes_sent
            .entry(path.clone())
            .or_default() += chunk.len() as u64;
        if rate.is_some() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stream.flush().await?;
    Ok(())
}
