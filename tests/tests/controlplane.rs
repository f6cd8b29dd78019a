//! The local control plane behaves like a real GPU cluster: pods requesting GPUs are
//! scheduled onto the kwok nodes and become Ready, Job pods succeed, claims of the default
//! StorageClass bind, and the API server is the pinned Kubernetes version.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams};
use sd35_e2e::{Probe, poll_until, shared_cluster};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a valid manifest")
}

fn is_pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|condition| condition.type_ == "Ready" && condition.status == "True")
        })
}

#[tokio::test]
async fn gpu_deployment_becomes_available_on_kwok_nodes() {
    let cluster = shared_cluster();
    let namespace = cluster.temp_namespace("gpu-deployment").await;
    let deployments: Api<Deployment> = namespace.api();
    let deployment: Deployment = from_json(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "gpu" },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "gpu" } },
            "template": {
                "metadata": { "labels": { "app": "gpu" } },
                "spec": {
                    "containers": [{
                        "name": "server",
                        "image": "registry.invalid/sd35-server:test",
                        "resources": {
                            "requests": { "nvidia.com/gpu": "1" },
                            "limits": { "nvidia.com/gpu": "1" }
                        }
                    }]
                }
            }
        }
    }));
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();

    poll_until(
        "the Deployment to have 2 available replicas",
        TIMEOUT,
        || async {
            let status = deployments.get("gpu").await?.status.unwrap_or_default();
            Ok(match status.available_replicas {
                Some(2) => Probe::Ready(()),
                available => Probe::Pending(format!("available replicas: {available:?}")),
            })
        },
    )
    .await
    .unwrap();

    let pods: Api<Pod> = namespace.api();
    let pods = pods
        .list(&ListParams::default().labels("app=gpu"))
        .await
        .unwrap()
        .items;
    assert_eq!(pods.len(), 2);
    for pod in &pods {
        let phase = pod
            .status
            .as_ref()
            .and_then(|status| status.phase.as_deref());
        assert_eq!(phase, Some("Running"));
        assert!(is_pod_ready(pod), "pod is not Ready: {:?}", pod.status);
        let node = pod.spec.as_ref().and_then(|spec| spec.node_name.clone());
        assert!(
            node.as_ref()
                .is_some_and(|node| cluster.gpu_node_names().contains(node)),
            "pod landed on {node:?}, not on a GPU node"
        );
    }
}

#[tokio::test]
async fn job_with_a_default_class_claim_completes() {
    let cluster = shared_cluster();
    let namespace = cluster.temp_namespace("claim-job").await;
    let claims: Api<PersistentVolumeClaim> = namespace.api();
    let jobs: Api<Job> = namespace.api();
    let claim: PersistentVolumeClaim = from_json(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": { "name": "cache" },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": { "requests": { "storage": "1Gi" } }
        }
    }));
    let job: Job = from_json(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": { "name": "fetch" },
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "fetch",
                        "image": "registry.invalid/sd35-server:test",
                        "args": ["fetch"],
                        "volumeMounts": [{ "name": "cache", "mountPath": "/cache" }]
                    }],
                    "volumes": [{
                        "name": "cache",
                        "persistentVolumeClaim": { "claimName": "cache" }
                    }]
                }
            }
        }
    }));
    claims.create(&PostParams::default(), &claim).await.unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();

    let bound = poll_until("the claim to be Bound", TIMEOUT, || async {
        let claim = claims.get("cache").await?;
        let phase = claim
            .status
            .as_ref()
            .and_then(|status| status.phase.clone());
        Ok(match phase.as_deref() {
            Some("Bound") => Probe::Ready(claim),
            other => Probe::Pending(format!("phase {other:?}")),
        })
    })
    .await
    .unwrap();
    let spec = bound.spec.unwrap();
    assert_eq!(spec.storage_class_name.as_deref(), Some("standard"));
    assert!(
        spec.volume_name
            .is_some_and(|name| name.starts_with("pvc-"))
    );
    assert_eq!(bound.status.unwrap().capacity.unwrap()["storage"].0, "1Gi");

    poll_until("the Job to be Complete", TIMEOUT, || async {
        let conditions = jobs
            .get("fetch")
            .await?
            .status
            .and_then(|status| status.conditions)
            .unwrap_or_default();
        let complete = conditions
            .iter()
            .any(|condition| condition.type_ == "Complete" && condition.status == "True");
        let failed = conditions
            .iter()
            .find(|condition| condition.type_ == "Failed" && condition.status == "True");
        if let Some(failed) = failed {
            anyhow::bail!("the Job failed: {:?}", failed.message);
        }
        Ok(if complete {
            Probe::Ready(())
        } else {
            Probe::Pending(format!("conditions: {conditions:?}"))
        })
    })
    .await
    .unwrap();
}

#[test]
fn kubectl_reports_the_pinned_server_version() {
    let output = shared_cluster()
        .kubectl()
        .args(["version", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl version failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let version: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(version["serverVersion"]["gitVersion"], "v1.34.4");
    assert_eq!(version["clientVersion"]["gitVersion"], "v1.34.4");
}

#[tokio::test]
async fn audit_log_records_each_write_once() {
    let cluster = shared_cluster();
    let namespace = cluster.temp_namespace("audit").await;
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> = namespace.api();
    let config_map = from_json(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": "audited" },
        "data": { "key": "value" }
    }));
    config_maps
        .create(&PostParams::default(), &config_map)
        .await
        .unwrap();

    let audit_log = cluster.audit_log_path();
    let creates = poll_until("the create in the audit log", TIMEOUT, || async {
        let log = std::fs::read_to_string(&audit_log)?;
        let creates: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| {
                event["verb"] == "create"
                    && event["objectRef"]["resource"] == "configmaps"
                    && event["objectRef"]["namespace"] == namespace.name()
                    && event["objectRef"]["name"] == "audited"
            })
            .collect();
        Ok(if creates.is_empty() {
            Probe::Pending("no matching event yet".into())
        } else {
            Probe::Ready(creates)
        })
    })
    .await
    .unwrap();
    assert_eq!(creates.len(), 1, "{creates:?}");
    assert_eq!(creates[0]["user"]["username"], "admin");
    assert_eq!(creates[0]["level"], "Metadata");
    assert_eq!(creates[0]["stage"], "ResponseComplete");
}
