//! Names, labels and annotations of the children, in one place.

use std::collections::BTreeMap;

/// Field manager of every server-side apply the operator makes.
pub const MANAGER: &str = "sd35-operator";

/// Label keys.
pub const NAME: &str = "app.kubernetes.io/name";
pub const INSTANCE: &str = "app.kubernetes.io/instance";
pub const COMPONENT: &str = "app.kubernetes.io/component";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const PART_OF: &str = "app.kubernetes.io/part-of";
pub const CACHE_KEY: &str = "sd35.io/cache-key";
pub const ENGINE_KEY: &str = "sd35.io/engine-key";
pub const ADAPTER_KEY: &str = "sd35.io/adapter-key";

/// Annotation on a cache claim: the model directory is complete and verified.
pub const CACHE_COMPLETE: &str = "sd35.io/cache-complete";
/// Annotation prefix on a cache claim: `engine.sd35.io/<engine-key>: ready`.
pub const ENGINE_READY_PREFIX: &str = "engine.sd35.io/";
/// Annotation prefix on a cache claim: `adapter.sd35.io/<adapter-key>: ready`.
pub const ADAPTER_READY_PREFIX: &str = "adapter.sd35.io/";
/// Annotation on a fetch or build Job: the UID of the cache claim it works on, so a Job left
/// from an earlier claim of the same name is never taken for this one's.
pub const CLAIM_UID: &str = "sd35.io/claim-uid";
/// Pod template annotation: what the serving pods run.
pub const SERVING_TARGET: &str = "sd35.io/serving-target";

/// Value of `app.kubernetes.io/name` on serving pods.
pub const SERVER_NAME: &str = "sd35-server";
/// Value of `app.kubernetes.io/name` on the fetch Job and its pods.
pub const FETCH_NAME: &str = "sd35-fetch";
/// Value of `app.kubernetes.io/name` on the engine build Job and its pods.
pub const BUILD_NAME: &str = "sd35-build";
/// Value of `app.kubernetes.io/name` on an adapter's fetch Job and its pods.
pub const ADAPTER_NAME: &str = "sd35-adapter";
/// Label the Job controller sets on a Job's pods: the Job's name.
pub const JOB_NAME: &str = "batch.kubernetes.io/job-name";

/// Labels every child carries.
pub fn common(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.to_owned(), MANAGER.to_owned()),
        (PART_OF.to_owned(), "sd35".to_owned()),
        (COMPONENT.to_owned(), component.to_owned()),
    ])
}

/// Labels selecting the serving pods of one SD35Deployment.
pub fn server_selector(instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME.to_owned(), SERVER_NAME.to_owned()),
        (INSTANCE.to_owned(), instance.to_owned()),
    ])
}

/// `status.selector` for the scale subresource.
pub fn selector_string(instance: &str) -> String {
    server_selector(instance)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Name of the cache claim of a cache key.
pub fn cache_claim(cache_key: &str) -> String {
    format!("sd35-cache-{cache_key}")
}

/// Name of the fetch Job of a cache key.
pub fn fetch_job(cache_key: &str) -> String {
    format!("sd35-fetch-{cache_key}")
}

/// Name of the engine build Job of an engine key.
pub fn build_job(engine_key: &str) -> String {
    format!("sd35-build-{engine_key}")
}

/// Annotation on the cache claim that marks an engine ready.
pub fn engine_ready_annotation(engine_key: &str) -> String {
    format!("{ENGINE_READY_PREFIX}{engine_key}")
}

/// Name of the fetch Job of an adapter (or ControlNet) key.
pub fn adapter_job(adapter_key: &str) -> String {
    format!("sd35-adapter-{adapter_key}")
}

/// Annotation on the cache claim that marks an adapter cached.
pub fn adapter_ready_annotation(adapter_key: &str) -> String {
    format!("{ADAPTER_READY_PREFIX}{adapter_key}")
}
