//! `sd35-localcluster`: run the local control plane for development, and serve its
//! default StorageClass.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use sd35_e2e::{Images, localcluster, node};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A local Kubernetes control plane with fake GPU nodes (and a real node, and Flux)"
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, clap::Args)]
struct StateDir {
    /// The cluster's state directory [default: ${XDG_CACHE_HOME:-~/.cache}/sd35-operator/localcluster].
    #[arg(long, env = "SD35_LOCALCLUSTER_DIR")]
    state_dir: Option<PathBuf>,
}

impl StateDir {
    fn resolve(self) -> Result<PathBuf> {
        self.state_dir
            .map_or_else(localcluster::default_state_dir, Ok)
    }
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Start a cluster that keeps running after this command; prints its kubeconfig path.
    Start {
        #[command(flatten)]
        state: StateDir,
        /// How many fake GPU nodes (eight nvidia.com/gpu each) to create.
        #[arg(long, default_value_t = 4)]
        gpu_nodes: usize,
        /// Also run the real node `real-0` (kubelet, containerd, kube-proxy; needs root) with
        /// the images `make images` built.
        #[arg(long)]
        real_node: bool,
        /// The directory of the image archives [default: $SD35_IMAGES_DIR, else the
        /// repository's target/images].
        #[arg(long, requires = "real_node")]
        images: Option<PathBuf>,
        /// Also run Flux's source-controller, kustomize-controller and helm-controller (built
        /// from the pinned Go modules by tests/controlplane/flux/build.sh, or $SD35_FLUX_DIR),
        /// with their CRDs installed and the namespace flux-system.
        #[arg(long)]
        flux: bool,
    },
    /// Stop the cluster and remove its state directory.
    Stop {
        #[command(flatten)]
        state: StateDir,
    },
    /// Show the cluster's processes; exits non-zero unless all of them run.
    Status {
        #[command(flatten)]
        state: StateDir,
    },
    /// Print the path of the cluster's kubeconfig.
    Kubeconfig {
        #[command(flatten)]
        state: StateDir,
    },
    /// Hold the real node's namespaces (started by the cluster, inside them).
    #[command(hide = true)]
    NodeNamespace {
        #[command(flatten)]
        state: StateDir,
    },
    /// Undo what a real node left on the host: its shims and containers, cgroups, link
    /// and kernel settings (run by `stop` and by the test clusters' janitor).
    NodeTeardown {
        #[command(flatten)]
        state: StateDir,
    },
    /// Serve a model directory as an `http` model source (its files plus sha256sums.txt),
    /// for pods on the real node: prints `serving <url>` once it listens.
    Mirror {
        /// The model directory to serve.
        #[arg(long)]
        model: PathBuf,
        /// Where the mirror's copy (with its sha256sums.txt) is written.
        #[arg(long)]
        dir: PathBuf,
        /// The address to listen on (port 0 picks one) [default: the host end of the real
        /// node's link].
        #[arg(long, default_value_t = std::net::SocketAddr::from((sd35_e2e::HOST_ADDRESS, 0)))]
        listen: std::net::SocketAddr,
    },
    /// Run the volume provisioner of the default StorageClass (started by the cluster).
    Provision {
        /// The kubeconfig to act with.
        #[arg(long)]
        kubeconfig: PathBuf,
        /// The directory that holds the volumes' directories.
        #[arg(long)]
        root: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Commands::Start {
            state,
            gpu_nodes,
            real_node,
            images,
            flux,
        } => {
            let images = match (real_node, images) {
                (false, _) => None,
                (true, Some(dir)) => Some(Images::in_dir(&dir)?),
                (true, None) => Some(Images::locate()?),
            };
            let options = localcluster::StartOptions {
                gpu_nodes,
                real_node: images,
                flux,
            };
            localcluster::start(&state.resolve()?, options)?;
        }
        Commands::NodeNamespace { state: _ } => node::hold_namespaces(),
        Commands::NodeTeardown { state } => node::teardown(&state.resolve()?)?,
        Commands::Stop { state } => localcluster::stop(&state.resolve()?)?,
        Commands::Status { state } => return localcluster::status(&state.resolve()?),
        Commands::Kubeconfig { state } => {
            println!(
                "{}",
                localcluster::kubeconfig_path(&state.resolve()?)?.display()
            );
        }
        Commands::Mirror { model, dir, listen } => {
            sd35_e2e::mirror::write_mirror(&model, &dir)?;
            tokio::runtime::Runtime::new()?.block_on(async {
                let mirror = sd35_e2e::mirror::ModelMirror::serve(&dir, listen, None).await?;
                println!("serving {}", mirror.url());
                tokio::signal::ctrl_c().await?;
                anyhow::Ok(())
            })?;
        }
        Commands::Provision { kubeconfig, root } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_ansi(std::io::stderr().is_terminal())
                .init();
            tokio::runtime::Runtime::new()?
                .block_on(sd35_e2e::provisioner::run(&kubeconfig, &root))?;
        }
    }
    Ok(true)
}
