//! Driving a fetch or build Job, shared by the fetch and build steps: start it when missing,
//! clear one of an earlier claim, keep its owners every user of the cache, read where it
//! stands (in the words its last failed attempt wrote), and run it again when the user
//! changed the spec after it failed.

use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::Api;
use serde_json::json;

use super::Reconciliation;
use crate::apply::same_owners;
use crate::controller::context::lookup;
use crate::index::namespaced;
use crate::jobs::{self, JobKind, JobOutcome};
use crate::pods::{AttemptFailure, last_attempt_failure};
use crate::status::StepState;

/// Where a step stands with its Job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum JobProgress {
    /// The Job succeeded: the step records it and says what is done.
    Succeeded,
    /// Not (yet) done: the step's state.
    Waiting(StepState),
}

impl Reconciliation<'_> {
    /// How the last failed attempt of the Job `name` ended, from its pods in the cache.
    fn last_attempt_failure(&self, kind: JobKind, name: &str) -> Option<AttemptFailure> {
        let children = &self.ctx.children;
        let pods: Vec<Arc<Pod>> = children
            .pods_by_job
            .get(&namespaced(&self.resolved.namespace, name))
            .iter()
            .filter_map(|p| children.pods.get(p))
            .collect();
        last_attempt_failure(pods.iter().map(AsRef::as_ref), kind.container())
    }

    /// Drives the Job `name` of `kind` on `claim` (`desired` when it must be created) and says
    /// where the step stands.
    pub(super) async fn drive_job(
        &self,
        kind: JobKind,
        name: &str,
        claim: &PersistentVolumeClaim,
        desired: impl FnOnce() -> Job,
    ) -> kube::Result<JobProgress> {
        let namespace = &self.resolved.namespace;
        let api: Api<Job> = Api::namespaced(self.ctx.client.clone(), namespace);
        let live = lookup(&self.ctx.children.jobs, &api, namespace, name).await?;
        let Some(job) = live else {
            let (_, written) = self.apply.apply(desired(), None).await?;
            if written {
                self.note(
                    &format!("{}Started", kind.word()),
                    &format!("started Job {name}"),
                );
            }
            return Ok(JobProgress::Waiting(jobs::started(kind, name)));
        };
        if !jobs::is_for_claim(&job, &claim.uid().unwrap_or_default()) {
            // A Job of an earlier claim of this name: it says nothing about this one.
            if job.metadata.deletion_timestamp.is_none() {
                self.apply.delete::<Job>(name).await?;
            }
            return Ok(JobProgress::Waiting(jobs::stale(name)));
        }
        let outcome = jobs::outcome(&job, kind, self.last_attempt_failure(kind, name).as_ref());
        if matches!(outcome, JobOutcome::Running { .. })
            && !same_owners(job.metadata.owner_references.as_ref(), &self.job_owners)
        {
            let patch = json!({"metadata": {"ownerReferences": self.job_owners}});
            self.apply.merge_patch::<Job>(name, &patch).await?;
        }
        if matches!(outcome, JobOutcome::Failed { .. })
            && self.retry_requested()
            && self.apply.delete::<Job>(name).await?
        {
            self.note(
                &format!("{}Retried", kind.word()),
                &format!("spec changed: retrying Job {name}"),
            );
            return Ok(JobProgress::Waiting(jobs::retrying(name)));
        }
        Ok(match jobs::step_state(kind, name, &outcome) {
            None => JobProgress::Succeeded,
            Some(state) => JobProgress::Waiting(state),
        })
    }
}
