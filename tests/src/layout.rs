//! Where everything of one local cluster lives inside its state directory.
//!
//! Every file a cluster writes (certificates, kubeconfigs, etcd data, process logs, the
//! audit log, provisioned volumes, Helm's homes) sits under one root, so removing that root
//! removes the cluster without a trace.

use std::path::{Path, PathBuf};

/// The paths of one cluster's state directory.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    root: PathBuf,
}

impl Layout {
    pub(crate) fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn pki_dir(&self) -> PathBuf {
        self.root.join("pki")
    }

    pub(crate) fn cert(&self, name: &str) -> PathBuf {
        self.pki_dir().join(format!("{name}.crt"))
    }

    pub(crate) fn key(&self, name: &str) -> PathBuf {
        self.pki_dir().join(format!("{name}.key"))
    }

    /// The public half of the service-account signing key.
    pub(crate) fn service_account_public_key(&self) -> PathBuf {
        self.pki_dir().join("service-account.pub")
    }

    /// The kubeconfig of the cluster administrator, the one handed to users and tests.
    pub(crate) fn admin_kubeconfig(&self) -> PathBuf {
        self.root.join("kubeconfig")
    }

    /// The kubeconfig a component authenticates with.
    pub(crate) fn component_kubeconfig(&self, identity: &str) -> PathBuf {
        self.root
            .join("kubeconfigs")
            .join(format!("{identity}.kubeconfig"))
    }

    pub(crate) fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub(crate) fn process_log(&self, process: &str) -> PathBuf {
        self.logs_dir().join(format!("{process}.log"))
    }

    pub(crate) fn etcd_data(&self) -> PathBuf {
        self.root.join("etcd")
    }

    pub(crate) fn audit_policy(&self) -> PathBuf {
        self.root.join("audit-policy.yaml")
    }

    pub(crate) fn audit_log(&self) -> PathBuf {
        self.logs_dir().join("audit.log")
    }

    pub(crate) fn kwok_workdir(&self) -> PathBuf {
        self.root.join("kwok")
    }

    /// Where the static provisioner puts the directories behind its volumes.
    pub(crate) fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }

    pub(crate) fn helm_dir(&self, kind: &str) -> PathBuf {
        self.root.join("helm").join(kind)
    }

    /// The record of the running processes (`name pid` per line).
    pub(crate) fn pids(&self) -> PathBuf {
        self.root.join("pids")
    }

    /// The real node's files: its configurations, containerd's content and snapshots, the
    /// kubelet's root directory, pod logs, and what teardown needs to restore the host.
    pub(crate) fn node_dir(&self) -> PathBuf {
        self.root.join("node")
    }

    /// A file or directory in the real node's directory.
    pub(crate) fn node_path(&self, name: &str) -> PathBuf {
        self.node_dir().join(name)
    }

    /// containerd's API socket, reachable from the host (the node's `/run` is private).
    pub(crate) fn containerd_socket(&self) -> PathBuf {
        self.node_path("containerd.sock")
    }

    /// Creates the directories the components expect to exist.
    pub(crate) fn create_dirs(&self) -> std::io::Result<()> {
        for dir in [
            self.pki_dir(),
            self.root.join("kubeconfigs"),
            self.logs_dir(),
            self.kwok_workdir(),
            self.volumes_dir(),
        ] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(())
    }
}
