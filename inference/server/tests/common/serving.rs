//! `sd35-server serve` as a process for the HTTP tests.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sd35_http::client::{self, metric};

/// The `sd35-server` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sd35-server");

/// A tiny test model (or any folder) under `inference/testdata`.
pub fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(name)
}

/// Runs `sd35-server generate --model <tiny model> <args> --out <a temporary file>` and
/// returns the PNG it wrote; a failed run fails the test with its stderr.
pub fn generate<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(model: &str, args: &[S]) -> Vec<u8> {
    generate_from(&tiny(model), args)
}

/// [`generate`] with the model folder at `model`.
pub fn generate_from<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    model: &Path,
    args: &[S],
) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let run = Command::new(BIN)
        .args(["generate", "--model"])
        .arg(model)
        .args(args)
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("generate");
    assert!(
        run.status.success(),
        "generate {args:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::read(out.path()).unwrap()
}

/// `sd35-server serve` running as a process on loopback, its JSON log lines collected.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub lines: mpsc::Receiver<String>,
    /// The log lines up to and including `listening`.
    pub early: Vec<String>,
}

impl Server {
    /// Starts `serve --model <tiny model> <flags>` and waits until `/readyz` answers 200.
    pub fn start(model: &str, flags: &[&str]) -> Self {
        Self::start_with_env(model, flags, &[])
    }

    /// [`Server::start`] with extra environment variables (`SD35_*` settings).
    pub fn start_with_env(model: &str, flags: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            // Storage credentials come from the test alone, never from the one running it.
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .envs(env.iter().copied())
            .arg("serve")
            .arg("--model")
            .arg(tiny(model))
            .args(["--host", "127.0.0.1", "--port", "0", "--log-format", "json"])
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sd35-server");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut early = Vec::new();
        let addr = loop {
            let line = lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the server logs its address");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            early.push(line);
            if v["fields"]["message"] == "listening" {
                break v["fields"]["addr"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .expect("address");
            }
        };
        let s = Self {
            child,
            addr,
            lines,
            early,
        };
        for _ in 0..600 {
            if client::get(s.addr, "/readyz").is_ok_and(|r| r.status == 200) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("not ready within 30 s");
    }

    pub fn metric(&self, name: &str) -> f64 {
        let text = client::get(self.addr, "/metrics").expect("metrics").text();
        metric(&text, name).unwrap_or(0.0)
    }

    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok);
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The log lines so far (those up to `listening` included), as JSON.
    pub fn log(&self) -> Vec<serde_json::Value> {
        self.early
            .iter()
            .cloned()
            .chain(self.lines.try_iter())
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
