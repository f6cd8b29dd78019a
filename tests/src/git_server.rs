//! [`GitServer`]: git repositories served over HTTP by git's own `git http-backend`, the
//! smart-protocol server that clients such as Flux's source-controller clone from.
//!
//! A minimal HTTP/1.1 front runs the CGI program once per request (one request per
//! connection), with the request body on its stdin and its answer relayed back. Every
//! repository directly under the served root is exported, read-only (pushes are refused: the
//! tests commit in the repositories themselves). It listens on the address it is given —
//! loopback, for the Flux controllers that run as local processes — and stops when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The largest request body accepted (a fetch negotiation is a few kilobytes).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRequest {
    /// The method, `GET` or `POST`.
    pub method: String,
    /// The path, e.g. `/fleet/info/refs`.
    pub path: String,
    /// The HTTP status answered.
    pub status: u16,
}

/// A running server.
#[derive(Debug)]
pub struct GitServer {
    address: SocketAddr,
    requests: Arc<Mutex<Vec<GitRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl GitServer {
    /// Serves the repositories under `root` on `address` (port 0 picks a free one). Must be
    /// called inside a tokio runtime, which then runs the server.
    pub async fn serve(root: &Path, address: SocketAddr) -> Result<Self> {
        let backend = http_backend()?;
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the git server to {address}"))?;
        let address = listener.local_addr()?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(accept_loop(
            listener,
            Arc::new(Backend {
                program: backend,
                root: root.to_path_buf(),
            }),
            Arc::clone(&requests),
        ));
        Ok(Self {
            address,
            requests,
            task,
        })
    }

    /// The clone URL of repository `name` (a directory under the served root).
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.address)
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<GitRequest> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `git http-backend`, from git's exec path.
fn http_backend() -> Result<PathBuf> {
    let output = std::process::Command::new("git")
        .arg("--exec-path")
        .output()
        .context("running git (apt-get install git)")?;
    let exec_path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let backend = Path::new(&exec_path).join("git-http-backend");
    if !backend.is_file() {
        bail!("{} does not exist", backend.display());
    }
    Ok(backend)
}

#[derive(Debug)]
struct Backend {
    program: PathBuf,
    root: PathBuf,
}

async fn accept_loop(
    listener: TcpListener,
    backend: Arc<Backend>,
    requests: Arc<Mutex<Vec<GitRequest>>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (backend, requests) = (Arc::clone(&backend), Arc::clone(&requests));
        tokio::spawn(async move {
            // A client that goes away mid-request leaves nothing to clean up.
            let _ = handle(stream, &backend, &requests).await;
        });
    }
}

/// The parts of a request the CGI program reads.
#[derive(Debug, Default)]
struct Request {
    method: String,
    path: String,
    query: String,
    content_type: Option<String>,
    content_encoding: Option<String>,
    git_protocol: Option<String>,
    body: Vec<u8>,
}

async fn handle(
    stream: TcpStream,
    backend: &Backend,
    requests: &Mutex<Vec<GitRequest>>,
) -> Result<()> {
    let mut reader = BufReader::new(stream);
    let request = read_request(&mut reader).await?;
    let (status, headers, body) = match run_backend(backend, &request).await {
        Ok(answer) => answer,
        Err(error) => (
            500,
            vec![("Content-Type".to_owned(), "text/plain".to_owned())],
            format!("{error:#}\n").into_bytes(),
        ),
    };
    requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(GitRequest {
            method: request.method.clone(),
            path: request.path.clone(),
            status,
        });
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in &headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let stream = reader.get_mut();
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await?;
    Ok(())
}

async fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Request> {
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let method = parts.next().context("empty request")?.to_owned();
    let target = parts.next().context("no request target")?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut request = Request {
        method,
        path: path.to_owned(),
        query: query.to_owned(),
        ..Request::default()
    };
    let mut content_length = 0usize;
    let mut chunked = false;
    loop {
        line.clear();
        reader.read_line(&mut line).await?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim().to_owned();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => content_length = value.parse().context("bad Content-Length")?,
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "content-type" => request.content_type = Some(value),
            "content-encoding" => request.content_encoding = Some(value),
            "git-protocol" => request.git_protocol = Some(value),
            _ => {}
        }
    }
    if chunked {
        request.body = read_chunked(reader).await?;
    } else {
        if content_length > MAX_BODY {
            bail!("a {content_length}-byte request body");
        }
        request.body = vec![0; content_length];
        reader.read_exact(&mut request.body).await?;
    }
    Ok(request)
}

async fn read_chunked(reader: &mut BufReader<TcpStream>) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await?;
        let size = line.trim().split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(size, 16).context("bad chunk size")?;
        if body.len() + size > MAX_BODY {
            bail!("a request body over {MAX_BODY} bytes");
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).await?;
        line.clear();
        reader.read_line(&mut line).await?;
        if size == 0 {
            return Ok(body);
        }
    }
}

