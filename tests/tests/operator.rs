#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

//! The operator as a real process against the real control plane: an SD35Deployment goes
//! CacheReady → EngineReady → Ready with pods on kwok GPU nodes; scale, precision changes,
//! failures, shared caches, self-healing, deletion, pausing and a quiet steady state behave
//! as documented.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, PersistentVolumeClaim, Pod, Secret, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use sd35_crds::SD35Deployment;
use sd35_e2e::{
    Cluster, OperatorProcess, Probe, TestNamespace, condition, has_condition, install_crd,
    kubectl_apply, poll_until, repo_root, shared_cluster, summary, wait_for, wait_ready,
};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

struct Setup {
    cluster: &'static Cluster,
    ns: TestNamespace,
    operator: OperatorProcess,
    api: Api<SD35Deployment>,
}

async fn setup(prefix: &str) -> Setup {
    let cluster = shared_cluster();
    install_crd(cluster).expect("install the CRD");
    let ns = cluster.temp_namespace(prefix).await;
    let operator = OperatorProcess::start(cluster, ns.name(), &[]).expect("start the operator");
    let api = ns.api::<SD35Deployment>();
    Setup {
        cluster,
        ns,
        operator,
        api,
    }
}

fn apply(s: &Setup, yaml: &str) {
    let out = kubectl_apply(s.cluster, s.ns.name(), yaml).expect("kubectl apply");
    assert!(
        out.status.success(),
        "apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn manifest(name: &str, spec: &str) -> String {
    let indented: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata:\n  name: {name}\nspec:\n{indented}"
    )
}

async fn ready(s: &Setup, name: &str) -> SD35Deployment {
    match wait_ready(&s.api, name, TIMEOUT).await {
        Ok(o) => o,
        Err(e) => panic!("{e:#}\noperator log:\n{}", s.operator.log()),
    }
}

async fn server_pods(s: &Setup, name: &str) -> Vec<Pod> {
    let pods: Api<Pod> = s.ns.api();
    let lp = ListParams::default().labels(&format!(
        "app.kubernetes.io/instance={name},app.kubernetes.io/name=sd35-server"
    ));
    pods.list(&lp).await.unwrap().items
}

