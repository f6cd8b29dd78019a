//! The desired state of an `SD35Deployment`: what a user writes.
//!
//! Every field's `///` doc becomes `kubectl explain` text, so it is written for cluster users.
//! Defaults and validation live in the schema wherever OpenAPI or CEL can say them, so that a
//! bad spec is rejected by `kubectl apply` instead of by the operator later.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use sd35_contract::{
    AdapterKind, ControlMode, EnginePrecision, Precision, S3UrlStyle, Variant,
};

use crate::status::SD35DeploymentStatus;

/// Runs a Stable Diffusion 3.5 text-to-image service: caches the weights on a volume, prebuilds
/// the serving engine for the chosen precision, and rolls out GPU pods running `sd35-server`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sd35.io",
    version = "v1alpha1",
    kind = "SD35Deployment",
    plural = "sd35deployments",
    singular = "sd35deployment",
    shortname = "sd35",
    category = "sd35",
    category = "ai",
    namespaced,
    status = "SD35DeploymentStatus",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Variant", type_ = "string", json_path = ".spec.variant"),
    printcolumn(name = "Precision", type_ = "string", json_path = ".spec.precision"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]{0,50}[a-z0-9])?$')")
        .message("metadata.name must be a DNS label of at most 52 characters that starts with a letter: it also names the Service and Deployment"),
    doc = "SD35Deployment runs a Stable Diffusion 3.5 text-to-image service on GPUs: it caches the weights on a volume, prebuilds the serving engine for the chosen precision and rolls out pods running sd35-server behind a Service."
)]
#[serde(rename_all = "camelCase")]
pub struct SD35DeploymentSpec {
    /// Which Stable Diffusion 3.5 model to serve: `large` (8B, best quality), `large-turbo`
    /// (8B distilled, 4 steps without guidance) or `medium` (2.5B, MMDiT-X).
    pub variant: Variant,

    /// Numeric precision of the serving engine: `bf16` (default) or `fp8` (F8E4M3 weights with
    /// scales: about half the GPU memory of bf16; needs a GPU with FP8 support for full speed).
    #[serde(default)]
    #[schemars(schema_with = "engine_precision_schema")]
    pub precision: EnginePrecision,

    /// Number of serving pods. Also set through the scale subresource (`kubectl scale`, HPA).
    /// Zero keeps the cache and engine but runs no server.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Where the weights come from and which text encoders to load.
    #[serde(default)]
    pub model: ModelSpec,

    /// LoRA adapters served beside the model; requests name the ones they apply, with scales.
    /// Each is fetched once into the cache, beside the weights; adding, changing or removing
    /// one never fetches the model again, and rolls the serving pods to the new set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b.name == a.name))")
        .message("spec.adapters must have unique names"))]
    pub adapters: Vec<AdapterSpec>,

    /// SD3.5 ControlNets served beside the model, at most one per mode; requests ask for one
    /// by its mode. Fetched and rolled out like the adapters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b.mode == a.mode))")
        .message("spec.controlNets must have one entry per mode"))]
    pub control_nets: Vec<ControlNetSpec>,

    /// The volume that caches the weights and the prebuilt engines.
    #[serde(default)]
    pub cache: CacheSpec,

    /// How the serving engine for the chosen precision is prebuilt.
    #[serde(default)]
    pub engine: EngineSpec,

    /// The `sd35-server` pods: image, port, GPU resources, generation defaults and limits.
    #[serde(default)]
    pub server: ServerSpec,

    /// Where the serving pods and the cache and engine Jobs may run.
    #[serde(default)]
    pub scheduling: SchedulingSpec,

    /// How serving pods are replaced when the spec changes.
    #[serde(default)]
    pub rollout: RolloutSpec,

    /// Scraping of the server's Prometheus `/metrics` by the Prometheus Operator.
    #[serde(default)]
    pub monitoring: MonitoringSpec,

    /// A NetworkPolicy that admits only the chosen namespaces and pods to the server port.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,

    /// When true the operator changes nothing for this object (children are left as they are)
    /// until it is set back to false.
    #[serde(default)]
    pub paused: bool,
}

/// Scraping of the server's metrics.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// A Prometheus Operator ServiceMonitor (monitoring.coreos.com/v1) for the server's
    /// `/metrics`.
    #[serde(default)]
    pub service_monitor: ServiceMonitorSettings,
}

