//! The serving Deployment, its Service and PodDisruptionBudget.
//!
//! The pod template is built from a [`ServingTarget`]: which model and engine the pods run,
//! and which adapters and ControlNets they load. The reconciler passes the desired target only
//! once its cache and engine are ready, and the target the pods already run otherwise, so a
//! precision change never takes serving pods down before the new engine exists.
//!
//! Adapters reach the pods as `--lora` / `--controlnet` flags of the pod template, only once
//! cached, so adding, changing or removing one rolls the pods with the rollout strategy's
//! behaviour (a new pod is ready before an old one stops with `Surge`) rather than hot-loading
//! it into running servers: after a restart, what a pod serves is exactly what its template
//! says, which is what the Deployment's updated replicas and the SD35Deployment's status
//! report. A hot-load would leave pods serving sets no object shows, and a load that fails
//! inside a running server with nowhere to say so.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, Lifecycle,
    LifecycleHandler, PodSpec, PodTemplateSpec, Probe, SecretKeySelector, SecretVolumeSource,
    Service, ServicePort, ServiceSpec, SleepAction, Volume,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sd35_contract::{
    AdapterKind, ArtifactArgs, CACHE_MOUNT, ControlNetArg, DeviceKind, LoraArg, Precision,
    ServeArgs, TERMINATION_MESSAGE_PATH, Variant, dedup_in_order, default_served_names, engine_dir,
    model_dir,
};
use sd35_crds::{ArtifactsSpec, RolloutStrategy};
use serde::{Deserialize, Serialize};

use super::{
    claim_volume, container_security, meta, mount, placement, pod_security, pull_policy,
    pull_secrets, tmp_volume,
};
use crate::config::{OperatorConfig, default_server_resources};
use crate::labels;
use crate::resolve::{FetchSource, Resolved, ResolvedAdapter};

/// An adapter or ControlNet the serving pods load: what its `--lora` or `--controlnet` says.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServedAdapter {
    pub kind: AdapterKind,
    /// The adapter's name, or the ControlNet's mode.
    pub name: String,
    /// Its key (its directory in the cache).
    pub key: String,
    /// What the server loads: its file, or its folder.
    pub path: std::path::PathBuf,
    /// A LoRA's scale for requests that name it without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
}

impl ServedAdapter {
    /// How the pods load a cached adapter.
    pub fn of(adapter: &ResolvedAdapter) -> Self {
        Self {
            kind: adapter.kind,
            name: adapter.name.clone(),
            key: adapter.key.clone(),
            path: adapter.served_path(),
            scale: adapter.scale,
        }
    }
}

/// What serving pods run: recorded as a pod template annotation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServingTarget {
    pub variant: Variant,
    pub precision: Precision,
    pub cache_claim: String,
    pub cache_key: String,
    pub engine_key: Option<String>,
    /// The adapters and ControlNets the pods load (the cached ones of the spec). Empty is left
    /// out, so a target without adapters reads as before they existed and rolls nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<ServedAdapter>,
}

impl ServingTarget {
    /// The target the spec asks for, loading the `served` adapters (those cached so far).
    pub fn desired(resolved: &Resolved, served: Vec<ServedAdapter>) -> Self {
        Self {
            variant: resolved.variant,
            precision: resolved.precision.into(),
            cache_claim: resolved.cache.claim.clone(),
            cache_key: resolved.cache_key.clone(),
            engine_key: resolved.engine_key.clone(),
            adapters: served,
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

/// Metadata of the serving Deployment, Service and PDB (and the add-ons): named after the
/// object, labelled as its server, owned by it.
pub(super) fn server_metadata(resolved: &Resolved, owner: &OwnerReference) -> ObjectMeta {
    let mut meta_labels = labels::common("server");
    meta_labels.extend(labels::server_selector(&resolved.name));
    meta(
        &resolved.name,
        &resolved.namespace,
        meta_labels,
        std::slice::from_ref(owner),
    )
}

/// The label selector of the serving pods.
pub(super) fn server_selector(resolved: &Resolved) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels::server_selector(&resolved.name)),
        ..Default::default()
    }
}

