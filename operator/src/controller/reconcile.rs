//! The reconciler: dereference (client) → validate (pure) → construct the children (pure) →
//! apply (client) → status (client), for one SD35Deployment at a time, in steps: the cache
//! claim, the fetch Job, the engine build Job, the adapters' fetch Jobs, the serving children
//! and add-ons, the status.
//!
//! Guarantees: every write goes through one [`Applier`], whose strategy is `Observe` while the
//! object is paused; children are only written when they differ from what is live, so a
//! steady state makes no write calls; children the spec no longer wants are swept by label
//! and owner; the serving pods are switched to a new cache or engine only once it is ready.
//! Shared caches and their Jobs are owned by all their users, so Kubernetes' garbage collector
//! deletes them with their last user; a newcomer of the same model waits for a claim being
//! deleted to go, and says so. Lookups of related objects go through indexes, never a scan of
//! a whole cache, so the work of a reconcile does not grow with the number of objects. A
//! failure names its step and its object, in logs and in the `error` label of the metrics.

mod adapters;
mod build;
mod claim;
mod controlled;
mod fetch;
mod job;
mod report;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use sd35_crds::{Phase, SD35Deployment, SD35DeploymentStatus, condition};
use tracing::{info, warn};

use super::context::Context;
use crate::apply::{Applier, Strategy};
use crate::index::namespaced;
use crate::labels;
use crate::resolve::{InvalidSpec, Resolved, resolve};
use crate::status::{Addons, Note, Observed, StepState, compute};

/// Errors of a reconciliation, one variant per step, each naming the object; the variant
/// names are the `error` label of the metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading, creating, re-owning or growing the cache claim.
    #[error("{object}: cache claim: {source}")]
    Claim {
        object: ObjectRef<SD35Deployment>,
        source: kube::Error,
    },
    /// Running the fetch Job or recording the complete cache on the claim.
    #[error("{object}: fetch Job: {source}")]
    Fetch {
        object: ObjectRef<SD35Deployment>,
        source: kube::Error,
    },
    /// Running the engine build Job or recording the engine on the claim.
    #[error("{object}: engine build Job: {source}")]
    Build {
        object: ObjectRef<SD35Deployment>,
        source: kube::Error,
    },
    /// Running an adapter's fetch Job or recording the adapter on the claim.
    #[error("{object}: adapter fetch Job: {source}")]
    Adapters {
        object: ObjectRef<SD35Deployment>,
        source: kube::Error,
    },
    /// Applying or sweeping the serving Deployment, Service or PodDisruptionBudget.
    #[error("{object}: serving children: {source}")]
    Serving {
        object: ObjectRef<SD35Deployment>,
        source: kube::Error,
    },
    /// Applying or sweeping the NetworkPolicy or ServiceMonitor.
    #[error("{object}: add-ons: {source}")]
    Addons {
        object: ObjectRef<SD35Deployment>,
        source: kube::Error,
    },
    /// Writing the status.
    #[error("{object}: status: {source}")]
    Status {
        object: ObjectRef<SD35Deployment>,
        source: kube::Error,
    },
    /// The object lacks a field the API server always sets.
    #[error("{object} has no {field}")]
    MissingField {
        object: ObjectRef<SD35Deployment>,
        field: &'static str,
    },
}

impl Error {
    /// The metric label of the error: its variant's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Claim { .. } => "Claim",
            Error::Fetch { .. } => "Fetch",
            Error::Build { .. } => "Build",
            Error::Adapters { .. } => "Adapters",
            Error::Serving { .. } => "Serving",
            Error::Addons { .. } => "Addons",
            Error::Status { .. } => "Status",
            Error::MissingField { .. } => "MissingField",
        }
    }
}

/// The steps of a reconcile that talk to the API server; each fails as its own [`Error`].
#[derive(Clone, Copy, Debug)]
enum Step {
    Claim,
    Fetch,
    Build,
    Adapters,
    Serving,
    Addons,
    Status,
}

impl Step {
    /// The error of this step on `object`.
    fn error(self, object: ObjectRef<SD35Deployment>, source: kube::Error) -> Error {
        match self {
            Step::Claim => Error::Claim { object, source },
            Step::Fetch => Error::Fetch { object, source },
            Step::Build => Error::Build { object, source },
            Step::Adapters => Error::Adapters { object, source },
            Step::Serving => Error::Serving { object, source },
            Step::Addons => Error::Addons { object, source },
            Step::Status => Error::Status { object, source },
        }
    }
}

/// One reconciliation of one SD35Deployment: what its steps share. Their writes go through
/// `apply`; what they did is noted for the reconcile's one event.
struct Reconciliation<'a> {
    ctx: &'a Context,
    /// The object, for errors.
    object: ObjectRef<SD35Deployment>,
    resolved: &'a Resolved,
    /// The owner reference of the children it controls.
    owner: OwnerReference,
    apply: Applier,
    previous: Option<&'a SD35DeploymentStatus>,
    /// Owners of the cache claim: every user, or none when one asks to retain it.
    claim_owners: Vec<OwnerReference>,
    /// Owners of the fetch and build Jobs: every user, so that no Job (and no completed pod
    /// of one, which holds the volume) outlives the last user of its cache.
    job_owners: Vec<OwnerReference>,
    /// What this reconcile did, told in its one event.
    actions: Mutex<Vec<Note>>,
}