type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// Runs the CGI program for `request`: its status, headers and body.
async fn run_backend(backend: &Backend, request: &Request) -> Result<Answer> {
    let mut command = tokio::process::Command::new(&backend.program);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        // No user or system configuration: the repositories' own is all there is.
        .env("HOME", &backend.root)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_PROJECT_ROOT", &backend.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("REQUEST_METHOD", &request.method)
        .env("PATH_INFO", &request.path)
        .env("QUERY_STRING", &request.query)
        .env("CONTENT_LENGTH", request.body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(value) = &request.content_type {
        command.env("CONTENT_TYPE", value);
    }
    if let Some(value) = &request.content_encoding {
        command.env("HTTP_CONTENT_ENCODING", value);
    }
    if let Some(value) = &request.git_protocol {
        command.env("GIT_PROTOCOL", value);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", backend.program.display()))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let body = request.body.clone();
    // Written beside the read, so a large answer cannot block a large request.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let output = child.wait_with_output().await?;
    let _ = writer.await;
    if !output.status.success() && output.stdout.is_empty() {
        bail!(
            "git http-backend failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse_cgi_output(&output.stdout)
}

/// Splits a CGI answer into status, headers and body (headers end at the first blank line;
/// `Status: 404 Not Found` sets the status, 200 otherwise).
fn parse_cgi_output(output: &[u8]) -> Result<Answer> {
    let (head_end, body_start) = [&b"\r\n\r\n"[..], &b"\n\n"[..]]
        .iter()
        .filter_map(|separator| {
            output
                .windows(separator.len())
                .position(|window| window == *separator)
                .map(|at| (at, at + separator.len()))
        })
        .min()
        .context("the CGI answer has no end of headers")?;
    let head = String::from_utf8_lossy(&output[..head_end]);
    let mut status = 200;
    let mut headers = Vec::new();
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            status = value
                .split_whitespace()
                .next()
                .and_then(|code| code.parse().ok())
                .context("bad CGI Status header")?;
        } else {
            headers.push((name.trim().to_owned(), value.to_owned()));
        }
    }
    Ok((status, headers, output[body_start..].to_vec()))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgi_answers_split_into_status_headers_and_body() {
        let (status, headers, body) =
            parse_cgi_output(b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnope")
                .unwrap();
        assert_eq!(status, 404);
        assert_eq!(
            headers,
            vec![("Content-Type".to_owned(), "text/plain".to_owned())]
        );
        assert_eq!(body, b"nope");
        let (status, _, body) = parse_cgi_output(b"Content-Type: x\n\n\x00\x01").unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, b"\x00\x01");
        assert!(parse_cgi_output(b"no end").is_err());
    }

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@sd35.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@sd35.invalid")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[tokio::test]
    async fn git_clones_and_fetches_through_it_and_cannot_push() {
        let root = tempfile_dir();
        let repository = root.join("fleet");
        std::fs::create_dir_all(&repository).unwrap();
        git(&repository, &["init", "--quiet", "--initial-branch=main"]);
        std::fs::write(repository.join("a.yaml"), "a: 1\n").unwrap();
        git(&repository, &["add", "--all"]);
        git(&repository, &["commit", "--quiet", "-m", "one"]);
        let server = GitServer::serve(&root, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let clone = root.join("clone");
        let url = server.url("fleet");
        let (clone_arg, url_arg) = (clone.display().to_string(), url.clone());
        tokio::task::spawn_blocking(move || {
            git(Path::new("/"), &["clone", "--quiet", &url_arg, &clone_arg])
        })
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(clone.join("a.yaml")).unwrap(),
            "a: 1\n"
        );
        std::fs::write(repository.join("b.yaml"), "b: 2\n").unwrap();
        git(&repository, &["add", "--all"]);
        git(&repository, &["commit", "--quiet", "-m", "two"]);
        let head = git(&repository, &["rev-parse", "HEAD"]);
        let fetched = clone.clone();
        tokio::task::spawn_blocking(move || git(&fetched, &["pull", "--quiet"]))
            .await
            .unwrap();
        assert_eq!(git(&clone, &["rev-parse", "HEAD"]), head);
        let pushed = clone.clone();
        let push = tokio::task::spawn_blocking(move || {
            std::process::Command::new("git")
                .arg("-C")
                .arg(&pushed)
                .args(["push", "--quiet", "origin", "HEAD:refs/heads/other"])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(!push.status.success(), "a push went through");
        assert!(
            server
                .requests()
                .iter()
                .any(|r| r.path == "/fleet/git-upload-pack" && r.status == 200),
            "{:?}",
            server.requests()
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sd35-git-server-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
