//! Flux's own controllers beside a local cluster: source-controller, kustomize-controller and
//! helm-controller at the releases pinned in `tests/controlplane/flux/` (built from their Go
//! modules by `build.sh` there, into the control-plane cache), run as processes the way the
//! control plane runs.
//!
//! Guarantees, once [`start`] returns: the controllers' CRDs (copied from the same modules)
//! are Established, the `flux-system` namespace exists, and each controller answers its
//! readiness probe. Each acts with a client certificate of its own (user `flux:<controller>`,
//! a cluster administrator as Flux's installation makes it), so the audit log tells them
//! apart; all of them listen on 127.0.0.1 only and keep their files (artifacts, Helm's
//! caches, temporary checkouts) in the cluster's state directory. Leader election is off:
//! there is one of each.

use std::ffi::OsString;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

use crate::layout::Layout;
use crate::pki::{
    ClientIdentity, FLUX_HELM_CONTROLLER, FLUX_KUSTOMIZE_CONTROLLER, FLUX_SOURCE_CONTROLLER,
};
use crate::process::ProcessSpec;
use crate::supervisor::Supervisor;
use crate::wait::{Probe, poll_while_healthy};

/// The environment variable naming the directory `tests/controlplane/flux/build.sh` prints
/// (the Makefile sets it); unset, the script is run.
pub const FLUX_DIR_ENV: &str = "SD35_FLUX_DIR";

/// The namespace of Flux's own objects (sources, Kustomizations), as in a Flux installation.
pub const FLUX_NAMESPACE: &str = "flux-system";

/// The controllers, in start order.
pub const FLUX_CONTROLLERS: [&str; 3] = [
    "source-controller",
    "kustomize-controller",
    "helm-controller",
];

/// How long each start-up milestone may take.
const MILESTONE_TIMEOUT: Duration = Duration::from_secs(60);

/// The user a controller acts as (the audit log's `user.username`).
pub fn flux_user(controller: &str) -> Option<&'static str> {
    identity(controller).map(|identity| identity.user)
}

fn identity(controller: &str) -> Option<ClientIdentity> {
    match controller {
        "source-controller" => Some(FLUX_SOURCE_CONTROLLER),
        "kustomize-controller" => Some(FLUX_KUSTOMIZE_CONTROLLER),
        "helm-controller" => Some(FLUX_HELM_CONTROLLER),
        _ => None,
    }
}

/// The built controllers (`bin/`) and their CRDs (`crds/`).
#[derive(Debug, Clone)]
pub struct FluxBinaries {
    dir: PathBuf,
}

impl FluxBinaries {
    /// `$SD35_FLUX_DIR`, else what `tests/controlplane/flux/build.sh` prints (building them
    /// the first time).
    pub fn locate() -> Result<Self> {
        let dir = match std::env::var_os(FLUX_DIR_ENV) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => run_build_script()?,
        };
        Self::in_dir(dir)
    }

    /// The controllers and CRDs in `dir`, checked to be there.
    pub fn in_dir(dir: PathBuf) -> Result<Self> {
        let flux = Self { dir };
        let missing: Vec<String> = FLUX_CONTROLLERS
            .iter()
            .map(|name| flux.path(name))
            .filter(|path| !path.is_file())
            .map(|path| path.display().to_string())
            .collect();
        ensure!(
            missing.is_empty(),
            "{} missing; point {FLUX_DIR_ENV} at the output of `bash tests/controlplane/flux/build.sh`",
            missing.join(", ")
        );
        ensure!(
            flux.crds_dir().is_dir(),
            "{} has no crds/ directory",
            flux.dir.display()
        );
        Ok(flux)
    }

    /// One controller's executable.
    pub fn path(&self, controller: &str) -> PathBuf {
        self.dir.join("bin").join(controller)
    }

    /// The directory of the controllers' CRDs.
    pub fn crds_dir(&self) -> PathBuf {
        self.dir.join("crds")
    }
}

