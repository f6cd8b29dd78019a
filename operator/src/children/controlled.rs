//! The children one SD35Deployment controls, one field per kind.
//!
//! Guarantee: the reconciler's applier and its sweep both destructure [`Controlled`] without
//! `..`, so a kind added here is applied and swept, or the crate does not compile. The cache
//! claim and the Jobs are not here: they are shared by key, owned by all their users, and go
//! with the last of them through Kubernetes' garbage collector.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::{
    ServiceMonitor, ServingTarget, deployment, network_policy, pdb, service, service_monitor,
};
use crate::config::OperatorConfig;
use crate::resolve::Resolved;

/// The children an SD35Deployment controls (its owner reference with `controller: true`), as
/// the spec wants them now. A kind the spec does not want is `None`, and the sweep deletes
/// what is left of it.
#[derive(Clone, Debug)]
pub struct Controlled {
    /// The serving Deployment for the target its pods are to run; `None` while they have
    /// none yet. The Deployment is always wanted under the object's name: `None` leaves the
    /// live one as it is.
    pub deployment: Option<Deployment>,
    /// The Service in front of the serving pods.
    pub service: Service,
    /// The PodDisruptionBudget, with more than one replica.
    pub pdb: Option<PodDisruptionBudget>,
    /// The NetworkPolicy, when the spec asks for one.
    pub network_policy: Option<NetworkPolicy>,
    /// The ServiceMonitor, when the spec asks for one.
    pub service_monitor: Option<ServiceMonitor>,
}

impl Controlled {
    /// The children of `resolved`, the serving pods running `target`.
    pub fn new(
        resolved: &Resolved,
        config: &OperatorConfig,
        owner: &OwnerReference,
        target: Option<&ServingTarget>,
    ) -> Self {
        Self {
            deployment: target.map(|t| deployment(resolved, config, owner, t)),
            service: service(resolved, owner),
            pdb: pdb(resolved, owner),
            network_policy: network_policy(resolved, owner),
            service_monitor: service_monitor(resolved, owner),
        }
    }
}
