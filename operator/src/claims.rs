//! What the cache claim says and what is recorded on it (pure): whether it has been Pending
//! too long, whether its size is what the spec asks for, and which annotations mark the cache
//! complete and an engine ready.
//!
//! The claim is the cache's record: `sd35.io/cache-complete: "true"` once the fetch Job
//! succeeded, `engine.sd35.io/<engine-key>: ready` once that engine was built,
//! `adapter.sd35.io/<adapter-key>: ready` once that adapter's fetch Job succeeded. With an engine
//! to build, the cache's mark waits for the engine's and both go in one patch (one write
//! fewer); until then the fetch Job says that the cache is complete.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use crate::labels;
use crate::resolve::storage_bytes;

/// How long a claim may stay Pending after its creation before it is reported: every claim is
/// Pending for a moment.
pub const PENDING_GRACE: SignedDuration = SignedDuration::from_secs(30);

/// Whether `claim` has been Pending (not bound) for longer than [`PENDING_GRACE`] at `now`.
pub fn pending_too_long(claim: &PersistentVolumeClaim, now: Timestamp) -> bool {
    let pending_for = claim
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| now.duration_since(t.0))
        .unwrap_or_default();
    claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending")
        && pending_for > PENDING_GRACE
}

/// The CacheReady message of a claim that stays Pending.
pub fn pending_message(claim_name: &str) -> String {
    format!(
        "cache claim {claim_name} is not bound yet; check its StorageClass (kubectl describe pvc {claim_name})"
    )
}

/// Whether the claim records its cache complete.
pub fn cache_recorded(claim: &PersistentVolumeClaim) -> bool {
    claim
        .annotations()
        .get(labels::CACHE_COMPLETE)
        .map(String::as_str)
        == Some("true")
}

/// Whether the claim records the engine `engine_key` ready.
pub fn engine_recorded(claim: &PersistentVolumeClaim, engine_key: &str) -> bool {
    claim
        .annotations()
        .get(&labels::engine_ready_annotation(engine_key))
        .map(String::as_str)
        == Some("ready")
}

/// Whether the claim records the adapter `adapter_key` cached.
pub fn adapter_recorded(claim: &PersistentVolumeClaim, adapter_key: &str) -> bool {
    claim
        .annotations()
        .get(&labels::adapter_ready_annotation(adapter_key))
        .map(String::as_str)
        == Some("ready")
}

/// What to record once the fetch Job of the adapter `adapter_key` succeeded.
pub fn records_after_adapter(adapter_key: &str) -> Vec<Record> {
    vec![(labels::adapter_ready_annotation(adapter_key), "ready")]
}

/// An annotation to record on the claim: key and value.
pub type Record = (String, &'static str);

fn cache_complete() -> Record {
    (labels::CACHE_COMPLETE.to_owned(), "true")
}

/// What to record once the fetch Job succeeded: the cache complete, unless an engine is to be
/// built, whose record carries the cache's too.
pub fn records_after_fetch(engine_key: Option<&str>) -> Vec<Record> {
    match engine_key {
        Some(_) => Vec::new(),
        None => vec![cache_complete()],
    }
}

/// What to record once the engine `engine_key` is built: the engine ready and, when the claim
/// does not say so yet, the cache complete.
pub fn records_after_build(claim: &PersistentVolumeClaim, engine_key: &str) -> Vec<Record> {
    let mut records = vec![(labels::engine_ready_annotation(engine_key), "ready")];
    records.extend(records_of_built_engine(claim));
    records
}

/// What to record when the claim already says the engine is built: the cache complete, when
/// it does not say so yet (the cache's mark waited for the engine's).
pub fn records_of_built_engine(claim: &PersistentVolumeClaim) -> Vec<Record> {
    if claim.annotations().contains_key(labels::CACHE_COMPLETE) {
        Vec::new()
    } else {
        vec![cache_complete()]
    }
}

/// Where the claim's size stands against `spec.cache.size`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Growth {
    /// The claim is as large as asked (or a size cannot be read): nothing to say.
    Enough,
    /// The claim asks for enough but its volume is not that large yet: it is being expanded.
    Expanding {
        /// What the claim requests.
        requested: String,
        /// What its volume has now.
        capacity: String,
    },
    /// The spec asks for more than the claim requests.
    Wanted {
        /// What the claim requests now.
        requested: String,
        /// The StorageClass that decides whether it may grow.
        class: String,
    },
}

fn quantity(q: Option<&Quantity>) -> String {
    q.map(|q| q.0.clone()).unwrap_or_default()
}