/// The ServiceMonitor of the serving pods.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.enabled || (!has(self.interval) && !has(self.labels))")
    .message("monitoring.serviceMonitor.interval and labels are only used with enabled: true"))]
pub struct ServiceMonitorSettings {
    /// Create a ServiceMonitor that scrapes every serving pod's `/metrics`. When the
    /// ServiceMonitor CRD is not installed it is skipped, and the AddonsReady condition says
    /// so; nothing else is affected.
    #[serde(default)]
    pub enabled: bool,

    /// Scrape interval, for example `30s`. Unset uses Prometheus' own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|h)$')")
        .message("monitoring.serviceMonitor.interval must be a duration such as 30s or 1m"))]
    pub interval: Option<String>,

    /// Extra labels of the ServiceMonitor, for example the one your Prometheus selects
    /// ServiceMonitors by (`release: prometheus`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The NetworkPolicy of the serving pods.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.enabled || !has(self.from)")
    .message("networkPolicy.from is only used with enabled: true"))]
pub struct NetworkPolicySpec {
    /// Create a NetworkPolicy on the serving pods that admits traffic to the server port only
    /// from `from` (other ports get none). It takes effect where the cluster's network plugin
    /// enforces NetworkPolicies.
    #[serde(default)]
    pub enabled: bool,

    /// Who may reach the server port: NetworkPolicy peers (`namespaceSelector`, `podSelector`
    /// or both, or `ipBlock`). Empty: only pods in this SD35Deployment's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub from: Vec<NetworkPolicyPeer>,
}

fn default_replicas() -> i32 {
    1
}

fn default_true() -> bool {
    true
}

/// The engine precisions a spec may ask for ([`EnginePrecision`]), with their default, as a
/// plain string enum.
fn engine_precision_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let names: Vec<&str> = [EnginePrecision::Bf16, EnginePrecision::Fp8]
        .iter()
        .map(|p| p.as_str())
        .collect();
    schemars::json_schema!({"type": "string", "enum": names, "default": EnginePrecision::default().as_str()})
}

/// Where the weights come from and which text encoders to load.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// The source of the weights. Unset means the official Hugging Face repository of the
    /// variant (for example `stabilityai/stable-diffusion-3.5-large`), which is gated: give a
    /// token with `huggingFace.tokenSecretRef` once you have accepted its licence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ModelSource>,

    /// Which text encoders the server loads.
    #[serde(default)]
    pub text_encoders: TextEncodersSpec,
}

/// Exactly one of `huggingFace`, `http` or `pvc`.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.huggingFace), has(self.http), has(self.pvc)].filter(x, x).size() == 1")
    .message("model.source must set exactly one of huggingFace, http or pvc"))]
pub struct ModelSource {
    /// A Hugging Face Hub repository in the diffusers layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugging_face: Option<HuggingFaceSource>,

    /// A plain HTTP(S) mirror serving the same file tree as the Hub repository plus a sha256
    /// manifest; for air-gapped clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,

    /// A pre-filled PersistentVolumeClaim in this namespace, imported read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
}

/// A Hugging Face Hub repository.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HuggingFaceSource {
    /// Repository id, `owner/name`, for example `stabilityai/stable-diffusion-3.5-large`.
    #[schemars(length(min = 3, max = 200))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][-A-Za-z0-9_.]*/[-A-Za-z0-9_.]+$')")
        .message("huggingFace.repo must look like owner/name, for example stabilityai/stable-diffusion-3.5-large"))]
    pub repo: String,

    /// Branch, tag or commit to download. A commit hash pins the exact files; a branch is
    /// resolved to its commit once, when the cache is filled.
    #[serde(default = "default_revision")]
    #[schemars(length(min = 1, max = 255))]
    pub revision: String,

    /// A Secret key holding a Hugging Face access token. Needed for gated repositories,
    /// including the official SD3.5 ones. The token is passed to the fetch Job as an
    /// environment variable from the Secret and never copied elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,

    /// Hub endpoint, for a Hub mirror or proxy. Defaults to `https://huggingface.co`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && (self.startsWith('https://') || self.startsWith('http://'))")
        .message("huggingFace.endpoint must be an http:// or https:// URL"))]
    pub endpoint: Option<String>,
}

fn default_revision() -> String {
    "main".to_owned()
}