#[tokio::test]
async fn an_example_goes_cached_built_ready_then_scales_heals_and_deletes() {
    let s = setup("lifecycle").await;
    let secrets: Api<Secret> = s.ns.api();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "hf-token"}, "stringData": {"token": "hf_e2e"}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let yaml = std::fs::read_to_string(repo_root().join("examples/large-bf16.yaml")).unwrap();
    apply(&s, &yaml);

    let obj = ready(&s, "sd35-large").await;
    let status = obj.status.clone().unwrap();
    for c in ["CacheReady", "EngineReady", "Available"] {
        assert!(has_condition(&obj, c, "True"), "{c}: {}", summary(&obj));
    }
    assert!(has_condition(&obj, "Reconciling", "False") && has_condition(&obj, "Stalled", "False"));
    assert_eq!(status.phase, Some(sd35_crds::Phase::Ready));
    assert_eq!(status.ready_replicas, 1);
    let cache = status.cache.clone().unwrap();
    assert!(cache.ready);
    let engine = status.engine.clone().unwrap();
    assert!(engine.ready);
    assert_eq!(
        status.endpoint.as_deref(),
        Some(format!("http://sd35-large.{}.svc:8080", s.ns.name()).as_str())
    );

    // The Jobs ran and succeeded; the token came from the Secret by reference.
    let jobs: Api<Job> = s.ns.api();
    let fetch = jobs
        .get(&format!("sd35-fetch-{}", cache.key))
        .await
        .unwrap();
    assert_eq!(fetch.status.as_ref().and_then(|st| st.succeeded), Some(1));
    let env = &fetch
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .env;
    assert!(
        !serde_json::to_string(env).unwrap().contains("hf_e2e"),
        "token value copied into the Job"
    );
    let build = jobs
        .get(&format!("sd35-build-{}", engine.key))
        .await
        .unwrap();
    assert_eq!(build.status.as_ref().and_then(|st| st.succeeded), Some(1));
    // Serving pods run on the GPU nodes with one GPU each.
    let pods = server_pods(&s, "sd35-large").await;
    assert_eq!(pods.len(), 1);
    let pod = &pods[0];
    assert!(
        s.cluster
            .gpu_node_names()
            .contains(pod.spec.as_ref().unwrap().node_name.as_ref().unwrap())
    );
    assert_eq!(
        pod.status.as_ref().unwrap().phase.as_deref(),
        Some("Running")
    );
    // kubectl shows the printer columns; events tell the story.
    let out = s
        .cluster
        .kubectl()
        .args(["get", "sd35", "-n", s.ns.name()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("VARIANT") && table.contains("large") && table.contains("Ready"),
        "{table}"
    );
    let events: Api<Event> = s.ns.api();
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for r in [
        "FetchStarted",
        "Cached",
        "BuildStarted",
        "EngineBuilt",
        "DeploymentCreated",
    ] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no {r} event in {reasons:?}"
        );
    }

    // kubectl scale goes through the scale subresource to 3 ready replicas.
    let out = s
        .cluster
        .kubectl()
        .args([
            "scale",
            "-n",
            s.ns.name(),
            "sd35/sd35-large",
            "--replicas=3",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(&s.api, "sd35-large", "3 ready replicas", TIMEOUT, |o| {
        o.status.as_ref().is_some_and(|st| st.ready_replicas == 3)
            && has_condition(o, "Ready", "True")
    })
    .await
    .unwrap();
    let pdbs: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> = s.ns.api();
    assert!(
        pdbs.get_opt("sd35-large").await.unwrap().is_some(),
        "a PDB once replicas > 1"
    );

    // Deleted children come back; a hand edit of an owned field is undone.
    let deployments: Api<Deployment> = s.ns.api();
    let services: Api<Service> = s.ns.api();
    let old_uid = deployments.get("sd35-large").await.unwrap().uid();
    deployments
        .delete("sd35-large", &DeleteParams::default())
        .await
        .unwrap();
    services
        .delete("sd35-large", &DeleteParams::default())
        .await
        .unwrap();
    poll_until("Deployment and Service recreated", TIMEOUT, || async {
        let d = deployments.get_opt("sd35-large").await?;
        let svc = services.get_opt("sd35-large").await?;
        Ok(match (d, svc) {
            (Some(d), Some(_)) if d.uid() != old_uid => Probe::Ready(()),
            (d, svc) => Probe::Pending(format!(
                "deployment {:?} service {}",
                d.map(|d| d.uid()),
                svc.is_some()
            )),
        })
    })
    .await
    .unwrap();
    let edit = json!({"spec": {"template": {"spec": {"containers": [{"name": "server", "image": "edited:1"}]}}}});
    deployments
        .patch(
            "sd35-large",
            &PatchParams::default(),
            &Patch::Strategic(&edit),
        )
        .await
        .unwrap();
    poll_until("image restored", TIMEOUT, || async {
        let d = deployments.get("sd35-large").await?;
        let image = d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .clone()
            .unwrap_or_default();
        Ok(if image == "sd35-server:e2e" {
            Probe::Ready(())
        } else {
            Probe::Pending(image)
        })
    })
    .await
    .unwrap();
    ready(&s, "sd35-large").await;

    // Deleting the object removes its children, the cache claim included (not retained).
    s.api
        .delete("sd35-large", &DeleteParams::default())
        .await
        .unwrap();
    let claims: Api<PersistentVolumeClaim> = s.ns.api();
    let claim_name = cache.claim_name.clone();
    poll_until("children garbage-collected", TIMEOUT, || async {
        let d = deployments.get_opt("sd35-large").await?;
        let svc = services.get_opt("sd35-large").await?;
        let claim = claims.get_opt(&claim_name).await?;
        let claim_going = claim
            .as_ref()
            .is_none_or(|c| c.metadata.deletion_timestamp.is_some());
        Ok(if d.is_none() && svc.is_none() && claim_going {
            Probe::Ready(())
        } else {
            Probe::Pending(format!(
                "deployment {} service {} claim {:?}",
                d.is_some(),
                svc.is_some(),
                claim.map(|c| c.metadata.deletion_timestamp)
            ))
        })
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn precision_change_builds_the_engine_first_and_surges_without_losing_capacity() {
    let s = setup("precision").await;
    apply(
        &s,
        &manifest(
            "sd",
            "variant: medium\nreplicas: 2\nrollout: {strategy: Surge}",
        ),
    );
    let before = ready(&s, "sd").await;
    let old_engine = before.status.unwrap().engine.unwrap().key;

    // Watch the Deployment and Jobs closely while the precision changes.
    let deployments: Api<Deployment> = s.ns.api();
    let jobs: Api<Job> = s.ns.api();
    let observer = {
        let (deployments, jobs, api) = (deployments.clone(), jobs.clone(), s.api.clone());
        let old_engine = old_engine.clone();
        tokio::spawn(async move {
            let mut min_ready = i32::MAX;
            let mut switched_before_built = Vec::new();
            let started = std::time::Instant::now();
            loop {
                let d = deployments.get("sd").await.unwrap();
                let ready = d
                    .status
                    .as_ref()
                    .and_then(|st| st.ready_replicas)
                    .unwrap_or(0);
                min_ready = min_ready.min(ready);
                let annotations = d
                    .spec
                    .as_ref()
                    .unwrap()
                    .template
                    .metadata
                    .as_ref()
                    .unwrap()
                    .annotations
                    .clone()
                    .unwrap_or_default();
                let engine = annotations
                    .get("sd35.io/engine-key")
                    .cloned()
                    .unwrap_or_default();
                if engine != old_engine {
                    let job = jobs.get_opt(&format!("sd35-build-{engine}")).await.unwrap();
                    let built = job.and_then(|j| j.status).and_then(|st| st.succeeded) == Some(1);
                    if !built {
                        switched_before_built.push(engine.clone());
                    }
                }
                let o = api.get("sd").await.unwrap();
                let done = o.spec.precision == sd35_crds::Precision::Fp8
                    && has_condition(&o, "Ready", "True")
                    && o.status.as_ref().and_then(|st| st.observed_generation)
                        == o.metadata.generation;
                if done || started.elapsed() > TIMEOUT {
                    return (min_ready, switched_before_built, done);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    s.api
        .patch(
            "sd",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"precision": "fp8"}})),
        )
        .await
        .unwrap();
    let (min_ready, switched_before_built, done) = observer.await.unwrap();
    assert!(
        done,
        "did not become Ready on fp8; operator log:\n{}",
        s.operator.log()
    );
    assert!(
        switched_before_built.is_empty(),
        "pods were pointed at engines before they were built: {switched_before_built:?}"
    );
    assert!(
        min_ready >= 2,
        "ready replicas dropped to {min_ready} during a surge rollout"
    );
    let after = ready(&s, "sd").await;
    let new_engine = after.status.unwrap().engine.unwrap().key;
    assert_ne!(new_engine, old_engine);
    let job = jobs.get(&format!("sd35-build-{new_engine}")).await.unwrap();
    let args = job.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(args.contains(&"--precision=fp8".to_owned()), "{args:?}");
    // Same cache: no second fetch.
    let fetches = jobs
        .list(&ListParams::default().labels("app.kubernetes.io/component=fetch"))
        .await
        .unwrap();
    assert_eq!(fetches.items.len(), 1);
}

/// A node no kubelet or kwok manages: pods scheduled there only change when the test says so.
async fn manual_node(cluster: &Cluster, label: &str) -> (String, tokio::task::JoinHandle<()>) {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(cluster.client());
    let name = format!("manual-{label}");
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"sd35.io/e2e-node": label, "kubernetes.io/hostname": name}},
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let capacity = json!({"cpu": "8", "memory": "32Gi", "pods": "20", "nvidia.com/gpu": "8"});
    let status = json!({"status": {
        "capacity": capacity, "allocatable": capacity,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Manual", "message": "set by the test",
                        "lastHeartbeatTime": k8s_openapi::jiff::Timestamp::now().to_string(),
                        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string()}]
    }});
    nodes
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    // Heartbeats keep the node lifecycle controller from tainting it unreachable.
    let (heart_nodes, heart_name) = (nodes.clone(), name.clone());
    let heartbeat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let beat = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Manual",
                "message": "set by the test", "lastHeartbeatTime": now}]}});
            let _ = heart_nodes
                .patch_status(
                    &heart_name,
                    &PatchParams::default(),
                    &Patch::Strategic(&beat),
                )
                .await;
        }
    });
    (name, heartbeat)
}