/// Where `claim` stands against the size `want`.
pub fn growth(claim: &PersistentVolumeClaim, want: &str) -> Growth {
    let requested = quantity(
        claim
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage")),
    );
    let capacity = quantity(
        claim
            .status
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get("storage")),
    );
    let (Some(want_bytes), Some(requested_bytes)) =
        (storage_bytes(want), storage_bytes(&requested))
    else {
        return Growth::Enough;
    };
    if want_bytes <= requested_bytes {
        return if storage_bytes(&capacity).is_some_and(|c| c < requested_bytes) {
            Growth::Expanding {
                requested,
                capacity,
            }
        } else {
            Growth::Enough
        };
    }
    Growth::Wanted {
        requested,
        class: claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn claim(value: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(value).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn only_a_claim_pending_past_the_grace_is_reported() {
        let created = Timestamp::from_second(1_000).unwrap_or_else(|e| panic!("{e}"));
        let pending = claim(json!({
            "metadata": {"name": "c", "creationTimestamp": created.to_string()},
            "status": {"phase": "Pending"}
        }));
        assert!(!pending_too_long(
            &pending,
            created + SignedDuration::from_secs(30)
        ));
        assert!(pending_too_long(
            &pending,
            created + SignedDuration::from_secs(31)
        ));
        let bound = claim(json!({
            "metadata": {"name": "c", "creationTimestamp": created.to_string()},
            "status": {"phase": "Bound"}
        }));
        assert!(!pending_too_long(
            &bound,
            created + SignedDuration::from_secs(300)
        ));
        assert!(pending_message("c").contains("kubectl describe pvc c"));
    }

    #[test]
    fn the_cache_mark_waits_for_the_engine_and_goes_in_its_patch() {
        assert!(records_after_fetch(Some("e")).is_empty());
        assert_eq!(
            records_after_fetch(None),
            [("sd35.io/cache-complete".to_owned(), "true")]
        );
        let fresh = claim(json!({"metadata": {"name": "c"}}));
        assert!(!cache_recorded(&fresh) && !engine_recorded(&fresh, "e"));
        assert_eq!(
            records_after_build(&fresh, "e"),
            [
                ("engine.sd35.io/e".to_owned(), "ready"),
                ("sd35.io/cache-complete".to_owned(), "true")
            ]
        );
        let recorded = claim(json!({"metadata": {"name": "c", "annotations": {
            "sd35.io/cache-complete": "true", "engine.sd35.io/e": "ready"
        }}}));
        assert!(cache_recorded(&recorded) && engine_recorded(&recorded, "e"));
        assert!(!engine_recorded(&recorded, "other"));
        assert_eq!(
            records_after_build(&recorded, "other"),
            [("engine.sd35.io/other".to_owned(), "ready")]
        );
        assert!(records_of_built_engine(&recorded).is_empty());
        assert_eq!(records_of_built_engine(&fresh).len(), 1);
    }

    #[test]
    fn an_adapter_is_recorded_by_its_own_key() {
        let fresh = claim(json!({"metadata": {"name": "c"}}));
        assert!(!adapter_recorded(&fresh, "a1"));
        assert_eq!(
            records_after_adapter("a1"),
            [("adapter.sd35.io/a1".to_owned(), "ready")]
        );
        let recorded = claim(json!({"metadata": {"name": "c", "annotations": {
            "adapter.sd35.io/a1": "ready", "sd35.io/cache-complete": "true"
        }}}));
        assert!(adapter_recorded(&recorded, "a1") && !adapter_recorded(&recorded, "a2"));
    }

    #[test]
    fn growth_compares_sizes_by_bytes() {
        let sized = |requested: &str, capacity: &str| {
            claim(json!({
                "metadata": {"name": "c"},
                "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": requested}}},
                "status": {"capacity": {"storage": capacity}}
            }))
        };
        assert_eq!(growth(&sized("100Gi", "100Gi"), "100G"), Growth::Enough);
        assert_eq!(
            growth(&sized("200Gi", "100Gi"), "100Gi"),
            Growth::Expanding {
                requested: "200Gi".into(),
                capacity: "100Gi".into()
            }
        );
        assert_eq!(
            growth(&sized("100Gi", "100Gi"), "150Gi"),
            Growth::Wanted {
                requested: "100Gi".into(),
                class: "fast".into()
            }
        );
        assert_eq!(growth(&sized("lots", "100Gi"), "150Gi"), Growth::Enough);
    }
}
