//! Settings of the operator itself (from flags and env), applied to every SD35Deployment.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Settings of the operator that shape the children it builds.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// `sd35-server` image used when an SD35Deployment names none.
    pub server_image: String,
    /// Hugging Face endpoint used when a source names none.
    pub hf_endpoint: String,
    /// Seconds a finished Job is kept for `kubectl logs` before Kubernetes deletes it.
    pub job_ttl_seconds: i32,
    /// Seconds a serving pod may take to load the model before it is restarted.
    pub startup_seconds: i32,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            server_image: "ghcr.io/sd35-operator/sd35-server:0.1.0".to_owned(),
            hf_endpoint: "https://huggingface.co".to_owned(),
            job_ttl_seconds: 24 * 60 * 60,
            // Loading ~16 GB of bf16 weights from a network volume takes minutes.
            startup_seconds: 20 * 60,
        }
    }
}

/// Requests and limits from (resource, request, limit) triples.
pub(crate) fn resources(items: &[(&str, &str, &str)]) -> ResourceRequirements {
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for (name, request, limit) in items {
        requests.insert((*name).to_owned(), Quantity((*request).to_owned()));
        limits.insert((*name).to_owned(), Quantity((*limit).to_owned()));
    }
    ResourceRequirements {
        requests: Some(requests),
        limits: Some(limits),
        ..Default::default()
    }
}

/// Default resources of the fetch Job: network- and disk-bound.
pub(crate) fn default_fetch_resources() -> ResourceRequirements {
    resources(&[("cpu", "500m", "2"), ("memory", "512Mi", "2Gi")])
}

/// Default resources of the engine build Job: it streams tensor by tensor, so memory stays
/// near the largest tensor.
pub(crate) fn default_build_resources() -> ResourceRequirements {
    resources(&[("cpu", "1", "4"), ("memory", "4Gi", "8Gi")])
}

/// Default CPU and memory of a serving container (GPUs are added from `server.gpu`).
pub(crate) fn default_server_resources() -> ResourceRequirements {
    resources(&[("cpu", "2", "8"), ("memory", "24Gi", "48Gi")])
}
