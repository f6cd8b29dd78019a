//! The serving Deployment, its Service and PodDisruptionBudget.
//!
//! The pod template is built from a [`ServingTarget`]: which model and engine the pods run.
//! The reconciler passes the desired target only once its cache and engine are ready, and the
//! target the pods already run otherwise, so a precision change never takes serving pods down
//! before the new engine exists.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use sd35_contract::{
    CACHE_MOUNT, DeviceKind, Precision, ServeArgs, TERMINATION_MESSAGE_PATH, Variant,
    dedup_in_order, default_served_names, engine_dir, model_dir,
};
use sd35_crds::RolloutStrategy;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{container_security, placement, pod_security, typed};
use crate::config::{OperatorConfig, default_server_resources};
use crate::labels;
use crate::resolve::{FetchSource, Resolved};

/// What serving pods run: recorded as a pod template annotation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServingTarget {
    pub variant: Variant,
    pub precision: Precision,
    pub cache_claim: String,
    pub cache_key: String,
    pub engine_key: Option<String>,
}

impl ServingTarget {
    /// The target the spec asks for.
    pub fn desired(r: &Resolved) -> Self {
        Self {
            variant: r.variant,
            precision: r.precision,
            cache_claim: r.cache.claim.clone(),
            cache_key: r.cache_key.clone(),
            engine_key: r.engine_key.clone(),
        }
    }

    /// The annotation value.
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The target recorded on a Deployment's pod template, if any.
    pub fn of(deployment: &Deployment) -> Option<Self> {
        let value = deployment
            .spec
            .as_ref()?
            .template
            .metadata
            .as_ref()?
            .annotations
            .as_ref()?
            .get(labels::SERVING_TARGET)?;
        serde_json::from_str(value).ok()
    }
}

/// Metadata of the serving Deployment, Service and PDB: named after the object, labelled as
/// its server, owned by it.
fn server_metadata(r: &Resolved, owner: &OwnerReference) -> serde_json::Value {
    let mut meta_labels = labels::common("server");
    meta_labels.extend(labels::server_selector(&r.name));
    json!({
        "name": r.name,
        "namespace": r.namespace,
        "labels": meta_labels,
        "ownerReferences": [owner],
    })
}

/// The model names the server answers to: the SD35Deployment's name first, then the
/// variant, the Hugging Face repository id, `sd3.5` and `stable-diffusion-3.5-<variant>`.
pub fn served_names(r: &Resolved, variant: Variant) -> Vec<String> {
    let repo = match &r.source {
        FetchSource::HuggingFace { repo, .. } => Some(repo.as_str()),
        _ => None,
    };
    let mut names = vec![r.name.clone()];
    names.extend(default_served_names(variant, repo));
    dedup_in_order(&mut names);
    names
}

fn serve_args(r: &Resolved, target: &ServingTarget) -> ServeArgs {
    let root = std::path::Path::new(CACHE_MOUNT);
    let s = &r.spec.server;
    ServeArgs {
        model: model_dir(root, &target.cache_key),
        engine: target.engine_key.as_ref().map(|k| engine_dir(root, k)),
        // Say where to run: a pod with GPUs must use them (and fail loudly when it cannot);
        // a pod without runs on its CPU.
        device: if s.gpu.count > 0 {
            DeviceKind::Cuda
        } else {
            DeviceKind::Cpu
        },
        variant: Some(target.variant),
        precision: Some(target.precision),
        served_model_names: served_names(r, target.variant),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        host: "0.0.0.0".to_owned(),
        port: u16::try_from(s.port).unwrap_or(8080),
        no_t5: !r.spec.model.text_encoders.t5,
        t5_max_tokens: u32::try_from(r.spec.model.text_encoders.t5_max_tokens).unwrap_or(256),
        default_steps: s.defaults.steps.and_then(|v| u32::try_from(v).ok()),
        default_guidance: s.defaults.guidance_scale,
        default_width: s.defaults.width.and_then(|v| u32::try_from(v).ok()),
        default_height: s.defaults.height.and_then(|v| u32::try_from(v).ok()),
        queue_size: u32::try_from(s.limits.queue_size).unwrap_or(16),
        max_batch_size: u32::try_from(s.limits.max_batch_size).unwrap_or(1),
        request_timeout_seconds: u32::try_from(s.limits.request_timeout_seconds).unwrap_or(300),
        auth_token_file: s
            .auth
            .as_ref()
            .map(|a| format!("/etc/sd35/auth/{}", a.secret_ref.key).into()),
        artifacts: sd35_contract::ArtifactArgs::default(),
    }
}

