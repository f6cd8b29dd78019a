//! The build step: once the cache is complete, the engine build Job builds the engine of the
//! engine key and the claim records it ready; with `engine.build: Never` there is none.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;

use super::Reconciliation;
use super::job::JobProgress;
use crate::children;
use crate::claims::{engine_recorded, records_after_build, records_of_built_engine};
use crate::jobs::JobKind;
use crate::labels;
use crate::status::StepState;

impl Reconciliation<'_> {
    /// The build step, after the fetch step said `cache`.
    pub(super) async fn build_step(
        &self,
        claim: Option<&PersistentVolumeClaim>,
        cache: &StepState,
    ) -> kube::Result<StepState> {
        let resolved = self.resolved;
        let Some(key) = &resolved.engine_key else {
            return Ok(StepState::Done(
                "NotRequired",
                format!(
                    "spec.engine.build is Never: serving pods load the cached weights and \
                     convert them to {} at start-up (slower starts; set engine.build: Auto to \
                     prebuild)",
                    resolved.precision
                ),
            ));
        };
        let Some(claim) = claim.filter(|_| cache.is_done()) else {
            return Ok(StepState::Pending(
                "WaitingForCache".into(),
                "the engine is built once the cache is complete".into(),
            ));
        };
        let built = || {
            StepState::Done(
                "Built",
                format!("{} engine {key} built", resolved.precision.as_str()),
            )
        };
        if engine_recorded(claim, key) {
            self.record_on_claim(claim, &records_of_built_engine(claim))
                .await?;
            return Ok(built());
        }
        let job = labels::build_job(key);
        let claim_uid = claim.uid().unwrap_or_default();
        let progress = self
            .drive_job(JobKind::Build, &job, claim, || {
                children::build_job(
                    resolved,
                    &self.ctx.config,
                    &self.job_owners,
                    &claim_uid,
                    key,
                )
            })
            .await?;
        match progress {
            JobProgress::Succeeded => {
                self.record_on_claim(claim, &records_after_build(claim, key))
                    .await?;
                Ok(built())
            }
            JobProgress::Waiting(state) => Ok(state),
        }
    }
}
