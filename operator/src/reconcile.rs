//! The reconciler: dereference (client) → validate (pure) → build (pure) → apply (client) →
//! status (client), for one SD35Deployment at a time.
//!
//! Guarantees: every write goes through one [`Applier`], whose strategy is `Observe` while the
//! object is paused; children are only written when they differ from what is live, so a
//! steady state makes no write calls; children the spec no longer wants are swept by label
//! and owner; the serving pods are switched to a new cache or engine only once it is ready.
//! Shared caches and their Jobs are owned by all their users, so Kubernetes' garbage collector
//! deletes them with their last user; a newcomer of the same model waits for a claim being
//! deleted to go, and says so. Lookups of related objects go through indexes, never a scan of
//! a whole cache, so the work of a reconcile does not grow with the number of objects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use sd35_crds::{SD35Deployment, SD35DeploymentStatus, condition};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::apply::{Applier, Strategy};
use crate::build::{self, ServiceMonitor, ServingTarget};
use crate::config::OperatorConfig;
use crate::index::{Index, namespaced};
use crate::jobs::{JobOutcome, outcome};
use crate::labels::{self, MANAGER};
use crate::metrics::Metrics;
use crate::resolve::{Resolved, resolve, storage_bytes};
use crate::status::{Addons, Note, Observed, Rollout, StepState, compute};

/// Errors of a reconciliation; the variant names are the `error` label of the metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("object has no {0}")]
    MissingField(&'static str),
}

impl Error {
    /// The metric label of the error.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "Kube",
            Error::MissingField(_) => "MissingField",
        }
    }
}

/// What every reconciliation shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The operator's settings.
    pub config: OperatorConfig,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes the events of transitions.
    pub recorder: crate::events::Recorder,
    /// All SD35Deployments.
    pub store: Store<SD35Deployment>,
    /// SD35Deployments by `namespace/cache key`: the users of a shared cache.
    pub users: Index<SD35Deployment>,
    /// The children the operator watches, read instead of asking the API server.
    pub children: ChildStores,
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

/// Caches of the operator's children, filled by the controller's watches.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // Store has no Debug
pub struct ChildStores {
    /// Cache claims (shared by cache key).
    pub claims: Store<PersistentVolumeClaim>,
    /// Fetch and build Jobs (shared by cache and engine key).
    pub jobs: Store<Job>,
    /// Serving Deployments.
    pub deployments: Owned<crate::compact::CachedDeployment>,
    /// Serving Services.
    pub services: Owned<Service>,
    /// Serving PodDisruptionBudgets.
    pub pdbs: Owned<PodDisruptionBudget>,
    /// Serving NetworkPolicies.
    pub network_policies: Owned<NetworkPolicy>,
    /// Serving ServiceMonitors (watched once their CRD is installed).
    pub service_monitors: Owned<ServiceMonitor>,
    /// Whether the ServiceMonitor CRD (monitoring.coreos.com/v1) is installed.
    pub service_monitor_crd: Arc<AtomicBool>,
    /// Serving pods, read for the exit codes of containers that could not start.
    pub pods: Store<Pod>,
    /// Serving pods by `namespace/instance`.
    pub pods_by_instance: Index<Pod>,
    /// Nodes, metadata only: their GPU feature discovery labels.
    pub nodes: Store<PartialObjectMeta<Node>>,
}

