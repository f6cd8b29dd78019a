//! Which SD35Deployments a change concerns: the index keys of the watch caches and the
//! mappers from a child's event to the objects to reconcile.
//!
//! A serving pod names its SD35Deployment in its instance label; a Job, a cache claim and a
//! Job's pod are shared by every user of a cache and name its key, whose users an index of
//! SD35Deployments by cache key finds without a scan. A Job's pods are found by the Job's
//! name, which the Job controller sets on them.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use sd35_crds::SD35Deployment;

use crate::config::OperatorConfig;
use crate::index::{Index, namespaced};
use crate::labels;
use crate::metrics::Metrics;
use crate::resolve::resolve;

/// The index key of an SD35Deployment: `namespace/cache key`, when its spec resolves.
pub fn cache_key_of(
    obj: &SD35Deployment,
    config: &OperatorConfig,
    metrics: &Metrics,
) -> Vec<String> {
    metrics.spec_resolved();
    match (obj.namespace(), resolve(obj, config)) {
        (Some(ns), Ok(resolved)) => vec![namespaced(&ns, &resolved.cache_key)],
        _ => Vec::new(),
    }
}

/// The index key of a serving pod: `namespace/instance`.
pub fn instance_of(pod: &Pod) -> Vec<String> {
    match (pod.namespace(), pod.labels().get(labels::INSTANCE)) {
        (Some(ns), Some(instance)) => vec![namespaced(&ns, instance)],
        _ => Vec::new(),
    }
}

/// The index key of a Job's pod: `namespace/job name`.
pub fn job_of(pod: &Pod) -> Vec<String> {
    match (pod.namespace(), pod.labels().get(labels::JOB_NAME)) {
        (Some(ns), Some(job)) => vec![namespaced(&ns, job)],
        _ => Vec::new(),
    }
}

/// The SD35Deployments a Job, claim or Job pod belongs to, found by its cache key label.
pub fn users_of_cache_key(
    users: &Index<SD35Deployment>,
    namespace: Option<&str>,
    key: Option<&str>,
) -> Vec<ObjectRef<SD35Deployment>> {
    match (namespace, key) {
        (Some(ns), Some(key)) => users.get(&namespaced(ns, key)),
        _ => Vec::new(),
    }
}

/// The SD35Deployments a pod concerns: a serving pod its instance, a Job's pod every user of
/// its cache key.
pub fn pod_users(users: &Index<SD35Deployment>, pod: &Pod) -> Vec<ObjectRef<SD35Deployment>> {
    let ns = pod.namespace();
    match pod.labels().get(labels::INSTANCE) {
        Some(name) => {
            let r = ObjectRef::<SD35Deployment>::new(name);
            vec![match ns {
                Some(ns) => r.within(&ns),
                None => r,
            }]
        }
        None => users_of_cache_key(
            users,
            ns.as_deref(),
            pod.labels().get(labels::CACHE_KEY).map(String::as_str),
        ),
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;
    use serde_json::json;

    use super::*;

    fn pod(labels: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels}}),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn user(name: &str, cache_key: &str) -> SD35Deployment {
        let mut obj: SD35Deployment = serde_json::from_value(json!({
            "apiVersion": "sd35.io/v1alpha1", "kind": "SD35Deployment",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"variant": "medium"}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        obj.labels_mut().insert("key".into(), cache_key.into());
        obj
    }

    #[test]
    fn a_serving_pod_concerns_its_instance_and_a_job_pod_every_user_of_its_cache() {
        // Users keyed as the controller keys them (here by a label, for the test).
        let users = Index::new(|o: &SD35Deployment| {
            vec![namespaced(
                &o.namespace().unwrap_or_default(),
                o.labels().get("key").map_or("", String::as_str),
            )]
        });
        for u in [user("a", "k1"), user("b", "k1"), user("c", "k2")] {
            users.apply_watcher_event(&Event::Apply(u));
        }
        let serving = pod(json!({labels::INSTANCE: "a", labels::CACHE_KEY: "k2"}));
        let names = |refs: Vec<ObjectRef<SD35Deployment>>| {
            let mut names: Vec<String> = refs.into_iter().map(|r| r.name).collect();
            names.sort();
            names
        };
        assert_eq!(names(pod_users(&users, &serving)), ["a"]);
        assert_eq!(instance_of(&serving), ["ns/a"]);
        assert!(job_of(&serving).is_empty());
        let fetch = pod(json!({labels::CACHE_KEY: "k1", labels::JOB_NAME: "sd35-fetch-k1"}));
        assert_eq!(names(pod_users(&users, &fetch)), ["a", "b"]);
        assert_eq!(job_of(&fetch), ["ns/sd35-fetch-k1"]);
        assert!(instance_of(&fetch).is_empty());
    }
}