/// A plain HTTP(S) mirror of a repository's file tree.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// Base URL of the mirrored tree, for example `https://models.internal/sd3.5-large/`.
    /// The directory must hold `sha256sums.txt` (`<sha256>  <path>` per line) listing every file.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && (self.startsWith('https://') || self.startsWith('http://'))")
        .message("http.url must be an http:// or https:// URL"))]
    pub url: String,

    /// A Secret key holding a bearer token sent to the mirror, if it needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
}

/// A pre-filled PersistentVolumeClaim.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Name of the PersistentVolumeClaim in this namespace.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,

    /// Directory inside the volume that holds the model (diffusers or single-file layout).
    /// Empty means the volume's root.
    #[serde(default)]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.split('/').exists(p, p == '..')")
        .message("pvc.path must be relative to the volume root and must not contain '..'"))]
    pub path: String,
}

/// A LoRA adapter served beside the model.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.source.pvc) || self.source.pvc.path.endsWith('.safetensors')")
    .message("a LoRA is one file: adapters[].source.pvc.path must name its .safetensors file"))]
pub struct AdapterSpec {
    /// The name requests use for it (`loras: [{name, scale}]`, `<lora:name:0.8>` in an
    /// AUTOMATIC1111 prompt): lower-case letters, digits, `-`, `_` and `.`, starting and ending
    /// with a letter or digit.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$')")
        .message("adapters[].name must be lower-case letters, digits, '-', '_' and '.', starting and ending with a letter or digit"))]
    pub name: String,

    /// Where its safetensors file (diffusers' PEFT or kohya format) comes from.
    pub source: AdapterSource,

    /// The scale a request that names the adapter without one gets. Unset: 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -10.0, max = 10.0))]
    pub scale: Option<f64>,
}

/// An SD3.5 ControlNet served beside the model.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ControlNetSpec {
    /// What it conditions on: `canny` (edges), `depth` (a depth map) or `blur` (a blurred
    /// image). Requests ask for a ControlNet by its mode.
    pub mode: ControlMode,

    /// Where it comes from: one safetensors file (as Stability publishes SD3.5's, for example
    /// `stabilityai/stable-diffusion-3.5-large-controlnet-canny` with `file:
    /// sd3.5_large_controlnet_canny.safetensors`) or a folder in diffusers' layout.
    pub source: AdapterSource,
}

/// Exactly one of `huggingFace`, `http` or `pvc`.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.huggingFace), has(self.http), has(self.pvc)].filter(x, x).size() == 1")
    .message("an adapter or ControlNet source must set exactly one of huggingFace, http or pvc"))]
pub struct AdapterSource {
    /// A file, or a folder in diffusers' layout, of a Hugging Face Hub repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugging_face: Option<AdapterHuggingFaceSource>,

    /// One file over HTTP(S), checked against its sha256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<FileHttpSource>,

    /// A file, or a folder in diffusers' layout, on a PersistentVolumeClaim in this namespace,
    /// imported read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<AdapterPvcSource>,
}

/// A file (or diffusers folder) of a Hugging Face Hub repository.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AdapterHuggingFaceSource {
    /// Repository id, `owner/name`.
    #[schemars(length(min = 3, max = 200))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][-A-Za-z0-9_.]*/[-A-Za-z0-9_.]+$')")
        .message("huggingFace.repo must look like owner/name"))]
    pub repo: String,

    /// Branch, tag or commit. A commit hash pins the exact file; a branch is resolved to its
    /// commit once, when the adapter is fetched.
    #[serde(default = "default_revision")]
    #[schemars(length(min = 1, max = 255))]
    pub revision: String,

    /// Path of the `.safetensors` file in the repository. Unset: a LoRA is the repository's
    /// one `.safetensors` file at its root; a ControlNet is the repository's root folder in
    /// diffusers' layout (`config.json` and its weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new("self.endsWith('.safetensors') && !self.startsWith('/') && !self.split('/').exists(p, p == '..')")
        .message("huggingFace.file must be a relative path to a .safetensors file in the repository"))]
    pub file: Option<String>,

    /// A Secret key holding a Hugging Face access token, for gated or private repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,

    /// Hub endpoint, for a Hub mirror or proxy. Defaults to the operator's Hub endpoint
    /// (`https://huggingface.co` unless the operator is configured with another).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && (self.startsWith('https://') || self.startsWith('http://'))")
        .message("huggingFace.endpoint must be an http:// or https:// URL"))]
    pub endpoint: Option<String>,
}