/// The GPUs the serving pods of `r` get: those of the nodes they run on, else of the GPU
/// nodes their nodeSelector admits. `None` when they request no GPU.
fn gpu_report(children: &ChildStores, r: &Resolved) -> Option<crate::gpu::GpuReport> {
    use crate::gpu::{NodeGpu, matches_selector, report};
    if r.spec.server.gpu.count == 0 {
        return None;
    }
    let node_gpu = |node: &PartialObjectMeta<Node>| {
        NodeGpu::of_labels(node.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()))
    };
    let scheduled: Vec<NodeGpu> = children
        .pods_by_instance
        .get(&namespaced(&r.namespace, &r.name))
        .iter()
        .filter_map(|p| children.pods.get(p))
        .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
        .filter_map(|n| children.nodes.get(&ObjectRef::new(&n)))
        .filter_map(|n| node_gpu(&n))
        .collect();
    let gpus = if scheduled.is_empty() {
        let selector = &r.spec.scheduling.node_selector;
        children
            .nodes
            .state()
            .iter()
            .filter(|n| {
                matches_selector(
                    n.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
                    selector,
                )
            })
            .filter_map(|n| node_gpu(n))
            .collect()
    } else {
        scheduled
    };
    Some(report(r.precision, &gpus))
}

/// The index key of an SD35Deployment: `namespace/cache key`, when its spec resolves.
pub fn cache_key_of(
    obj: &SD35Deployment,
    config: &OperatorConfig,
    metrics: &Metrics,
) -> Vec<String> {
    metrics.spec_resolved();
    match (obj.namespace(), resolve(obj, config)) {
        (Some(ns), Ok(r)) => vec![namespaced(&ns, &r.cache_key)],
        _ => Vec::new(),
    }
}

/// The index key of a serving pod: `namespace/instance`.
pub fn instance_of(pod: &Pod) -> Vec<String> {
    match (pod.namespace(), pod.labels().get(labels::INSTANCE)) {
        (Some(ns), Some(instance)) => vec![namespaced(&ns, instance)],
        _ => Vec::new(),
    }
}

/// The SD35Deployments a Job or claim belongs to, found by its cache key label.
pub fn users_of_cache_key(
    users: &Index<SD35Deployment>,
    namespace: Option<&str>,
    key: Option<&str>,
) -> Vec<ObjectRef<SD35Deployment>> {
    match (namespace, key) {
        (Some(ns), Some(key)) => users.get(&namespaced(ns, key)),
        _ => Vec::new(),
    }
}

/// An object from the watch cache, or from the API server when the cache does not have it
/// (yet): a cache can lag behind, but a missing child must never be assumed missing.
async fn lookup<K>(
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
fn cached<K>(store: &Store<K>, namespace: &str, name: &str) -> Option<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    store
        .get(&ObjectRef::new(name).within(namespace))
        .map(|o| o.as_ref().clone())
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A non-controller owner reference to `obj`.
fn shared_owner(obj: &SD35Deployment) -> Option<OwnerReference> {
    let mut o = obj.controller_owner_ref(&())?;
    o.controller = Some(false);
    o.block_owner_deletion = Some(false);
    Some(o)
}

/// The live users of this object's cache (itself included, as reconciled now), by UID.
fn cache_users(ctx: &Context, obj: &SD35Deployment, r: &Resolved) -> Vec<Arc<SD35Deployment>> {
    let mut users: Vec<Arc<SD35Deployment>> = ctx
        .users
        .get(&namespaced(&r.namespace, &r.cache_key))
        .iter()
        .filter_map(|u| ctx.store.get(u))
        .filter(|o| o.metadata.deletion_timestamp.is_none() && o.uid() != obj.uid())
        .collect();
    // The object being reconciled may be newer than the store.
    users.push(Arc::new(obj.clone()));
    users.sort_by_key(|u| u.uid());
    users
}

fn same_owners(a: Option<&Vec<OwnerReference>>, b: &[OwnerReference]) -> bool {
    let mut x: Vec<&str> = a
        .map(|v| v.iter().map(|o| o.uid.as_str()).collect())
        .unwrap_or_default();
    let mut y: Vec<&str> = b.iter().map(|o| o.uid.as_str()).collect();
    x.sort_unstable();
    y.sort_unstable();
    x == y
}

/// One reconciliation's client-side work; its writes go through `apply`.
struct Run<'a> {
    ctx: &'a Context,
    r: &'a Resolved,
    owner: OwnerReference,
    apply: Applier,
    previous: Option<&'a SD35DeploymentStatus>,
    /// Owners of the cache claim: every user, or none when one asks to retain it.
    claim_owners: Vec<OwnerReference>,
    /// Owners of the fetch and build Jobs: every user, so that no Job (and no completed pod
    /// of one, which holds the volume) outlives the last user of its cache.
    job_owners: Vec<OwnerReference>,
    /// What this reconcile did, told in its one event.
    actions: std::sync::Mutex<Vec<Note>>,
}

