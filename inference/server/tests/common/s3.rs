//! A real S3-compatible server for the artifact tests: SeaweedFS's `weed` (built from its
//! pinned Go module and cached per user by `tests/s3/build.sh`), on loopback ports of its own,
//! telemetry off, with one identity, virtual-host names under `localhost` and no buckets made
//! by uploads (as on AWS). It is killed,
//! and the sockets it leaves in /tmp are removed, on drop.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

/// The identity the server accepts.
pub const ACCESS_KEY: &str = "sd35-test-access";
/// Its secret.
pub const SECRET_KEY: &str = "sd35-test-secret-key";

/// The `weed` binary: `SD35_WEED_BIN`, else what `tests/s3/build.sh` builds (or has cached).
/// `None` (the test is skipped, and says so) when it cannot be had outside CI.
pub fn weed_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SD35_WEED_BIN") {
        return Some(PathBuf::from(p));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/s3/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let path = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            Some(PathBuf::from(path))
        }
        other => {
            assert!(
                std::env::var_os("CI").is_none(),
                "tests/s3/build.sh failed: {other:?}"
            );
            eprintln!("SKIPPED: no S3 server (tests/s3/build.sh failed: {other:?})");
            None
        }
    }
}

/// Ports the OS hands out for loopback now.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// `weed server` with S3 on loopback.
pub struct S3Server {
    child: Child,
    dir: tempfile::TempDir,
    /// The S3 port.
    pub port: u16,
    grpc: Vec<(&'static str, u16)>,
    runtime: tokio::runtime::Runtime,
}

impl S3Server {
    /// Starts the server and waits until it creates buckets; `None` when there is no `weed`.
    pub fn start() -> Option<Self> {
        let weed = weed_binary()?;
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({"identities": [{
            "name": "sd35-tests",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]});
        let config_path = dir.path().join("s3.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let p = free_ports(8);
        let (master, volume, filer, s3) = (p[0], p[1], p[2], p[3]);
        let grpc = vec![
            ("master", p[4]),
            ("volume", p[5]),
            ("filer", p[6]),
            ("s3", p[7]),
        ];
        let d = dir.path().display().to_string();
        let child = Command::new(weed)
            .arg("server")
            .args([
                "-ip=127.0.0.1".to_owned(),
                "-ip.bind=127.0.0.1".to_owned(),
                format!("-dir={d}/data"),
                format!("-master.port={master}"),
                format!("-master.port.grpc={}", grpc[0].1),
                format!("-volume.port={volume}"),
                format!("-volume.port.grpc={}", grpc[1].1),
                format!("-filer.port={filer}"),
                format!("-filer.port.grpc={}", grpc[2].1),
                format!("-filer.localSocket={d}/filer.sock"),
                "-s3".to_owned(),
                format!("-s3.port={s3}"),
                format!("-s3.port.grpc={}", grpc[3].1),
                format!("-s3.localSocket={d}/s3.sock"),
                "-s3.port.iceberg=0".to_owned(),
                "-s3.port.lance=0".to_owned(),
                format!("-s3.config={}", config_path.display()),
                "-s3.domainName=localhost".to_owned(),
                // Like AWS: an upload to a bucket that does not exist fails.
                "-s3.autoCreateBucket=false".to_owned(),
                // No connection may leave the machine.
                "-master.telemetry=false".to_owned(),
                "-master.volumeSizeLimitMB=64".to_owned(),
                "-volume.max=4".to_owned(),
            ])
            // Its own logs go to the temporary directory, not to /tmp.
            .env("TMPDIR", dir.path())
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("weed.log")).unwrap())
            .spawn()
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = Self {
            child,
            dir,
            port: s3,
            grpc,
            runtime,
        };
        s.wait_ready();
        Some(s)
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            // Buckets can be made once the filer behind the gateway is up.
            if self.create_bucket("sd35-ready-probe") {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the S3 server did not start: {}",
                std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://localhost:<port>`, for virtual-host addressing (`<bucket>.localhost`).
    pub fn host_endpoint(&self) -> String {
        format!("http://localhost:{}", self.port)
    }

    fn bucket(&self, name: &str) -> Bucket {
        Bucket::new(
            self.endpoint().parse().unwrap(),
            UrlStyle::Path,
            name.to_owned(),
            "us-east-1",
        )
        .unwrap()
    }

    /// Creates a bucket; whether it exists now.
    pub fn create_bucket(&self, name: &str) -> bool {
        let creds = Credentials::new(ACCESS_KEY, SECRET_KEY);
        let bucket = self.bucket(name);
        let action = rusty_s3::actions::CreateBucket::new(&bucket, &creds);
        let url = action.sign(Duration::from_secs(60));
        self.runtime.block_on(async {
            let r = reqwest::Client::new()
                .put(url)
                .header(reqwest::header::CONTENT_LENGTH, "0")
                .send()
                .await;
            r.is_ok_and(|r| r.status().is_success() || r.status().as_u16() == 409)
        })
    }

    /// GETs a URL (a `*.localhost` host resolves to loopback); status and body.
    pub fn get(&self, url: &str) -> (u16, Vec<u8>) {
        let parsed = url::Url::parse(url).unwrap();
        let mut client = reqwest::Client::builder();
        if let Some(host) = parsed.host_str()
            && host.ends_with(".localhost")
        {
            client = client.resolve(host, SocketAddr::from(([127, 0, 0, 1], self.port)));
        }
        let client = client.build().unwrap();
        self.runtime.block_on(async {
            let r = client.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.bytes().await.unwrap().to_vec())
        })
    }

    /// The environment a server process needs for these credentials.
    pub fn credentials_env() -> [(&'static str, &'static str); 2] {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // weed makes its gRPC sockets in /tmp whatever TMPDIR says.
        for (component, port) in &self.grpc {
            let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{component}-grpc-{port}.sock"));
        }
    }
}