impl Reconciliation<'_> {
    /// Maps a client error of `step` to its [`Error`].
    fn failed(&self, step: Step) -> impl FnOnce(kube::Error) -> Error + '_ {
        move |source| step.error(self.object.clone(), source)
    }

    /// Whether the user asked for a retry since a failure was reported: the spec changed after
    /// the Stalled condition was set.
    fn retry_requested(&self) -> bool {
        self.previous
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == condition::STALLED))
            .is_some_and(|c| {
                c.status == "True" && c.observed_generation.unwrap_or(0) < self.resolved.generation
            })
    }

    /// Notes an action for this reconcile's event.
    fn note(&self, reason: &str, text: &str) {
        if let Ok(mut actions) = self.actions.lock() {
            actions.push(Note {
                warning: false,
                reason: reason.to_owned(),
                text: text.to_owned(),
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

/// A non-controller owner reference to `obj`.
fn shared_owner(obj: &SD35Deployment) -> Option<OwnerReference> {
    let mut o = obj.controller_owner_ref(&())?;
    o.controller = Some(false);
    o.block_owner_deletion = Some(false);
    Some(o)
}

/// The live users of this object's cache (itself included, as reconciled now), by UID.
fn cache_users(
    ctx: &Context,
    obj: &SD35Deployment,
    resolved: &Resolved,
) -> Vec<Arc<SD35Deployment>> {
    let mut users: Vec<Arc<SD35Deployment>> = ctx
        .users
        .get(&namespaced(&resolved.namespace, &resolved.cache_key))
        .iter()
        .filter_map(|u| ctx.store.get(u))
        .filter(|o| o.metadata.deletion_timestamp.is_none() && o.uid() != obj.uid())
        .collect();
    // The object being reconciled may be newer than the store.
    users.push(Arc::new(obj.clone()));
    users.sort_by_key(|u| u.uid());
    users
}

/// The status of a spec that cannot be acted on: every step waits for the field to be fixed.
fn invalid_spec(obj: &SD35Deployment, invalid: InvalidSpec, selector: String) -> Observed {
    Observed {
        generation: obj.metadata.generation.unwrap_or(0),
        desired_replicas: obj.spec.replicas,
        paused: obj.spec.paused,
        invalid: Some(invalid.0.clone()),
        cache: StepState::Pending("InvalidSpec".into(), invalid.0.clone()),
        engine: StepState::Pending("InvalidSpec".into(), invalid.0),
        rollout: None,
        addons: Addons::default(),
        adapters: Vec::new(),
        gpu: None,
        cache_claim: String::new(),
        cache_key: String::new(),
        engine_key: None,
        selector,
        endpoint: None,
    }
}

/// Reconcile one SD35Deployment.
pub async fn reconcile(obj: Arc<SD35Deployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let object = ObjectRef::from_obj(obj.as_ref());
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
    let missing = |field| Error::MissingField {
        object: object.clone(),
        field,
    };
    let ns = obj
        .namespace()
        .ok_or_else(|| missing("metadata.namespace"))?;
    let selector = labels::selector_string(&name);

    ctx.metrics.spec_resolved();
    let resolved = match resolve(&obj, &ctx.config) {
        Ok(resolved) => resolved,
        Err(invalid) => {
            let status = compute(
                &invalid_spec(&obj, invalid, selector),
                obj.status.as_ref(),
                now,
            );
            report::write_status(&ctx, &obj, &ns, status, Vec::new())
                .await
                .map_err(|source| Step::Status.error(object.clone(), source))?;
            return Ok(Action::await_change());
        }
    };
    let owner = obj
        .controller_owner_ref(&())
        .ok_or_else(|| missing("metadata.uid"))?;
    let users = cache_users(&ctx, &obj, &resolved);
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
    let run = Reconciliation {
        ctx: &ctx,
        object: object.clone(),
        resolved: &resolved,
        owner,
        apply: Applier::new(ctx.client.clone(), &ns, strategy),
        previous: obj.status.as_ref(),
        claim_owners,
        job_owners,
        actions: Mutex::new(Vec::new()),
    };

    let claim = run.ensure_claim().await.map_err(run.failed(Step::Claim))?;
    let (cache, claim) = run.fetch_step(claim).await?;
    let engine = run
        .build_step(claim.as_ref(), &cache)
        .await
        .map_err(run.failed(Step::Build))?;
    let adapter_states = run
        .adapters_step(claim.as_ref())
        .await
        .map_err(run.failed(Step::Adapters))?;
    let (rollout, addons) = run
        .controlled_step(
            cache.is_done() && engine.is_done(),
            adapters::served(&resolved, &adapter_states),
        )
        .await?;

    let observed = Observed {
        generation,
        desired_replicas: resolved.spec.replicas,
        paused: resolved.spec.paused,
        invalid: None,
        cache,
        engine,
        rollout,
        addons,
        adapters: adapter_states,
        gpu: report::gpu_report(&ctx.children, &resolved),
        cache_claim: resolved.cache.claim.clone(),
        cache_key: resolved.cache_key.clone(),
        engine_key: resolved.engine_key.clone(),
        selector,
        endpoint: Some(format!(
            "http://{name}.{ns}.svc:{}",
            resolved.spec.server.port
        )),
    };
    let status = compute(&observed, obj.status.as_ref(), now);
    let ready = matches!(status.phase, Some(Phase::Ready | Phase::ScaledToZero));
    if obj.status.as_ref().and_then(|s| s.phase) != status.phase {
        info!(phase = ?status.phase, "phase changed");
    }
    report::write_status(&ctx, &obj, &ns, status, run.take_actions())
        .await
        .map_err(run.failed(Step::Status))?;
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