/// The model names the server answers to: the SD35Deployment's name first, then the
/// variant, the Hugging Face repository id, `sd3.5` and `stable-diffusion-3.5-<variant>`.
pub fn served_names(resolved: &Resolved, variant: Variant) -> Vec<String> {
    let repo = match &resolved.source {
        FetchSource::HuggingFace { repo, .. } => Some(repo.as_str()),
        _ => None,
    };
    let mut names = vec![resolved.name.clone()];
    names.extend(default_served_names(variant, repo));
    dedup_in_order(&mut names);
    names
}

fn serve_args(resolved: &Resolved, target: &ServingTarget) -> ServeArgs {
    let root = std::path::Path::new(CACHE_MOUNT);
    let s = &resolved.spec.server;
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
        served_model_names: served_names(resolved, target.variant),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        host: "0.0.0.0".to_owned(),
        port: u16::try_from(s.port).unwrap_or(8080),
        no_t5: !resolved.spec.model.text_encoders.t5,
        t5_max_tokens: u32::try_from(resolved.spec.model.text_encoders.t5_max_tokens)
            .unwrap_or(256),
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
        artifacts: artifact_args(s.artifacts.as_ref()),
        loras: target
            .adapters
            .iter()
            .filter(|a| a.kind == AdapterKind::Lora)
            .map(|a| LoraArg {
                name: a.name.clone(),
                scale: a.scale,
                path: a.path.clone(),
            })
            .collect(),
        controlnets: target
            .adapters
            .iter()
            .filter(|a| a.kind == AdapterKind::Controlnet)
            .filter_map(|a| {
                Some(ControlNetArg {
                    mode: a.name.parse().ok()?,
                    path: a.path.clone(),
                })
            })
            .collect(),
    }
}

/// The server's storage flags for `spec.server.artifacts` (none when unset). The credentials
/// are not among them: they reach the pod as environment variables from the Secret
/// ([`artifact_env`]).
fn artifact_args(spec: Option<&ArtifactsSpec>) -> ArtifactArgs {
    let Some(a) = spec else {
        return ArtifactArgs::default();
    };
    ArtifactArgs {
        artifacts_dir: None,
        artifacts_s3_bucket: Some(a.bucket.clone()),
        artifacts_s3_endpoint: a.endpoint.clone(),
        artifacts_s3_region: a.region.clone(),
        artifacts_s3_prefix: a.prefix.clone(),
        artifacts_s3_url_style: a.url_style,
        artifacts_url_seconds: u32::try_from(a.url_seconds).unwrap_or(3600),
    }
}

/// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` from the credentials Secret, by reference:
/// the values stay in the Secret, never in the Deployment, the SD35Deployment or the logs.
fn artifact_env(spec: Option<&ArtifactsSpec>) -> Vec<EnvVar> {
    let Some(a) = spec else {
        return Vec::new();
    };
    let from_secret = |name: &str, key: &str| EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: a.credentials_secret.name.clone(),
                key: key.to_owned(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    };
    vec![
        from_secret("AWS_ACCESS_KEY_ID", &a.credentials_secret.access_key_id_key),
        from_secret(
            "AWS_SECRET_ACCESS_KEY",
            &a.credentials_secret.secret_access_key_key,
        ),
    ]
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// The serving Deployment for a target.
pub fn deployment(
    resolved: &Resolved,
    config: &OperatorConfig,
    owner: &OwnerReference,
    target: &ServingTarget,
) -> Deployment {
    let s = &resolved.spec.server;
    let selector = labels::server_selector(&resolved.name);
    let mut pod_labels = labels::common("server");
    pod_labels.extend(selector);
    let mut args = vec!["serve".to_owned()];
    args.extend(serve_args(resolved, target).to_args());

    let mut resources = s.resources.clone().unwrap_or_else(default_server_resources);
    if s.gpu.count > 0 {
        // Extended resources are set as limits; Kubernetes copies them to requests.
        resources.limits.get_or_insert_with(BTreeMap::new).insert(
            s.gpu.resource_name.clone(),
            Quantity(s.gpu.count.to_string()),
        );
    }
    let mut mounts = vec![
        mount("cache", CACHE_MOUNT, Some(true)),
        mount("tmp", "/tmp", None),
    ];
    let mut volumes = vec![
        claim_volume("cache", &target.cache_claim, Some(true)),
        tmp_volume(),
    ];
    if let Some(auth) = &s.auth {
        mounts.push(mount("auth", "/etc/sd35/auth", Some(true)));
        volumes.push(Volume {
            name: "auth".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(auth.secret_ref.name.clone()),
                items: Some(vec![KeyToPath {
                    key: auth.secret_ref.key.clone(),
                    path: auth.secret_ref.key.clone(),
                    mode: None,
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let container = Container {
        name: "server".into(),
        image: Some(resolved.image.clone()),
        image_pull_policy: pull_policy(resolved),
        command: Some(vec!["sd35-server".into()]),
        args: Some(args),
        env: Some(artifact_env(s.artifacts.as_ref())).filter(|e| !e.is_empty()),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: s.port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(resources),
        security_context: Some(container_security()),
        volume_mounts: Some(mounts),
        // The server writes why it could not start (no GPU, a wrong engine) here; the
        // operator quotes it in the SD35Deployment's conditions.
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        // Model loading gets the whole startup budget; after that, readiness gates traffic
        // and liveness restarts a wedged server.
        startup_probe: Some(probe("/readyz", 10, (config.startup_seconds / 10).max(1))),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        // The Service's endpoints (and kube-proxy's rules) drop a deleted pod a moment after
        // its kubelet learns of the deletion: keep accepting for that moment before SIGTERM,
        // so a rollout never sends a new request to a closed port.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds: 5 }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let place = placement(resolved);
    let sched = &resolved.spec.scheduling;
    let pod = PodSpec {
        security_context: Some(pod_security()),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        // In-flight requests may run up to the request timeout; SIGTERM lets them finish.
        termination_grace_period_seconds: Some(i64::from(s.limits.request_timeout_seconds) + 30),
        containers: vec![container],
        volumes: Some(volumes),
        node_selector: place.node_selector,
        tolerations: place.tolerations,
        affinity: place.affinity,
        priority_class_name: sched.priority_class_name.clone(),
        runtime_class_name: sched.runtime_class_name.clone(),
        image_pull_secrets: pull_secrets(resolved),
        ..Default::default()
    };
    let rolling = match resolved.spec.rollout.strategy {
        // No spare GPU assumed: replace pods one at a time.
        RolloutStrategy::NoSurge => RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(0)),
            max_unavailable: Some(IntOrString::Int(1)),
        },
        RolloutStrategy::Surge => RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(
                resolved.spec.rollout.max_surge.unwrap_or(1),
            )),
            max_unavailable: Some(IntOrString::Int(0)),
        },
    };
    Deployment {
        metadata: server_metadata(resolved, owner),
        spec: Some(DeploymentSpec {
            replicas: Some(resolved.spec.replicas),
            selector: server_selector(resolved),
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(rolling),
            }),
            revision_history_limit: Some(3),
            progress_deadline_seconds: Some(config.startup_seconds + 600),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        (labels::SERVING_TARGET.to_owned(), target.to_annotation()),
                        (labels::CACHE_KEY.to_owned(), target.cache_key.clone()),
                        (
                            labels::ENGINE_KEY.to_owned(),
                            target.engine_key.clone().unwrap_or_default(),
                        ),
                    ])),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// The Service in front of the serving pods.
pub fn service(resolved: &Resolved, owner: &OwnerReference) -> Service {
    Service {
        metadata: server_metadata(resolved, owner),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(labels::server_selector(&resolved.name)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: resolved.spec.server.port,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// A PodDisruptionBudget keeping all but one serving pod up during voluntary disruptions;
/// only built when there is more than one replica.
pub fn pdb(resolved: &Resolved, owner: &OwnerReference) -> Option<PodDisruptionBudget> {
    if resolved.spec.replicas <= 1 {
        return None;
    }
    Some(PodDisruptionBudget {
        metadata: server_metadata(resolved, owner),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(server_selector(resolved)),
            ..Default::default()
        }),
        status: None,
    })
}
