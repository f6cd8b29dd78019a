//! Runs `gitops/argocd/health.lua` through Argo CD's own code: `argocd-health` (built from the
//! pinned argo-cd Go module by `tests/argocd/build.sh`, cached per user) loads
//! `gitops/argocd/argocd-cm-patch.yaml` with Argo CD's settings manager, looks the script up for
//! the object's group and kind as the application controller does, and runs it in Argo CD's
//! Lua VM through gitops-engine's `GetResourceHealth`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// The environment variable naming a built `argocd-health` (the Makefile sets it).
const BINARY_ENV: &str = "SD35_ARGOCD_HEALTH";

/// Path of the health script.
#[allow(dead_code)] // not every test binary that includes this module reads the script
pub fn script_path() -> PathBuf {
    sd35_e2e::repo_root().join("gitops/argocd/health.lua")
}

/// Path of the argocd-cm patch that registers it.
pub fn config_map_path() -> PathBuf {
    sd35_e2e::repo_root().join("gitops/argocd/argocd-cm-patch.yaml")
}

/// `$SD35_ARGOCD_HEALTH`, else what `tests/argocd/build.sh` prints (building it once).
fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os(BINARY_ENV).filter(|path| !path.is_empty()) {
            return PathBuf::from(path);
        }
        let script = sd35_e2e::repo_root().join("tests/argocd/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} failed; it needs Go and the Go module proxy the first time",
            script.display()
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// The (status, message) Argo CD gives each object file, or its error.
pub fn health_of_files(paths: &[PathBuf]) -> Vec<Result<(String, String), String>> {
    let out = Command::new(binary())
        .arg(config_map_path())
        .args(paths)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "argocd-health: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(results.len(), paths.len());
    results
        .iter()
        .map(|result| match result["error"].as_str() {
            Some(error) => Err(error.to_owned()),
            None => Ok((
                result["status"].as_str().unwrap_or_default().to_owned(),
                result["message"].as_str().unwrap_or_default().to_owned(),
            )),
        })
        .collect()
}

/// The (status, message) Argo CD gives `object`.
pub fn health(object: &Value) -> Result<(String, String), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("object.yaml");
    std::fs::write(&path, serde_json::to_string(object).unwrap()).unwrap();
    health_of_files(&[path]).remove(0)
}