impl Run<'_> {
    /// Whether the user asked for a retry since a failure was reported: the spec changed after
    /// the Stalled condition was set.
    fn retry_requested(&self) -> bool {
        self.previous
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == condition::STALLED))
            .is_some_and(|c| {
                c.status == "True" && c.observed_generation.unwrap_or(0) < self.r.generation
            })
    }

    async fn ensure_claim(&self) -> Result<Option<PersistentVolumeClaim>, Error> {
        let api: Api<PersistentVolumeClaim> =
            Api::namespaced(self.ctx.client.clone(), &self.r.namespace);
        let live = lookup(
            &self.ctx.children.claims,
            &api,
            &self.r.namespace,
            &self.r.cache.claim,
        )
        .await?;
        if !self.r.cache.managed {
            return Ok(live);
        }
        match live {
            // Being deleted: nothing is added to it; the cache step waits for it to go.
            Some(live) if live.metadata.deletion_timestamp.is_some() => Ok(Some(live)),
            None => {
                let desired = build::cache_claim(self.r, &self.claim_owners);
                match self.apply.create(&desired).await? {
                    Some((created, true)) => {
                        self.event(
                            "CacheClaimCreated",
                            &format!("created cache claim {}", self.r.cache.claim),
                        )
                        .await;
                        Ok(Some(created))
                    }
                    Some((existing, false)) => Ok(Some(existing)),
                    None => Ok(None),
                }
            }
            Some(live)
                if !same_owners(live.metadata.owner_references.as_ref(), &self.claim_owners) =>
            {
                let patch = json!({"metadata": {"ownerReferences": self.claim_owners}});
                let patched = self.apply.merge_patch(&self.r.cache.claim, &patch).await?;
                Ok(Some(patched.unwrap_or(live)))
            }
            Some(live) => Ok(Some(live)),
        }
    }

    /// Grows a managed claim to `spec.cache.size` when its StorageClass allows expansion.
    /// Returns the claim as it is now and, while its size is not what the spec asks for, a
    /// reason and a message for the CacheReady condition.
    async fn grow_claim(
        &self,
        claim: PersistentVolumeClaim,
    ) -> Result<(PersistentVolumeClaim, Option<(&'static str, String)>), Error> {
        let size = |q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>| {
            q.map(|q| q.0.clone()).unwrap_or_default()
        };
        let requested = size(
            claim
                .spec
                .as_ref()
                .and_then(|s| s.resources.as_ref())
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage")),
        );
        let capacity = size(
            claim
                .status
                .as_ref()
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.get("storage")),
        );
        let name = &self.r.cache.claim;
        let want = &self.r.cache.size;
        let (Some(want_bytes), Some(requested_bytes)) =
            (storage_bytes(want), storage_bytes(&requested))
        else {
            return Ok((claim, None));
        };
        if want_bytes <= requested_bytes {
            let growing = storage_bytes(&capacity).is_some_and(|c| c < requested_bytes);
            return Ok((
                claim,
                growing.then(|| {
                    (
                        "Expanding",
                        format!(
                            "cache claim {name} is being expanded to {requested} (now {capacity})"
                        ),
                    )
                }),
            ));
        }
        let class = claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .unwrap_or_default();
        let classes: Api<StorageClass> = Api::all(self.ctx.client.clone());
        let allowed = match classes.get_opt(&class).await {
            Ok(sc) => sc.and_then(|sc| sc.allow_volume_expansion) == Some(true),
            Err(kube::Error::Api(e)) if e.code == 403 => false,
            Err(e) => return Err(e.into()),
        };
        if !allowed {
            return Ok((
                claim,
                Some((
                    "ExpansionNotAllowed",
                    format!(
                        "spec.cache.size is {want}, but StorageClass {class:?} of cache claim {name} does not allow volume expansion (allowVolumeExpansion is not true): the claim stays at {requested}; the cache is usable as it is"
                    ),
                )),
            ));
        }
        let patch = json!({"spec": {"resources": {"requests": {"storage": want}}}});
        let grown = self
            .apply
            .merge_patch::<PersistentVolumeClaim>(name, &patch)
            .await?;
        if grown.is_some() {
            self.event(
                "CacheClaimExpanding",
                &format!("growing cache claim {name} from {requested} to {want}"),
            )
            .await;
        }
        Ok((
            grown.unwrap_or(claim),
            Some((
                "Expanding",
                format!("cache claim {name} is growing from {requested} to {want}"),
            )),
        ))
    }

    /// Records facts about the cache on its claim, in one patch.
    async fn annotate_claim(
        &self,
        claim: &PersistentVolumeClaim,
        annotations: &[(&str, &str)],
    ) -> Result<PersistentVolumeClaim, Error> {
        let annotations: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let patch = json!({"metadata": {"annotations": annotations}});
        let patched = self
            .apply
            .merge_patch::<PersistentVolumeClaim>(&self.r.cache.claim, &patch)
            .await?;
        Ok(patched.unwrap_or_else(|| claim.clone()))
    }

    /// Drive one Job-backed step (fetch or build) on `claim` and say where it stands.
    async fn job_step(
        &self,
        name: &str,
        what: &str,
        pending: &str,
        claim: &PersistentVolumeClaim,
        desired: impl FnOnce() -> Job,
    ) -> Result<(StepState, bool), Error> {
        let api: Api<Job> = Api::namespaced(self.ctx.client.clone(), &self.r.namespace);
        let live = lookup(&self.ctx.children.jobs, &api, &self.r.namespace, name).await?;
        let Some(job) = live else {
            let (_, written) = self.apply.apply(desired(), None).await?;
            if written {
                self.event(&format!("{what}Started"), &format!("started Job {name}"))
                    .await;
            }
            return Ok((
                StepState::Pending(pending.to_owned(), format!("Job {name} is running")),
                false,
            ));
        };
        let claim_uid = claim.uid().unwrap_or_default();
        let for_claim = job.annotations().get(labels::CLAIM_UID);
        if job.metadata.deletion_timestamp.is_some()
            || for_claim.is_some_and(|uid| *uid != claim_uid)
        {
            // A Job of an earlier claim of this name: it says nothing about this one.
            if job.metadata.deletion_timestamp.is_none() {
                self.apply.delete::<Job>(name).await?;
            }
            return Ok((
                StepState::Pending(
                    "Waiting".into(),
                    format!("Job {name} of an earlier cache claim is being deleted"),
                ),
                false,
            ));
        }
        let outcome = outcome(&job, what);
        if matches!(outcome, JobOutcome::Running { .. })
            && !same_owners(job.metadata.owner_references.as_ref(), &self.job_owners)
        {
            let patch = json!({"metadata": {"ownerReferences": self.job_owners}});
            self.apply.merge_patch::<Job>(name, &patch).await?;
        }
        match outcome {
            JobOutcome::Succeeded => Ok((StepState::Done("", String::new()), true)),
            JobOutcome::Running { active, failed } => {
                let msg = if failed > 0 {
                    format!(
                        "Job {name} is running ({active} active, {failed} failed attempts so far)"
                    )
                } else {
                    format!("Job {name} is running")
                };
                Ok((StepState::Pending(pending.to_owned(), msg), false))
            }
            JobOutcome::Failed { reason, message } => {
                if self.retry_requested() && self.apply.delete::<Job>(name).await? {
                    self.event(
                        &format!("{what}Retried"),
                        &format!("spec changed: retrying Job {name}"),
                    )
                    .await;
                    return Ok((
                        StepState::Pending("Retrying".into(), format!("retrying Job {name}")),
                        false,
                    ));
                }
                Ok((StepState::Failed(reason, message), false))
            }
        }
    }

    /// The cache step, and the claim as it is after it.
    async fn cache_step(
        &self,
        claim: Option<PersistentVolumeClaim>,
    ) -> Result<(StepState, Option<PersistentVolumeClaim>), Error> {
        let Some(claim) = claim else {
            return Ok((
                if self.r.cache.managed {
                    StepState::Pending(
                        "ClaimPending".into(),
                        format!("cache claim {} is being created", self.r.cache.claim),
                    )
                } else {
                    StepState::Failed(
                        "ClaimNotFound".into(),
                        format!(
                            "spec.cache.existingClaim {} does not exist in this namespace; create it or unset the field",
                            self.r.cache.claim
                        ),
                    )
                },
                None,
            ));
        };
        if claim.metadata.deletion_timestamp.is_some() {
            let name = &self.r.cache.claim;
            return Ok((
                StepState::Pending(
                    "ClaimTerminating".into(),
                    format!(
                        "cache claim {name} is being deleted (its last user went away); a new one is created once it is gone (kubectl describe pvc {name} shows what holds it)"
                    ),
                ),
                Some(claim),
            ));
        }
        let (claim, growth) = if self.r.cache.managed {
            self.grow_claim(claim).await?
        } else {
            (claim, None)
        };
        let done = |growth: Option<(&'static str, String)>| match growth {
            Some((reason, message)) => StepState::Done(reason, message),
            None => StepState::Done(
                "Cached",
                format!("model cached in claim {}", self.r.cache.claim),
            ),
        };
        if claim
            .annotations()
            .get(labels::CACHE_COMPLETE)
            .map(String::as_str)
            == Some("true")
        {
            return Ok((done(growth), Some(claim)));
        }
        let name = labels::fetch_job(&self.r.cache_key);
        let claim_uid = claim.uid().unwrap_or_default();
        let (state, succeeded) = self
            .job_step(&name, "Fetch", "Fetching", &claim, || {
                build::fetch_job(self.r, &self.ctx.config, &self.job_owners, &claim_uid)
            })
            .await?;
        if succeeded {
            // With an engine to build, the fetch Job's success is recorded on the claim in
            // the same patch as the engine's (one write fewer); until then the Job says it.
            if self.r.engine_key.is_some() {
                return Ok((done(growth), Some(claim)));
            }
            let claim = self
                .annotate_claim(&claim, &[(labels::CACHE_COMPLETE, "true")])
                .await?;
            return Ok((done(growth), Some(claim)));
        }
        // A claim is Pending for a moment after it is created; only one that stays so is
        // worth a status of its own.
        let pending_for = claim
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t.0))
            .unwrap_or_default();
        if matches!(state, StepState::Pending(..))
            && claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending")
            && pending_for > k8s_openapi::jiff::SignedDuration::from_secs(30)
        {
            return Ok((
                StepState::Pending(
                    "ClaimPending".into(),
                    format!(
                        "cache claim {} is not bound yet; check its StorageClass (kubectl describe pvc {})",
                        self.r.cache.claim, self.r.cache.claim
                    ),
                ),
                Some(claim),
            ));
        }
        Ok((state, Some(claim)))
    }

    async fn engine_step(
        &self,
        claim: Option<&PersistentVolumeClaim>,
        cache: &StepState,
    ) -> Result<StepState, Error> {
        let Some(key) = &self.r.engine_key else {
            return Ok(StepState::Done(
                "NotRequired",
                format!(
                    "spec.engine.build is Never: serving pods load the cached weights and \
                     convert them to {} at start-up (slower starts; set engine.build: Auto to \
                     prebuild)",
                    self.r.precision
                ),
            ));
        };
        let Some(claim) = claim.filter(|_| cache.is_done()) else {
            return Ok(StepState::Pending(
                "WaitingForCache".into(),
                "the engine is built once the cache is complete".into(),
            ));
        };
        let annotation = labels::engine_ready_annotation(key);
        let built = || {
            StepState::Done(
                "Built",
                format!("{} engine {key} built", self.r.precision.as_str()),
            )
        };
        // The cache is complete: recorded on the claim already, or to be recorded now.
        let record_cache = (!claim.annotations().contains_key(labels::CACHE_COMPLETE))
            .then_some((labels::CACHE_COMPLETE, "true"));
        if claim.annotations().get(&annotation).map(String::as_str) == Some("ready") {
            if let Some(cache) = record_cache {
                self.annotate_claim(claim, &[cache]).await?;
            }
            return Ok(built());
        }
        let name = labels::build_job(key);
        let claim_uid = claim.uid().unwrap_or_default();
        let (state, succeeded) = self
            .job_step(&name, "Build", "Building", claim, || {
                build::build_job(self.r, &self.ctx.config, &self.job_owners, &claim_uid, key)
            })
            .await?;
        if succeeded {
            let mut record = vec![(annotation.as_str(), "ready")];
            record.extend(record_cache);
            self.annotate_claim(claim, &record).await?;
            return Ok(built());
        }
        Ok(state)
    }

    /// The add-ons the spec asks for, applied; those that cannot be are skipped and said so.
    async fn addons(&self) -> Result<Addons, Error> {
        let ns = &self.r.namespace;
        let name = self.r.name.as_str();
        let children = &self.ctx.children;
        let uid = self.owner.uid.as_str();
        let mut addons = Addons::default();
        let policy = build::network_policy(self.r, &self.owner);
        if let Some(desired) = policy.clone() {
            let live = cached(&children.network_policies.store, ns, name);
            if self.apply.apply(desired, live).await?.0.is_some() {
                addons.applied.push("NetworkPolicy");
            }
        }
        let wanted: &[&str] = if policy.is_some() { &[name] } else { &[] };
        let c = &children.network_policies;
        self.apply.sweep(&c.store, &c.by_owner, uid, wanted).await?;

        let monitor = build::service_monitor(self.r, &self.owner);
        let not_installed = || {
            "ServiceMonitor skipped: the Prometheus Operator's ServiceMonitor CRD \
             (servicemonitors.monitoring.coreos.com) is not installed; the operator creates it \
             once the CRD is there"
                .to_owned()
        };
        if !children.service_monitor_crd.load(Ordering::Relaxed) {
            if monitor.is_some() {
                addons.skipped.push(not_installed());
            }
            return Ok(addons);
        }
        if let Some(desired) = monitor.clone() {
            let live = cached(&children.service_monitors.store, ns, name);
            let applied = self.apply.apply(desired, live).await;
            match applied {
                Ok((Some(_), _)) => addons.applied.push("ServiceMonitor"),
                Ok((None, _)) => {}
                // The CRD went away since it was seen.
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    addons.skipped.push(not_installed());
                    return Ok(addons);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let wanted: &[&str] = if monitor.is_some() { &[name] } else { &[] };
        let c = &children.service_monitors;
        self.apply.sweep(&c.store, &c.by_owner, uid, wanted).await?;
        Ok(addons)
    }

    async fn serving(&self, ready_for_desired: bool) -> Result<Option<Rollout>, Error> {
        let ns = &self.r.namespace;
        let name = self.r.name.as_str();
        let children = &self.ctx.children;
        let uid = self.owner.uid.as_str();
        let live = children
            .deployments
            .store
            .get(&ObjectRef::new(name).within(ns))
            .map(|d| d.to_deployment());
        let desired_target = ServingTarget::desired(self.r);
        let target = if ready_for_desired {
            Some(desired_target.clone())
        } else {
            live.as_ref().and_then(ServingTarget::of)
        };
        let deployment = match &target {
            Some(t) => {
                let desired = build::deployment(self.r, &self.ctx.config, &self.owner, t);
                let had = live.is_some();
                let (now, written) = self.apply.apply(desired, live).await?;
                if written && !had {
                    self.event(
                        "DeploymentCreated",
                        &format!("created serving Deployment {name}"),
                    )
                    .await;
                } else if written {
                    debug!("serving Deployment updated");
                }
                now
            }
            None => live,
        };

        let live = cached(&children.services.store, ns, name);
        self.apply
            .apply(build::service(self.r, &self.owner), live)
            .await?;
        let pdb = build::pdb(self.r, &self.owner);
        if let Some(desired) = pdb.clone() {
            let live = cached(&children.pdbs.store, ns, name);
            self.apply.apply(desired, live).await?;
        }

        // One sweep, by the operator's label and this object's UID, of each child kind the
        // spec can stop wanting: whatever it does not want now goes. (The serving Deployment
        // is always wanted, under the object's name.)
        let mut swept = Vec::new();
        let c = &children.services;
        swept.extend(
            self.apply
                .sweep(&c.store, &c.by_owner, uid, &[name])
                .await?,
        );
        let wanted: &[&str] = if pdb.is_some() { &[name] } else { &[] };
        let c = &children.pdbs;
        swept.extend(self.apply.sweep(&c.store, &c.by_owner, uid, wanted).await?);
        if !swept.is_empty() {
            info!(?swept, "deleted children the spec no longer wants");
        }

        let pods: Vec<Arc<Pod>> = children
            .pods_by_instance
            .get(&namespaced(ns, name))
            .iter()
            .filter_map(|p| children.pods.get(p))
            .collect();
        Ok(deployment.map(|d| Rollout::of(&d, &desired_target, pods.iter().map(AsRef::as_ref))))
    }

    /// Notes an action for this reconcile's event.
    async fn event(&self, reason: &str, note: &str) {
        if let Ok(mut actions) = self.actions.lock() {
            actions.push(Note {
                warning: false,
                reason: reason.to_owned(),
                text: note.to_owned(),
            });
        }
    }

    fn take_actions(&self) -> Vec<Note> {
        self.actions
            .lock()
            .map(|mut a| std::mem::take(&mut *a))
            .unwrap_or_default()
    }
}

async fn publish(ctx: &Context, obj: &SD35Deployment, note: Note) {
    if let Err(e) = ctx.recorder.publish(&note, &obj.object_ref(&())).await {
        warn!(error = %e, reason = %note.reason, "could not publish event");
    }
}

/// Write the status if it changed, and publish this reconcile's one event: its actions and
/// the condition transitions worth telling.
async fn write_status(
    ctx: &Context,
    obj: &SD35Deployment,
    status: SD35DeploymentStatus,
    actions: Vec<Note>,
) -> Result<(), Error> {
    let ns = obj
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let previous = obj.status.as_ref();
    ctx.metrics.set_phase(
        &format!("{ns}/{}", obj.name_any()),
        status
            .phase
            .map(|p| {
                serde_json::to_value(p)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            })
            .as_deref(),
    );
    let event = crate::status::event(&actions, previous, &status);
    if previous != Some(&status) {
        let api: Api<SD35Deployment> = Api::namespaced(ctx.client.clone(), &ns);
        let patch =
            json!({"apiVersion": "sd35.io/v1alpha1", "kind": "SD35Deployment", "status": status});
        api.patch_status(
            &obj.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    // After the status: what a watcher of the object waits for is not held up by the event.
    if let Some(note) = event {
        publish(ctx, obj, note).await;
    }
    Ok(())
}

/// Reconcile one SD35Deployment.
pub async fn reconcile(obj: Arc<SD35Deployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    if obj.metadata.deletion_timestamp.is_some() {
        // Children carry owner references; the garbage collector removes them.
        ctx.metrics.set_phase(
            &format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any()),
            None,
        );
        return Ok(Action::await_change());
    }
    let generation = obj.metadata.generation.unwrap_or(0);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let name = obj.name_any();
    let ns = obj
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let selector = labels::selector_string(&name);

    ctx.metrics.spec_resolved();
    let r = match resolve(&obj, &ctx.config) {
        Ok(r) => r,
        Err(invalid) => {
            let observed = Observed {
                generation,
                desired_replicas: obj.spec.replicas,
                paused: obj.spec.paused,
                invalid: Some(invalid.0.clone()),
                cache: StepState::Pending("InvalidSpec".into(), invalid.0.clone()),
                engine: StepState::Pending("InvalidSpec".into(), invalid.0),
                rollout: None,
                addons: Addons::default(),
                gpu: None,
                cache_claim: String::new(),
                cache_key: String::new(),
                engine_key: None,
                selector,
                endpoint: None,
            };
            let status = compute(&observed, obj.status.as_ref(), now);
            write_status(&ctx, &obj, status, Vec::new()).await?;
            return Ok(Action::await_change());
        }
    };
    let owner = obj
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    let users = cache_users(&ctx, &obj, &r);
    let job_owners: Vec<OwnerReference> = users.iter().filter_map(|u| shared_owner(u)).collect();
    let claim_owners = if users.iter().any(|u| u.spec.cache.retain) {
        Vec::new()
    } else {
        job_owners.clone()
    };
    let strategy = if obj.spec.paused {
        Strategy::Observe
    } else {
        Strategy::Apply
    };
    let run = Run {
        ctx: &ctx,
        r: &r,
        owner,
        apply: Applier::new(ctx.client.clone(), &ns, strategy),
        previous: obj.status.as_ref(),
        claim_owners,
        job_owners,
        actions: std::sync::Mutex::new(Vec::new()),
    };

    let claim = run.ensure_claim().await?;
    let (cache, claim) = run.cache_step(claim).await?;
    let engine = run.engine_step(claim.as_ref(), &cache).await?;
    let rollout = run.serving(cache.is_done() && engine.is_done()).await?;
    let addons = run.addons().await?;

    let observed = Observed {
        generation,
        desired_replicas: r.spec.replicas,
        paused: r.spec.paused,
        invalid: None,
        cache,
        engine,
        rollout,
        addons,
        gpu: gpu_report(&ctx.children, &r),
        cache_claim: r.cache.claim.clone(),
        cache_key: r.cache_key.clone(),
        engine_key: r.engine_key.clone(),
        selector,
        endpoint: Some(format!("http://{name}.{ns}.svc:{}", r.spec.server.port)),
    };
    let status = compute(&observed, obj.status.as_ref(), now);
    let ready = matches!(
        status.phase,
        Some(sd35_crds::Phase::Ready | sd35_crds::Phase::ScaledToZero)
    );
    if obj.status.as_ref().and_then(|s| s.phase) != status.phase {
        info!(phase = ?status.phase, "phase changed");
    }
    write_status(&ctx, &obj, status, run.take_actions()).await?;
    Ok(if ready || obj.spec.paused {
        Action::requeue(Duration::from_secs(600))
    } else {
        Action::requeue(Duration::from_secs(60))
    })
}

/// Log, count and retry with a delay.
pub fn error_policy(obj: Arc<SD35Deployment>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(name = %obj.name_any(), namespace = ?obj.namespace(), %error, "reconcile failed");
    ctx.metrics.reconcile_failed(error.kind());
    Action::requeue(Duration::from_secs(10))
}