fn run_build_script() -> Result<PathBuf> {
    let script = crate::binaries::workspace_root().join("tests/controlplane/flux/build.sh");
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
    stdout
        .lines()
        .last()
        .map(|line| PathBuf::from(line.trim()))
        .filter(|path| !path.as_os_str().is_empty())
        .context("build.sh printed no directory")
}

/// The loopback ports the controllers listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FluxPorts {
    /// source-controller's artifact server, where the other two download what it fetched.
    pub(crate) storage: u16,
    /// Each controller's metrics and health (readiness) ports, in [`FLUX_CONTROLLERS`] order.
    pub(crate) metrics: [u16; 3],
    pub(crate) health: [u16; 3],
}

impl FluxPorts {
    pub(crate) fn pick() -> Result<Self> {
        let listeners = (0..7)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .collect::<std::io::Result<Vec<_>>>()
            .context("binding 127.0.0.1:0 to find free ports")?;
        let ports = listeners
            .iter()
            .map(|listener| listener.local_addr().map(|address| address.port()))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            storage: ports[0],
            metrics: [ports[1], ports[2], ports[3]],
            health: [ports[4], ports[5], ports[6]],
        })
    }
}

/// Where the controllers keep their files.
fn flux_dir(layout: &Layout, name: &str) -> PathBuf {
    layout.root().join("flux").join(name)
}

fn flag(name: &str, value: impl AsRef<std::ffi::OsStr>) -> OsString {
    let mut arg = OsString::from(format!("--{name}="));
    arg.push(value);
    arg
}

/// The controllers' command lines.
pub(crate) fn specs(layout: &Layout, flux: &FluxBinaries, ports: &FluxPorts) -> Vec<ProcessSpec> {
    FLUX_CONTROLLERS
        .iter()
        .zip(ports.metrics.iter().zip(ports.health.iter()))
        .map(|(name, (metrics, health))| {
            let kubeconfig = identity(name)
                .map(|identity| layout.component_kubeconfig(identity.name))
                .unwrap_or_default();
            let mut args = vec![
                flag("metrics-addr", format!("127.0.0.1:{metrics}")),
                flag("health-addr", format!("127.0.0.1:{health}")),
                flag("watch-all-namespaces", "true"),
                flag("enable-leader-election", "false"),
                // A dependency that is not Ready yet is looked at again this soon.
                flag("requeue-dependency", "5s"),
                flag("log-level", "info"),
            ];
            if *name == "source-controller" {
                let storage = format!("127.0.0.1:{}", ports.storage);
                args.extend([
                    flag("storage-path", flux_dir(layout, "artifacts")),
                    flag("storage-addr", &storage),
                    // The URL in each artifact's status: an address, never a name to look up.
                    flag("storage-adv-addr", &storage),
                ]);
            }
            let home = flux_dir(layout, name);
            ProcessSpec {
                name,
                program: flux.path(name),
                args,
                envs: vec![
                    // controller-runtime reads it; the controllers have no flag for it.
                    ("KUBECONFIG", kubeconfig.into()),
                    ("RUNTIME_NAMESPACE", FLUX_NAMESPACE.into()),
                    // Helm's and git's caches and temporary checkouts stay in the state dir.
                    ("HOME", home.clone().into()),
                    ("TMPDIR", home.join("tmp").into()),
                    ("HELM_CACHE_HOME", home.join("helm/cache").into()),
                    ("HELM_CONFIG_HOME", home.join("helm/config").into()),
                    ("HELM_DATA_HOME", home.join("helm/data").into()),
                ],
            }
        })
        .collect()
}

