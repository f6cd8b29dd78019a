//! Compute the status of an SD35Deployment from what was observed (pure).
//!
//! Conditions follow kstatus: `Ready` is True only when the latest generation is observed and
//! every desired replica runs the desired target (with every adapter of the spec) and is
//! available; `Reconciling` is True while work is in flight; `Stalled` is True when nothing
//! will change without a change to the spec or the cluster. A failed adapter stalls only
//! itself: the model and the other adapters are served, and it is reported as `Stalled` once
//! nothing else is in progress (phase `Degraded`: serving, not everything asked for). A condition keeps its transition time while its status does not change, so
//! a steady state computes exactly the status it already has.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use sd35_crds::{
    AdapterKind, AdapterStatus, CacheStatus, EngineStatus, Phase, SD35DeploymentStatus, condition,
};

use crate::children::ServingTarget;

mod event;

pub use event::{Note, event, is_warning, transitions};

/// State of a fetch or build step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepState {
    /// Done; the reason says how (`Cached`, `Built`, `NotRequired`), the message anything a
    /// person should know about it (empty when nothing).
    Done(&'static str, String),
    /// In progress or waiting; reason and message say for what.
    Pending(String, String),
    /// Failed with its retries spent; reason and message name the cause and the fix.
    Failed(String, String),
}

impl StepState {
    pub fn is_done(&self) -> bool {
        matches!(self, StepState::Done(..))
    }
}

/// The serving Deployment as observed after this reconcile's apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rollout {
    /// Whether the Deployment runs the desired target (cache and engine of the current spec).
    pub runs_desired_target: bool,
    /// Whether the Deployment controller has observed the Deployment's latest generation.
    pub observed: bool,
    pub replicas: i32,
    pub ready: i32,
    pub updated: i32,
    pub available: i32,
    /// The Deployment's own progress deadline was exceeded.
    pub progress_deadline_exceeded: bool,
    /// A serving container that exited with one of the server's documented codes: the
    /// reason word (`GPUUnavailable`, `EngineMismatch`, …) and a message quoting the
    /// container's termination message.
    pub server_failure: Option<(String, String)>,
}

impl Rollout {
    /// The rollout of `deployment` towards `desired`, with the failure of any of its `pods`.
    pub fn of<'a>(
        deployment: &Deployment,
        desired: &ServingTarget,
        pods: impl IntoIterator<Item = &'a Pod>,
    ) -> Self {
        let status = deployment.status.clone().unwrap_or_default();
        Rollout {
            server_failure: crate::pods::server_failure(pods),
            runs_desired_target: ServingTarget::of(deployment).as_ref() == Some(desired),
            observed: status.observed_generation.unwrap_or(0)
                >= deployment.metadata.generation.unwrap_or(0),
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
    }
}

/// One adapter or ControlNet of the spec and where its fetch stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterState {
    pub kind: AdapterKind,
    /// The adapter's name, or the ControlNet's mode.
    pub name: String,
    /// Its key.
    pub key: String,
    /// Done once cached (`Cached`), pending while its Job runs, failed with the Job's reason.
    pub state: StepState,
}

impl AdapterState {
    /// `lora detail`, `controlnet canny`: how messages name it.
    fn what(&self) -> String {
        format!("{} {}", self.kind, self.name)
    }

    fn status(&self) -> AdapterStatus {
        let (reason, message) = match &self.state {
            StepState::Done(reason, message) => ((*reason).to_owned(), message.clone()),
            StepState::Pending(reason, message) | StepState::Failed(reason, message) => {
                (reason.clone(), message.clone())
            }
        };
        AdapterStatus {
            kind: self.kind,
            name: self.name.clone(),
            key: self.key.clone(),
            ready: self.state.is_done(),
            reason,
            message,
        }
    }
}

/// The adapters' condition, and how they bear on Ready: those still fetched and those failed.
struct AdaptersView<'a> {
    pending: Vec<&'a AdapterState>,
    failed: Vec<&'a AdapterState>,
    all: &'a [AdapterState],
}

