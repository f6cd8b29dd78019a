//! Apply children with server-side apply, but only when they differ from what is live.
//!
//! A steady-state reconcile must make no write calls, and a hand-edited field the operator
//! owns must be restored. Both follow from one rule: send the desired object when, and only
//! when, some field of it is not what the live object has. Fields the apiserver or other
//! controllers add (defaults, status, other managers' fields) do not count.

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::labels::MANAGER;

/// Whether every field set in `desired` has the same value in `live`.
///
/// Empty strings, lists and maps in `desired` match a missing field (the apiserver drops
/// them); lists must have the same length and match element by element.
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(k, dv)| match l.get(k) {
            Some(lv) => is_subset(dv, lv),
            None => is_empty(dv),
        }),
        (Value::Object(d), Value::Null) => d.values().all(is_empty),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(a, b)| is_subset(a, b))
        }
        (Value::Array(d), Value::Null) => d.is_empty(),
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b || (is_empty(a) && b.is_null()),
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_empty),
        _ => false,
    }
}

/// Whether `desired` needs to be sent, given the live object.
pub fn needs_apply<K: Serialize>(desired: &K, live: Option<&K>) -> bool {
    let Some(live) = live else { return true };
    let (Ok(mut d), Ok(l)) = (serde_json::to_value(desired), serde_json::to_value(live)) else {
        return true;
    };
    if let Some(obj) = d.as_object_mut() {
        obj.remove("status");
    }
    !is_subset(&d, &l)
}

/// Server-side apply `desired` if it differs from `live`; returns the object as it is now.
pub async fn apply_if_changed<K>(
    api: &Api<K>,
    desired: &K,
    live: Option<K>,
) -> kube::Result<(K, bool)>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    if let Some(live) = live
        && !needs_apply(desired, Some(&live))
    {
        return Ok((live, false));
    }
    let params = PatchParams::apply(MANAGER).force();
    let applied = api
        .patch(&desired.name_any(), &params, &Patch::Apply(desired))
        .await?;
    Ok((applied, true))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn defaults_and_other_fields_on_the_live_object_do_not_count() {
        let desired = json!({"spec": {"replicas": 2, "template": {"containers": [{"name": "s", "image": "a"}]}}});
        let live = json!({
            "spec": {"replicas": 2, "progressDeadlineSeconds": 600,
                     "template": {"containers": [{"name": "s", "image": "a", "terminationMessagePath": "/dev/x"}]}},
            "status": {"replicas": 2}
        });
        assert!(is_subset(&desired, &live));
    }

    #[test]
    fn a_changed_owned_field_counts() {
        let desired = json!({"spec": {"template": {"containers": [{"name": "s", "image": "a"}]}}});
        let edited = json!({"spec": {"template": {"containers": [{"name": "s", "image": "b"}]}}});
        assert!(!is_subset(&desired, &edited));
        let removed = json!({"spec": {"template": {"containers": []}}});
        assert!(!is_subset(&desired, &removed));
        let missing_key = json!({"spec": {}});
        assert!(!is_subset(&desired, &missing_key));
    }

    #[test]
    fn empty_desired_values_match_missing_ones() {
        let desired = json!({"metadata": {"labels": {}, "ownerReferences": []}, "spec": {"x": ""}});
        assert!(is_subset(&desired, &json!({"metadata": {}, "spec": {}})));
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(is_subset(&json!({"a": 1}), &json!({"a": 1.0})));
        assert!(!is_subset(&json!({"a": 1}), &json!({"a": "1"})));
    }
}
