//! What every reconciliation shares: the client, the settings, the metrics, the event
//! recorder, and the watch caches and indexes the controller fills.
//!
//! Guarantee: the reconciler reads children from these caches, never by listing; a lookup
//! costs the size of its answer, not the size of a cache.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use sd35_crds::SD35Deployment;

use crate::children::ServiceMonitor;
use crate::compact::CachedDeployment;
use crate::config::OperatorConfig;
use crate::events::Recorder;
use crate::index::Index;
use crate::metrics::Metrics;

/// What every reconciliation shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The operator's settings.
    pub config: OperatorConfig,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes the events of transitions.
    pub recorder: Recorder,
    /// All SD35Deployments.
    pub store: Store<SD35Deployment>,
    /// SD35Deployments by `namespace/cache key`: the users of a shared cache.
    pub users: Index<SD35Deployment>,
    /// The children the operator watches, read instead of asking the API server.
    pub children: ChildStores,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A watch cache of children controlled by an SD35Deployment, and the same children by the
/// UID of their controller (for the sweep).
#[allow(missing_debug_implementations)] // Store has no Debug
#[derive(Clone)]
pub struct Owned<K: Resource<DynamicType = ()> + 'static> {
    /// The children.
    pub store: Store<K>,
    /// The children by controller UID.
    pub by_owner: Index<K>,
}

/// The caches of the children an SD35Deployment controls, one per kind of
/// [`crate::children::Controlled`].
#[derive(Clone)]
#[allow(missing_debug_implementations)] // Store has no Debug
pub struct ControlledStores {
    /// Serving Deployments (their specs kept as JSON text).
    pub deployments: Owned<CachedDeployment>,
    /// Serving Services.
    pub services: Owned<Service>,
    /// Serving PodDisruptionBudgets.
    pub pdbs: Owned<PodDisruptionBudget>,
    /// Serving NetworkPolicies.
    pub network_policies: Owned<NetworkPolicy>,
    /// Serving ServiceMonitors (watched once their CRD is installed).
    pub service_monitors: Owned<ServiceMonitor>,
}

/// Caches of the operator's children, filled by the controller's watches.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // Store has no Debug
pub struct ChildStores {
    /// Cache claims (shared by cache key).
    pub claims: Store<PersistentVolumeClaim>,
    /// Fetch and build Jobs (shared by cache and engine key).
    pub jobs: Store<Job>,
    /// The children each SD35Deployment controls.
    pub controlled: ControlledStores,
    /// Whether the ServiceMonitor CRD (monitoring.coreos.com/v1) is installed.
    pub service_monitor_crd: Arc<AtomicBool>,
    /// Serving pods and the pods of fetch and build Jobs, read for how their containers
    /// ended: the exit codes and termination messages of those that failed.
    pub pods: Store<Pod>,
    /// Serving pods by `namespace/instance`.
    pub pods_by_instance: Index<Pod>,
    /// The pods of fetch and build Jobs by `namespace/job name`.
    pub pods_by_job: Index<Pod>,
    /// Nodes, metadata only: their GPU feature discovery labels.
    pub nodes: Store<PartialObjectMeta<Node>>,
}

/// An object from the watch cache, or from the API server when the cache does not have it
/// (yet): a cache can lag behind, but a missing child must never be assumed missing.
pub async fn lookup<K>(
    store: &Store<K>,
    api: &Api<K>,
    namespace: &str,
    name: &str,
) -> kube::Result<Option<K>>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match store.get(&ObjectRef::new(name).within(namespace)) {
        Some(cached) => Ok(Some(cached.as_ref().clone())),
        None => api.get_opt(name).await,
    }
}

/// A server-side applied child from the watch cache alone. Applying is idempotent, so a
/// child the cache does not have yet is applied as new (one write, the same as creating it)
/// rather than looked up first on every reconcile until it exists.
pub fn cached<K>(store: &Store<K>, namespace: &str, name: &str) -> Option<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    store
        .get(&ObjectRef::new(name).within(namespace))
        .map(|o| o.as_ref().clone())
}
