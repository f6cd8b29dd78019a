//! The cache claim and the Jobs that fill it (`sd35-server fetch`, and `fetch-adapter` for each
//! adapter and ControlNet) and build engines from it (`sd35-server build-engine`). These are
//! shared by every SD35Deployment of the namespace with the same keys, so they are named by
//! key, not by object.
//!
//! Each adapter has a fetch Job of its own rather than one Job for all: a failing download
//! fails that Job alone, its pods' termination message names that adapter's cause, and the
//! model and the other adapters go on; adding one starts one small Job and re-runs nothing.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSpec,
    PodTemplateSpec, ResourceRequirements, SecretKeySelector, Volume, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use sd35_contract::{
    BuildEngineArgs, CACHE_MOUNT, ExitReason, FetchArgs, IMPORT_MOUNT, SourceArgs,
    TERMINATION_MESSAGE_PATH, TOKEN_ENV,
};

use super::{
    claim_volume, container_security, meta, mount, placement, pod_security, pull_policy,
    pull_secrets, tmp_volume,
};
use crate::config::{OperatorConfig, default_build_resources, default_fetch_resources};
use crate::labels;
use crate::resolve::{FetchSource, Resolved, ResolvedAdapter};

/// The cache claim. `owners` are the SD35Deployments using it (none when one of them asks to
/// retain it), so Kubernetes deletes it when the last user goes.
pub fn cache_claim(resolved: &Resolved, owners: &[OwnerReference]) -> PersistentVolumeClaim {
    let mut labels = labels::common("cache");
    labels.insert(labels::NAME.into(), "sd35-cache".into());
    labels.insert(labels::CACHE_KEY.into(), resolved.cache_key.clone());
    PersistentVolumeClaim {
        metadata: meta(&resolved.cache.claim, &resolved.namespace, labels, owners),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(resolved.cache.access_modes.clone()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(resolved.cache.size.clone()),
                )])),
                ..Default::default()
            }),
            volume_mode: Some("Filesystem".into()),
            storage_class_name: resolved.cache.storage_class.clone(),
            ..Default::default()
        }),
        status: None,
    }
}

/// Exit codes after which a retry cannot help: the Job fails at once instead of burning its
/// retries, and the operator names the cause.
fn fail_job_exit_codes() -> Vec<i32> {
    ExitReason::ALL
        .into_iter()
        .filter(|reason| !reason.retriable())
        .map(ExitReason::code)
        .collect()
}

/// What differs between the fetch and the build Job.
struct JobParts<'a> {
    name: String,
    component: &'a str,
    /// Its `app.kubernetes.io/name`, which the operator's watch of Job pods selects.
    app_name: &'static str,
    owners: &'a [OwnerReference],
    claim_uid: &'a str,
    limits: &'a sd35_crds::JobSpec,
    container: Container,
    volumes: Vec<Volume>,
    /// Extra labels of the Job and its pods.
    labels: Vec<(String, String)>,
}