/// Marks the fetch pod of `job` as failed with `exit_code`, as a kubelet would.
async fn fail_job_pod(s: &Setup, job: &str, exclude: &[String]) -> String {
    let pods: Api<Pod> = s.ns.api();
    let pod = poll_until(
        &format!("a new pod of {job} on the manual node"),
        TIMEOUT,
        || async {
            let list = pods
                .list(&ListParams::default().labels(&format!("job-name={job}")))
                .await?;
            Ok(
                match list.items.into_iter().find(|p| {
                    !exclude.contains(&p.uid().unwrap_or_default())
                        && p.spec
                            .as_ref()
                            .and_then(|sp| sp.node_name.as_ref())
                            .is_some()
                }) {
                    Some(p) => Probe::Ready(p),
                    None => Probe::Pending("no scheduled pod yet".into()),
                },
            )
        },
    )
    .await
    .unwrap();
    pod.uid().unwrap()
}

async fn fail_pod(s: &Setup, job: &str, exclude: &[String], exit_code: i32) -> String {
    let uid = fail_job_pod(s, job, exclude).await;
    let pods: Api<Pod> = s.ns.api();
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .unwrap();
    let pod = list
        .items
        .into_iter()
        .find(|p| p.uid().as_deref() == Some(uid.as_str()))
        .unwrap();
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({"status": {
        "phase": "Failed",
        "containerStatuses": [{
            "name": "fetch", "image": "sd35-server:e2e", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": exit_code, "reason": "Error", "startedAt": now, "finishedAt": now}}
        }]
    }});
    pods.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await
    .unwrap();
    uid
}

