//! [`Cluster`]: a real Kubernetes control plane on loopback, with kwok-simulated GPU nodes
//! and a default StorageClass, started in a few seconds from a fresh state directory.
//!
//! Guarantees, once [`Cluster::start`] returns: `/readyz` is ok, the controller-manager and
//! scheduler run, the GPU nodes are Ready, the default StorageClass provisions claims, and,
//! when asked for, the real node `real-0` is Ready with the project's images imported. The
//! processes never outlive the cluster (or, for [`Lifetime::Attached`], this process) and
//! nothing listens beyond 127.0.0.1 and, with a real node, the host's end of its link.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};

use crate::binaries::Binaries;
use crate::bootstrap;
use crate::components::{self, AUDIT_POLICY, Inputs};
use crate::flux::FluxBinaries;
use crate::kubeconfig;
use crate::layout::Layout;
use crate::namespace::TestNamespace;
use crate::node::{self, Images};
use crate::pki::{self, ADMIN};
use crate::ports::Ports;
use crate::process::Lifetime;
use crate::supervisor::Supervisor;
use crate::wait::block_on;

/// The name of the `sd35-localcluster` executable, which serves the default StorageClass.
pub const LOCALCLUSTER_EXE: &str = "sd35-localcluster";

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// How many fake GPU nodes (eight `nvidia.com/gpu` each) to create.
    pub gpu_nodes: usize,
    /// Where the cluster keeps its files; it must be empty or absent. `None` picks a fresh
    /// directory under the system temp dir.
    pub state_dir: Option<PathBuf>,
    /// The `sd35-localcluster` executable that runs the volume provisioner. `None` uses this
    /// executable when it is `sd35-localcluster`, else the one Cargo builds next to the test
    /// binaries; integration tests may pass `env!("CARGO_BIN_EXE_sd35-localcluster")`.
    pub provisioner: Option<PathBuf>,
    /// Whether the processes die with this process or keep running on their own.
    pub lifetime: Lifetime,
    /// A real node (`real-0`: kubelet, containerd, kube-proxy) running these images, beside
    /// the fake GPU nodes. Needs root; see [`crate::node`].
    pub real_node: Option<Images>,
    /// Raise the client rate limits of kube-controller-manager and kube-scheduler, the
    /// controllers' sync concurrency and kwok's parallelism, and let the Go processes' heaps
    /// grow further between collections (`GOGC`), so that a benchmark of a controller
    /// measures the controller rather than the control plane's defaults.
    pub high_throughput: bool,
    /// Also run Flux's source-controller, kustomize-controller and helm-controller (see
    /// [`crate::flux`]), with their CRDs installed.
    pub flux: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            gpu_nodes: 4,
            state_dir: None,
            provisioner: None,
            lifetime: Lifetime::Attached,
            real_node: None,
            high_throughput: false,
            flux: false,
        }
    }
}

/// A running local control plane. Dropping it stops everything and removes its state.
#[derive(Debug)]
pub struct Cluster {
    layout: Layout,
    binaries: Binaries,
    server_url: String,
    client_config: kube::Config,
    gpu_nodes: Vec<String>,
    images: Option<Images>,
    supervisor: Supervisor,
}

