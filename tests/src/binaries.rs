//! Finds the control-plane executables (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kubectl, kwok, helm, and the real node's kubelet and kube-proxy).
//!
//! `SD35_CONTROLPLANE_BIN` names the directory when set (the Makefile sets it); otherwise
//! `tests/controlplane/build.sh` is run, which builds them once from the pinned Go modules
//! and prints the directory of its cache. Either way every executable is checked to exist
//! before a cluster starts, so a missing one fails with the remedy instead of a spawn error.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// The environment variable naming the directory of the control-plane executables.
pub const BIN_DIR_ENV: &str = "SD35_CONTROLPLANE_BIN";

const REQUIRED: [&str; 9] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
    "kubelet",
    "kube-proxy",
];

/// The directory holding the control-plane executables.
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// Locates the executables, building them when neither the environment nor the build
    /// cache has them yet.
    pub fn locate() -> Result<Self> {
        let dir = match std::env::var_os(BIN_DIR_ENV) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => run_build_script()?,
        };
        Self::in_dir(dir)
    }

    /// Uses the executables in `dir`, checking that all of them are there.
    pub fn in_dir(dir: PathBuf) -> Result<Self> {
        let missing: Vec<&str> = REQUIRED
            .into_iter()
            .filter(|name| !dir.join(name).is_file())
            .collect();
        ensure!(
            missing.is_empty(),
            "{} lacks {}; point {BIN_DIR_ENV} at the output of `bash tests/controlplane/build.sh`",
            dir.display(),
            missing.join(", ")
        );
        Ok(Self { dir })
    }

    #[cfg(test)]
    pub(crate) fn unchecked(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of one executable, e.g. `kubectl`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn run_build_script() -> Result<PathBuf> {
    let script = workspace_root().join("tests/controlplane/build.sh");
    ensure!(
        script.is_file(),
        "{BIN_DIR_ENV} is not set and {} does not exist",
        script.display()
    );
    let output = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}); it needs Go and the Go module proxy the first time",
            script.display(),
            output.status
        );
    }
    let stdout = String::from_utf8(output.stdout).context("build.sh printed a non-UTF-8 path")?;
    let dir = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .context("build.sh printed no directory")?;
    Ok(PathBuf::from(dir))
}

/// The workspace root, known at compile time from this crate's manifest directory.
pub(crate) fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}
