//! The cache claim and the Jobs that fill it (`sd35-server fetch`) and build engines from it
//! (`sd35-server build-engine`). These are shared by every SD35Deployment of the namespace
//! with the same keys, so they are named by key, not by object.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use sd35_contract::{
    BuildEngineArgs, CACHE_MOUNT, ExitReason, FetchArgs, IMPORT_MOUNT, SourceArgs, TOKEN_ENV,
};
use serde_json::{Value, json};

use super::{container_security, placement, pod_security, typed};
use crate::config::{OperatorConfig, default_build_resources, default_fetch_resources};
use crate::labels;
use crate::resolve::{FetchSource, Resolved};

/// The cache claim. `owners` are the SD35Deployments using it (none when one of them asks to
/// retain it), so Kubernetes deletes it when the last user goes.
pub fn cache_claim(r: &Resolved, owners: &[OwnerReference]) -> PersistentVolumeClaim {
    let mut labels = labels::common("cache");
    labels.insert(labels::NAME.into(), "sd35-cache".into());
    labels.insert(labels::CACHE_KEY.into(), r.cache_key.clone());
    let mut spec = json!({
        "accessModes": r.cache.access_modes,
        "resources": {"requests": {"storage": r.cache.size}},
        "volumeMode": "Filesystem",
    });
    if let Some(class) = &r.cache.storage_class {
        spec["storageClassName"] = json!(class);
    }
    typed(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": r.cache.claim,
            "namespace": r.namespace,
            "labels": labels,
            "ownerReferences": owners,
        },
        "spec": spec,
    }))
}

/// Exit codes after which a retry cannot help: the Job fails at once instead of burning its
/// retries, and the operator names the cause.
fn fail_job_exit_codes() -> Vec<i32> {
    ExitReason::ALL
        .into_iter()
        .filter(|r| !r.retriable())
        .map(ExitReason::code)
        .collect()
}

/// What differs between the fetch and the build Job.
struct JobParts<'a> {
    name: String,
    component: &'a str,
    owner: &'a OwnerReference,
    limits: &'a sd35_crds::JobSpec,
    container: Value,
    volumes: Vec<Value>,
}

fn job(r: &Resolved, config: &OperatorConfig, parts: JobParts<'_>) -> Job {
    let JobParts {
        name,
        component,
        owner,
        limits: job_spec,
        container,
        mut volumes,
    } = parts;
    let mut labels = labels::common(component);
    labels.insert(labels::NAME.into(), format!("sd35-{component}"));
    labels.insert(labels::CACHE_KEY.into(), r.cache_key.clone());
    volumes.push(json!({"name": "cache", "persistentVolumeClaim": {"claimName": r.cache.claim}}));
    volumes.push(json!({"name": "tmp", "emptyDir": {}}));
    let mut pod = json!({
        "restartPolicy": "Never",
        "securityContext": pod_security(),
        "automountServiceAccountToken": false,
        "containers": [container],
        "volumes": volumes,
    });
    for (k, v) in placement(r) {
        pod[k] = v;
    }
    if !r.spec.server.image_pull_secrets.is_empty() {
        pod["imagePullSecrets"] = json!(
            r.spec
                .server
                .image_pull_secrets
                .iter()
                .map(|n| json!({"name": n}))
                .collect::<Vec<_>>()
        );
    }
    typed(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": r.namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "backoffLimit": job_spec.backoff_limit,
            "activeDeadlineSeconds": job_spec.active_deadline_seconds,
            "ttlSecondsAfterFinished": config.job_ttl_seconds,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": component, "operator": "In", "values": fail_job_exit_codes()}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "template": {
                "metadata": {"labels": labels},
                "spec": pod,
            },
        },
    }))
}

fn container(
    r: &Resolved,
    name: &str,
    args: Vec<String>,
    resources: Value,
    env: Vec<Value>,
) -> Value {
    let mut c = json!({
        "name": name,
        "image": r.image,
        "command": ["sd35-server"],
        "args": args,
        "env": env,
        "resources": resources,
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "cache", "mountPath": CACHE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    });
    if let Some(policy) = r.spec.server.image_pull_policy {
        c["imagePullPolicy"] = json!(policy);
    }
    c
}

/// The fetch Job: downloads (or imports) the model into `<cache>/models/<cache-key>`.
pub fn fetch_job(r: &Resolved, config: &OperatorConfig, owner: &OwnerReference) -> Job {
    let mut source = SourceArgs {
        hf_repo: None,
        http_url: None,
        import_dir: None,
    };
    let (mut revision, mut endpoint) = ("main".to_owned(), config.hf_endpoint.clone());
    let mut volumes = Vec::new();
    let mut import_mount = None;
    match &r.source {
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
            volumes.push(json!({"name": "import", "persistentVolumeClaim": {"claimName": claim, "readOnly": true}}));
            import_mount =
                Some(json!({"name": "import", "mountPath": IMPORT_MOUNT, "readOnly": true}));
        }
    }
    let args = FetchArgs {
        source,
        revision,
        hf_endpoint: endpoint,
        variant: r.variant,
        cache_root: CACHE_MOUNT.into(),
        cache_key: r.cache_key.clone(),
    };
    let mut env = Vec::new();
    if let Some(token) = &r.token {
        // The token travels from the Secret to the process only; the spec names the Secret.
        env.push(json!({"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}}));
    }
    let resources = r
        .spec
        .cache
        .fetch
        .resources
        .clone()
        .unwrap_or_else(default_fetch_resources);
    let mut c = container(
        r,
        "fetch",
        [vec!["fetch".to_owned()], args.to_args()].concat(),
        json!(resources),
        env,
    );
    if let (Some(mount), Some(mounts)) = (import_mount, c["volumeMounts"].as_array_mut()) {
        mounts.push(mount);
    }
    job(
        r,
        config,
        JobParts {
            name: labels::fetch_job(&r.cache_key),
            component: "fetch",
            owner,
            limits: &r.spec.cache.fetch,
            container: c,
            volumes,
        },
    )
}

/// The engine build Job: converts `<cache>/models/<cache-key>` into
/// `<cache>/engines/<engine-key>` for the precision. Only built when there is an engine key.
pub fn build_job(
    r: &Resolved,
    config: &OperatorConfig,
    owner: &OwnerReference,
    engine_key: &str,
) -> Job {
    let args = BuildEngineArgs {
        cache_root: CACHE_MOUNT.into(),
        cache_key: r.cache_key.clone(),
        engine_key: engine_key.to_owned(),
        precision: r.precision,
        variant: Some(r.variant),
    };
    let resources = r
        .spec
        .engine
        .job
        .resources
        .clone()
        .unwrap_or_else(default_build_resources);
    let c = container(
        r,
        "build",
        [vec!["build-engine".to_owned()], args.to_args()].concat(),
        json!(resources),
        Vec::new(),
    );
    let mut j = job(
        r,
        config,
        JobParts {
            name: labels::build_job(engine_key),
            component: "build",
            owner,
            limits: &r.spec.engine.job,
            container: c,
            volumes: Vec::new(),
        },
    );
    if let Some(l) = j.metadata.labels.as_mut() {
        l.insert(labels::ENGINE_KEY.into(), engine_key.to_owned());
    }
    if let Some(l) = j
        .spec
        .as_mut()
        .and_then(|s| s.template.metadata.as_mut())
        .and_then(|m| m.labels.as_mut())
    {
        l.insert(labels::ENGINE_KEY.into(), engine_key.to_owned());
    }
    j
}