#[tokio::test]
async fn failing_fetches_report_their_cause_stall_after_the_budget_and_retry_on_change() {
    let s = setup("failing").await;
    let label = s.ns.name().to_owned();
    let (node, heartbeat) = manual_node(s.cluster, &label).await;

    // A retriable failure (network, exit 15) uses the Job's retries, then stalls.
    let spec = |url: &str, backoff: i32| {
        format!(
            "variant: large-turbo\nmodel: {{source: {{http: {{url: '{url}'}}}}}}\ncache: {{fetch: {{backoffLimit: {backoff}}}}}\nscheduling: {{nodeSelector: {{sd35.io/e2e-node: {label}}}}}"
        )
    };
    apply(
        &s,
        &manifest("flaky", &spec("https://mirror.invalid/flaky/", 1)),
    );
    let obj = wait_for(&s.api, "flaky", "cache status", TIMEOUT, |o| {
        o.status.as_ref().and_then(|st| st.cache.as_ref()).is_some()
    })
    .await
    .unwrap();
    let job = format!("sd35-fetch-{}", obj.status.unwrap().cache.unwrap().key);
    let first = fail_pod(&s, &job, &[], 15).await;
    let o = wait_for(&s.api, "flaky", "a failed attempt reported", TIMEOUT, |o| {
        condition(o, "CacheReady").is_some_and(|c| c.message.contains("failed attempts"))
    })
    .await
    .unwrap();
    assert!(
        has_condition(&o, "Ready", "False") && has_condition(&o, "Stalled", "False"),
        "{}",
        summary(&o)
    );
    let second = fail_pod(&s, &job, std::slice::from_ref(&first), 15).await;
    let o = wait_for(&s.api, "flaky", "Stalled", TIMEOUT, |o| {
        has_condition(o, "Stalled", "True")
    })
    .await
    .unwrap();
    assert_eq!(
        condition(&o, "CacheReady").unwrap().reason,
        "FetchFailed",
        "{}",
        summary(&o)
    );
    assert!(has_condition(&o, "Ready", "False"));
    assert!(has_condition(&o, "Reconciling", "False"));
    assert_eq!(
        o.status.as_ref().unwrap().phase,
        Some(sd35_crds::Phase::Failed)
    );

    // A spec change retries: a new Job, a new pod.
    apply(
        &s,
        &manifest("flaky", &spec("https://mirror.invalid/flaky/", 2)),
    );
    fail_job_pod(&s, &job, &[first, second]).await;
    let o = wait_for(&s.api, "flaky", "retrying", TIMEOUT, |o| {
        has_condition(o, "Stalled", "False")
    })
    .await
    .unwrap();
    assert!(has_condition(&o, "CacheReady", "False"));

    // A non-retriable failure (401, exit 10) fails the Job at once and names the cause.
    apply(
        &s,
        &manifest("gated", &spec("https://mirror.invalid/gated/", 3)),
    );
    let obj = wait_for(&s.api, "gated", "cache status", TIMEOUT, |o| {
        o.status.as_ref().and_then(|st| st.cache.as_ref()).is_some()
    })
    .await
    .unwrap();
    let job = format!("sd35-fetch-{}", obj.status.unwrap().cache.unwrap().key);
    fail_pod(&s, &job, &[], 10).await;
    let o = wait_for(&s.api, "gated", "Stalled", TIMEOUT, |o| {
        has_condition(o, "Stalled", "True")
    })
    .await
    .unwrap();
    let cache = condition(&o, "CacheReady").unwrap();
    assert_eq!(cache.reason, "Unauthorized", "{}", summary(&o));
    assert!(cache.message.contains("token"), "{}", cache.message);
    assert_eq!(condition(&o, "Ready").unwrap().reason, "Unauthorized");

    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(s.cluster.client());
    heartbeat.abort();
    nodes.delete(&node, &DeleteParams::default()).await.unwrap();
}