fn job(resolved: &Resolved, config: &OperatorConfig, parts: JobParts<'_>) -> Job {
    let JobParts {
        name,
        component,
        app_name,
        owners,
        claim_uid,
        limits: job_spec,
        container,
        mut volumes,
        labels: extra,
    } = parts;
    let mut labels = labels::common(component);
    labels.insert(labels::NAME.into(), app_name.to_owned());
    labels.insert(labels::CACHE_KEY.into(), resolved.cache_key.clone());
    labels.extend(extra);
    volumes.push(claim_volume("cache", &resolved.cache.claim, None));
    volumes.push(tmp_volume());
    let place = placement(resolved);
    let pod = PodSpec {
        restart_policy: Some("Never".into()),
        security_context: Some(pod_security()),
        automount_service_account_token: Some(false),
        containers: vec![container],
        volumes: Some(volumes),
        node_selector: place.node_selector,
        tolerations: place.tolerations,
        affinity: place.affinity,
        image_pull_secrets: pull_secrets(resolved),
        ..Default::default()
    };
    let mut metadata = meta(&name, &resolved.namespace, labels.clone(), owners);
    metadata.annotations = Some(BTreeMap::from([(
        labels::CLAIM_UID.to_owned(),
        claim_uid.to_owned(),
    )]));
    Job {
        metadata,
        spec: Some(JobSpec {
            backoff_limit: Some(job_spec.backoff_limit),
            active_deadline_seconds: Some(job_spec.active_deadline_seconds),
            ttl_seconds_after_finished: Some(config.job_ttl_seconds),
            pod_failure_policy: Some(PodFailurePolicy {
                rules: vec![
                    PodFailurePolicyRule {
                        action: "FailJob".into(),
                        on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                            container_name: Some(component.to_owned()),
                            operator: "In".into(),
                            values: fail_job_exit_codes(),
                        }),
                        on_pod_conditions: None,
                    },
                    PodFailurePolicyRule {
                        action: "Ignore".into(),
                        on_exit_codes: None,
                        on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                            type_: "DisruptionTarget".into(),
                            status: "True".into(),
                        }]),
                    },
                ],
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    }
}