/// One file over HTTP(S).
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileHttpSource {
    /// URL of the `.safetensors` file.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && (self.startsWith('https://') || self.startsWith('http://'))")
        .message("http.url must be an http:// or https:// URL"))]
    pub url: String,

    /// Lower-case hex sha256 of the file; the fetch refuses a file that does not match.
    #[schemars(length(min = 64, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')")
        .message("http.sha256 must be the file's sha256 as 64 lower-case hex digits (sha256sum prints it)"))]
    pub sha256: String,

    /// A Secret key holding a bearer token sent with the request, if the server needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
}

/// A file or folder on a PersistentVolumeClaim.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AdapterPvcSource {
    /// Name of the PersistentVolumeClaim in this namespace.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,

    /// Path inside the volume: a file ending in `.safetensors`, or (for a ControlNet) a folder
    /// in diffusers' layout. Empty means the volume's root folder.
    #[serde(default)]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.split('/').exists(p, p == '..')")
        .message("pvc.path must be relative to the volume root and must not contain '..'"))]
    pub path: String,
}

/// A key of a Secret in this namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// Key within the Secret.
    #[serde(default = "default_token_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_token_key() -> String {
    "token".to_owned()
}

/// Which text encoders the server loads.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TextEncodersSpec {
    /// Load the T5-XXL encoder (about 9.5 GB of GPU memory in bf16). Without it the model
    /// runs on CLIP-L and CLIP-G alone, with somewhat weaker prompt following.
    #[serde(default = "default_true")]
    pub t5: bool,

    /// Maximum T5 prompt length in tokens.
    #[serde(default = "default_t5_tokens")]
    #[schemars(range(min = 77, max = 512))]
    pub t5_max_tokens: i32,
}

impl Default for TextEncodersSpec {
    fn default() -> Self {
        Self {
            t5: true,
            t5_max_tokens: default_t5_tokens(),
        }
    }
}

fn default_t5_tokens() -> i32 {
    256
}

/// The volume that caches the weights and the prebuilt engines. SD35Deployments in a namespace
/// that ask for the same variant and source share one cache volume.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.existingClaim) || (!has(self.storageClassName) && !has(self.size) && !has(self.accessModes))")
    .message("cache.existingClaim cannot be combined with storageClassName, size or accessModes: those describe a claim the operator creates"))]
pub struct CacheSpec {
    /// StorageClass of the cache claim. Unset uses the cluster's default StorageClass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,

    /// Size of the cache claim, for example `100Gi`. Defaults per variant: 100Gi for large and
    /// large-turbo, 50Gi for medium (weights plus one engine per precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('1Gi')) >= 0")
        .message("cache.size must be a quantity of at least 1Gi, for example 100Gi"))]
    pub size: Option<String>,

    /// Access modes of the cache claim. Defaults to `ReadWriteOnce`; use `ReadWriteMany` when
    /// replicas spread over several nodes and your storage supports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4))]
    pub access_modes: Option<Vec<AccessMode>>,

    /// Keep the cache claim when this SD35Deployment is deleted, so a new one starts warm.
    #[serde(default)]
    pub retain: bool,

    /// Use this existing PersistentVolumeClaim as the cache instead of creating one. It is
    /// never deleted by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub existing_claim: Option<String>,

    /// The Job that fills the cache.
    #[serde(default)]
    pub fetch: JobSpec,
}

/// An access mode of a PersistentVolumeClaim.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessMode {
    ReadWriteOnce,
    ReadOnlyMany,
    ReadWriteMany,
    ReadWriteOncePod,
}

/// Limits and resources of a Job the operator runs (cache fetch or engine build).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    /// Retries of a failed pod before the Job counts as failed.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 20))]
    pub backoff_limit: i32,

    /// Seconds the Job may run in all before it is stopped and counted as failed.
    #[serde(default = "default_active_deadline")]
    #[schemars(range(min = 60))]
    pub active_deadline_seconds: i64,

    /// CPU and memory of the Job's pod. Unset uses the operator's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for JobSpec {
    fn default() -> Self {
        Self {
            backoff_limit: default_backoff_limit(),
            active_deadline_seconds: default_active_deadline(),
            resources: None,
        }
    }
}