impl<'a> AdaptersView<'a> {
    fn of(all: &'a [AdapterState]) -> Self {
        Self {
            pending: all
                .iter()
                .filter(|a| matches!(a.state, StepState::Pending(..)))
                .collect(),
            failed: all
                .iter()
                .filter(|a| matches!(a.state, StepState::Failed(..)))
                .collect(),
            all,
        }
    }

    /// `lora a: <reason>: <message>; controlnet canny: ...` of `which`.
    fn told(which: &[&AdapterState], with_reason: bool) -> String {
        which
            .iter()
            .map(|a| match &a.state {
                StepState::Pending(reason, message) | StepState::Failed(reason, message)
                    if with_reason =>
                {
                    format!("{}: {reason}: {message}", a.what())
                }
                StepState::Pending(_, message) | StepState::Failed(_, message) => {
                    format!("{}: {message}", a.what())
                }
                StepState::Done(..) => a.what(),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Why Ready waits on the adapters while one is fetched.
    fn fetching(&self) -> Option<(String, String)> {
        (!self.pending.is_empty()).then(|| {
            (
                "FetchingAdapters".to_owned(),
                Self::told(&self.pending, false),
            )
        })
    }

    /// What the failed adapters stall, once nothing else is in progress.
    fn stalled(&self) -> Option<(String, String)> {
        (!self.failed.is_empty()).then(|| {
            let served = self.all.len() - self.failed.len() - self.pending.len();
            (
                "AdapterFailed".to_owned(),
                format!(
                    "{}; the model and {served} other adapter(s) are served; fix the source \
                     in the spec (or delete the failed Job) to retry",
                    Self::told(&self.failed, true)
                ),
            )
        })
    }

    fn condition(&self, generation: i64, now: &Time) -> Condition {
        let (status, reason, message) = if self.all.is_empty() {
            (true, "NoneRequested", String::new())
        } else if !self.failed.is_empty() {
            (false, "AdapterFailed", Self::told(&self.failed, true))
        } else if !self.pending.is_empty() {
            (false, "Fetching", Self::told(&self.pending, false))
        } else {
            let names: Vec<String> = self.all.iter().map(AdapterState::what).collect();
            (true, "Cached", format!("cached: {}", names.join(", ")))
        };
        cond(
            condition::ADAPTERS_READY,
            status,
            reason,
            &message,
            generation,
            now,
        )
    }
}

/// The add-ons the spec asks for (ServiceMonitor, NetworkPolicy) and what became of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Addons {
    /// Add-ons in place, by kind.
    pub applied: Vec<&'static str>,
    /// Add-ons skipped, each with why (for example, its CRD is not installed).
    pub skipped: Vec<String>,
}

impl Addons {
    fn condition(&self, generation: i64, now: &Time) -> Condition {
        if !self.skipped.is_empty() {
            cond(
                condition::ADDONS_READY,
                false,
                "Skipped",
                &self.skipped.join("; "),
                generation,
                now,
            )
        } else if self.applied.is_empty() {
            cond(
                condition::ADDONS_READY,
                true,
                "NoneRequested",
                "",
                generation,
                now,
            )
        } else {
            cond(
                condition::ADDONS_READY,
                true,
                "Applied",
                &format!("{} in place", self.applied.join(" and ")),
                generation,
                now,
            )
        }
    }
}

/// Everything the status is computed from.
#[derive(Clone, Debug)]
pub struct Observed {
    pub generation: i64,
    pub desired_replicas: i32,
    pub paused: bool,
    /// Set when the spec cannot be acted on; the message names the field.
    pub invalid: Option<String>,
    pub cache: StepState,
    pub engine: StepState,
    pub rollout: Option<Rollout>,
    /// The add-ons; they never hold up Ready.
    pub addons: Addons,
    /// The adapters and ControlNets of the spec (none for an invalid spec).
    pub adapters: Vec<AdapterState>,
    /// The GPUs the serving pods get, when they request GPUs; never holds up Ready.
    pub gpu: Option<crate::gpu::GpuReport>,
    pub cache_claim: String,
    pub cache_key: String,
    pub engine_key: Option<String>,
    pub selector: String,
    pub endpoint: Option<String>,
}

fn cond(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: i64,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.chars().take(32 * 1024).collect(),
        observed_generation: Some(generation),
        last_transition_time: now.clone(),
    }
}

fn step_condition(type_: &str, step: &StepState, generation: i64, now: &Time) -> Condition {
    match step {
        StepState::Done(reason, message) => cond(type_, true, reason, message, generation, now),
        StepState::Pending(reason, message) | StepState::Failed(reason, message) => {
            cond(type_, false, reason, message, generation, now)
        }
    }
}

/// The status for `o`, keeping transition times from `previous` where nothing changed.
pub fn compute(
    o: &Observed,
    previous: Option<&SD35DeploymentStatus>,
    now: Time,
) -> SD35DeploymentStatus {
    let g = o.generation;
    let r = o.rollout.clone().unwrap_or_default();
    let rolled_out = o.rollout.is_some()
        && r.runs_desired_target
        && r.observed
        && r.updated == o.desired_replicas
        && r.available == o.desired_replicas
        && r.replicas == o.desired_replicas;

    // What blocks Ready, first blocker first; None when Ready.
    let base_stalled: Option<(String, String)> = if let Some(msg) = &o.invalid {
        Some(("InvalidSpec".into(), msg.clone()))
    } else if let StepState::Failed(reason, msg) = &o.cache {
        Some((reason.clone(), msg.clone()))
    } else if let StepState::Failed(reason, msg) = &o.engine {
        Some((reason.clone(), msg.clone()))
    } else if let Some((reason, msg)) = r.server_failure.as_ref().filter(|_| !rolled_out) {
        Some((reason.clone(), msg.clone()))
    } else if r.progress_deadline_exceeded && !rolled_out {
        Some(("ProgressDeadlineExceeded".into(), "the serving pods did not become available within the progress deadline; see kubectl describe deployment".into()))
    } else {
        None
    };
    let adapters = AdaptersView::of(&o.adapters);
    // Work in flight, first first: the cache, the engine, the rollout, then the adapters.
    let progress: Option<(String, String)> = if let StepState::Pending(reason, msg) = &o.cache {
        Some((reason.clone(), msg.clone()))
    } else if let StepState::Pending(reason, msg) = &o.engine {
        Some((reason.clone(), msg.clone()))
    } else if !rolled_out {
        Some((
            "RollingOut".into(),
            format!(
                "{} of {} replicas updated and available",
                r.available.min(r.updated),
                o.desired_replicas
            ),
        ))
    } else {
        adapters.fetching()
    };
    // A failed adapter stalls the object only once nothing else moves: until then the model's
    // own progress is what Ready reports (and AdaptersReady says what failed).
    let adapter_stalled = base_stalled.is_none() && progress.is_none();
    let stalled = base_stalled.or_else(|| adapters.stalled().filter(|_| adapter_stalled));
    let adapter_stalled = adapter_stalled && stalled.is_some();
    let not_ready: Option<(String, String)> = if o.paused {
        Some((
            "Paused".into(),
            "spec.paused is true: the operator changes nothing".into(),
        ))
    } else if let Some(s) = &stalled {
        Some(s.clone())
    } else {
        progress
    };

    let scaled_to_zero = not_ready.is_none() && o.desired_replicas == 0;
    let mut conditions = vec![
        match &not_ready {
            // Healthy for kstatus and Argo CD: nothing is wrong, nothing is pending.
            None if scaled_to_zero => cond(
                condition::READY,
                true,
                "ScaledToZero",
                "spec.replicas is 0: no serving pod runs; the cache and the engine are kept, \
                 so scaling up serves again without fetching or building",
                g,
                &now,
            ),
            None => cond(
                condition::READY,
                true,
                "Ready",
                &format!(
                    "{} of {} replicas available",
                    r.available, o.desired_replicas
                ),
                g,
                &now,
            ),
            Some((reason, msg)) => cond(condition::READY, false, reason, msg, g, &now),
        },
        match (&not_ready, &stalled, o.paused) {
            (Some((reason, msg)), None, false) => {
                cond(condition::RECONCILING, true, reason, msg, g, &now)
            }
            _ => cond(condition::RECONCILING, false, "Idle", "", g, &now),
        },
        match &stalled {
            Some((reason, msg)) => cond(condition::STALLED, true, reason, msg, g, &now),
            None => cond(condition::STALLED, false, "Progressing", "", g, &now),
        },
        step_condition(condition::CACHE_READY, &o.cache, g, &now),
        step_condition(condition::ENGINE_READY, &o.engine, g, &now),
    ];
    conditions.push(match &o.rollout {
        None => cond(
            condition::AVAILABLE,
            false,
            "NoDeployment",
            "the serving Deployment is created once cache and engine are ready",
            g,
            &now,
        ),
        Some(_) if o.desired_replicas == 0 => {
            cond(condition::AVAILABLE, true, "ScaledToZero", "", g, &now)
        }
        Some(r) if r.available > 0 => cond(
            condition::AVAILABLE,
            true,
            "ReplicasAvailable",
            &format!(
                "{} of {} replicas available",
                r.available, o.desired_replicas
            ),
            g,
            &now,
        ),
        Some(Rollout {
            server_failure: Some((reason, msg)),
            ..
        }) => cond(condition::AVAILABLE, false, reason, msg, g, &now),
        Some(_) => cond(
            condition::AVAILABLE,
            false,
            "NoReplicasAvailable",
            "no serving pod is available yet",
            g,
            &now,
        ),
    });

    conditions.push(adapters.condition(g, &now));
    conditions.push(o.addons.condition(g, &now));
    if let Some(gpu) = &o.gpu {
        conditions.push(Condition {
            type_: condition::GPU_COMPATIBLE.to_owned(),
            status: gpu.status.to_owned(),
            reason: gpu.reason.to_owned(),
            message: gpu.message.chars().take(32 * 1024).collect(),
            observed_generation: Some(g),
            last_transition_time: now.clone(),
        });
    }

    // Keep the transition time of a condition whose status did not change.
    if let Some(prev) = previous {
        for c in &mut conditions {
            if let Some(p) = prev.conditions.iter().find(|p| p.type_ == c.type_)
                && p.status == c.status
            {
                c.last_transition_time = p.last_transition_time.clone();
            }
        }
    }

    let phase = if o.paused {
        Phase::Paused
    } else if adapter_stalled {
        // Serving, but not everything the spec asks for.
        Phase::Degraded
    } else if stalled.is_some() {
        Phase::Failed
    } else if !o.cache.is_done() {
        Phase::Caching
    } else if !o.engine.is_done() {
        Phase::Building
    } else if rolled_out && !adapters.pending.is_empty() {
        Phase::Caching
    } else if rolled_out && scaled_to_zero {
        Phase::ScaledToZero
    } else if rolled_out {
        Phase::Ready
    } else if r.runs_desired_target
        && r.observed
        && r.updated == o.desired_replicas
        && r.available < o.desired_replicas
        && r.replicas == o.desired_replicas
    {
        Phase::Degraded
    } else {
        Phase::Deploying
    };

    SD35DeploymentStatus {
        observed_generation: Some(g),
        conditions,
        phase: Some(phase),
        replicas: r.replicas,
        ready_replicas: r.ready,
        updated_replicas: r.updated,
        available_replicas: r.available,
        selector: Some(o.selector.clone()),
        cache: Some(CacheStatus {
            claim_name: o.cache_claim.clone(),
            key: o.cache_key.clone(),
            ready: o.cache.is_done(),
        }),
        engine: o.engine_key.as_ref().map(|k| EngineStatus {
            key: k.clone(),
            ready: o.engine.is_done(),
        }),
        endpoint: o.endpoint.clone(),
        adapters: o.adapters.iter().map(AdapterState::status).collect(),
    }
}

#[cfg(test)]
pub(crate) mod tests;
