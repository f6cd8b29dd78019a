//! The observed state of an `SD35Deployment`, written by the operator.
//!
//! Conditions follow kstatus (`Ready`, `Reconciling`, `Stalled`) so that kubectl wait, Helm,
//! Argo CD and Flux read the object's health without custom code; the other conditions and
//! fields explain where in the cache → engine → rollout pipeline the object is.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use sd35_contract::AdapterKind;
use serde::{Deserialize, Serialize};

/// Condition types the operator sets.
pub mod condition {
    /// True when the latest generation is observed and every desired, updated replica is
    /// available.
    pub const READY: &str = "Ready";
    /// True while the operator is working towards the latest spec.
    pub const RECONCILING: &str = "Reconciling";
    /// True when the operator cannot make progress without a change to the spec or cluster.
    pub const STALLED: &str = "Stalled";
    /// True when the weights are completely cached and verified.
    pub const CACHE_READY: &str = "CacheReady";
    /// True when the engine for the current precision is built (or not needed).
    pub const ENGINE_READY: &str = "EngineReady";
    /// True when at least the minimum number of serving pods is available.
    pub const AVAILABLE: &str = "Available";
    /// True when every add-on the spec asks for (ServiceMonitor, NetworkPolicy) is in place.
    pub const ADDONS_READY: &str = "AddonsReady";
    /// What the serving pods' GPUs are, which precision path the deployment gets there and
    /// whether one GPU holds its memory plan (from the nodes' GPU feature discovery labels);
    /// False only on a GPU the server cannot run on or one with less memory than the plan
    /// needs. Set only when the serving pods request GPUs.
    pub const GPU_COMPATIBLE: &str = "GPUCompatible";
    /// True when every adapter and ControlNet of the spec is cached and verified (or none is
    /// asked for).
    pub const ADAPTERS_READY: &str = "AdaptersReady";
}

/// Observed state of an SD35Deployment.
///
/// A new object reads back `status.observedGeneration: -1` (the schema's default) until the
/// operator writes its first status: kstatus (Flux's health checks, `kubectl wait`) then sees
/// a generation not yet observed, in progress, instead of an object with no status, which it
/// counts as current. Flux's own CRDs do the same.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[schemars(extend("default" = {"observedGeneration": -1}))]
#[serde(rename_all = "camelCase")]
pub struct SD35DeploymentStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, Reconciling and Stalled (kstatus), plus CacheReady, EngineReady, Available,
    /// AdaptersReady, AddonsReady and GPUCompatible.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// One word for where the object is: Pending, Caching, Building, Deploying, Ready,
    /// ScaledToZero (`replicas: 0`, cache and engine kept; Ready is True), Degraded, Failed or
    /// Paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Serving pods that exist.
    #[serde(default)]
    pub replicas: i32,

    /// Serving pods that are ready to take requests.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Serving pods running the latest spec.
    #[serde(default)]
    pub updated_replicas: i32,

    /// Serving pods available for at least the minimum ready time.
    #[serde(default)]
    pub available_replicas: i32,

    /// Label selector of the serving pods, for the scale subresource (HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// The weight cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStatus>,

    /// The serving engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineStatus>,

    /// In-cluster URL of the service, for example `http://name.namespace.svc:8080`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// The adapters and ControlNets of the spec, each cached or not and why. The serving pods
    /// load the ready ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["kind", "name"]))]
    pub adapters: Vec<AdapterStatus>,
}

/// One word for where the object is.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Caching,
    Building,
    Deploying,
    Ready,
    // `spec.replicas` is 0: no serving pod runs; the cache and the engine are kept, so scaling
    // up serves again without fetching or building. (A `///` here would change the schema's
    // shape: schemars describes documented variants one by one.)
    ScaledToZero,
    Degraded,
    Failed,
    Paused,
}

/// The weight cache.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheStatus {
    /// PersistentVolumeClaim holding the cache.
    pub claim_name: String,
    /// Content-derived key of the cache (variant, source, revision).
    pub key: String,
    /// True when the cache is complete and verified.
    pub ready: bool,
}

/// One adapter or ControlNet of the spec.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AdapterStatus {
    /// `lora` or `controlnet`.
    pub kind: AdapterKind,
    /// The adapter's name, or the ControlNet's mode.
    pub name: String,
    /// Content-derived key of its directory in the cache (its source and the model's cache).
    pub key: String,
    /// True when it is cached and verified: the serving pods load it from the rollout that
    /// follows.
    pub ready: bool,
    /// One word: `Cached`, `Fetching`, or why it failed (`NotFound`, `InvalidModel`,
    /// `ChecksumMismatch`, …).
    pub reason: String,
    /// What is happening, or what failed and what to change.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The serving engine.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EngineStatus {
    /// Content-derived key of the engine (cache key, precision, engine format version).
    pub key: String,
    /// True when the engine is built.
    pub ready: bool,
}
