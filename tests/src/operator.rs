//! The operator as a real process against the local cluster.
//!
//! Each test runs its own operator watching only the test's namespace, so tests running in
//! parallel never reconcile each other's objects. The process is started through
//! `setpriv --pdeathsig KILL` from the test's thread, so it dies with the test even on abort,
//! and is killed when the guard drops.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Cluster;

/// Env var naming the operator binary; `make e2e` sets it.
pub const OPERATOR_BIN_ENV: &str = "SD35_OPERATOR_BIN";

/// Env var naming the `sd35-server` binary; `make e2e` sets it.
pub const SERVER_BIN_ENV: &str = "SD35_SERVER_BIN";

/// A binary of this workspace: from `env`, else beside this test binary's target dir.
fn workspace_binary(name: &str, env: &str, package: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locate the test binary")?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let candidate = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join(name))
        .context("locate the target directory")?;
    if candidate.is_file() {
        return Ok(candidate);
    }
    bail!(
        "{name} is not built: run `cargo build -p {package}` (or `make e2e`), or set {env}; looked at {}",
        candidate.display()
    )
}

/// The operator binary: from `SD35_OPERATOR_BIN`, else beside this test binary's target dir.
pub fn operator_binary() -> Result<PathBuf> {
    workspace_binary("sd35-operator", OPERATOR_BIN_ENV, "sd35-operator")
}

/// The `sd35-server` binary: from `SD35_SERVER_BIN`, else beside this test binary's target dir.
pub fn server_binary() -> Result<PathBuf> {
    workspace_binary("sd35-server", SERVER_BIN_ENV, "sd35-server")
}

fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("pick a free port")?;
    listener.local_addr().context("read the free port")
}

/// A running operator process.
#[derive(Debug)]
pub struct OperatorProcess {
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
}

impl OperatorProcess {
    /// Starts the operator watching `namespace`, with `extra` flags, as the cluster
    /// administrator.
    pub fn start(cluster: &Cluster, namespace: &str, extra: &[&str]) -> Result<Self> {
        let mut args = vec![
            format!("--namespace={namespace}"),
            "--server-image=sd35-server:e2e".to_owned(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        Self::spawn(
            cluster,
            &cluster.kubeconfig_path(),
            namespace,
            &args,
            &[("POD_NAMESPACE", namespace.to_owned())],
        )
    }

    /// Starts the operator with another identity: `kubeconfig` (for example one from
    /// [`Cluster::service_account_kubeconfig`]), exactly the flags `args` and the extra
    /// environment `env` (as a pod spec would give them), plus a free `--admin-addr`.
    pub fn start_with_kubeconfig(
        cluster: &Cluster,
        kubeconfig: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<Self> {
        let label = kubeconfig
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("custom")
            .to_owned();
        Self::spawn(cluster, kubeconfig, &label, args, env)
    }

    fn spawn(
        cluster: &Cluster,
        kubeconfig: &Path,
        label: &str,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<Self> {
        let binary = operator_binary()?;
        let admin = free_port()?;
        let log = cluster
            .state_dir()
            .join(format!("operator-{label}-{}.log", admin.port()));
        let file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(&binary)
            .args(args)
            // Last, so that it wins over an admin address in `args`.
            .arg(format!("--admin-addr={admin}"))
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,sd35_operator=debug,kube=warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(file.try_clone().context("clone log handle")?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        Ok(Self { child, admin, log })
    }

    /// Base URL of the admin port.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// The body of `GET path` on the admin port.
    pub async fn admin_get(&self, path: &str) -> Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.admin)
            .await
            .context("connect to the admin port")?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .context("send request")?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .context("read response")?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("malformed HTTP response")?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            bail!("GET {path}: {head}");
        }
        Ok(body.to_owned())
    }

    /// The operator's `sd35_operator_reconciliations_total`.
    pub async fn reconciliations(&self) -> Result<u64> {
        let text = self.admin_get("/metrics").await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("sd35_operator_reconciliations_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process has exited (and how).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("send SIGTERM")?;
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().context("wait for the operator")? {
                return Ok(status);
            }
            if started.elapsed() > timeout {
                bail!(
                    "the operator did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the process at once (like a crashed node).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