/// The serving Deployment for a target.
pub fn deployment(
    r: &Resolved,
    config: &OperatorConfig,
    owner: &OwnerReference,
    target: &ServingTarget,
) -> Deployment {
    let s = &r.spec.server;
    let selector = labels::server_selector(&r.name);
    let mut pod_labels = labels::common("server");
    pod_labels.extend(selector.clone());
    let mut args = vec!["serve".to_owned()];
    args.extend(serve_args(r, target).to_args());

    let mut resources = json!(s.resources.clone().unwrap_or_else(default_server_resources));
    if s.gpu.count > 0 {
        // Extended resources are set as limits; Kubernetes copies them to requests.
        resources["limits"][s.gpu.resource_name.as_str()] = json!(s.gpu.count.to_string());
    }
    let mut mounts = vec![
        json!({"name": "cache", "mountPath": CACHE_MOUNT, "readOnly": true}),
        json!({"name": "tmp", "mountPath": "/tmp"}),
    ];
    let mut volumes = vec![
        json!({"name": "cache", "persistentVolumeClaim": {"claimName": target.cache_claim, "readOnly": true}}),
        json!({"name": "tmp", "emptyDir": {}}),
    ];
    if let Some(auth) = &s.auth {
        mounts.push(json!({"name": "auth", "mountPath": "/etc/sd35/auth", "readOnly": true}));
        volumes.push(json!({"name": "auth", "secret": {"secretName": auth.secret_ref.name, "items": [{"key": auth.secret_ref.key, "path": auth.secret_ref.key}]}}));
    }
    let probe = |path: &str, period: i32, failures: i32| json!({"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": failures});
    let mut container = json!({
        "name": "server",
        "image": r.image,
        "command": ["sd35-server"],
        "args": args,
        "ports": [{"name": "http", "containerPort": s.port, "protocol": "TCP"}],
        "resources": resources,
        "securityContext": container_security(),
        "volumeMounts": mounts,
        // The server writes why it could not start (no GPU, a wrong engine) here; the
        // operator quotes it in the SD35Deployment's conditions.
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        // Model loading gets the whole startup budget; after that, readiness gates traffic
        // and liveness restarts a wedged server.
        "startupProbe": probe("/readyz", 10, (config.startup_seconds / 10).max(1)),
        "readinessProbe": probe("/readyz", 5, 2),
        "livenessProbe": probe("/healthz", 10, 3),
    });
    if let Some(policy) = s.image_pull_policy {
        container["imagePullPolicy"] = json!(policy);
    }
    let mut pod = json!({
        "securityContext": pod_security(),
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        // In-flight requests may run up to the request timeout; SIGTERM lets them finish.
        "terminationGracePeriodSeconds": s.limits.request_timeout_seconds + 30,
        "containers": [container],
        "volumes": volumes,
    });
    for (k, v) in placement(r) {
        pod[k] = v;
    }
    let sched = &r.spec.scheduling;
    if let Some(p) = &sched.priority_class_name {
        pod["priorityClassName"] = json!(p);
    }
    if let Some(rc) = &sched.runtime_class_name {
        pod["runtimeClassName"] = json!(rc);
    }
    if !s.image_pull_secrets.is_empty() {
        pod["imagePullSecrets"] = json!(
            s.image_pull_secrets
                .iter()
                .map(|n| json!({"name": n}))
                .collect::<Vec<_>>()
        );
    }
    let strategy = match r.spec.rollout.strategy {
        // No spare GPU assumed: replace pods one at a time.
        RolloutStrategy::NoSurge => json!({"maxSurge": 0, "maxUnavailable": 1}),
        RolloutStrategy::Surge => {
            json!({"maxSurge": r.spec.rollout.max_surge.unwrap_or(1), "maxUnavailable": 0})
        }
    };
    typed(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": server_metadata(r, owner),
        "spec": {
            "replicas": r.spec.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": strategy},
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": config.startup_seconds + 600,
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        labels::SERVING_TARGET: target.to_annotation(),
                        labels::CACHE_KEY: target.cache_key,
                        labels::ENGINE_KEY: target.engine_key.clone().unwrap_or_default(),
                    },
                },
                "spec": pod,
            },
        },
    }))
}

/// The Service in front of the serving pods.
pub fn service(r: &Resolved, owner: &OwnerReference) -> Service {
    typed(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": server_metadata(r, owner),
        "spec": {
            "type": "ClusterIP",
            "selector": labels::server_selector(&r.name),
            "ports": [{"name": "http", "port": r.spec.server.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }))
}

/// A PodDisruptionBudget keeping all but one serving pod up during voluntary disruptions;
/// only built when there is more than one replica.
pub fn pdb(r: &Resolved, owner: &OwnerReference) -> Option<PodDisruptionBudget> {
    if r.spec.replicas <= 1 {
        return None;
    }
    Some(typed(json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": server_metadata(r, owner),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": labels::server_selector(&r.name)},
        },
    })))
}