#[tokio::test]
async fn two_deployments_of_one_model_share_one_claim_and_one_fetch() {
    let s = setup("shared").await;
    apply(&s, &manifest("a", "variant: large\nprecision: bf16"));
    apply(&s, &manifest("b", "variant: large\nprecision: fp8"));
    let a = ready(&s, "a").await;
    let b = ready(&s, "b").await;
    let (ca, cb) = (
        a.status.unwrap().cache.unwrap(),
        b.status.unwrap().cache.unwrap(),
    );
    assert_eq!(ca, cb);
    let claims: Api<PersistentVolumeClaim> = s.ns.api();
    let all = claims.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(
        all.len(),
        1,
        "one claim: {:?}",
        all.iter().map(ResourceExt::name_any).collect::<Vec<_>>()
    );
    let owners: Vec<String> = all[0]
        .owner_references()
        .iter()
        .map(|o| o.name.clone())
        .collect();
    assert_eq!(owners.len(), 2, "{owners:?}");
    let jobs: Api<Job> = s.ns.api();
    let fetches = jobs
        .list(&ListParams::default().labels("app.kubernetes.io/component=fetch"))
        .await
        .unwrap();
    assert_eq!(fetches.items.len(), 1);

    // Deleting one keeps the claim for the other.
    s.api.delete("a", &DeleteParams::default()).await.unwrap();
    poll_until("claim owned by b alone", TIMEOUT, || async {
        let c = claims.get(&ca.claim_name).await?;
        let names: Vec<String> = c
            .owner_references()
            .iter()
            .map(|o| o.name.clone())
            .collect();
        Ok(
            if names == ["b"] && c.metadata.deletion_timestamp.is_none() {
                Probe::Ready(())
            } else {
                Probe::Pending(format!("{names:?}"))
            },
        )
    })
    .await
    .unwrap();
    ready(&s, "b").await;
}

