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
