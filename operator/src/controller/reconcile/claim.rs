//! The claim step: the cache claim exists, is owned by every user of its cache (or by none
//! when one asks to retain it), and grows to `spec.cache.size` where its StorageClass allows.
//! Also the one way facts about the cache are recorded on the claim.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::Api;
use serde_json::json;

use super::Reconciliation;
use crate::apply::same_owners;
use crate::children;
use crate::claims::{Growth, Record, growth};
use crate::controller::context::lookup;

impl Reconciliation<'_> {
    /// The cache claim, created or re-owned as needed; `None` while it does not exist (an
    /// existing claim that is missing, or a paused object's claim not created).
    pub(super) async fn ensure_claim(&self) -> kube::Result<Option<PersistentVolumeClaim>> {
        let resolved = self.resolved;
        let api: Api<PersistentVolumeClaim> =
            Api::namespaced(self.ctx.client.clone(), &resolved.namespace);
        let live = lookup(
            &self.ctx.children.claims,
            &api,
            &resolved.namespace,
            &resolved.cache.claim,
        )
        .await?;
        if !resolved.cache.managed {
            return Ok(live);
        }
        match live {
            // Being deleted: nothing is added to it; the fetch step waits for it to go.
            Some(live) if live.metadata.deletion_timestamp.is_some() => Ok(Some(live)),
            None => {
                let desired = children::cache_claim(resolved, &self.claim_owners);
                match self.apply.create(&desired).await? {
                    Some((created, true)) => {
                        self.note(
                            "CacheClaimCreated",
                            &format!("created cache claim {}", resolved.cache.claim),
                        );
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
                let patched = self
                    .apply
                    .merge_patch(&resolved.cache.claim, &patch)
                    .await?;
                Ok(Some(patched.unwrap_or(live)))
            }
            Some(live) => Ok(Some(live)),
        }
    }

    /// Grows a managed claim to `spec.cache.size` when its StorageClass allows expansion.
    /// Returns the claim as it is now and, while its size is not what the spec asks for, a
    /// reason and a message for the CacheReady condition.
    pub(super) async fn grow_claim(
        &self,
        claim: PersistentVolumeClaim,
    ) -> kube::Result<(PersistentVolumeClaim, Option<(&'static str, String)>)> {
        let name = &self.resolved.cache.claim;
        let want = &self.resolved.cache.size;
        let (requested, class) = match growth(&claim, want) {
            Growth::Enough => return Ok((claim, None)),
            Growth::Expanding {
                requested,
                capacity,
            } => {
                let message =
                    format!("cache claim {name} is being expanded to {requested} (now {capacity})");
                return Ok((claim, Some(("Expanding", message))));
            }
            Growth::Wanted { requested, class } => (requested, class),
        };
        let classes: Api<StorageClass> = Api::all(self.ctx.client.clone());
        let allowed = match classes.get_opt(&class).await {
            Ok(sc) => sc.and_then(|sc| sc.allow_volume_expansion) == Some(true),
            Err(kube::Error::Api(e)) if e.code == 403 => false,
            Err(e) => return Err(e),
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
            self.note(
                "CacheClaimExpanding",
                &format!("growing cache claim {name} from {requested} to {want}"),
            );
        }
        Ok((
            grown.unwrap_or(claim),
            Some((
                "Expanding",
                format!("cache claim {name} is growing from {requested} to {want}"),
            )),
        ))
    }

    /// Records facts about the cache on its claim, in one patch (none when there are none).
    pub(super) async fn record_on_claim(
        &self,
        claim: &PersistentVolumeClaim,
        records: &[Record],
    ) -> kube::Result<PersistentVolumeClaim> {
        if records.is_empty() {
            return Ok(claim.clone());
        }
        let annotations: serde_json::Map<String, serde_json::Value> =
            records.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let patch = json!({"metadata": {"annotations": annotations}});
        let patched = self
            .apply
            .merge_patch::<PersistentVolumeClaim>(&self.resolved.cache.claim, &patch)
            .await?;
        Ok(patched.unwrap_or_else(|| claim.clone()))
    }
}