#[tokio::test]
async fn paused_changes_nothing_until_resumed_and_retain_keeps_the_claim() {
    let s = setup("paused").await;
    apply(&s, &manifest("p", "variant: medium\ncache: {retain: true}"));
    let obj = ready(&s, "p").await;
    let claim = obj.status.unwrap().cache.unwrap().claim_name;
    s.api
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .unwrap();
    wait_for(&s.api, "p", "Paused", TIMEOUT, |o| {
        o.status.as_ref().and_then(|st| st.phase) == Some(sd35_crds::Phase::Paused)
    })
    .await
    .unwrap();
    let deployments: Api<Deployment> = s.ns.api();
    deployments
        .delete("p", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        deployments.get_opt("p").await.unwrap().is_none(),
        "paused object's Deployment was recreated"
    );
    s.api
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false}})),
        )
        .await
        .unwrap();
    ready(&s, "p").await;
    assert!(deployments.get_opt("p").await.unwrap().is_some());

    s.api.delete("p", &DeleteParams::default()).await.unwrap();
    poll_until("Deployment collected", TIMEOUT, || async {
        Ok(if deployments.get_opt("p").await?.is_none() {
            Probe::Ready(())
        } else {
            Probe::Pending("still there".into())
        })
    })
    .await
    .unwrap();
    let claims: Api<PersistentVolumeClaim> = s.ns.api();
    let c = claims.get(&claim).await.unwrap();
    assert!(
        c.metadata.deletion_timestamp.is_none() && c.owner_references().is_empty(),
        "retained claim is kept, unowned"
    );
}

fn audit_writes_by_operator(cluster: &Cluster, namespace: &str, from_line: usize) -> Vec<String> {
    let text = std::fs::read_to_string(cluster.audit_log_path()).unwrap();
    text.lines()
        .skip(from_line)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| {
            e["userAgent"]
                .as_str()
                .is_some_and(|ua| ua.starts_with("sd35-operator/"))
        })
        .filter(|e| {
            matches!(
                e["verb"].as_str(),
                Some("create" | "update" | "patch" | "delete" | "deletecollection")
            )
        })
        .filter(|e| e["objectRef"]["namespace"].as_str() == Some(namespace))
        .map(|e| {
            format!(
                "{} {} {}",
                e["verb"], e["objectRef"]["resource"], e["objectRef"]["name"]
            )
        })
        .collect()
}

async fn reconciliations(operator: &OperatorProcess) -> u64 {
    operator
        .reconciliations()
        .await
        .expect("read the operator's metrics")
}