/// Installs the CRDs, creates `flux-system`, starts the controllers and waits until each is
/// ready.
pub(crate) async fn start(
    layout: &Layout,
    supervisor: &Supervisor,
    kubectl: &Path,
    flux: &FluxBinaries,
    client: &kube::Client,
) -> Result<()> {
    let health = || supervisor.check_running();
    install_crds(layout, kubectl, flux, client, &health).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(FLUX_NAMESPACE).await?.is_none() {
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(FLUX_NAMESPACE.to_owned()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .context("creating the flux-system namespace")?;
    }
    let ports = FluxPorts::pick()?;
    for spec in specs(layout, flux, &ports) {
        std::fs::create_dir_all(flux_dir(layout, spec.name).join("tmp"))?;
        supervisor.launch(&spec)?;
    }
    std::fs::create_dir_all(flux_dir(layout, "artifacts"))?;
    for (name, port) in FLUX_CONTROLLERS.iter().zip(ports.health) {
        poll_while_healthy(
            &format!("Flux's {name} to be ready"),
            MILESTONE_TIMEOUT,
            health,
            || async move {
                Ok(match http_status(port, "/readyz") {
                    Ok(200) => Probe::Ready(()),
                    Ok(status) => Probe::Pending(format!("/readyz answered {status}")),
                    Err(error) => Probe::Pending(format!("{error:#}")),
                })
            },
        )
        .await?;
    }
    Ok(())
}

/// `kubectl apply --server-side` of the CRDs, then waits until each is Established.
async fn install_crds(
    layout: &Layout,
    kubectl: &Path,
    flux: &FluxBinaries,
    client: &kube::Client,
    health: &(dyn Fn() -> Result<()> + Sync),
) -> Result<()> {
    let out = Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(layout.admin_kubeconfig())
        .args([
            "apply",
            "--server-side",
            "--field-manager=sd35-localcluster",
            "-f",
        ])
        .arg(flux.crds_dir())
        .output()
        .context("running kubectl")?;
    ensure!(
        out.status.success(),
        "kubectl apply -f {}: {}",
        flux.crds_dir().display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let names = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|object| object.strip_prefix("customresourcedefinition.apiextensions.k8s.io/"))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    ensure!(!names.is_empty(), "kubectl applied no CRD");
    for name in &names {
        poll_while_healthy(
            &format!("CRD {name} to be Established"),
            MILESTONE_TIMEOUT,
            health,
            || crate::fixtures::crd_established(&crds, name),
        )
        .await?;
    }
    Ok(())
}

/// The status of `GET http://127.0.0.1:<port><path>`, over a plain socket: the probe needs
/// nothing more (and the crate has no HTTP client outside its tests).
fn http_status(port: u16, path: &str) -> Result<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP answer: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_specs() -> Vec<ProcessSpec> {
        let layout = Layout::new(PathBuf::from("/state"));
        let flux = FluxBinaries {
            dir: PathBuf::from("/flux"),
        };
        let ports = FluxPorts {
            storage: 2001,
            metrics: [2002, 2003, 2004],
            health: [2005, 2006, 2007],
        };
        specs(&layout, &flux, &ports)
    }

    fn args(spec: &ProcessSpec) -> Vec<String> {
        spec.args
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn every_controller_listens_on_loopback_and_keeps_its_files_in_the_state_dir() {
        let specs = all_specs();
        assert_eq!(specs.len(), 3);
        for spec in &specs {
            let args = args(spec);
            for arg in args.iter().filter(|arg| arg.contains("-addr=")) {
                assert!(arg.contains("=127.0.0.1:"), "{}: {arg}", spec.name);
            }
            assert!(args.contains(&"--enable-leader-election=false".to_owned()));
            for (_, value) in &spec.envs {
                let value = value.to_string_lossy();
                assert!(
                    !value.starts_with('/') || value.starts_with("/state/"),
                    "{}: {value}",
                    spec.name
                );
            }
        }
        let source = args(&specs[0]);
        assert!(source.contains(&"--storage-adv-addr=127.0.0.1:2001".to_owned()));
        assert!(source.contains(&"--storage-path=/state/flux/artifacts".to_owned()));
    }

    #[test]
    fn each_controller_has_a_user_of_its_own() {
        let users: Vec<_> = FLUX_CONTROLLERS
            .iter()
            .filter_map(|c| flux_user(c))
            .collect();
        assert_eq!(
            users,
            [
                "flux:source-controller",
                "flux:kustomize-controller",
                "flux:helm-controller"
            ]
        );
    }
}
