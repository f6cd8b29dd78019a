//! The reconciler: dereference (client) → validate (pure) → build (pure) → apply (client) →
//! status (client), for one SD35Deployment at a time.
//!
//! Guarantees: children are only written when they differ from what is live, so a steady
//! state makes no write calls; the serving pods are switched to a new cache or engine only once
//! it is ready; shared caches are owned by all their users (or none, when one asks to retain),
//! so Kubernetes' garbage collector deletes them with their last user.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use sd35_contract::ExitReason;
use sd35_crds::{SD35Deployment, SD35DeploymentStatus, condition};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::apply::apply_if_changed;
use crate::build::{self, ServingTarget};
use crate::config::OperatorConfig;
use crate::jobs::{JobOutcome, outcome};
use crate::labels::{self, MANAGER};
use crate::metrics::Metrics;
use crate::resolve::{Resolved, resolve};
use crate::status::{Observed, Rollout, StepState, compute, transitions};

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
    pub client: Client,
    pub config: OperatorConfig,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// All SD35Deployments, for finding the users of a shared cache.
    pub store: Store<SD35Deployment>,
    /// The children the operator watches, read instead of asking the API server.
    pub children: ChildStores,
}

/// Caches of the operator's children, filled by the controller's watches.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // Store has no Debug
pub struct ChildStores {
    pub claims: Store<PersistentVolumeClaim>,
    pub jobs: Store<Job>,
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub pdbs: Store<PodDisruptionBudget>,
    /// Serving pods, read for the exit codes of containers that could not start.
    pub pods: Store<Pod>,
}