fn default_backoff_limit() -> i32 {
    3
}

fn default_active_deadline() -> i64 {
    4 * 60 * 60
}

/// How the serving engine is prebuilt.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EngineSpec {
    /// `Auto` runs a Job that converts the cached weights into the serving layout for the
    /// precision when no engine exists for it yet; `Never` serves the cached weights directly
    /// and converts at start-up.
    #[serde(default)]
    pub build: EngineBuild,

    /// The Job that builds the engine.
    #[serde(default)]
    pub job: JobSpec,
}

/// Whether the operator prebuilds the engine.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineBuild {
    #[default]
    Auto,
    Never,
}

/// The `sd35-server` pods.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// Container image of `sd35-server`. Unset uses the image the operator was installed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// Pull policy of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// Names of Secrets in this namespace used to pull the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,

    /// HTTP port of the server inside the pod and of the Service.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// GPUs per serving pod.
    #[serde(default)]
    pub gpu: GpuSpec,

    /// CPU and memory of the serving container (GPUs are set by `gpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Generation parameters used when a request leaves them out. Unset fields follow the
    /// variant's model card (large: 28 steps, guidance 3.5; large-turbo: 4 steps, guidance 0;
    /// medium: 40 steps, guidance 4.5; 1024x1024).
    #[serde(default)]
    pub defaults: GenerationDefaults,

    /// Queue and batch limits of each server pod.
    #[serde(default)]
    pub limits: ServerLimits,

    /// Require a bearer token on the generation endpoints. Health, readiness and metrics
    /// stay open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,

    /// Store generated images in an S3-compatible bucket when a client asks for URLs
    /// (`response_format: "url"` on `/v1/images/generations`, `store: true` on
    /// `/v1/txt2img`) and hand out presigned GET URLs. Unset: images are only sent inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<ArtifactsSpec>,
}

impl Default for ServerSpec {
    fn default() -> Self {
        Self {
            image: None,
            image_pull_policy: None,
            image_pull_secrets: Vec::new(),
            port: default_port(),
            gpu: GpuSpec::default(),
            resources: None,
            defaults: GenerationDefaults::default(),
            limits: ServerLimits::default(),
            auth: None,
            artifacts: None,
        }
    }
}

fn default_port() -> i32 {
    8080
}

/// Image pull policy.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// GPUs per serving pod.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuSpec {
    /// Number of GPUs per pod. Zero runs on CPU (very slow; for tests only).
    #[serde(default = "default_gpu_count")]
    #[schemars(range(min = 0, max = 16))]
    pub count: i32,

    /// Extended resource name of the GPU, for example `nvidia.com/gpu` or a MIG profile such
    /// as `nvidia.com/mig-3g.40gb`.
    #[serde(default = "default_gpu_resource")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$')")
        .message("gpu.resourceName must be a resource name such as nvidia.com/gpu"))]
    pub resource_name: String,
}

impl Default for GpuSpec {
    fn default() -> Self {
        Self {
            count: default_gpu_count(),
            resource_name: default_gpu_resource(),
        }
    }
}

fn default_gpu_count() -> i32 {
    1
}

fn default_gpu_resource() -> String {
    "nvidia.com/gpu".to_owned()
}

/// Generation parameters used when a request leaves them out.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GenerationDefaults {
    /// Sampling steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 150))]
    pub steps: Option<i32>,

    /// Classifier-free guidance scale; 1 or less turns guidance off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 30.0))]
    pub guidance_scale: Option<f64>,

    /// Image width in pixels, a multiple of 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 256, max = 2048))]
    #[x_kube(validation = Rule::new("self % 16 == 0").message("server.defaults.width must be a multiple of 16"))]
    pub width: Option<i32>,

    /// Image height in pixels, a multiple of 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 256, max = 2048))]
    #[x_kube(validation = Rule::new("self % 16 == 0").message("server.defaults.height must be a multiple of 16"))]
    pub height: Option<i32>,
}