#[tokio::test]
async fn a_steady_state_makes_no_writes_over_a_quiet_minute() {
    let s = setup("quiet").await;
    apply(&s, &manifest("q", "variant: large-turbo\nreplicas: 2"));
    ready(&s, "q").await;
    // Let the last status write and events land, then count from here.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let start_line = std::fs::read_to_string(s.cluster.audit_log_path())
        .unwrap()
        .lines()
        .count();
    let before = reconciliations(&s.operator).await;
    // Touch the object (labels do not bump the generation) so the operator reconciles
    // repeatedly during the minute; each of those reconciles must find nothing to write.
    let started = std::time::Instant::now();
    let mut touches = 0;
    while started.elapsed() < Duration::from_secs(60) {
        let patch = json!({"metadata": {"labels": {"touch": touches.to_string()}}});
        s.api
            .patch("q", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        touches += 1;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let after = reconciliations(&s.operator).await;
    assert!(
        after >= before + 6,
        "the operator reconciled only {} times during the minute",
        after - before
    );
    let writes = audit_writes_by_operator(s.cluster, s.ns.name(), start_line);
    assert!(
        writes.is_empty(),
        "the operator wrote in a steady state: {writes:?}"
    );
    // The counting works: the operator's own earlier writes are in the log.
    assert!(!audit_writes_by_operator(s.cluster, s.ns.name(), 0).is_empty());
}

#[tokio::test]
async fn only_the_leader_reconciles_and_another_takes_over_when_it_dies() {
    let cluster = shared_cluster();
    install_crd(cluster).unwrap();
    let ns = cluster.temp_namespace("leader").await;
    let api = ns.api::<SD35Deployment>();
    let flags = |id: &str| {
        vec![
            "--leader-elect".to_owned(),
            format!("--identity={id}"),
            "--lease-duration-seconds=6".to_owned(),
        ]
    };
    let a_flags = flags("op-a");
    let mut a = OperatorProcess::start(
        cluster,
        ns.name(),
        &a_flags.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .unwrap();
    // Let a take the lease before b starts, so the roles are known.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = ns.api();
    poll_until("op-a leads", TIMEOUT, || async {
        let holder = leases
            .get_opt("sd35-operator")
            .await?
            .and_then(|l| l.spec)
            .and_then(|sp| sp.holder_identity);
        Ok(if holder.as_deref() == Some("op-a") {
            Probe::Ready(())
        } else {
            Probe::Pending(format!("{holder:?}"))
        })
    })
    .await
    .unwrap();
    let b_flags = flags("op-b");
    let mut b = OperatorProcess::start(
        cluster,
        ns.name(),
        &b_flags.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .unwrap();

    let out = kubectl_apply(cluster, ns.name(), &manifest("one", "variant: medium")).unwrap();
    assert!(out.status.success());
    wait_ready(&api, "one", TIMEOUT).await.unwrap();
    assert!(reconciliations(&a).await > 0);
    assert_eq!(
        reconciliations(&b).await,
        0,
        "the standby reconciled; log:\n{}",
        b.log()
    );

    // The leader dies without releasing the lease; b takes over and reconciles a new object.
    a.kill();
    let killed = std::time::Instant::now();
    let out = kubectl_apply(cluster, ns.name(), &manifest("two", "variant: medium")).unwrap();
    assert!(out.status.success());
    wait_ready(&api, "two", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\nop-b log:\n{}", b.log()));
    assert!(killed.elapsed() < Duration::from_secs(30));
    assert!(reconciliations(&b).await > 0);

    // SIGTERM stops b cleanly and releases the lease.
    let status = b.terminate(Duration::from_secs(15)).unwrap();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        b.log()
    );
    let holder = leases
        .get("sd35-operator")
        .await
        .unwrap()
        .spec
        .and_then(|sp| sp.holder_identity);
    assert_eq!(holder, None, "lease not released on shutdown");
}

/// The first pod matching `labels` scheduled on a node, once there is one.
async fn scheduled_pod(s: &Setup, labels: &str) -> Pod {
    let pods: Api<Pod> = s.ns.api();
    poll_until(
        &format!("a scheduled pod with {labels}"),
        TIMEOUT,
        || async {
            let list = pods.list(&ListParams::default().labels(labels)).await?;
            Ok(
                match list.items.into_iter().find(|p| {
                    p.spec
                        .as_ref()
                        .and_then(|sp| sp.node_name.as_ref())
                        .is_some()
                }) {
                    Some(p) => Probe::Ready(p),
                    None => Probe::Pending("none yet".into()),
                },
            )
        },
    )
    .await
    .unwrap()
}

/// Sets a pod's status as a kubelet would report it.
async fn set_pod_status(s: &Setup, pod: &Pod, status: serde_json::Value) {
    let pods: Api<Pod> = s.ns.api();
    pods.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": status })),
    )
    .await
    .unwrap();
}

fn container_name(pod: &Pod) -> String {
    pod.spec.as_ref().unwrap().containers[0].name.clone()
}

#[tokio::test]
async fn a_serving_pod_without_a_usable_gpu_is_reported_in_its_own_words_until_it_runs() {
    let s = setup("gpu").await;
    let label = s.ns.name().to_owned();
    let (_node, heartbeat) = manual_node(s.cluster, &label).await;
    apply(
        &s,
        &manifest(
            "nogpu",
            &format!(
                "variant: large-turbo\nmodel: {{source: {{http: {{url: 'http://127.0.0.1:9/'}}}}}}\nscheduling: {{nodeSelector: {{sd35.io/e2e-node: {label}}}}}"
            ),
        ),
    );
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    // The fetch and build Jobs succeed, as their pods would on a GPU node.
    for component in ["fetch", "build"] {
        let pod = scheduled_pod(&s, &format!("app.kubernetes.io/component={component}")).await;
        let name = container_name(&pod);
        set_pod_status(&s, &pod, json!({
            "phase": "Succeeded",
            "containerStatuses": [{"name": name, "image": "sd35-server:e2e", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                "startedAt": now, "finishedAt": now}}}]
        }))
        .await;
    }
    let pod = scheduled_pod(
        &s,
        "app.kubernetes.io/instance=nogpu,app.kubernetes.io/name=sd35-server",
    )
    .await;
    let args = pod.spec.as_ref().unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(args.contains(&"--device=cuda".to_owned()), "{args:?}");
    // The server exits 17 with its one-line reason; the kubelet restarts it in a loop.
    let said =
        "GPUUnavailable: --device cuda: no usable GPU: no CUDA driver: libcuda.so.1 not found";
    set_pod_status(&s, &pod, json!({
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [{"name": "server", "image": "sd35-server:e2e", "imageID": "", "ready": false,
            "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 17, "reason": "Error", "message": format!("{said}\n"),
                "startedAt": now, "finishedAt": now}}}]
    }))
    .await;
    let o = wait_for(
        &s.api,
        "nogpu",
        "Available=False GPUUnavailable",
        TIMEOUT,
        |o| {
            condition(o, "Available")
                .is_some_and(|c| c.status == "False" && c.reason == "GPUUnavailable")
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", s.operator.log()));
    let available = condition(&o, "Available").unwrap();
    assert!(
        available.message.contains(said) && available.message.contains(&pod.name_any()),
        "{}",
        available.message
    );
    for (c, status) in [("Ready", "False"), ("Stalled", "True")] {
        assert!(has_condition(&o, c, status), "{c}: {}", summary(&o));
        assert_eq!(condition(&o, c).unwrap().reason, "GPUUnavailable");
    }
    assert_eq!(
        o.status.as_ref().unwrap().phase,
        Some(sd35_crds::Phase::Failed)
    );

    // The node's driver is fixed: the server runs and the object is Ready again.
    let later = k8s_openapi::jiff::Timestamp::now().to_string();
    set_pod_status(&s, &pod, json!({
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": later}],
        "containerStatuses": [{"name": "server", "image": "sd35-server:e2e", "imageID": "", "ready": true,
            "started": true, "restartCount": 4, "state": {"running": {"startedAt": later}},
            "lastState": {"terminated": {"exitCode": 17, "reason": "Error", "message": said,
                "startedAt": now, "finishedAt": now}}}]
    }))
    .await;
    let o = ready(&s, "nogpu").await;
    assert!(has_condition(&o, "Stalled", "False"), "{}", summary(&o));
    heartbeat.abort();
}