/// The first serving container of these pods that ended with one of the server's documented
/// exit codes: its reason word and a message quoting its termination message.
pub fn server_failure<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Option<(String, String)> {
    pods.into_iter().find_map(|pod| {
        let status = pod.status.as_ref()?;
        status.container_statuses.iter().flatten().find_map(|c| {
            // A container running now has recovered; what ended it before is history.
            if c.state.as_ref().is_some_and(|s| s.running.is_some()) {
                return None;
            }
            let ended = c
                .state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .or_else(|| c.last_state.as_ref().and_then(|s| s.terminated.as_ref()))?;
            let reason = ExitReason::from_code(ended.exit_code)?;
            let said = ended
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .unwrap_or("(no termination message)");
            Some((
                reason.as_str().to_owned(),
                format!(
                    "pod {} exited with code {} ({}): {said}; {}",
                    pod.metadata.name.as_deref().unwrap_or("?"),
                    ended.exit_code,
                    reason.as_str(),
                    reason.hint()
                ),
            ))
        })
    })
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

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The SD35Deployments a Job or claim belongs to, found by its cache key label.
pub fn users_of_cache_key(
    store: &Store<SD35Deployment>,
    namespace: Option<&str>,
    key: Option<&str>,
    config: &OperatorConfig,
) -> Vec<ObjectRef<SD35Deployment>> {
    let (Some(ns), Some(key)) = (namespace, key) else {
        return Vec::new();
    };
    store
        .state()
        .iter()
        .filter(|o| o.namespace().as_deref() == Some(ns))
        .filter(|o| resolve(o, config).is_ok_and(|r| r.cache_key == key))
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

/// Owner references for a shared cache claim: every live user, or none when a user asks to
/// retain the cache.
fn cache_owners(ctx: &Context, obj: &SD35Deployment, r: &Resolved) -> Vec<OwnerReference> {
    let mut users: Vec<Arc<SD35Deployment>> = ctx
        .store
        .state()
        .into_iter()
        .filter(|o| {
            o.namespace().as_deref() == Some(r.namespace.as_str())
                && o.metadata.deletion_timestamp.is_none()
        })
        .filter(|o| resolve(o, &ctx.config).is_ok_and(|u| u.cache_key == r.cache_key))
        .collect();
    // The object being reconciled may be newer than the store.
    users.retain(|u| u.uid() != obj.uid());
    users.push(Arc::new(obj.clone()));
    if users.iter().any(|u| u.spec.cache.retain) {
        return Vec::new();
    }
    users.sort_by_key(|u| u.uid());
    users
        .iter()
        .filter_map(|u| {
            let mut o = u.controller_owner_ref(&())?;
            o.controller = Some(false);
            o.block_owner_deletion = Some(false);
            Some(o)
        })
        .collect()
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

/// A non-controller owner reference to a claim, so Jobs go with their cache.
fn claim_owner(pvc: &PersistentVolumeClaim) -> Option<OwnerReference> {
    let mut o = pvc.controller_owner_ref(&())?;
    o.controller = Some(false);
    o.block_owner_deletion = Some(false);
    Some(o)
}

/// One reconciliation's client-side work, with writes switched off when paused.
struct Run<'a> {
    ctx: &'a Context,
    obj: &'a SD35Deployment,
    r: &'a Resolved,
    owner: OwnerReference,
    write: bool,
    previous: Option<&'a SD35DeploymentStatus>,
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
        if !self.r.cache.managed || !self.write {
            return Ok(live);
        }
        let owners = cache_owners(self.ctx, self.obj, self.r);
        match live {
            None => {
                let desired = build::cache_claim(self.r, &owners);
                match api
                    .create(
                        &PostParams {
                            field_manager: Some(MANAGER.into()),
                            ..Default::default()
                        },
                        &desired,
                    )
                    .await
                {
                    Ok(created) => {
                        self.event(
                            EventType::Normal,
                            "CacheClaimCreated",
                            &format!("created cache claim {}", self.r.cache.claim),
                        )
                        .await;
                        Ok(Some(created))
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        Ok(api.get_opt(&self.r.cache.claim).await?)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Some(live) if !same_owners(live.metadata.owner_references.as_ref(), &owners) => {
                let patch = json!({"metadata": {"ownerReferences": owners}});
                Ok(Some(
                    api.patch(
                        &self.r.cache.claim,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?,
                ))
            }
            Some(live) => Ok(Some(live)),
        }
    }

    async fn annotate_claim(&self, key: &str, value: &str) -> Result<(), Error> {
        let api: Api<PersistentVolumeClaim> =
            Api::namespaced(self.ctx.client.clone(), &self.r.namespace);
        let patch = json!({"metadata": {"annotations": {key: value}}});
        api.patch(
            &self.r.cache.claim,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        Ok(())
    }

    /// Drive one Job-backed step (fetch or build) and say where it stands.
    async fn job_step(
        &self,
        name: &str,
        what: &str,
        pending: &str,
        desired: impl FnOnce() -> Job,
    ) -> Result<(StepState, bool), Error> {
        let api: Api<Job> = Api::namespaced(self.ctx.client.clone(), &self.r.namespace);
        let live = lookup(&self.ctx.children.jobs, &api, &self.r.namespace, name).await?;
        let Some(job) = live else {
            if self.write {
                apply_if_changed(&api, &desired(), None).await?;
                self.event(
                    EventType::Normal,
                    &format!("{what}Started"),
                    &format!("started Job {name}"),
                )
                .await;
            }
            return Ok((
                StepState::Pending(pending.to_owned(), format!("Job {name} is running")),
                false,
            ));
        };
        match outcome(&job, what) {
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
                if self.write && self.retry_requested() {
                    api.delete(name, &DeleteParams::background()).await?;
                    self.event(
                        EventType::Normal,
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

    async fn cache_step(&self, claim: Option<&PersistentVolumeClaim>) -> Result<StepState, Error> {
        let Some(claim) = claim else {
            return Ok(if self.r.cache.managed {
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
            });
        };
        if claim
            .annotations()
            .get(labels::CACHE_COMPLETE)
            .map(String::as_str)
            == Some("true")
        {
            return Ok(StepState::Done("Cached", String::new()));
        }
        let owner = match (self.r.cache.managed, claim_owner(claim)) {
            (true, Some(o)) => o,
            _ => self.owner.clone(),
        };
        let name = labels::fetch_job(&self.r.cache_key);
        let (state, succeeded) = self
            .job_step(&name, "Fetch", "Fetching", || {
                build::fetch_job(self.r, &self.ctx.config, &owner)
            })
            .await?;
        if succeeded {
            if self.write {
                self.annotate_claim(labels::CACHE_COMPLETE, "true").await?;
                self.event(
                    EventType::Normal,
                    "Cached",
                    &format!("model cached in claim {}", self.r.cache.claim),
                )
                .await;
            }
            return Ok(StepState::Done("Cached", String::new()));
        }
        if matches!(state, StepState::Pending(..))
            && claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending")
        {
            return Ok(StepState::Pending(
                "ClaimPending".into(),
                format!(
                    "cache claim {} is not bound yet; check its StorageClass (kubectl describe pvc {})",
                    self.r.cache.claim, self.r.cache.claim
                ),
            ));
        }
        Ok(state)
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
        if claim.annotations().get(&annotation).map(String::as_str) == Some("ready") {
            return Ok(StepState::Done("Built", String::new()));
        }
        let owner = match (self.r.cache.managed, claim_owner(claim)) {
            (true, Some(o)) => o,
            _ => self.owner.clone(),
        };
        let name = labels::build_job(key);
        let (state, succeeded) = self
            .job_step(&name, "Build", "Building", || {
                build::build_job(self.r, &self.ctx.config, &owner, key)
            })
            .await?;
        if succeeded {
            if self.write {
                self.annotate_claim(&annotation, "ready").await?;
                self.event(
                    EventType::Normal,
                    "EngineBuilt",
                    &format!("{} engine {key} built", self.r.precision.as_str()),
                )
                .await;
            }
            return Ok(StepState::Done("Built", String::new()));
        }
        Ok(state)
    }

    async fn serving(&self, ready_for_desired: bool) -> Result<Option<Rollout>, Error> {
        let client = self.ctx.client.clone();
        let ns = &self.r.namespace;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
        let live = lookup(
            &self.ctx.children.deployments,
            &deployments,
            ns,
            &self.r.name,
        )
        .await?;
        let desired_target = ServingTarget::desired(self.r);
        let target = if ready_for_desired {
            Some(desired_target.clone())
        } else {
            live.as_ref().and_then(ServingTarget::of)
        };
        let deployment = match (&target, self.write) {
            (Some(t), true) => {
                let desired = build::deployment(self.r, &self.ctx.config, &self.owner, t);
                let had = live.is_some();
                let (now, changed) = apply_if_changed(&deployments, &desired, live).await?;
                if changed && had && ServingTarget::of(&now).as_ref() == Some(&desired_target) {
                    debug!("serving Deployment updated");
                }
                if !had {
                    self.event(
                        EventType::Normal,
                        "DeploymentCreated",
                        &format!("created serving Deployment {}", self.r.name),
                    )
                    .await;
                }
                Some(now)
            }
            _ => live,
        };

        if self.write {
            let services: Api<Service> = Api::namespaced(client.clone(), ns);
            let live = lookup(&self.ctx.children.services, &services, ns, &self.r.name).await?;
            apply_if_changed(&services, &build::service(self.r, &self.owner), live).await?;
            let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client, ns);
            let live = lookup(&self.ctx.children.pdbs, &pdbs, ns, &self.r.name).await?;
            match build::pdb(self.r, &self.owner) {
                Some(desired) => {
                    apply_if_changed(&pdbs, &desired, live).await?;
                }
                None if live.is_some() => {
                    pdbs.delete(&self.r.name, &DeleteParams::background())
                        .await?;
                }
                None => {}
            }
        }

        let selector = labels::server_selector(&self.r.name);
        let pods: Vec<Arc<Pod>> = self
            .ctx
            .children
            .pods
            .state()
            .into_iter()
            .filter(|p| {
                p.metadata.namespace.as_deref() == Some(ns.as_str())
                    && selector.iter().all(|(k, v)| p.labels().get(k) == Some(v))
            })
            .collect();
        let failure = server_failure(pods.iter().map(AsRef::as_ref));
        Ok(deployment.map(|d| {
            let status = d.status.clone().unwrap_or_default();
            Rollout {
                server_failure: failure,
                runs_desired_target: ServingTarget::of(&d).as_ref() == Some(&desired_target),
                observed: status.observed_generation.unwrap_or(0)
                    >= d.metadata.generation.unwrap_or(0),
                replicas: status.replicas.unwrap_or(0),
                ready: status.ready_replicas.unwrap_or(0),
                updated: status.updated_replicas.unwrap_or(0),
                available: status.available_replicas.unwrap_or(0),
                progress_deadline_exceeded: status.conditions.unwrap_or_default().iter().any(|c| {
                    c.type_ == "Progressing"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
                }),
            }
        }))
    }

    async fn event(&self, type_: EventType, reason: &str, note: &str) {
        publish(self.ctx, self.obj, type_, reason, note).await;
    }
}

async fn publish(ctx: &Context, obj: &SD35Deployment, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.to_owned()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish event");
    }
}

/// Write the status if it changed, and report each condition transition as an event.
async fn write_status(
    ctx: &Context,
    obj: &SD35Deployment,
    status: SD35DeploymentStatus,
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
    if previous == Some(&status) {
        return Ok(());
    }
    for c in transitions(previous, &status) {
        let warning = (c.type_ == condition::STALLED && c.status == "True")
            || (c.type_ != condition::STALLED
                && c.type_ != condition::RECONCILING
                && c.status == "False"
                && previous.is_some());
        if c.type_ == condition::RECONCILING {
            continue;
        }
        let note = if c.message.is_empty() {
            format!("{} is {}", c.type_, c.status)
        } else {
            format!("{} is {}: {}", c.type_, c.status, c.message)
        };
        publish(
            ctx,
            obj,
            if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            &c.reason,
            &note,
        )
        .await;
    }
    let api: Api<SD35Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let patch =
        json!({"apiVersion": "sd35.io/v1alpha1", "kind": "SD35Deployment", "status": status});
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
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
                cache_claim: String::new(),
                cache_key: String::new(),
                engine_key: None,
                selector,
                endpoint: None,
            };
            write_status(&ctx, &obj, compute(&observed, obj.status.as_ref(), now)).await?;
            return Ok(Action::await_change());
        }
    };
    let owner = obj
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    let run = Run {
        ctx: &ctx,
        obj: &obj,
        r: &r,
        owner,
        write: !obj.spec.paused,
        previous: obj.status.as_ref(),
    };

    let claim = run.ensure_claim().await?;
    let cache = run.cache_step(claim.as_ref()).await?;
    // Re-read the claim if this run just marked the cache complete.
    let claim = if cache.is_done()
        && claim
            .as_ref()
            .is_some_and(|c| !c.annotations().contains_key(labels::CACHE_COMPLETE))
    {
        Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&r.cache.claim)
            .await?
    } else {
        claim
    };
    let engine = run.engine_step(claim.as_ref(), &cache).await?;
    let rollout = run.serving(cache.is_done() && engine.is_done()).await?;

    let observed = Observed {
        generation,
        desired_replicas: r.spec.replicas,
        paused: r.spec.paused,
        invalid: None,
        cache,
        engine,
        rollout,
        cache_claim: r.cache.claim.clone(),
        cache_key: r.cache_key.clone(),
        engine_key: r.engine_key.clone(),
        selector,
        endpoint: Some(format!("http://{name}.{ns}.svc:{}", r.spec.server.port)),
    };
    let status = compute(&observed, obj.status.as_ref(), now);
    let ready = status.phase == Some(sd35_crds::Phase::Ready);
    if obj.status.as_ref().and_then(|s| s.phase) != status.phase {
        info!(phase = ?status.phase, "phase changed");
    }
    write_status(&ctx, &obj, status).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, state: serde_json::Value, last: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"containerStatuses": [{
                "name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 3,
                "state": state, "lastState": last,
            }]},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_documented_exit_code_of_a_server_becomes_the_reason_with_its_message() {
        let crashing = pod(
            "tiny-1",
            json!({"waiting": {"reason": "CrashLoopBackOff"}}),
            json!({"terminated": {"exitCode": 17, "message": "GPUUnavailable: --device cuda: no usable GPU: no CUDA driver\n"}}),
        );
        let (reason, message) = server_failure([&crashing]).unwrap_or_default();
        assert_eq!(reason, "GPUUnavailable");
        assert!(
            message.contains("pod tiny-1 exited with code 17")
                && message.contains("no CUDA driver")
                && message.contains("device plugin"),
            "{message}"
        );
        // Running again: what ended it before is history. Unknown codes are not ours to name.
        let recovered = pod(
            "tiny-2",
            json!({"running": {}}),
            json!({"terminated": {"exitCode": 17}}),
        );
        let oom = pod(
            "tiny-3",
            json!({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}),
            json!({}),
        );
        assert_eq!(server_failure([&recovered, &oom]), None);
        let mismatch = pod("tiny-4", json!({"terminated": {"exitCode": 18}}), json!({}));
        let (reason, message) = server_failure([&recovered, &mismatch]).unwrap_or_default();
        assert_eq!(reason, "EngineMismatch");
        assert!(message.contains("(no termination message)"), "{message}");
    }
}
