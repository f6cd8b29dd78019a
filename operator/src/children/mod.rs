//! The children of an SD35Deployment (pure and infallible): the cache claim, the fetch,
//! adapter fetch and engine build Jobs, the serving Deployment, its Service and
//! PodDisruptionBudget, and the optional NetworkPolicy and ServiceMonitor.
//!
//! Each function takes the resolved spec and returns a complete object, typed with the
//! Kubernetes API structs (k8s-openapi), so the compiler checks every field; the reconciler
//! sends them with server-side apply. Everything a test wants to know about a child is
//! visible here. The children one SD35Deployment controls are gathered in [`Controlled`], the
//! one list of kinds that the reconciler applies and sweeps.

mod addons;
mod cache;
mod controlled;
mod serving;

pub use addons::{ServiceMonitor, ServiceMonitorSpec, network_policy, service_monitor};
pub use cache::{adapter_job, build_job, cache_claim, fetch_job};
pub use controlled::Controlled;
pub use serving::{ServedAdapter, ServingTarget, deployment, pdb, service};

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, EmptyDirVolumeSource, LocalObjectReference,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, SeccompProfile, SecurityContext,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::resolve::Resolved;

/// Metadata of a namespaced child.
fn meta(
    name: &str,
    namespace: &str,
    labels: BTreeMap<String, String>,
    owners: &[OwnerReference],
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels),
        owner_references: Some(owners.to_vec()),
        ..Default::default()
    }
}

/// A volume of the claim `claim`, named `name`.
fn claim_volume(name: &str, claim: &str, read_only: Option<bool>) -> Volume {
    Volume {
        name: name.to_owned(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.to_owned(),
            read_only,
        }),
        ..Default::default()
    }
}

/// The pod's writable `/tmp` (the root filesystem is read-only).
fn tmp_volume() -> Volume {
    Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }
}

/// A mount of the volume `name` at `path`.
fn mount(name: &str, path: &str, read_only: Option<bool>) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only,
        ..Default::default()
    }
}

/// Pod-level security defaults: non-root, RuntimeDefault seccomp, volumes group-owned.
fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        run_as_group: Some(65532),
        fs_group: Some(65532),
        fs_group_change_policy: Some("OnRootMismatch".into()),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Container-level security defaults: read-only root, no privilege escalation, no capabilities.
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Node placement shared by the serving pods and the Jobs (so that a ReadWriteOnce cache is
/// written and read in the same place).
struct Placement {
    node_selector: Option<BTreeMap<String, String>>,
    tolerations: Option<Vec<Toleration>>,
    affinity: Option<Affinity>,
}

fn placement(resolved: &Resolved) -> Placement {
    let s = &resolved.spec.scheduling;
    Placement {
        node_selector: (!s.node_selector.is_empty()).then(|| s.node_selector.clone()),
        tolerations: (!s.tolerations.is_empty()).then(|| s.tolerations.clone()),
        affinity: s.affinity.clone(),
    }
}

/// The image pull secrets of the server image, if any.
fn pull_secrets(resolved: &Resolved) -> Option<Vec<LocalObjectReference>> {
    let names = &resolved.spec.server.image_pull_secrets;
    (!names.is_empty()).then(|| {
        names
            .iter()
            .map(|n| LocalObjectReference { name: n.clone() })
            .collect()
    })
}

/// The pull policy of the server image, as Kubernetes spells it.
fn pull_policy(resolved: &Resolved) -> Option<String> {
    resolved.spec.server.image_pull_policy.map(|p| {
        match p {
            sd35_crds::PullPolicy::Always => "Always",
            sd35_crds::PullPolicy::IfNotPresent => "IfNotPresent",
            sd35_crds::PullPolicy::Never => "Never",
        }
        .to_owned()
    })
}