impl Cluster {
    /// Starts a cluster and waits until it is usable. Blocks; callable from any thread,
    /// inside a tokio runtime or not.
    pub fn start(options: ClusterOptions) -> Result<Self> {
        let started = Instant::now();
        let binaries = Binaries::locate()?;
        // Built (or found) before anything starts, so a failed build leaves nothing running.
        let flux = if options.flux {
            Some(FluxBinaries::locate()?)
        } else {
            None
        };
        let provisioner = match options.provisioner {
            Some(path) => path,
            None => locate_provisioner()?,
        };
        ensure!(
            provisioner.is_file(),
            "the provisioner executable {} does not exist",
            provisioner.display()
        );
        let layout = Layout::new(match options.state_dir {
            Some(dir) => prepare_state_dir(dir)?,
            None => fresh_state_dir()?,
        });
        // From here on the supervisor removes the state directory (and restores the host)
        // if anything fails.
        let supervisor = Supervisor::new(layout.clone(), options.lifetime, &provisioner)?;
        layout.create_dirs()?;
        pki::write_all(&layout)?;
        let real_node = options.real_node.is_some();
        // The link the API server listens on exists before the API server starts.
        let prepared = if real_node {
            Some(node::prepare(&layout, &supervisor, &provisioner)?)
        } else {
            None
        };
        let ports = Ports::pick()?;
        let server_url = components::server_url(&ports, real_node);
        kubeconfig::write(&layout, &server_url, ADMIN, &layout.admin_kubeconfig())?;
        for identity in pki::CLIENT_IDENTITIES {
            let path = layout.component_kubeconfig(identity.name);
            kubeconfig::write(&layout, &server_url, identity, &path)?;
        }
        std::fs::write(layout.audit_policy(), AUDIT_POLICY)?;
        if options.high_throughput {
            std::fs::write(
                components::kwok_config_path(&layout),
                components::KWOK_HIGH_THROUGHPUT,
            )?;
        }

        let inputs = Inputs {
            layout: &layout,
            ports: &ports,
            binaries: &binaries,
            provisioner: &provisioner,
            real_node,
            high_throughput: options.high_throughput,
        };
        for spec in components::api(inputs) {
            supervisor.launch(&spec)?;
        }
        let admin_kubeconfig = layout.admin_kubeconfig();
        let (client_config, gpu_nodes) = block_on(async {
            let config = kubeconfig::client_config(&admin_kubeconfig).await?;
            let client = kube::Client::try_from(config.clone())?;
            let health = || supervisor.check_running();
            bootstrap::wait_api_ready(&client, &health).await?;
            for spec in components::clients(inputs) {
                supervisor.launch(&spec)?;
            }
            supervisor.write_pid_file()?;
            let nodes = bootstrap::populate(&client, options.gpu_nodes, &health).await?;
            if let (Some(prepared), Some(images)) = (&prepared, &options.real_node) {
                node::start(
                    &layout,
                    &supervisor,
                    binaries.dir(),
                    prepared,
                    images,
                    &client,
                )
                .await?;
                supervisor.write_pid_file()?;
            }
            if let Some(flux) = &flux {
                crate::flux::start(
                    &layout,
                    &supervisor,
                    &binaries.path("kubectl"),
                    flux,
                    &client,
                )
                .await?;
                supervisor.write_pid_file()?;
            }
            anyhow::Ok((config, nodes))
        })??;
        // Straight to stderr rather than through eprintln!, which the test harness captures.
        let _ = writeln!(
            std::io::stderr(),
            "sd35-e2e: local control plane ready in {:.1}s ({} GPU nodes{}{}, {})",
            started.elapsed().as_secs_f64(),
            gpu_nodes.len(),
            if real_node { ", real node real-0" } else { "" },
            if flux.is_some() { ", Flux" } else { "" },
            layout.root().display()
        );
        Ok(Self {
            layout,
            binaries,
            server_url,
            client_config,
            gpu_nodes,
            images: options.real_node,
            supervisor,
        })
    }

    /// The images the real node runs, when the cluster has one.
    pub fn real_node_images(&self) -> Option<&Images> {
        self.images.as_ref()
    }