/// Queue and batch limits of each server pod.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerLimits {
    /// Requests waiting for the GPU beyond which new ones get 429 Too Many Requests.
    #[serde(default = "default_queue_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub queue_size: i32,

    /// Requests of the same shape generated together in one batch.
    #[serde(default = "default_max_batch")]
    #[schemars(range(min = 1, max = 16))]
    pub max_batch_size: i32,

    /// Seconds a request may wait and run in all before it fails with 504.
    #[serde(default = "default_request_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub request_timeout_seconds: i32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            queue_size: default_queue_size(),
            max_batch_size: default_max_batch(),
            request_timeout_seconds: default_request_timeout(),
        }
    }
}

fn default_queue_size() -> i32 {
    16
}

fn default_max_batch() -> i32 {
    1
}

fn default_request_timeout() -> i32 {
    300
}

/// Bearer-token authentication of the generation endpoints.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// A Secret key holding the accepted tokens, one per line.
    pub secret_ref: SecretKeyRef,
}

/// An S3-compatible bucket for generated images.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactsSpec {
    /// Name of the bucket (S3 naming: 3 to 63 lowercase letters, digits, dots and hyphens,
    /// starting and ending with a letter or digit). The operator does not create it.
    #[schemars(length(min = 3, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9][a-z0-9.-]*[a-z0-9]$') && !self.contains('..')")
        .message("artifacts.bucket must be an S3 bucket name: lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit"))]
    pub bucket: String,

    /// Endpoint of the object store, `http(s)://host[:port]`, for example
    /// `https://s3.eu-west-1.amazonaws.com` or `http://minio.storage:9000`. Unset: AWS's
    /// endpoint of `region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && self.matches('^https?://[^/?#@]+/?$')")
        .message("artifacts.endpoint must be http(s)://host[:port] with no path, query or credentials"))]
    pub endpoint: Option<String>,

    /// Region of the bucket (part of every signature).
    #[serde(default = "default_region")]
    #[schemars(length(min = 1, max = 64))]
    pub region: String,

    /// Prepended to every object key, for example `sd35/`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new("!self.startsWith('/')")
        .message("artifacts.prefix must not start with /"))]
    pub prefix: String,

    /// How the endpoint addresses the bucket: `path` (`<endpoint>/<bucket>/<key>`, works
    /// with every S3-compatible server) or `virtual-host` (`<bucket>.<endpoint host>/<key>`).
    #[serde(default)]
    pub url_style: S3UrlStyle,

    /// Seconds a handed-out URL stays valid (at most 7 days, S3's limit for presigned URLs).
    #[serde(default = "default_url_seconds")]
    #[schemars(range(min = 1, max = 604800))]
    pub url_seconds: i32,

    /// The Secret holding the access key pair. Only its name and keys are read by the
    /// operator; the serving pods get the values as environment variables from the Secret.
    pub credentials_secret: S3CredentialsSecret,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

fn default_url_seconds() -> i32 {
    3600
}

/// A Secret in this namespace with an S3 access key pair.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3CredentialsSecret {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// Key of the access key id within the Secret.
    #[serde(default = "default_access_key_id_key")]
    #[schemars(length(min = 1, max = 253))]
    pub access_key_id_key: String,

    /// Key of the secret access key within the Secret.
    #[serde(default = "default_secret_access_key_key")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_access_key_key: String,
}

fn default_access_key_id_key() -> String {
    "AWS_ACCESS_KEY_ID".to_owned()
}

fn default_secret_access_key_key() -> String {
    "AWS_SECRET_ACCESS_KEY".to_owned()
}

/// Where the serving pods and the Jobs may run.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Node labels a node must have, for example a GPU product label.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations, for example for tainted GPU nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Node and pod affinity of the serving pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// PriorityClass of the serving pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// RuntimeClass of the serving pods, for example `nvidia`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
}

/// How serving pods are replaced when the spec changes.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.strategy == 'Surge' || !has(self.maxSurge)")
    .message("rollout.maxSurge is only used with strategy Surge"))]
pub struct RolloutSpec {
    /// `NoSurge` (default) stops an old pod before starting its replacement, because GPU
    /// clusters rarely have a spare GPU; `Surge` starts new pods first so serving capacity
    /// never drops, and needs spare GPUs.
    #[serde(default)]
    pub strategy: RolloutStrategy,

    /// With `Surge`: how many pods above `replicas` may run during a rollout (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_surge: Option<i32>,
}

/// Rollout strategy of the serving pods.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RolloutStrategy {
    #[default]
    NoSurge,
    Surge,
}