fn container(
    resolved: &Resolved,
    name: &str,
    args: Vec<String>,
    resources: ResourceRequirements,
    env: Vec<EnvVar>,
) -> Container {
    Container {
        name: name.to_owned(),
        image: Some(resolved.image.clone()),
        image_pull_policy: pull_policy(resolved),
        command: Some(vec!["sd35-server".into()]),
        args: Some(args),
        env: Some(env),
        resources: Some(resources),
        security_context: Some(container_security()),
        volume_mounts: Some(vec![
            mount("cache", CACHE_MOUNT, None),
            mount("tmp", "/tmp", None),
        ]),
        // The Job writes why it failed here (the URL and the HTTP status, the full volume);
        // the operator quotes it in the SD35Deployment's conditions.
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// The fetch Job: downloads (or imports) the model into `<cache>/models/<cache-key>`.
///
/// `owners` are the SD35Deployments using the cache, so the Job (and its completed pod, which
/// holds the volume) goes with the last of them; `claim_uid` names the claim it fills.
pub fn fetch_job(
    resolved: &Resolved,
    config: &OperatorConfig,
    owners: &[OwnerReference],
    claim_uid: &str,
) -> Job {
    let mut source = SourceArgs {
        hf_repo: None,
        http_url: None,
        import_dir: None,
    };
    let (mut revision, mut endpoint) = ("main".to_owned(), config.hf_endpoint.clone());
    let mut volumes = Vec::new();
    let mut import_mount = None;
    match &resolved.source {
        FetchSource::HuggingFace {
            endpoint: e,
            repo,
            revision: rev,
        } => {
            source.hf_repo = Some(repo.clone());
            revision = rev.clone();
            endpoint = e.clone();
        }
        FetchSource::Http { url } => source.http_url = Some(url.clone()),
        FetchSource::Pvc { claim, path } => {
            let dir = if path.is_empty() {
                IMPORT_MOUNT.to_owned()
            } else {
                format!("{IMPORT_MOUNT}/{path}")
            };
            source.import_dir = Some(dir.into());
            volumes.push(claim_volume("import", claim, Some(true)));
            import_mount = Some(mount("import", IMPORT_MOUNT, Some(true)));
        }
    }
    let args = FetchArgs {
        source,
        revision,
        hf_endpoint: endpoint,
        variant: resolved.variant,
        cache_root: CACHE_MOUNT.into(),
        cache_key: resolved.cache_key.clone(),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
    };
    let env = token_env(resolved.token.as_ref());
    let resources = resolved
        .spec
        .cache
        .fetch
        .resources
        .clone()
        .unwrap_or_else(default_fetch_resources);
    let mut c = container(
        resolved,
        "fetch",
        [vec!["fetch".to_owned()], args.to_args()].concat(),
        resources,
        env,
    );
    if let (Some(m), Some(mounts)) = (import_mount, c.volume_mounts.as_mut()) {
        mounts.push(m);
    }
    job(
        resolved,
        config,
        JobParts {
            name: labels::fetch_job(&resolved.cache_key),
            component: "fetch",
            app_name: labels::FETCH_NAME,
            owners,
            claim_uid,
            limits: &resolved.spec.cache.fetch,
            container: c,
            volumes,
            labels: Vec::new(),
        },
    )
}

/// The environment that carries a source's token into a fetch: from the Secret to the process
/// only (the spec names the Secret, never the value).
fn token_env(token: Option<&sd35_crds::SecretKeyRef>) -> Vec<EnvVar> {
    token
        .map(|token| EnvVar {
            name: TOKEN_ENV.into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: token.name.clone(),
                    key: token.key.clone(),
                    optional: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .into_iter()
        .collect()
}

/// The fetch Job of one adapter or ControlNet: downloads (or imports) it into
/// `<cache>/adapters/<adapter-key>`, beside the model. Owned like the model's fetch Job;
/// limits and resources are `spec.cache.fetch`'s.
pub fn adapter_job(
    resolved: &Resolved,
    config: &OperatorConfig,
    owners: &[OwnerReference],
    claim_uid: &str,
    adapter: &ResolvedAdapter,
) -> Job {
    let resources = resolved
        .spec
        .cache
        .fetch
        .resources
        .clone()
        .unwrap_or_else(default_fetch_resources);
    let mut c = container(
        resolved,
        "adapter",
        [vec!["fetch-adapter".to_owned()], adapter.fetch.to_args()].concat(),
        resources,
        token_env(adapter.token.as_ref()),
    );
    let mut volumes = Vec::new();
    if let Some(claim) = &adapter.import_claim {
        volumes.push(claim_volume("import", claim, Some(true)));
        if let Some(mounts) = c.volume_mounts.as_mut() {
            mounts.push(mount("import", IMPORT_MOUNT, Some(true)));
        }
    }
    job(
        resolved,
        config,
        JobParts {
            name: labels::adapter_job(&adapter.key),
            component: "adapter",
            app_name: labels::ADAPTER_NAME,
            owners,
            claim_uid,
            limits: &resolved.spec.cache.fetch,
            container: c,
            volumes,
            labels: vec![(labels::ADAPTER_KEY.into(), adapter.key.clone())],
        },
    )
}

/// The engine build Job: converts `<cache>/models/<cache-key>` into
/// `<cache>/engines/<engine-key>` for the precision. Only built when there is an engine key.
/// Owned like the fetch Job.
pub fn build_job(
    resolved: &Resolved,
    config: &OperatorConfig,
    owners: &[OwnerReference],
    claim_uid: &str,
    engine_key: &str,
) -> Job {
    let args = BuildEngineArgs {
        cache_root: CACHE_MOUNT.into(),
        cache_key: resolved.cache_key.clone(),
        engine_key: engine_key.to_owned(),
        precision: resolved.precision,
        variant: Some(resolved.variant),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
    };
    let resources = resolved
        .spec
        .engine
        .job
        .resources
        .clone()
        .unwrap_or_else(default_build_resources);
    let c = container(
        resolved,
        "build",
        [vec!["build-engine".to_owned()], args.to_args()].concat(),
        resources,
        Vec::new(),
    );
    job(
        resolved,
        config,
        JobParts {
            name: labels::build_job(engine_key),
            component: "build",
            app_name: labels::BUILD_NAME,
            owners,
            claim_uid,
            limits: &resolved.spec.engine.job,
            container: c,
            volumes: Vec::new(),
            labels: vec![(labels::ENGINE_KEY.into(), engine_key.to_owned())],
        },
    )
}
