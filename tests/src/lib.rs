//! End-to-end test support for the sd35 operator: a real Kubernetes control plane on
//! loopback (etcd, kube-apiserver, kube-controller-manager, kube-scheduler built from the
//! pinned Go modules in `tests/controlplane/`), kwok playing GPU nodes, a static
//! provisioner behind the default StorageClass, and optionally one real node running pods
//! with containerd ([`node`]) and Flux's controllers ([`flux`]).
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let cluster = sd35_e2e::shared_cluster();
//! let namespace = cluster.temp_namespace("my-test").await;
//! let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = namespace.api();
//! # Ok(()) }
//! ```

mod binaries;
mod bootstrap;
mod cluster;
mod components;
mod fixtures;
pub mod flux;
pub mod git_server;
pub mod kubeconfig;
mod layout;
pub mod localcluster;
pub mod mirror;
mod namespace;
pub mod node;
mod nodes;
mod operator;
mod pki;
mod ports;
mod process;
pub mod provisioner;
mod sd35;
mod shared;
mod storage;
mod supervisor;
pub mod wait;

pub use binaries::{BIN_DIR_ENV, Binaries};
pub use cluster::{Cluster, ClusterOptions, LOCALCLUSTER_EXE};
pub use components::{KWOK_NODE_ANNOTATION, LOCAL_PROVISIONER, SERVICE_ACCOUNT_ISSUER};
pub use fixtures::{crd_established, install_crd, kubectl_apply, repo_root};
pub use flux::{FLUX_NAMESPACE, FluxBinaries, flux_user};
pub use git_server::GitServer;
pub use namespace::{TEST_NAMESPACE_LABEL, TestNamespace};
pub use node::{HOST_ADDRESS, HostState, Images, REAL_NODE_NAME};
pub use nodes::{GPU_PRODUCT, GPU_RESOURCE, GPUS_PER_NODE, gpu_node_name, is_ready};
pub use operator::{
    OPERATOR_BIN_ENV, OperatorProcess, SERVER_BIN_ENV, operator_binary, server_binary,
};
pub use process::{Lifetime, runs_for_state_dir};
pub use sd35::{condition, has_condition, summary, wait_for, wait_ready};
pub use shared::{shared_cluster, shared_real_node_cluster, skip_without_real_node};
pub use storage::DEFAULT_STORAGE_CLASS;
pub use supervisor::KEEP_STATE_ENV;
pub use wait::{Probe, poll_until};
