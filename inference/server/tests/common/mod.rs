//! A local HTTP/1.1 file server with fault injection, a real S3 server ([`s3`]), and helpers
//! to run `sd35-server`.

#![allow(dead_code, clippy::unwrap_used)]

pub mod s3;
pub mod serving;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// One request the server saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub auth: Option<String>,
}

/// What the server serves and how it misbehaves.
#[derive(Default)]
pub struct State {
    /// URL path (without query) → body.
    pub files: BTreeMap<String, Vec<u8>>,
    pub log: Vec<Seen>,
    /// Paths whose next full response stops halfway and closes the connection.
    pub cut_once: BTreeSet<String>,
    /// Paths whose next response has one byte flipped.
    pub corrupt_once: BTreeSet<String>,
    /// Paths whose responses send half the body and then stall.
    pub stall: BTreeSet<String>,
    /// Bearer token required on every request, when set.
    pub token: Option<String>,
}

pub struct Server {
    pub base: String,
    pub state: Arc<Mutex<State>>,
}

impl Server {
    pub fn start(state: State) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(state));
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &s);
                });
            }
        });
        Self { base, state }
    }

    pub fn requests_for(&self, suffix: &str) -> Vec<Seen> {
        let st = self.state.lock().unwrap();
        st.log
            .iter()
            .filter(|s| s.path.ends_with(suffix))
            .cloned()
            .collect()
    }

    pub fn request_count(&self) -> usize {
        self.state.lock().unwrap().log.len()
    }
}

fn handle(conn: TcpStream, state: &Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let path = target.split('?').next().unwrap_or("/").to_owned();
    let (mut range, mut auth) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((&h, ""));
        match k.to_ascii_lowercase().as_str() {
            "range" => range = Some(v.trim().to_owned()),
            "authorization" => auth = Some(v.trim().to_owned()),
            _ => {}
        }
    }
    let mut conn = conn;
    let (status, body, mode) = {
        let mut st = state.lock().unwrap();
        st.log.push(Seen {
            path: path.clone(),
            range: range.clone(),
            auth: auth.clone(),
        });
        let authorised = st
            .token
            .as_ref()
            .is_none_or(|t| auth.as_deref() == Some(&format!("Bearer {t}")));
        if !authorised {
            (401, b"unauthorized".to_vec(), "")
        } else if let Some(body) = st.files.get(&path).cloned() {
            let from: usize = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            if from >= body.len() && from > 0 {
                (416, Vec::new(), "")
            } else {
                let mut part = body[from..].to_vec();
                let mode = if st.stall.contains(&path) {
                    "stall"
                } else if st.cut_once.remove(&path) {
                    "cut"
                } else if st.corrupt_once.remove(&path) {
                    let mid = part.len() / 2;
                    part[mid] ^= 0xff;
                    ""
                } else {
                    ""
                };
                (if from > 0 { 206 } else { 200 }, part, mode)
            }
        } else {
            (404, b"not found".to_vec(), "")
        }
    };
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        401 => "Unauthorized",
        416 => "Range Not Satisfiable",
        _ => "Not Found",
    };
    write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    match mode {
        "cut" => {
            conn.write_all(&body[..body.len() / 2])?;
            conn.flush()?;
            conn.shutdown(std::net::Shutdown::Both)?;
        }
        "stall" => {
            conn.write_all(&body[..body.len() / 2])?;
            conn.flush()?;
            std::thread::sleep(Duration::from_secs(30));
        }
        _ => conn.write_all(&body)?,
    }
    Ok(())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(name)
}

/// Every file of a directory tree: relative `/` path → content.
pub fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Runs `sd35-server <args>` and returns its output.
pub fn server(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sd35-server"));
    cmd.args(args).env_remove("SD35_SOURCE_TOKEN");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
