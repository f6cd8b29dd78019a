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
    // The GPUs, from the simulated nodes' GPU feature discovery labels.
    let gpu = condition(&obj, "GPUCompatible").expect("a GPUCompatible condition");
    assert_eq!(
        (gpu.status.as_str(), gpu.reason.as_str()),
        ("True", "Supported")
    );
    // The nodes' memory label (81559 MiB, an H100's) holds the memory plan.
    assert!(
        gpu.message.starts_with(&format!(
            "bf16 on {} (compute capability 9.0); the memory plan of large bf16 at 1024x1024, \
             batch 1, with guidance, with T5 needs ",
            sd35_e2e::GPU_PRODUCT
        )) && gpu.message.ends_with(" of each GPU's 79.6 GiB"),
        "{}",
        gpu.message
    );
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
    // One event per reconcile that did something tells every step.
    let events: Api<Event> = s.ns.api();
    let notes: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.message)
        .collect();
    for step in [
        "created cache claim",
        "started Job sd35-fetch-",
        "CacheReady is True",
        "started Job sd35-build-",
        "EngineReady is True",
        "created serving Deployment sd35-large",
        "Ready is True",
    ] {
        assert!(
            notes.iter().any(|n| n.contains(step)),
            "no event tells {step:?}: {notes:?}"
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

    // Scaled to zero: no serving pod, cache and engine kept, and healthy (Ready True, nothing
    // reconciling) for kstatus and Argo CD; back to 3 without a Job.
    let scale = |n: u32| {
        let out = s
            .cluster
            .kubectl()
            .args([
                "scale",
                "-n",
                s.ns.name(),
                "sd35/sd35-large",
                &format!("--replicas={n}"),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    scale(0);
    let zero = wait_for(&s.api, "sd35-large", "scaled to zero", TIMEOUT, |o| {
        o.status
            .as_ref()
            .is_some_and(|st| st.phase == Some(sd35_crds::Phase::ScaledToZero))
    })
    .await
    .unwrap();
    assert!(
        has_condition(&zero, "Ready", "True")
            && has_condition(&zero, "Reconciling", "False")
            && has_condition(&zero, "Stalled", "False")
            && has_condition(&zero, "CacheReady", "True")
            && has_condition(&zero, "EngineReady", "True"),
        "{}",
        summary(&zero)
    );
    poll_until("serving pods gone", TIMEOUT, || async {
        Ok(if server_pods(&s, "sd35-large").await.is_empty() {
            Probe::Ready(())
        } else {
            Probe::Pending("serving pods still exist".into())
        })
    })
    .await
    .unwrap();
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> = s.ns.api();
    assert!(
        claims.get_opt(&cache.claim_name).await.unwrap().is_some(),
        "the cache claim is kept at zero replicas"
    );
    let jobs_before = jobs.list(&ListParams::default()).await.unwrap().items.len();
    scale(3);
    wait_for(
        &s.api,
        "sd35-large",
        "3 ready replicas again",
        TIMEOUT,
        |o| {
            o.status.as_ref().is_some_and(|st| {
                st.ready_replicas == 3 && st.phase == Some(sd35_crds::Phase::Ready)
            })
        },
    )
    .await
    .unwrap();
    assert_eq!(
        jobs.list(&ListParams::default()).await.unwrap().items.len(),
        jobs_before,
        "scaling up from zero started a Job"
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
                let done = o.spec.precision == sd35_crds::EnginePrecision::Fp8
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
    fail_pod_saying(s, job, exclude, exit_code, None).await
}

/// Marks the fetch pod of `job` as failed with `exit_code` and, when given, the termination
/// message `sd35-server fetch` writes.
async fn fail_pod_saying(
    s: &Setup,
    job: &str,
    exclude: &[String],
    exit_code: i32,
    message: Option<&str>,
) -> String {
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
    let mut terminated =
        json!({"exitCode": exit_code, "reason": "Error", "startedAt": now, "finishedAt": now});
    if let Some(message) = message {
        terminated["message"] = json!(message);
    }
    let status = json!({"status": {
        "phase": "Failed",
        "containerStatuses": [{
            "name": "fetch", "image": "sd35-server:e2e", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": terminated}
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
    // What the attempt wrote is quoted while the Job retries.
    let reset =
        "fetch failed: https://mirror.invalid/flaky/sha256sums.txt: connection reset by peer";
    let first = fail_pod_saying(&s, &job, &[], 15, Some(reset)).await;
    let o = wait_for(&s.api, "flaky", "a failed attempt reported", TIMEOUT, |o| {
        condition(o, "CacheReady").is_some_and(|c| c.message.contains("failed attempts"))
    })
    .await
    .unwrap();
    let message = &condition(&o, "CacheReady").unwrap().message;
    assert!(message.contains(&format!("the last: {reset}")), "{message}");
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

    // A source that is not there (404, exit 11): the conditions kubectl describe, Flux and
    // Argo CD show quote the URL and the status the fetch wrote as its termination message.
    apply(
        &s,
        &manifest("missing", &spec("https://mirror.invalid/no-such-model/", 3)),
    );
    let obj = wait_for(&s.api, "missing", "cache status", TIMEOUT, |o| {
        o.status.as_ref().and_then(|st| st.cache.as_ref()).is_some()
    })
    .await
    .unwrap();
    let job = format!("sd35-fetch-{}", obj.status.unwrap().cache.unwrap().key);
    let said = "fetch failed: https://mirror.invalid/no-such-model/sha256sums.txt: HTTP 404: no such repository, revision or file";
    fail_pod_saying(&s, &job, &[], 11, Some(&format!("{said}\n"))).await;
    let o = wait_for(&s.api, "missing", "Stalled", TIMEOUT, |o| {
        has_condition(o, "Stalled", "True")
    })
    .await
    .unwrap();
    for c in ["CacheReady", "Stalled", "Ready"] {
        let c = condition(&o, c).unwrap();
        assert_eq!(c.reason, "NotFound", "{}", summary(&o));
        assert!(
            c.message.contains(said) && c.message.contains("spec.model.source"),
            "{}: {}",
            c.type_,
            c.message
        );
    }

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

#[tokio::test(flavor = "multi_thread")]
async fn the_nodes_gpu_labels_say_which_path_a_deployment_gets_whether_it_fits_and_nothing_is_refused()
 {
    let s = setup("gpulabels").await;
    let label = format!("{}-gpu", s.ns.name());
    let (node, heartbeat) = manual_node(s.cluster, &label).await;
    // A T4, tainted so that only this test's pods go there.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(s.cluster.client());
    let relabel = |product: &str, compute: Option<(&str, &str)>| {
        let mut labels = json!({"nvidia.com/gpu.product": product});
        if let Some((major, minor)) = compute {
            labels["nvidia.com/gpu.compute.major"] = json!(major);
            labels["nvidia.com/gpu.compute.minor"] = json!(minor);
        }
        json!({"metadata": {"labels": labels},
               "spec": {"taints": [{"key": "sd35.io/e2e-gpu", "value": label, "effect": "NoSchedule"}]}})
    };
    nodes
        .patch(
            &node,
            &PatchParams::default(),
            &Patch::Merge(relabel("Tesla-T4", None)),
        )
        .await
        .unwrap();
    apply(
        &s,
        &manifest(
            "gl",
            &format!(
                "variant: medium\nprecision: fp8\nmodel: {{source: {{http: {{url: 'http://127.0.0.1:9/'}}}}}}\n\
                 scheduling:\n  nodeSelector: {{sd35.io/e2e-node: {label}}}\n  \
                 tolerations: [{{key: sd35.io/e2e-gpu, operator: Equal, value: {label}, effect: NoSchedule}}]"
            ),
        ),
    );
    let o = wait_for(
        &s.api,
        "gl",
        "GPUCompatible=False ComputeCapabilityTooLow",
        TIMEOUT,
        |o| {
            condition(o, "GPUCompatible")
                .is_some_and(|c| c.status == "False" && c.reason == "ComputeCapabilityTooLow")
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", s.operator.log()));
    let gpu = condition(&o, "GPUCompatible").unwrap();
    assert!(
        gpu.message
            .starts_with("Tesla-T4 (compute capability 7.5) is older than compute capability 8.0"),
        "{}",
        gpu.message
    );
    // Nothing is refused: the fetch Job is there, and Ready waits on the cache, not the GPU.
    let jobs: Api<Job> = s.ns.api();
    let fetches = jobs
        .list(&ListParams::default().labels("app.kubernetes.io/component=fetch"))
        .await
        .unwrap();
    assert_eq!(fetches.items.len(), 1, "{}", summary(&o));
    assert_ne!(
        condition(&o, "Ready").unwrap().reason,
        "ComputeCapabilityTooLow"
    );

    // The node turns out to be an L40S by its compute labels: fp8 there is weight-only, with
    // tensor cores the build does not use yet. Labels are read at the next reconcile.
    nodes
        .patch(
            &node,
            &PatchParams::default(),
            &Patch::Merge(relabel("NVIDIA-L40S", Some(("8", "9")))),
        )
        .await
        .unwrap();
    s.api
        .patch(
            "gl",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"sd35.io/e2e-touch": "1"}}})),
        )
        .await
        .unwrap();
    let o = wait_for(
        &s.api,
        "gl",
        "GPUCompatible=True FP8WeightOnly",
        TIMEOUT,
        |o| condition(o, "GPUCompatible").is_some_and(|c| c.reason == "FP8WeightOnly"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", s.operator.log()));
    let gpu = condition(&o, "GPUCompatible").unwrap();
    assert_eq!(gpu.status, "True");
    assert!(
        gpu.message.starts_with(
            "fp8 on NVIDIA-L40S (compute capability 8.9): weight-only FP8: F8E4M3 weights"
        ) && gpu.message.contains("have FP8 tensor cores"),
        "{}",
        gpu.message
    );

    // An A2 (16 GB: 15356 MiB by its memory label) cannot hold medium in bf16 with T5 at its
    // default 1024x1024 by the memory plan: said with the figures and what to change, and
    // still nothing is refused.
    let mut a2 = relabel("NVIDIA-A2", Some(("8", "6")));
    a2["metadata"]["labels"]["nvidia.com/gpu.memory"] = json!("15356");
    nodes
        .patch(&node, &PatchParams::default(), &Patch::Merge(a2))
        .await
        .unwrap();
    s.api
        .patch(
            "gl",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"precision": "bf16"}})),
        )
        .await
        .unwrap();
    let o = wait_for(
        &s.api,
        "gl",
        "GPUCompatible=False InsufficientGPUMemory",
        TIMEOUT,
        |o| condition(o, "GPUCompatible").is_some_and(|c| c.reason == "InsufficientGPUMemory"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", s.operator.log()));
    let gpu = condition(&o, "GPUCompatible").unwrap();
    assert_eq!(gpu.status, "False");
    for part in [
        "medium bf16 at 1024x1024, batch 1, with guidance, with T5 needs ",
        "more than one GPU holds: NVIDIA-A2 with 15.0 GiB (nvidia.com/gpu.memory label)",
        "precision: fp8 (",
        "model.textEncoders.t5: false (",
    ] {
        assert!(
            gpu.message.contains(part),
            "{part:?} not in {}",
            gpu.message
        );
    }
    assert_ne!(
        condition(&o, "Ready").unwrap().reason,
        "InsufficientGPUMemory"
    );
    heartbeat.abort();
    nodes.delete(&node, &DeleteParams::default()).await.unwrap();
}

/// A counter or gauge of the operator's `/metrics`, 0 when absent.
async fn metric(operator: &OperatorProcess, name: &str) -> f64 {
    let text = operator.admin_get("/metrics").await.expect("read metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the object's status describes its current generation: the reconcile that
/// wrote it has applied every child for that generation first.
async fn observed(s: &Setup, name: &str) -> SD35Deployment {
    wait_for(&s.api, name, "current generation observed", TIMEOUT, |o| {
        o.status.as_ref().and_then(|st| st.observed_generation) == o.metadata.generation
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", s.operator.log()))
}

#[tokio::test]
async fn removing_a_field_from_the_spec_removes_it_from_the_live_deployment_within_one_reconcile() {
    let s = setup("removal").await;
    let priority_class = format!("{}-high", s.ns.name());
    let classes: Api<k8s_openapi::api::scheduling::v1::PriorityClass> =
        Api::all(s.cluster.client());
    let class: k8s_openapi::api::scheduling::v1::PriorityClass =
        serde_json::from_value(json!({"metadata": {"name": priority_class}, "value": 1000}))
            .unwrap();
    classes
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    let full = format!(
        "variant: medium\nscheduling:\n  nodeSelector: {{kubernetes.io/os: linux, nvidia.com/gpu.present: 'true'}}\n  \
         tolerations: [{{key: sd35.io/e2e, operator: Exists, effect: NoSchedule}}]\n  priorityClassName: {priority_class}"
    );
    apply(&s, &manifest("rm", &full));
    ready(&s, "rm").await;
    let deployments: Api<Deployment> = s.ns.api();
    let pod_spec = |d: Deployment| d.spec.unwrap().template.spec.unwrap();
    let before = pod_spec(deployments.get("rm").await.unwrap());
    assert_eq!(
        before.node_selector.as_ref().map(|m| m.len()),
        Some(2),
        "{before:?}"
    );
    assert!(before.tolerations.is_some() && before.priority_class_name.is_some());

    // One selector key, the toleration and the priority class go; the status of the new
    // generation is written by the reconcile that applied it.
    apply(
        &s,
        &manifest(
            "rm",
            "variant: medium\nscheduling:\n  nodeSelector: {kubernetes.io/os: linux}",
        ),
    );
    observed(&s, "rm").await;
    let after = pod_spec(deployments.get("rm").await.unwrap());
    assert_eq!(
        after.node_selector,
        Some([("kubernetes.io/os".to_owned(), "linux".to_owned())].into()),
        "a removed nodeSelector key stayed on the live Deployment"
    );
    assert_eq!(after.tolerations, None, "a removed toleration stayed");
    assert_eq!(
        after.priority_class_name, None,
        "a removed priorityClassName stayed"
    );
    ready(&s, "rm").await;

    // A hand edit of a field the operator owns is still undone.
    let edit =
        json!({"spec": {"template": {"spec": {"nodeSelector": {"kubernetes.io/os": "windows"}}}}});
    deployments
        .patch("rm", &PatchParams::default(), &Patch::Strategic(&edit))
        .await
        .unwrap();
    poll_until("hand edit undone", TIMEOUT, || async {
        let selector = pod_spec(deployments.get("rm").await?).node_selector;
        Ok(
            match selector.as_ref().and_then(|m| m.get("kubernetes.io/os")) {
                Some(os) if os == "linux" => Probe::Ready(()),
                other => Probe::Pending(format!("{other:?}")),
            },
        )
    })
    .await
    .unwrap();
    let _ = classes
        .delete(&priority_class, &DeleteParams::default())
        .await;
}

#[tokio::test]
async fn a_job_event_costs_the_same_work_with_one_object_or_many() {
    let s = setup("index").await;
    apply(&s, &manifest("one", "variant: medium"));
    let obj = ready(&s, "one").await;
    // Thirty more objects of other models, paused: in the operator's caches, doing nothing.
    for i in 0..30 {
        apply(
            &s,
            &manifest(
                &format!("other-{i}"),
                &format!(
                    "variant: medium\npaused: true\nmodel: {{source: {{http: {{url: 'https://mirror.invalid/{i}/'}}}}}}"
                ),
            ),
        );
    }
    for i in 0..30 {
        wait_for(&s.api, &format!("other-{i}"), "Paused", TIMEOUT, |o| {
            o.status.as_ref().and_then(|st| st.phase) == Some(sd35_crds::Phase::Paused)
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let jobs: Api<Job> = s.ns.api();
    let fetch = format!("sd35-fetch-{}", obj.status.unwrap().cache.unwrap().key);
    let (resolved, reconciled) = (
        metric(&s.operator, "sd35_operator_spec_resolutions_total").await,
        reconciliations(&s.operator).await,
    );
    // Each touch of the Job is an event the operator maps to the object that uses it.
    for i in 0..10 {
        let patch = json!({"metadata": {"labels": {"touch": i.to_string()}}});
        jobs.patch(&fetch, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let resolutions = metric(&s.operator, "sd35_operator_spec_resolutions_total").await - resolved;
    let reconciles = reconciliations(&s.operator).await - reconciled;
    assert!(reconciles >= 1, "the Job events triggered no reconcile");
    // The work is one resolve per reconcile, whatever the number of other objects; a scan
    // of the store would resolve all 31 on every event.
    assert!(
        resolutions <= 2.0 * reconciles as f64 + 2.0,
        "{resolutions} specs resolved for 10 Job events and {reconciles} reconciles with 31 objects"
    );
}

#[tokio::test]
async fn two_operators_with_clocks_30_s_apart_never_both_lead() {
    let cluster = shared_cluster();
    install_crd(cluster).unwrap();
    let ns = cluster.temp_namespace("skew").await;
    let start = |id: &str, offset: i64| {
        let flags = [
            "--leader-elect".to_owned(),
            format!("--identity={id}"),
            "--lease-duration-seconds=6".to_owned(),
            format!("--clock-offset-seconds={offset}"),
        ];
        OperatorProcess::start(
            cluster,
            ns.name(),
            &flags.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .unwrap()
    };
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = ns.api();
    let holder = || async {
        leases
            .get_opt("sd35-operator")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|sp| sp.holder_identity)
    };
    let mut a = start("op-a", 0);
    poll_until("op-a leads", TIMEOUT, || async {
        let h = holder().await;
        Ok(if h.as_deref() == Some("op-a") {
            Probe::Ready(())
        } else {
            Probe::Pending(format!("{h:?}"))
        })
    })
    .await
    .unwrap();
    // A candidate whose clock runs 30 s ahead sees every renewal as 30 s old.
    let mut b = start("op-b", 30);
    let watched = std::time::Instant::now();
    while watched.elapsed() < Duration::from_secs(20) {
        let h = holder().await;
        assert_eq!(
            h.as_deref(),
            Some("op-a"),
            "the lease changed hands while its holder renewed it; op-b log:\n{}",
            b.log()
        );
        assert!(
            a.try_status().is_none(),
            "op-a stopped leading:\n{}",
            a.log()
        );
        assert!(b.try_status().is_none(), "op-b exited:\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(reconciliations(&b).await, 0, "the standby reconciled");

    // The leader dies without releasing: op-b takes over one lease duration after it last
    // saw the lease change, whatever the clocks say.
    a.kill();
    poll_until("op-b leads", Duration::from_secs(30), || async {
        let h = holder().await;
        Ok(if h.as_deref() == Some("op-b") {
            Probe::Ready(())
        } else {
            Probe::Pending(format!("{h:?}"))
        })
    })
    .await
    .unwrap();
    // Now the leader's clock is 30 s ahead of a new candidate's: its renewals look 30 s in
    // the future. The candidate still waits while they continue, and takes over promptly
    // once they stop.
    let mut c = start("op-c", 0);
    let watched = std::time::Instant::now();
    while watched.elapsed() < Duration::from_secs(12) {
        assert_eq!(
            holder().await.as_deref(),
            Some("op-b"),
            "op-c log:\n{}",
            c.log()
        );
        assert!(
            b.try_status().is_none(),
            "op-b stopped leading:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    b.kill();
    poll_until("op-c leads", Duration::from_secs(25), || async {
        let h = holder().await;
        Ok(if h.as_deref() == Some("op-c") {
            Probe::Ready(())
        } else {
            Probe::Pending(format!("{h:?}"))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\nop-c log:\n{}", c.log()));
    assert!(c.try_status().is_none());
}

#[tokio::test]
async fn children_the_spec_no_longer_wants_are_swept_by_label_and_owner() {
    let s = setup("sweep").await;
    apply(&s, &manifest("sw", "variant: medium\nreplicas: 2"));
    let obj = ready(&s, "sw").await;
    let services: Api<Service> = s.ns.api();
    let pdbs: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> = s.ns.api();
    assert!(pdbs.get_opt("sw").await.unwrap().is_some());
    // A Service an earlier spec wanted (the operator's labels, owned by the object), and
    // two it must leave alone: one owned by something else, one without the operator's label.
    let owner = json!({"apiVersion": "sd35.io/v1alpha1", "kind": "SD35Deployment", "name": "sw",
                       "uid": obj.metadata.uid, "controller": true});
    let svc = |name: &str, managed: bool, owners: serde_json::Value| -> Service {
        let mut labels =
            json!({"app.kubernetes.io/instance": "sw", "app.kubernetes.io/name": "sd35-server"});
        if managed {
            labels["app.kubernetes.io/managed-by"] = json!("sd35-operator");
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels, "ownerReferences": owners},
            "spec": {"ports": [{"name": "http", "port": 8080}]}
        }))
        .unwrap()
    };
    for (name, managed, owners) in [
        ("sw-stale", true, json!([owner])),
        ("sw-foreign", true, json!([])),
        ("sw-unlabelled", false, json!([owner])),
    ] {
        services
            .create(&PostParams::default(), &svc(name, managed, owners))
            .await
            .unwrap();
    }
    // Scaling to one replica: the PDB is no longer wanted either.
    s.api
        .patch(
            "sw",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    poll_until("stale children swept", TIMEOUT, || async {
        let stale = services.get_opt("sw-stale").await?.is_some();
        let pdb = pdbs.get_opt("sw").await?.is_some();
        Ok(if !stale && !pdb {
            Probe::Ready(())
        } else {
            Probe::Pending(format!("stale Service {stale}, PDB {pdb}"))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", s.operator.log()));
    ready(&s, "sw").await;
    for kept in ["sw", "sw-foreign", "sw-unlabelled"] {
        assert!(
            services.get_opt(kept).await.unwrap().is_some(),
            "{kept} was deleted"
        );
    }
}

/// The fetch and build Jobs of a cache key, by name.
async fn jobs_of(s: &Setup, cache_key: &str) -> Vec<String> {
    let jobs: Api<Job> = s.ns.api();
    jobs.list(&ListParams::default().labels(&format!("sd35.io/cache-key={cache_key}")))
        .await
        .unwrap()
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect()
}

#[tokio::test]
async fn after_the_last_user_goes_its_claim_and_jobs_go_within_a_minute_and_a_newcomer_waits() {
    let s = setup("lastuser").await;
    apply(&s, &manifest("a", "variant: large-turbo"));
    apply(&s, &manifest("b", "variant: large-turbo\nprecision: fp8"));
    let a = ready(&s, "a").await;
    ready(&s, "b").await;
    let cache = a.status.unwrap().cache.unwrap();
    assert_eq!(
        jobs_of(&s, &cache.key).await.len(),
        3,
        "one fetch and two builds"
    );
    let claims: Api<PersistentVolumeClaim> = s.ns.api();
    let pods: Api<Pod> = s.ns.api();
    for name in ["a", "b"] {
        s.api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    let deleted = std::time::Instant::now();
    poll_until(
        "claim, Jobs and their pods gone",
        Duration::from_secs(60),
        || async {
            let claim = claims.get_opt(&cache.claim_name).await?;
            let jobs = jobs_of(&s, &cache.key).await;
            let job_pods = pods
                .list(&ListParams::default().labels(&format!("sd35.io/cache-key={}", cache.key)))
                .await?
                .items
                .len();
            Ok(if claim.is_none() && jobs.is_empty() && job_pods == 0 {
                Probe::Ready(())
            } else {
                Probe::Pending(format!(
                    "claim {:?}, jobs {jobs:?}, {job_pods} pods",
                    claim.map(|c| c.metadata.deletion_timestamp)
                ))
            })
        },
    )
    .await
    .unwrap();
    assert!(deleted.elapsed() < Duration::from_secs(60));

    // A newcomer of the same model while the claim is still being deleted (held here by a
    // finalizer of the test) waits and says why, then proceeds on a new claim.
    apply(&s, &manifest("c", "variant: large-turbo"));
    ready(&s, "c").await;
    let old = claims.get(&cache.claim_name).await.unwrap();
    let hold = json!({"metadata": {"finalizers": ["sd35.io/e2e-hold"]}});
    claims
        .patch(
            &cache.claim_name,
            &PatchParams::default(),
            &Patch::Merge(&hold),
        )
        .await
        .unwrap();
    s.api.delete("c", &DeleteParams::default()).await.unwrap();
    poll_until("claim terminating", TIMEOUT, || async {
        let c = claims.get(&cache.claim_name).await?;
        Ok(if c.metadata.deletion_timestamp.is_some() {
            Probe::Ready(())
        } else {
            Probe::Pending("not yet".into())
        })
    })
    .await
    .unwrap();
    apply(&s, &manifest("d", "variant: large-turbo"));
    let waiting = wait_for(
        &s.api,
        "d",
        "CacheReady=False ClaimTerminating",
        TIMEOUT,
        |o| condition(o, "CacheReady").is_some_and(|c| c.reason == "ClaimTerminating"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", s.operator.log()));
    let message = &condition(&waiting, "CacheReady").unwrap().message;
    assert!(message.contains(&cache.claim_name), "{message}");
    assert!(
        has_condition(&waiting, "Stalled", "False"),
        "{}",
        summary(&waiting)
    );
    let release = json!({"metadata": {"finalizers": null}});
    claims
        .patch(
            &cache.claim_name,
            &PatchParams::default(),
            &Patch::Merge(&release),
        )
        .await
        .unwrap();
    ready(&s, "d").await;
    let new = claims.get(&cache.claim_name).await.unwrap();
    assert_ne!(new.uid(), old.uid(), "d runs on a new claim");
}

/// The Prometheus Operator's ServiceMonitor CRD, reduced to what the API server needs to
/// serve it.
const SERVICE_MONITOR_CRD: &str = "\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
";

#[tokio::test]
async fn add_ons_are_applied_when_asked_skipped_without_their_crd_and_swept_when_turned_off() {
    let mut s = setup("addons").await;
    let spec = |policy: bool, monitor: bool| {
        format!(
            "variant: medium\nnetworkPolicy: {{enabled: {policy}{}}}\nmonitoring: {{serviceMonitor: {{enabled: {monitor}{}}}}}",
            if policy {
                ", from: [{namespaceSelector: {matchLabels: {team: web}}}]"
            } else {
                ""
            },
            if monitor {
                ", labels: {release: prom}"
            } else {
                ""
            },
        )
    };
    apply(&s, &manifest("ad", &spec(true, true)));
    let o = ready(&s, "ad").await;
    // No ServiceMonitor CRD in this cluster: skipped, said so, and Ready all the same.
    let addons = condition(&o, "AddonsReady").unwrap();
    assert_eq!(
        (addons.status.as_str(), addons.reason.as_str()),
        ("False", "Skipped"),
        "{}",
        summary(&o)
    );
    assert!(
        addons.message.contains("ServiceMonitor") && addons.message.contains("not installed"),
        "{}",
        addons.message
    );
    assert!(has_condition(&o, "Stalled", "False"));
    let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> = s.ns.api();
    let np = policies.get("ad").await.unwrap().spec.unwrap();
    let rule = &np.ingress.unwrap()[0];
    assert_eq!(
        rule.ports.as_ref().unwrap()[0].port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080))
    );
    assert!(rule.from.as_ref().unwrap()[0].namespace_selector.is_some());

    // The CRD arrives; an operator started now manages ServiceMonitors.
    let out = kubectl_apply(s.cluster, s.ns.name(), SERVICE_MONITOR_CRD).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let monitors: Api<kube::core::DynamicObject> = Api::namespaced_with(
        s.ns.client(),
        s.ns.name(),
        &kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
            "servicemonitors",
        ),
    );
    poll_until("ServiceMonitors served", TIMEOUT, || async {
        Ok(match monitors.list(&ListParams::default()).await {
            Ok(_) => Probe::Ready(()),
            Err(e) => Probe::Pending(e.to_string()),
        })
    })
    .await
    .unwrap();
    s.operator.kill();
    s.operator = OperatorProcess::start(s.cluster, s.ns.name(), &[]).unwrap();
    let o = wait_for(&s.api, "ad", "AddonsReady", TIMEOUT, |o| {
        has_condition(o, "AddonsReady", "True")
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", s.operator.log()));
    assert_eq!(
        condition(&o, "AddonsReady").unwrap().message,
        "NetworkPolicy and ServiceMonitor in place"
    );
    let sm = monitors.get("ad").await.unwrap();
    assert_eq!(sm.metadata.labels.as_ref().unwrap()["release"], "prom");
    assert_eq!(sm.data["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(sm.data["spec"]["endpoints"][0]["port"], "http");

    // Turned off: the sweep deletes both.
    apply(&s, &manifest("ad", &spec(false, false)));
    poll_until("add-ons swept", TIMEOUT, || async {
        let np = policies.get_opt("ad").await?.is_some();
        let sm = monitors.get_opt("ad").await?.is_some();
        Ok(if !np && !sm {
            Probe::Ready(())
        } else {
            Probe::Pending(format!("NetworkPolicy {np}, ServiceMonitor {sm}"))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", s.operator.log()));
    let o = ready(&s, "ad").await;
    assert_eq!(
        condition(&o, "AddonsReady").unwrap().reason,
        "NoneRequested"
    );
}

#[tokio::test]
async fn raising_the_cache_size_grows_the_claim_when_its_class_allows_and_says_so_when_not() {
    let s = setup("grow").await;
    let claims: Api<PersistentVolumeClaim> = s.ns.api();
    let request = |c: &PersistentVolumeClaim| {
        c.spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0
            .clone()
    };
    // The default class does not allow expansion.
    let fixed = |size: &str| format!("variant: medium\ncache: {{size: {size}}}");
    apply(&s, &manifest("fixed", &fixed("1Gi")));
    let o = ready(&s, "fixed").await;
    let claim = o.status.unwrap().cache.unwrap().claim_name;
    apply(&s, &manifest("fixed", &fixed("2Gi")));
    let o = wait_for(&s.api, "fixed", "ExpansionNotAllowed", TIMEOUT, |o| {
        condition(o, "CacheReady").is_some_and(|c| c.reason == "ExpansionNotAllowed")
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", s.operator.log()));
    let message = &condition(&o, "CacheReady").unwrap().message;
    assert!(
        message.contains("standard") && message.contains("2Gi"),
        "{message}"
    );
    assert!(has_condition(&o, "CacheReady", "True") && has_condition(&o, "Ready", "True"));
    assert_eq!(request(&claims.get(&claim).await.unwrap()), "1Gi");

    // A class that allows it: the claim asks for the new size.
    let classes: Api<k8s_openapi::api::storage::v1::StorageClass> = Api::all(s.cluster.client());
    let class = format!("{}-expandable", s.ns.name());
    let sc: k8s_openapi::api::storage::v1::StorageClass = serde_json::from_value(json!({
        "metadata": {"name": class}, "provisioner": sd35_e2e::LOCAL_PROVISIONER,
        "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate", "allowVolumeExpansion": true
    }))
    .unwrap();
    classes.create(&PostParams::default(), &sc).await.unwrap();
    let grows = |size: &str| {
        format!(
            "variant: medium\nmodel: {{source: {{http: {{url: 'https://mirror.invalid/grow/'}}}}}}\ncache: {{size: {size}, storageClassName: {class}}}"
        )
    };
    apply(&s, &manifest("grows", &grows("1Gi")));
    let o = ready(&s, "grows").await;
    let claim = o.status.unwrap().cache.unwrap().claim_name;
    apply(&s, &manifest("grows", &grows("3Gi")));
    poll_until("claim asks for 3Gi", TIMEOUT, || async {
        let r = request(&claims.get(&claim).await?);
        Ok(if r == "3Gi" {
            Probe::Ready(())
        } else {
            Probe::Pending(r)
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", s.operator.log()));
    let o = wait_for(&s.api, "grows", "Expanding", TIMEOUT, |o| {
        condition(o, "CacheReady").is_some_and(|c| c.reason == "Expanding")
    })
    .await
    .unwrap();
    assert!(has_condition(&o, "Ready", "True"), "{}", summary(&o));
    let _ = classes.delete(&class, &DeleteParams::default()).await;
}

/// The serving Deployment's server arguments that name adapters (`--lora=…`, `--controlnet=…`).
async fn adapter_flags(s: &Setup, name: &str) -> Vec<String> {
    let deployments: Api<Deployment> = s.ns.api();
    let d = deployments.get(name).await.unwrap();
    d.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap()
        .into_iter()
        .filter(|a| a.starts_with("--lora=") || a.starts_with("--controlnet="))
        .collect()
}

/// The status entry of adapter `name` (a ControlNet's mode), if there is one.
fn adapter_status<'a>(o: &'a SD35Deployment, name: &str) -> Option<&'a sd35_crds::AdapterStatus> {
    o.status.as_ref()?.adapters.iter().find(|a| a.name == name)
}

#[tokio::test]
async fn adapters_and_a_controlnet_are_cached_beside_the_model_and_a_change_never_fetches_it_again()
{
    let s = setup("adapters").await;
    let sha = |c: char| c.to_string().repeat(64);
    let spec = |loras: &str| {
        format!(
            "variant: large\nprecision: fp8\nreplicas: 2\nrollout: {{strategy: Surge}}\n\
             adapters:\n{loras}\
             controlNets:\n\
             - {{mode: canny, source: {{huggingFace: {{repo: stabilityai/stable-diffusion-3.5-large-controlnet-canny, file: sd3.5_large_controlnet_canny.safetensors}}}}}}\n"
        )
    };
    let detail = "- {name: detail, scale: 0.8, source: {huggingFace: {repo: org/loras, file: detail.safetensors}}}\n";
    let style = format!(
        "- {{name: style, source: {{http: {{url: 'https://m.example/style.safetensors', sha256: {}}}}}}}\n",
        sha('a')
    );
    apply(&s, &manifest("ad", &spec(&format!("{detail}{style}"))));
    let o = ready(&s, "ad").await;

    // Two LoRAs and the ControlNet, each cached by a Job of its own beside the model.
    let adapters = &o.status.as_ref().unwrap().adapters;
    assert_eq!(adapters.len(), 3, "{}", summary(&o));
    assert!(
        adapters.iter().all(|a| a.ready && a.reason == "Cached"),
        "{adapters:?}"
    );
    let ready_condition = condition(&o, "AdaptersReady").unwrap();
    assert_eq!(
        (
            ready_condition.status.as_str(),
            ready_condition.message.as_str()
        ),
        ("True", "cached: lora detail, lora style, controlnet canny")
    );
    let jobs: Api<Job> = s.ns.api();
    for a in adapters {
        let job = jobs.get(&format!("sd35-adapter-{}", a.key)).await.unwrap();
        assert_eq!(
            job.status.and_then(|st| st.succeeded),
            Some(1),
            "{}",
            a.name
        );
    }
    let claims: Api<PersistentVolumeClaim> = s.ns.api();
    let claim_name = o
        .status
        .as_ref()
        .unwrap()
        .cache
        .as_ref()
        .unwrap()
        .claim_name
        .clone();
    let annotations = claims
        .get(&claim_name)
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap();
    for a in adapters {
        assert_eq!(
            annotations
                .get(&format!("adapter.sd35.io/{}", a.key))
                .map(String::as_str),
            Some("ready")
        );
    }
    // The pods load all three.
    let key = |name: &str| adapter_status(&o, name).unwrap().key.clone();
    let flags = adapter_flags(&s, "ad").await;
    assert_eq!(
        flags,
        [
            format!(
                "--lora=detail:0.8=/cache/adapters/{}/adapter.safetensors",
                key("detail")
            ),
            format!(
                "--lora=style=/cache/adapters/{}/adapter.safetensors",
                key("style")
            ),
            format!(
                "--controlnet=canny=/cache/adapters/{}/adapter.safetensors",
                key("canny")
            ),
        ]
    );

    // Style goes, a new adapter comes, detail is rescaled: one new Job (the newcomer's),
    // no new fetch of the model, and the pods roll with the surge: capacity never drops.
    let deployments: Api<Deployment> = s.ns.api();
    let observer = {
        let (deployments, api) = (deployments.clone(), s.api.clone());
        tokio::spawn(async move {
            let mut min_ready = i32::MAX;
            let started = std::time::Instant::now();
            loop {
                let d = deployments.get("ad").await.unwrap();
                min_ready = min_ready.min(
                    d.status
                        .as_ref()
                        .and_then(|st| st.ready_replicas)
                        .unwrap_or(0),
                );
                let o = api.get("ad").await.unwrap();
                let done = o.spec.adapters.iter().any(|a| a.name == "night")
                    && has_condition(&o, "Ready", "True")
                    && o.status.as_ref().and_then(|st| st.observed_generation)
                        == o.metadata.generation;
                if done || started.elapsed() > TIMEOUT {
                    return (min_ready, done);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let night = format!(
        "- {{name: night, source: {{http: {{url: 'https://m.example/night.safetensors', sha256: {}}}}}}}\n",
        sha('b')
    );
    let rescaled = detail.replace("scale: 0.8", "scale: 0.5");
    apply(&s, &manifest("ad", &spec(&format!("{rescaled}{night}"))));
    let (min_ready, done) = observer.await.unwrap();
    assert!(
        done,
        "not Ready with the new adapters; operator log:\n{}",
        s.operator.log()
    );
    assert!(
        min_ready >= 2,
        "ready replicas dropped to {min_ready} while adapters changed"
    );
    let o = ready(&s, "ad").await;
    let names: Vec<&str> = o
        .status
        .as_ref()
        .unwrap()
        .adapters
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(names, ["detail", "night", "canny"]);
    assert_eq!(
        adapter_status(&o, "detail").unwrap().key,
        key("detail"),
        "rescaling keeps the key"
    );
    let flags = adapter_flags(&s, "ad").await;
    assert!(flags[0].starts_with("--lora=detail:0.5="), "{flags:?}");
    assert!(flags.iter().all(|f| !f.contains("style")), "{flags:?}");
    let adapter_jobs = jobs
        .list(&ListParams::default().labels("app.kubernetes.io/component=adapter"))
        .await
        .unwrap();
    assert_eq!(
        adapter_jobs.items.len(),
        4,
        "one Job per adapter source ever asked for"
    );
    let fetches = jobs
        .list(&ListParams::default().labels("app.kubernetes.io/component=fetch"))
        .await
        .unwrap();
    assert_eq!(fetches.items.len(), 1, "the model was fetched again");
    let builds = jobs
        .list(&ListParams::default().labels("app.kubernetes.io/component=build"))
        .await
        .unwrap();
    assert_eq!(builds.items.len(), 1, "the engine was built again");
}

/// Ends the Job pod with `labels` as a kubelet would: exit 0, or `exit_code` with the
/// termination message `said`.
async fn end_job_pod(s: &Setup, labels: &str, exit_code: i32, said: Option<&str>) {
    let pod = scheduled_pod(s, labels).await;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut terminated = json!({"exitCode": exit_code, "startedAt": now, "finishedAt": now,
        "reason": if exit_code == 0 { "Completed" } else { "Error" }});
    if let Some(said) = said {
        terminated["message"] = json!(said);
    }
    set_pod_status(
        s,
        &pod,
        json!({
            "phase": if exit_code == 0 { "Succeeded" } else { "Failed" },
            "containerStatuses": [{"name": container_name(&pod), "image": "sd35-server:e2e",
                "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": terminated}}]
        }),
    )
    .await;
}

#[tokio::test]
async fn a_failing_adapter_download_stalls_only_that_adapter_while_the_model_and_the_others_serve()
{
    let s = setup("badadapter").await;
    let label = s.ns.name().to_owned();
    let (node, heartbeat) = manual_node(s.cluster, &label).await;
    let sha = |c: char| c.to_string().repeat(64);
    apply(
        &s,
        &manifest(
            "ba",
            &format!(
                "variant: large-turbo\nmodel: {{source: {{http: {{url: 'https://m.example/turbo/'}}}}}}\n\
                 scheduling: {{nodeSelector: {{sd35.io/e2e-node: {label}}}}}\n\
                 adapters:\n\
                 - {{name: good, source: {{http: {{url: 'https://m.example/good.safetensors', sha256: {}}}}}}}\n\
                 - {{name: bad, source: {{http: {{url: 'https://m.example/bad.safetensors', sha256: {}}}}}}}",
                sha('c'),
                sha('d')
            ),
        ),
    );
    let o = wait_for(&s.api, "ba", "two adapters in the status", TIMEOUT, |o| {
        o.status.as_ref().is_some_and(|st| st.adapters.len() == 2)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", s.operator.log()));
    let key = |name: &str| adapter_status(&o, name).unwrap().key.clone();
    let (good, bad) = (key("good"), key("bad"));

    // The good one is cached; the bad one's download answers 404, in its own words.
    end_job_pod(&s, &format!("sd35.io/adapter-key={good}"), 0, None).await;
    let said = "fetch-adapter failed: lora bad: https://m.example/bad.safetensors: HTTP 404: no such repository, revision or file";
    end_job_pod(&s, &format!("sd35.io/adapter-key={bad}"), 11, Some(said)).await;
    let o = wait_for(&s.api, "ba", "good cached, bad failed", TIMEOUT, |o| {
        adapter_status(o, "good").is_some_and(|a| a.ready)
            && adapter_status(o, "bad").is_some_and(|a| a.reason == "NotFound")
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", s.operator.log()));
    // The model's own progress is what Ready says meanwhile; the failure is the adapter's.
    assert_eq!(
        condition(&o, "Ready").unwrap().reason,
        "Fetching",
        "{}",
        summary(&o)
    );
    assert!(has_condition(&o, "Stalled", "False"), "{}", summary(&o));
    assert_eq!(
        condition(&o, "AdaptersReady").unwrap().reason,
        "AdapterFailed"
    );

    // The model is fetched and built and its pod runs: it serves with the good adapter.
    end_job_pod(&s, "app.kubernetes.io/component=fetch", 0, None).await;
    end_job_pod(&s, "app.kubernetes.io/component=build", 0, None).await;
    let pod = scheduled_pod(
        &s,
        "app.kubernetes.io/instance=ba,app.kubernetes.io/name=sd35-server",
    )
    .await;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    set_pod_status(&s, &pod, json!({
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
        "containerStatuses": [{"name": "server", "image": "sd35-server:e2e", "imageID": "", "ready": true,
            "started": true, "restartCount": 0, "state": {"running": {"startedAt": now}}}]
    }))
    .await;
    let o = wait_for(&s.api, "ba", "Stalled by the bad adapter", TIMEOUT, |o| {
        condition(o, "Stalled").is_some_and(|c| c.status == "True" && c.reason == "AdapterFailed")
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", s.operator.log()));
    for c in ["CacheReady", "EngineReady", "Available"] {
        assert!(has_condition(&o, c, "True"), "{c}: {}", summary(&o));
    }
    assert_eq!(
        o.status.as_ref().unwrap().phase,
        Some(sd35_crds::Phase::Degraded)
    );
    let ready = condition(&o, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "AdapterFailed")
    );
    assert!(
        ready.message.contains(said)
            && ready
                .message
                .contains("the model and 1 other adapter(s) are served"),
        "{}",
        ready.message
    );
    let bad_status = adapter_status(&o, "bad").unwrap();
    assert!(!bad_status.ready);
    assert!(
        bad_status.message.contains(said) && bad_status.message.contains("spec.adapters"),
        "{}",
        bad_status.message
    );
    assert!(adapter_status(&o, "good").unwrap().ready);
    let flags = adapter_flags(&s, "ba").await;
    assert_eq!(
        flags,
        [format!(
            "--lora=good=/cache/adapters/{good}/adapter.safetensors"
        )]
    );

    heartbeat.abort();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(s.cluster.client());
    nodes.delete(&node, &DeleteParams::default()).await.unwrap();
}
