//! Build the children of an SD35Deployment (pure and infallible): the cache claim, the fetch
//! and engine build Jobs, the serving Deployment, its Service and PodDisruptionBudget.
//!
//! Builders take the resolved spec and return complete objects; the apply step sends them
//! with server-side apply. Everything a test wants to know about a child is visible here.

mod cache;
mod serving;

pub use cache::{build_job, cache_claim, fetch_job};
pub use serving::{ServingTarget, deployment, pdb, service};

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::resolve::Resolved;

/// Turns a JSON literal into a typed object. The literals in this module are written against
/// the Kubernetes API types and covered by snapshot tests, so a mismatch is a bug here.
fn typed<T: DeserializeOwned>(value: Value) -> T {
    match serde_json::from_value(value) {
        Ok(v) => v,
        Err(e) => panic!("child manifest does not match its Kubernetes type: {e}"),
    }
}

/// Pod-level security defaults: non-root, RuntimeDefault seccomp, volumes group-owned.
fn pod_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"}
    })
}

/// Container-level security defaults: read-only root, no privilege escalation, no capabilities.
fn container_security() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]}
    })
}

/// Node placement shared by the serving pods and the Jobs (so that a ReadWriteOnce cache is
/// written and read in the same place).
fn placement(r: &Resolved) -> serde_json::Map<String, Value> {
    let s = &r.spec.scheduling;
    let mut m = serde_json::Map::new();
    if !s.node_selector.is_empty() {
        m.insert("nodeSelector".into(), json!(s.node_selector));
    }
    if !s.tolerations.is_empty() {
        m.insert("tolerations".into(), json!(s.tolerations));
    }
    if let Some(a) = &s.affinity {
        m.insert("affinity".into(), json!(a));
    }
    m
}