    /// A new API client acting as the cluster administrator (`system:masters`).
    ///
    /// Each call builds its own client, so each test's tokio runtime gets one bound to it.
    /// Must be called inside a tokio runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.client_config.clone())
            .expect("the client configuration was proven to work when the cluster started")
    }

    /// The administrator's client configuration, for clients with other settings.
    pub fn client_config(&self) -> &kube::Config {
        &self.client_config
    }

    /// The administrator's kubeconfig (absolute paths, context `sd35-local`).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.layout.admin_kubeconfig()
    }

    /// The API server's audit log: JSON lines, one Metadata-level event per request (no
    /// `RequestReceived` stage), `user.username` telling who made it.
    pub fn audit_log_path(&self) -> PathBuf {
        self.layout.audit_log()
    }

    /// The API server's URL, `https://127.0.0.1:<port>` (with a real node, the host's end
    /// of its link instead of 127.0.0.1).
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The cluster's state directory.
    pub fn state_dir(&self) -> &Path {
        self.layout.root()
    }

    /// The log file of one component (`etcd`, `kube-apiserver`, `kube-controller-manager`,
    /// `kube-scheduler`, `kwok`, `provisioner`; with a real node also `containerd`,
    /// `kubelet`, `kube-proxy`; with Flux also `source-controller`, `kustomize-controller`,
    /// `helm-controller`).
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.layout.process_log(component)
    }

    /// The names of the fake GPU nodes.
    pub fn gpu_node_names(&self) -> &[String] {
        &self.gpu_nodes
    }

    /// The control-plane executables this cluster runs.
    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// `kubectl --kubeconfig <admin kubeconfig>`, ready for more arguments.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(self.binaries.path("kubectl"));
        command.arg("--kubeconfig").arg(self.kubeconfig_path());
        command
    }

    /// `helm --kubeconfig <admin kubeconfig>`, with Helm's cache, config and data homes in
    /// the state directory.
    pub fn helm(&self) -> Command {
        let mut command = Command::new(self.binaries.path("helm"));
        command
            .arg("--kubeconfig")
            .arg(self.kubeconfig_path())
            .env("HELM_CACHE_HOME", self.layout.helm_dir("cache"))
            .env("HELM_CONFIG_HOME", self.layout.helm_dir("config"))
            .env("HELM_DATA_HOME", self.layout.helm_dir("data"));
        command
    }

    /// Writes a kubeconfig that acts as ServiceAccount `namespace/name`, with a token from the
    /// TokenRequest API (valid for an hour, bound to nothing), and returns its path. Clients
    /// using it have exactly the permissions RBAC gives that ServiceAccount.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        use k8s_openapi::api::core::v1::ServiceAccount;

        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let accounts: kube::Api<ServiceAccount> = kube::Api::namespaced(self.client(), namespace);
        let response = accounts
            .create_token_request(name, &Default::default(), &request)
            .await
            .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{name}"))?;
        let token = response
            .status
            .map(|status| status.token)
            .filter(|token| !token.is_empty())
            .with_context(|| {
                format!("the TokenRequest for {namespace}/{name} returned no token")
            })?;
        let path = self
            .layout
            .root()
            .join(format!("kubeconfig-sa-{namespace}-{name}.yaml"));
        kubeconfig::write_token(&self.layout, &self.server_url, &token, namespace, &path)?;
        Ok(path)
    }

    /// Creates a namespace named `<prefix>-<random>`, deleted when the guard is dropped.
    ///
    /// # Panics
    /// If the namespace cannot be created (e.g. `prefix` is not a DNS label).
    pub async fn temp_namespace(&self, prefix: &str) -> TestNamespace {
        match TestNamespace::create(self.client_config.clone(), prefix).await {
            Ok(namespace) => namespace,
            Err(error) => panic!("{error:#}"),
        }
    }

    /// The name and pid of each of the cluster's processes.
    pub fn process_ids(&self) -> Vec<(&'static str, u32)> {
        self.supervisor.process_ids()
    }

    /// Fails with the log tail of the first component that has exited, if any.
    pub fn check_running(&self) -> Result<()> {
        self.supervisor.check_running()
    }

    /// Leaves the processes running and the state directory in place, for
    /// `sd35-localcluster stop` to end. Returns the state directory.
    pub fn detach(mut self) -> PathBuf {
        self.supervisor.detach();
        self.layout.root().to_path_buf()
    }
}

/// A new, empty directory under the system temp dir.
fn fresh_state_dir() -> Result<PathBuf> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = std::env::temp_dir();
    loop {
        let dir = base.join(format!(
            "sd35-cluster-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(error) => {
                return Err(error).with_context(|| format!("creating {}", dir.display()));
            }
        }
    }
}

/// Creates `dir` if needed; refuses one that already holds something.
fn prepare_state_dir(dir: PathBuf) -> Result<PathBuf> {
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    if std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "the state directory {} is not empty; remove it or pick another",
            dir.display()
        );
    }
    Ok(dir)
}

/// This executable if it is `sd35-localcluster`; otherwise the one Cargo puts beside the
/// `deps/` directory that test executables run from.
fn locate_provisioner() -> Result<PathBuf> {
    let current = std::env::current_exe().context("finding the current executable")?;
    if current
        .file_name()
        .is_some_and(|name| name == LOCALCLUSTER_EXE)
    {
        return Ok(current);
    }
    let beside_deps = current
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(LOCALCLUSTER_EXE))
        .filter(|path| path.is_file());
    beside_deps.with_context(|| {
        format!(
            "cannot find the {LOCALCLUSTER_EXE} executable near {}; build it \
             (`cargo build -p sd35-e2e`) or set ClusterOptions::provisioner",
            current.display()
        )
    })
}
