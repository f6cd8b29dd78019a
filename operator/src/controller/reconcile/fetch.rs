//! The fetch step: the cache claim is there (and not going), grown as asked, and filled by
//! the fetch Job; the step says where the cache stands.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;

use super::job::JobProgress;
use super::{Error, Reconciliation, Step};
use crate::children;
use crate::claims::{self, cache_recorded, records_after_fetch};
use crate::jobs::JobKind;
use crate::labels;
use crate::status::StepState;

impl Reconciliation<'_> {
    /// The fetch step, and the claim as it is after it.
    pub(super) async fn fetch_step(
        &self,
        claim: Option<PersistentVolumeClaim>,
    ) -> Result<(StepState, Option<PersistentVolumeClaim>), Error> {
        let resolved = self.resolved;
        let name = &resolved.cache.claim;
        let Some(claim) = claim else {
            return Ok((
                if resolved.cache.managed {
                    StepState::Pending(
                        "ClaimPending".into(),
                        format!("cache claim {name} is being created"),
                    )
                } else {
                    StepState::Failed(
                        "ClaimNotFound".into(),
                        format!(
                            "spec.cache.existingClaim {name} does not exist in this namespace; create it or unset the field"
                        ),
                    )
                },
                None,
            ));
        };
        if claim.metadata.deletion_timestamp.is_some() {
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
        let (claim, growth) = if resolved.cache.managed {
            self.grow_claim(claim)
                .await
                .map_err(self.failed(Step::Claim))?
        } else {
            (claim, None)
        };
        let done = |growth: Option<(&'static str, String)>| match growth {
            Some((reason, message)) => StepState::Done(reason, message),
            None => StepState::Done("Cached", format!("model cached in claim {name}")),
        };
        if cache_recorded(&claim) {
            return Ok((done(growth), Some(claim)));
        }
        let job = labels::fetch_job(&resolved.cache_key);
        let claim_uid = claim.uid().unwrap_or_default();
        let progress = self
            .drive_job(JobKind::Fetch, &job, &claim, || {
                children::fetch_job(resolved, &self.ctx.config, &self.job_owners, &claim_uid)
            })
            .await
            .map_err(self.failed(Step::Fetch))?;
        match progress {
            JobProgress::Succeeded => {
                let records = records_after_fetch(resolved.engine_key.as_deref());
                let claim = self
                    .record_on_claim(&claim, &records)
                    .await
                    .map_err(self.failed(Step::Fetch))?;
                Ok((done(growth), Some(claim)))
            }
            JobProgress::Waiting(state) => {
                // A claim is Pending for a moment after it is created; only one that stays so
                // is worth a status of its own.
                let pending = matches!(state, StepState::Pending(..))
                    && claims::pending_too_long(&claim, k8s_openapi::jiff::Timestamp::now());
                if pending {
                    let state =
                        StepState::Pending("ClaimPending".into(), claims::pending_message(name));
                    return Ok((state, Some(claim)));
                }
                Ok((state, Some(claim)))
            }
        }
    }
}
