//! The adapters step: each adapter and ControlNet of the spec is fetched into the cache claim,
//! beside the model, by a Job of its own (started as soon as the claim is there, alongside the
//! model's fetch), and recorded on the claim once cached; the step says where each stands.
//!
//! Guarantees: a failed adapter fails its own Job and its own entry, nothing else; the model's
//! fetch, build and rollout never wait for an adapter; a cached adapter is never fetched again
//! (its record on the claim is read first), whatever else changes in the spec.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;

use super::Reconciliation;
use super::job::JobProgress;
use crate::children::{self, ServedAdapter};
use crate::claims::{adapter_recorded, records_after_adapter};
use crate::jobs::JobKind;
use crate::labels;
use crate::status::{AdapterState, StepState};

/// The adapters the serving pods may load: those of `states` that are cached, in spec order.
pub(super) fn served(
    resolved: &crate::resolve::Resolved,
    states: &[AdapterState],
) -> Vec<ServedAdapter> {
    resolved
        .adapters
        .iter()
        .zip(states)
        .filter(|(_, state)| state.state.is_done())
        .map(|(adapter, _)| ServedAdapter::of(adapter))
        .collect()
}

impl Reconciliation<'_> {
    /// The adapters step, on the cache claim as the fetch step left it.
    pub(super) async fn adapters_step(
        &self,
        claim: Option<&PersistentVolumeClaim>,
    ) -> kube::Result<Vec<AdapterState>> {
        let resolved = self.resolved;
        let name = &resolved.cache.claim;
        let mut claim = claim
            .filter(|c| c.metadata.deletion_timestamp.is_none())
            .cloned();
        let mut states = Vec::with_capacity(resolved.adapters.len());
        for adapter in &resolved.adapters {
            let cached = || StepState::Done("Cached", format!("cached in claim {name}"));
            let state = match claim.clone() {
                None => StepState::Pending(
                    "WaitingForClaim".into(),
                    format!("fetched once cache claim {name} is there"),
                ),
                Some(c) if adapter_recorded(&c, &adapter.key) => cached(),
                Some(c) => {
                    let job = labels::adapter_job(&adapter.key);
                    let claim_uid = c.uid().unwrap_or_default();
                    let progress = self
                        .drive_job(JobKind::Adapter, &job, &c, || {
                            children::adapter_job(
                                resolved,
                                &self.ctx.config,
                                &self.job_owners,
                                &claim_uid,
                                adapter,
                            )
                        })
                        .await?;
                    match progress {
                        JobProgress::Succeeded => {
                            let records = records_after_adapter(&adapter.key);
                            claim = Some(self.record_on_claim(&c, &records).await?);
                            cached()
                        }
                        JobProgress::Waiting(state) => state,
                    }
                }
            };
            states.push(AdapterState {
                kind: adapter.kind,
                name: adapter.name.clone(),
                key: adapter.key.clone(),
                state,
            });
        }
        Ok(states)
    }
}
