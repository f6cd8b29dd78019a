//! Helpers the end-to-end tests share: the repository root, installing the CRD once per
//! cluster, whether a CRD is Established, and `kubectl apply` of a manifest given as text.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;

use crate::Cluster;
use crate::wait::Probe;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Installs the CRD from `crds/` with `kubectl apply` (once per cluster; concurrent tests
/// would race on its creation) and waits until it is Established.
pub fn install_crd(cluster: &Cluster) -> Result<()> {
    static INSTALLED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut installed = INSTALLED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if installed.iter().any(|url| url == cluster.server_url()) {
        return Ok(());
    }
    let out = cluster
        .kubectl()
        .args(["apply", "-f"])
        .arg(repo_root().join("crds"))
        .output()
        .context("run kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl apply -f crds/ failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Wait until the CRD is established and served by discovery, which kubectl needs.
    // (`kubectl wait --for=condition=Established` fails outright on a CRD whose status is
    // not written yet.)
    let started = std::time::Instant::now();
    loop {
        let out = cluster
            .kubectl()
            .args(["get", "sd35", "-A"])
            .output()
            .context("run kubectl")?;
        if out.status.success() {
            break;
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            bail!(
                "kubectl cannot find the sd35 resource: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    installed.push(cluster.server_url().to_owned());
    Ok(())
}

/// Whether the CRD `name` is Established, as a probe for [`crate::poll_until`]. Polled
/// rather than `kubectl wait --for=condition=Established`, which fails outright while a new
/// CRD's status has no conditions yet.
pub async fn crd_established(
    crds: &Api<CustomResourceDefinition>,
    name: &str,
) -> Result<Probe<()>> {
    let crd = crds.get(name).await?;
    let established = crd
        .status
        .and_then(|status| status.conditions)
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Established" && c.status == "True");
    Ok(if established {
        Probe::Ready(())
    } else {
        Probe::Pending("not Established yet".into())
    })
}

/// `kubectl apply -n NAMESPACE -f -` with `yaml` on stdin.
pub fn kubectl_apply(cluster: &Cluster, namespace: &str, yaml: &str) -> Result<Output> {
    let mut child = cluster
        .kubectl()
        .args(["apply", "-n", namespace, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run kubectl")?;
    child
        .stdin
        .take()
        .context("kubectl stdin")?
        .write_all(yaml.as_bytes())
        .context("write manifest to kubectl")?;
    child.wait_with_output().context("wait for kubectl")
}
