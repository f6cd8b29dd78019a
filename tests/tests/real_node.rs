#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

//! The whole path on the real node `real-0`: the chart's operator runs as a pod in a
//! namespace enforcing the `restricted` Pod Security level, with only the chart's RBAC; a
//! tiny-model SD35Deployment with no GPU request, sourced from an `http` mirror this test
//! serves, really fetches, builds and serves there; a request through the Service returns a
//! PNG byte-identical to `sd35-server generate` with the same model, seed and parameters; a
//! killed server pod is replaced and serves again; two LoRA adapters and a canny ControlNet
//! declared beside the model are fetched by Jobs of their own and served per request, the
//! same bytes as `generate` with the same files; a fetch Job killed mid-download resumes;
//! a precision change rolls out without one failed request from a client polling the
//! Service.
//!
//! The images come from `make images` (the server's CPU flavour; `make test` builds them
//! from the same binaries this test runs, so `generate` here is the image's own code). The
//! tests skip only where a real node cannot run (not root), never under `CI=true`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    Namespace, PersistentVolume, PersistentVolumeClaim, Pod, Service,
};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use sd35_crds::SD35Deployment;
use sd35_e2e::mirror::{ModelMirror, Throttle, write_mirror};
use sd35_e2e::{
    Cluster, HOST_ADDRESS, Probe, REAL_NODE_NAME, TestNamespace, kubectl_apply, poll_until,
    repo_root, server_binary, shared_real_node_cluster, wait_for, wait_ready,
};

/// The namespace the chart installs the operator into.
const OPERATOR_NAMESPACE: &str = "sd35-system";
const TIMEOUT: Duration = Duration::from_secs(240);

/// The request every test sends: tiny, so a debug build answers in seconds.
const PROMPT: &str = "a lighthouse at dusk";
const SEED: u64 = 7;
const STEPS: u32 = 2;
const SIZE: u32 = 64;
const GUIDANCE: f64 = 3.5;

fn kubectl(cluster: &Cluster, args: &[&str]) -> String {
    let out = cluster.kubectl().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `repository` and `tag` of an image reference.
fn split_image(image: &str) -> (&str, &str) {
    let slash = image.rfind('/').unwrap_or(0);
    match image[slash..].rfind(':') {
        Some(colon) => (&image[..slash + colon], &image[slash + colon + 1..]),
        None => (image, ""),
    }
}

/// Labels a namespace to enforce the `restricted` Pod Security level.
fn enforce_restricted(cluster: &Cluster, namespace: &str) {
    kubectl(
        cluster,
        &[
            "label",
            "--overwrite",
            "namespace",
            namespace,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest",
        ],
    );
}

/// Installs the chart once per test binary: the operator image built here, running as a pod
/// on the real node, watching every namespace, in a restricted namespace.
fn operator_installed(cluster: &'static Cluster) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let images = cluster.real_node_images().unwrap();
        let (operator_repo, operator_tag) = split_image(&images.operator);
        let (server_repo, server_tag) = split_image(&images.server);
        kubectl(cluster, &["create", "namespace", OPERATOR_NAMESPACE]);
        enforce_restricted(cluster, OPERATOR_NAMESPACE);
        let out = cluster
            .helm()
            .args([
                "install",
                "sd35",
                "--namespace",
                OPERATOR_NAMESPACE,
                "--wait",
                "--timeout",
                "180s",
            ])
            .arg(repo_root().join("charts/sd35-operator"))
            .args(["--set", &format!("image.repository={operator_repo}")])
            .args(["--set", &format!("image.tag={operator_tag}")])
            .args(["--set", &format!("serverImage.repository={server_repo}")])
            .args(["--set", &format!("serverImage.tag={server_tag}")])
            .arg("--values")
            .arg(repo_root().join("charts/sd35-operator/ci/local-node-values.yaml"))
            .args(["--set", "logLevel=info\\,sd35_operator=debug"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm install: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            kubectl(cluster, &["get", "pods", "-A", "-o", "wide"])
        );
    });
}

/// A namespace for one test's SD35Deployment, enforcing `restricted` too.
async fn app_namespace(cluster: &'static Cluster, prefix: &str) -> TestNamespace {
    operator_installed(cluster);
    let namespace = cluster.temp_namespace(prefix).await;
    enforce_restricted(cluster, namespace.name());
    namespace
}

/// The tiny model's mirror, served on the host's end of the node's link, so pods reach it.
async fn serve_tiny_model(throttle: Option<Throttle>) -> (ModelMirror, PathBuf) {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sd35-real-node-mirror-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    write_mirror(
        &repo_root().join("inference/testdata/sd35-tiny-large"),
        &dir,
    )
    .unwrap();
    let mirror = ModelMirror::serve(&dir, SocketAddr::from((HOST_ADDRESS, 0)), throttle)
        .await
        .unwrap();
    (mirror, dir)
}

/// An SD35Deployment of the tiny model: no GPU, small requests, everything on real-0.
fn tiny_manifest(name: &str, mirror: &ModelMirror, precision: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: sd35.io/v1alpha1
kind: SD35Deployment
metadata:
  name: {name}
spec:
  variant: large
  precision: {precision}
  model:
    source:
      http:
        url: "{url}"
  cache:
    size: 1Gi
    fetch:
      resources: {{requests: {{cpu: 100m, memory: 128Mi}}, limits: {{memory: 1Gi}}}}
  engine:
    job:
      resources: {{requests: {{cpu: 100m, memory: 128Mi}}, limits: {{memory: 2Gi}}}}
  server:
    gpu:
      count: 0
    resources: {{requests: {{cpu: 100m, memory: 256Mi}}, limits: {{memory: 2Gi}}}}
  scheduling:
    nodeSelector:
      kubernetes.io/hostname: {node}
    tolerations:
      - {{key: sd35.io/real-node, operator: Exists, effect: NoSchedule}}
{extra}"#,
        url = mirror.url(),
        node = REAL_NODE_NAME,
    )
}

fn apply(cluster: &Cluster, namespace: &str, manifest: &str) {
    let out = kubectl_apply(cluster, namespace, manifest).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `kubectl port-forward service/<name> :8080`, stopped on drop.
struct PortForward {
    child: Child,
    port: u16,
}

impl PortForward {
    fn start(cluster: &Cluster, namespace: &str, service: &str) -> Self {
        let mut child = cluster
            .kubectl()
            .args([
                "port-forward",
                "-n",
                namespace,
                &format!("service/{service}"),
                ":8080",
            ])
            .args(["--address", "127.0.0.1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        // kubectl writes a line per connection; a closed pipe would kill it.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        // "Forwarding from 127.0.0.1:40123 -> 8080"
        let port = line
            .split_whitespace()
            .nth(2)
            .and_then(|address| address.rsplit(':').next())
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("unexpected port-forward output {line:?}"));
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn txt2img_body() -> serde_json::Value {
    serde_json::json!({
        "prompt": PROMPT,
        "seed": SEED,
        "steps": STEPS,
        "width": SIZE,
        "height": SIZE,
        "guidance_scale": GUIDANCE,
    })
}

/// `POST /v1/txt2img` at `base`; the PNG, or the status and body of the failure.
async fn txt2img(client: &reqwest::Client, base: &str) -> Result<Vec<u8>, String> {
    let response = client
        .post(format!("{base}/v1/txt2img"))
        .header("content-type", "application/json")
        .body(txt2img_body().to_string())
        .send()
        .await
        .map_err(|error| format!("{error:#}"))?;
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response
        .bytes()
        .await
        .map_err(|error| format!("{error:#}"))?;
    if status.is_success() && content_type == "image/png" {
        Ok(body.to_vec())
    } else {
        Err(format!(
            "{status} {content_type}: {}",
            String::from_utf8_lossy(&body)
        ))
    }
}

/// The PNG through a fresh port-forward to the Service, retried while the forward settles.
async fn png_through_port_forward(cluster: &Cluster, namespace: &str, service: &str) -> Vec<u8> {
    let client = reqwest::Client::new();
    poll_until(
        "a PNG through kubectl port-forward",
        Duration::from_secs(60),
        || async {
            let forward = PortForward::start(cluster, namespace, service);
            Ok(match txt2img(&client, &forward.url()).await {
                Ok(png) => Probe::Ready(png),
                Err(error) => Probe::Pending(error),
            })
        },
    )
    .await
    .unwrap()
}

/// The host directory behind the SD35Deployment's cache claim.
async fn cache_dir(namespace: &TestNamespace, claim: &str) -> PathBuf {
    let claims: Api<PersistentVolumeClaim> = namespace.api();
    let volume = claims
        .get(claim)
        .await
        .unwrap()
        .spec
        .unwrap()
        .volume_name
        .unwrap();
    let volumes: Api<PersistentVolume> = Api::all(namespace.client());
    let volume = volumes.get(&volume).await.unwrap();
    PathBuf::from(volume.spec.unwrap().host_path.unwrap().path)
}

/// `sd35-server generate` with the same model, seed and parameters as [`txt2img_body`].
fn generate(model: &Path, precision: &str) -> Vec<u8> {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join(format!("{precision}.png"));
    let output = Command::new(server_binary().unwrap())
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(["--precision", precision, "--prompt", PROMPT])
        .args(["--seed", &SEED.to_string(), "--steps", &STEPS.to_string()])
        .args(["--width", &SIZE.to_string(), "--height", &SIZE.to_string()])
        .args(["--guidance", &GUIDANCE.to_string()])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "generate: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read(&out).unwrap()
}

/// The serving pods of the SD35Deployment `name` (through its Deployment's selector).
async fn server_pods(namespace: &TestNamespace, name: &str) -> Vec<Pod> {
    let deployments: Api<Deployment> = namespace.api();
    let selector = deployments
        .get(name)
        .await
        .unwrap()
        .spec
        .unwrap()
        .selector
        .match_labels
        .unwrap();
    let selector: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let pods: Api<Pod> = namespace.api();
    pods.list(&ListParams::default().labels(&selector.join(",")))
        .await
        .unwrap()
        .items
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|status| status.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
}

fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.node_name.clone())
        .unwrap_or_default()
}

/// Every pod of Job `name` ran on the real node, and the Job succeeded.
async fn assert_job_succeeded_on_real_node(namespace: &TestNamespace, name: &str) {
    let jobs: Api<Job> = namespace.api();
    let job = jobs.get(name).await.unwrap();
    assert!(
        job.status
            .as_ref()
            .and_then(|status| status.succeeded)
            .unwrap_or(0)
            >= 1,
        "Job {name} did not succeed: {:?}",
        job.status
    );
    let pods: Api<Pod> = namespace.api();
    let list = pods
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={name}")))
        .await
        .unwrap();
    assert!(!list.items.is_empty(), "Job {name} left no pods");
    for pod in &list.items {
        assert_eq!(
            node_of(pod),
            REAL_NODE_NAME,
            "a pod of Job {name} ran elsewhere"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_runs_the_operator_as_a_pod_in_a_restricted_namespace() {
    let Some(cluster) = shared_real_node_cluster() else {
        return;
    };
    operator_installed(cluster);
    let client = cluster.client();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let labels = namespaces
        .get(OPERATOR_NAMESPACE)
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap();
    assert_eq!(labels["pod-security.kubernetes.io/enforce"], "restricted");

    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let operator = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=sd35-operator"))
        .await
        .unwrap()
        .items;
    assert_eq!(operator.len(), 1, "one operator pod");
    let pod = &operator[0];
    assert_eq!(node_of(pod), REAL_NODE_NAME);
    assert!(
        is_ready(pod),
        "the operator pod is not Ready: {:?}",
        pod.status
    );
    let images = cluster.real_node_images().unwrap();
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some(images.operator.as_str())
    );
    let security = spec.containers[0].security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        spec.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );

    // The namespace really enforces `restricted`: a pod asking for root is refused.
    let privileged = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: root-probe}}\nspec:\n  nodeSelector: {{kubernetes.io/hostname: {REAL_NODE_NAME}}}\n  tolerations: [{{operator: Exists}}]\n  containers: [{{name: c, image: '{}', securityContext: {{runAsUser: 0}}}}]\n",
        images.server
    );
    let out = kubectl_apply(cluster, OPERATOR_NAMESPACE, &privileged).unwrap();
    assert!(
        !out.status.success(),
        "a root pod was admitted into a restricted namespace"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("violates PodSecurity \"restricted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Only the chart's RBAC: every binding of the operator's ServiceAccount is the release's.
    let account = spec.service_account_name.clone().unwrap();
    let is_operator = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|subject| {
            subject.kind == "ServiceAccount"
                && subject.name == account
                && subject.namespace.as_deref() == Some(OPERATOR_NAMESPACE)
        })
    };
    let release_of = |meta: &kube::api::ObjectMeta| {
        meta.annotations
            .as_ref()
            .and_then(|annotations| annotations.get("meta.helm.sh/release-name"))
            .cloned()
    };
    let cluster_bindings: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> =
        Api::all(client.clone());
    let mut bindings = 0;
    for binding in cluster_bindings.list(&ListParams::default()).await.unwrap() {
        if is_operator(&binding.subjects) {
            assert_eq!(
                release_of(&binding.metadata).as_deref(),
                Some("sd35"),
                "{:?}",
                binding.metadata.name
            );
            bindings += 1;
        }
    }
    let role_bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> = Api::all(client.clone());
    for binding in role_bindings.list(&ListParams::default()).await.unwrap() {
        if is_operator(&binding.subjects) {
            assert_eq!(
                release_of(&binding.metadata).as_deref(),
                Some("sd35"),
                "{:?}",
                binding.metadata.name
            );
            bindings += 1;
        }
    }
    assert!(
        bindings > 0,
        "the operator's ServiceAccount is bound to nothing"
    );

    // real-0 keeps other workloads off with its taint; the chart's values tolerate it.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let taints = nodes
        .get(REAL_NODE_NAME)
        .await
        .unwrap()
        .spec
        .unwrap()
        .taints
        .unwrap_or_default();
    assert!(
        taints
            .iter()
            .any(|taint| taint.key == "sd35.io/real-node" && taint.effect == "NoSchedule"),
        "{taints:?}"
    );

    // The operator is ready and serves its metrics from inside the pod network: the kubelet's
    // readiness probe reached it, and its leader election (if any) and watches work with
    // nothing but the chart's RBAC.
    let logs = kubectl(
        cluster,
        &[
            "logs",
            "-n",
            OPERATOR_NAMESPACE,
            "deployment/sd35-sd35-operator",
        ],
    );
    assert!(
        !logs.contains("Forbidden"),
        "the chart's RBAC is not enough:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tiny_model_is_fetched_built_and_served_for_real_and_a_killed_server_pod_is_replaced() {
    let Some(cluster) = shared_real_node_cluster() else {
        return;
    };
    let namespace = app_namespace(cluster, "real-serve").await;
    let (mirror, mirror_dir) = serve_tiny_model(None).await;
    apply(
        cluster,
        namespace.name(),
        &tiny_manifest("tiny", &mirror, "bf16", ""),
    );
    let api: Api<SD35Deployment> = namespace.api();
    let ready = wait_ready(&api, "tiny", TIMEOUT).await.unwrap();
    let status = ready.status.unwrap();
    let cache = status.cache.unwrap();
    let engine_key = status.engine.unwrap().key;

    // The Jobs ran for real on the real node: the mirror served the files, the volume
    // holds the model and the engine.
    assert_job_succeeded_on_real_node(&namespace, &format!("sd35-fetch-{}", cache.key)).await;
    assert_job_succeeded_on_real_node(&namespace, &format!("sd35-build-{engine_key}")).await;
    assert!(
        mirror
            .requests()
            .iter()
            .any(|r| r.path == "sha256sums.txt" && r.status == 200),
        "the fetch Job never read the mirror's manifest: {:?}",
        mirror.requests()
    );
    let volume = cache_dir(&namespace, &cache.claim_name).await;
    let model = volume.join("models").join(&cache.key);
    assert!(
        model.join(sd35_contract::COMPLETE_MARKER).is_file(),
        "no complete model in {}",
        model.display()
    );
    let engine = volume.join("engines").join(&engine_key);
    assert!(
        engine.join(sd35_contract::ENGINE_MANIFEST).is_file(),
        "no engine in {}",
        engine.display()
    );
    let pods = server_pods(&namespace, "tiny").await;
    assert_eq!(pods.len(), 1);
    assert_eq!(node_of(&pods[0]), REAL_NODE_NAME);

    // Through the Service: the same bytes `sd35-server generate` writes.
    let png = png_through_port_forward(cluster, namespace.name(), "tiny").await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let reference = generate(&model, "bf16");
    assert!(
        png == reference,
        "the served PNG differs from `sd35-server generate`'s"
    );

    // Killed (deleted at once, no grace), the server pod is replaced and serves again.
    let old = pods[0].metadata.name.clone().unwrap();
    let pod_api: Api<Pod> = namespace.api();
    pod_api
        .delete(
            &old,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        )
        .await
        .unwrap();
    poll_until("a replacement server pod to be Ready", TIMEOUT, || async {
        let pods = server_pods(&namespace, "tiny").await;
        let fresh: Vec<&Pod> = pods
            .iter()
            .filter(|pod| pod.metadata.name.as_deref() != Some(old.as_str()) && is_ready(pod))
            .collect();
        Ok(if fresh.len() == 1 && pods.len() == 1 {
            Probe::Ready(())
        } else {
            Probe::Pending(format!("{} pods", pods.len()))
        })
    })
    .await
    .unwrap();
    let again = png_through_port_forward(cluster, namespace.name(), "tiny").await;
    assert!(
        again == reference,
        "the replacement pod serves a different image"
    );
    let _ = std::fs::remove_dir_all(mirror_dir);
}

/// A file of the test data put in the mirror under `extra/`: its URL and sha256.
fn mirror_file(mirror: &ModelMirror, testdata: &str) -> (String, String) {
    use sha2::Digest as _;
    let from = repo_root().join("inference/testdata").join(testdata);
    let name = from.file_name().unwrap().to_str().unwrap().to_owned();
    let to = mirror.root().join("extra").join(&name);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(&from, &to).unwrap();
    let sha = sha2::Sha256::digest(std::fs::read(&from).unwrap());
    let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    (format!("{}extra/{name}", mirror.url()), hex)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_adapters_and_a_canny_controlnet_are_fetched_and_served_for_real_as_generate_makes_them()
 {
    use base64::Engine as _;
    let Some(cluster) = shared_real_node_cluster() else {
        return;
    };
    let namespace = app_namespace(cluster, "real-adapters").await;
    let (mirror, mirror_dir) = serve_tiny_model(None).await;
    let (style_url, style_sha) = mirror_file(&mirror, "lora/style.safetensors");
    let (detail_url, detail_sha) = mirror_file(&mirror, "lora/detail.safetensors");
    let (canny_url, canny_sha) = mirror_file(
        &mirror,
        "controlnet/sd3.5_large_controlnet_canny.safetensors",
    );
    let extra = format!(
        "  adapters:\n\
         \x20   - {{name: style, scale: 0.7, source: {{http: {{url: \"{style_url}\", sha256: {style_sha}}}}}}}\n\
         \x20   - {{name: detail, source: {{http: {{url: \"{detail_url}\", sha256: {detail_sha}}}}}}}\n\
         \x20 controlNets:\n\
         \x20   - {{mode: canny, source: {{http: {{url: \"{canny_url}\", sha256: {canny_sha}}}}}}}\n"
    );
    apply(
        cluster,
        namespace.name(),
        &tiny_manifest("adapted", &mirror, "bf16", &extra),
    );
    let api: Api<SD35Deployment> = namespace.api();
    let ready = wait_for(&api, "adapted", "Ready with its adapters", TIMEOUT, |o| {
        let Some(status) = o.status.as_ref() else {
            return false;
        };
        status.adapters.len() == 3
            && status.adapters.iter().all(|a| a.ready)
            && status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
    .await
    .unwrap();
    let status = ready.status.unwrap();
    let adapters_ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "AdaptersReady")
        .unwrap();
    assert_eq!(adapters_ready.status, "True", "{adapters_ready:?}");
    let cache = status.cache.unwrap();
    let volume = cache_dir(&namespace, &cache.claim_name).await;
    let mut cached = std::collections::BTreeMap::new();
    for adapter in &status.adapters {
        // Each was fetched by a Job of its own on the real node, from the mirror.
        assert_job_succeeded_on_real_node(&namespace, &format!("sd35-adapter-{}", adapter.key))
            .await;
        let file =
            sd35_contract::adapter_dir(&volume, &adapter.key).join(sd35_contract::ADAPTER_FILE);
        assert!(
            file.is_file(),
            "{} is not cached at {}",
            adapter.name,
            file.display()
        );
        cached.insert(adapter.name.clone(), file);
    }
    for url in [&style_url, &detail_url, &canny_url] {
        let path = url.strip_prefix(&mirror.url()).unwrap();
        assert!(
            mirror
                .requests()
                .iter()
                .any(|r| r.path == path && r.status == 200),
            "{path} was never fetched: {:?}",
            mirror.requests()
        );
    }

    // One request with both adapters (style at its declared scale, detail at 1.3) and a canny
    // condition made from a picture, through the Service.
    let picture = repo_root().join("inference/testdata/golden/controlnet_blur.png");
    let body = serde_json::json!({
        "prompt": PROMPT, "seed": SEED, "steps": STEPS, "width": 64, "height": 48,
        "guidance_scale": GUIDANCE,
        "loras": [{"name": "style"}, {"name": "detail", "scale": 1.3}],
        "control": {
            "mode": "canny",
            "image": base64::engine::general_purpose::STANDARD.encode(std::fs::read(&picture).unwrap()),
            "scale": 0.8,
            "preprocess": true,
        },
    });
    let client = reqwest::Client::new();
    let served = poll_until(
        "an adapted PNG through kubectl port-forward",
        Duration::from_secs(60),
        || async {
            let forward = PortForward::start(cluster, namespace.name(), "adapted");
            let response = client
                .post(format!("{}/v1/txt2img", forward.url()))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await;
            Ok(match response {
                Ok(r) if r.status().is_success() => Probe::Ready(r.bytes().await?.to_vec()),
                Ok(r) => Probe::Pending(format!("{}: {}", r.status(), r.text().await?)),
                Err(error) => Probe::Pending(format!("{error:#}")),
            })
        },
    )
    .await
    .unwrap();
    assert!(served.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");

    // `generate` with the files the pod loaded from the cache: the same bytes.
    let model = volume.join("models").join(&cache.key);
    let out = std::env::temp_dir().join(format!(
        "sd35-real-node-adapters-{}.png",
        std::process::id()
    ));
    let output = Command::new(server_binary().unwrap())
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .args(["--precision", "bf16", "--prompt", PROMPT])
        .args(["--seed", &SEED.to_string(), "--steps", &STEPS.to_string()])
        .args(["--width", "64", "--height", "48"])
        .args(["--guidance", &GUIDANCE.to_string()])
        .arg("--lora")
        .arg(format!("{}:0.7", cached["style"].display()))
        .arg("--lora")
        .arg(format!("{}:1.3", cached["detail"].display()))
        .arg("--controlnet")
        .arg(&cached["canny"])
        .args([
            "--control-mode",
            "canny",
            "--control-scale",
            "0.8",
            "--control-preprocess",
        ])
        .arg("--control-image")
        .arg(&picture)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "generate: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reference = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    assert!(
        served == reference,
        "the served adapted PNG differs from `sd35-server generate`'s"
    );
    // And the adapters changed the image: the plain request differs.
    let plain = png_through_port_forward(cluster, namespace.name(), "adapted").await;
    assert!(
        plain != served,
        "the adapters and the condition changed nothing"
    );
    let _ = std::fs::remove_dir_all(mirror_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_job_killed_mid_download_resumes_from_its_partial_file() {
    let Some(cluster) = shared_real_node_cluster() else {
        return;
    };
    let namespace = app_namespace(cluster, "real-resume").await;
    // One file trickles, so the fetch is surely mid-download when it is killed.
    const SLOW: &str = "text_encoder_2/model.safetensors";
    let slow_size = std::fs::metadata(
        repo_root()
            .join("inference/testdata/sd35-tiny-large")
            .join(SLOW),
    )
    .unwrap()
    .len();
    let throttle = Throttle {
        suffix: SLOW.to_owned(),
        bytes_per_second: slow_size / 12,
    };
    let (mirror, mirror_dir) = serve_tiny_model(Some(throttle)).await;
    apply(
        cluster,
        namespace.name(),
        &tiny_manifest("resume", &mirror, "bf16", ""),
    );

    poll_until(
        "the fetch to be a third into the slow file",
        TIMEOUT,
        || async {
            Ok(if mirror.bytes_sent(SLOW) > slow_size / 3 {
                Probe::Ready(())
            } else {
                Probe::Pending(format!("{} bytes so far", mirror.bytes_sent(SLOW)))
            })
        },
    )
    .await
    .unwrap();
    let fetchers: Vec<u32> = sd35_e2e::node::container_processes()
        .into_iter()
        .filter(|(_, argv)| {
            argv.first().is_some_and(|a| a.ends_with("sd35-server"))
                && argv.get(1).map(String::as_str) == Some("fetch")
        })
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(fetchers.len(), 1, "one fetch process runs on the node");
    let killed = Command::new("kill")
        .args(["-KILL", &fetchers[0].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let sent_before_kill = mirror.bytes_sent(SLOW);

    let api: Api<SD35Deployment> = namespace.api();
    let ready = wait_ready(&api, "resume", TIMEOUT).await.unwrap();
    let cache = ready.status.unwrap().cache.unwrap();
    let resumed: Vec<u64> = mirror
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(SLOW) && r.method == "GET")
        .filter_map(|r| r.range_from)
        .collect();
    assert!(
        resumed.iter().any(|from| *from > 0),
        "the second fetch did not continue the partial file: {:?}",
        mirror.requests()
    );
    // Resuming sent the rest, not the whole file again.
    let total_sent = mirror.bytes_sent(SLOW);
    assert!(
        total_sent < slow_size + sent_before_kill / 2 + slow_size / 10,
        "{total_sent} bytes sent for a {slow_size}-byte file: the download restarted"
    );
    let jobs: Api<Job> = namespace.api();
    let job = jobs
        .get(&format!("sd35-fetch-{}", cache.key))
        .await
        .unwrap();
    assert!(
        job.status.unwrap().failed.unwrap_or(0) >= 1,
        "the killed pod counts as a failed attempt"
    );
    let volume = cache_dir(&namespace, &cache.claim_name).await;
    assert!(
        volume
            .join("models")
            .join(&cache.key)
            .join(sd35_contract::COMPLETE_MARKER)
            .is_file()
    );
    let _ = std::fs::remove_dir_all(mirror_dir);
}

/// Counts of the polling client's outcomes.
#[derive(Debug, Default)]
struct Polls {
    succeeded: usize,
    failures: Vec<String>,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_precision_change_rolls_out_without_a_failed_request() {
    let Some(cluster) = shared_real_node_cluster() else {
        return;
    };
    let namespace = app_namespace(cluster, "real-rollout").await;
    let (mirror, mirror_dir) = serve_tiny_model(None).await;
    let surge = "  rollout:\n    strategy: Surge\n    maxSurge: 1\n";
    apply(
        cluster,
        namespace.name(),
        &tiny_manifest("rollout", &mirror, "bf16", surge),
    );
    let api: Api<SD35Deployment> = namespace.api();
    wait_ready(&api, "rollout", TIMEOUT).await.unwrap();
    let before: Vec<String> = server_pods(&namespace, "rollout")
        .await
        .iter()
        .filter_map(|pod| pod.metadata.name.clone())
        .collect();

    // A client polls the Service's cluster IP (the host routes Service addresses into the
    // node, where kube-proxy balances them) for the whole rollout.
    let services: Api<Service> = namespace.api();
    let cluster_ip = services
        .get("rollout")
        .await
        .unwrap()
        .spec
        .unwrap()
        .cluster_ip
        .unwrap();
    let base = format!("http://{cluster_ip}:8080");
    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(Mutex::new(Polls::default()));
    let poller = {
        let (stop, polls, base) = (Arc::clone(&stop), Arc::clone(&polls), base.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let outcome = txt2img(&client, &base).await;
                let mut polls = polls.lock().unwrap();
                match outcome {
                    Ok(_) => polls.succeeded += 1,
                    Err(error) => polls.failures.push(error),
                }
            }
        })
    };
    poll_until(
        "the poller's first answer",
        Duration::from_secs(60),
        || async {
            let polls = polls.lock().unwrap();
            Ok(if polls.succeeded + polls.failures.len() > 0 {
                Probe::Ready(())
            } else {
                Probe::Pending("none yet".into())
            })
        },
    )
    .await
    .unwrap();

    let patch = serde_json::json!({"spec": {"precision": "fp8"}});
    api.patch("rollout", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let rolled = wait_for(&api, "rollout", "Ready on fp8", TIMEOUT, |obj| {
        sd35_e2e::has_condition(obj, "Ready", "True")
            && obj.status.as_ref().and_then(|s| s.observed_generation) == obj.metadata.generation
            && obj
                .status
                .as_ref()
                .is_some_and(|s| s.updated_replicas == 1 && s.ready_replicas == 1)
    })
    .await
    .unwrap();
    poll_until("the old server pod to be gone", TIMEOUT, || async {
        let pods = server_pods(&namespace, "rollout").await;
        let names: Vec<String> = pods
            .iter()
            .filter_map(|pod| pod.metadata.name.clone())
            .collect();
        Ok(
            if pods.len() == 1 && is_ready(&pods[0]) && !before.contains(&names[0]) {
                Probe::Ready(())
            } else {
                Probe::Pending(format!("pods {names:?}"))
            },
        )
    })
    .await
    .unwrap();
    // A few more answers from the new pod alone.
    let settled = polls.lock().unwrap().succeeded;
    poll_until(
        "answers from the new pod",
        Duration::from_secs(90),
        || async {
            let polls = polls.lock().unwrap();
            Ok(if polls.succeeded >= settled + 2 {
                Probe::Ready(())
            } else {
                Probe::Pending(format!("{polls:?}"))
            })
        },
    )
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    poller.await.unwrap();
    {
        let polls = polls.lock().unwrap();
        assert!(
            polls.failures.is_empty(),
            "requests failed during the rollout: {:?}",
            polls.failures
        );
        assert!(polls.succeeded >= 3, "{polls:?}");
    }

    // The new pods serve the fp8 engine: the image is `generate --precision fp8`'s.
    let cache = rolled.status.unwrap().cache.unwrap();
    let model = cache_dir(&namespace, &cache.claim_name)
        .await
        .join("models")
        .join(&cache.key);
    let client = reqwest::Client::new();
    let png = txt2img(&client, &base).await.unwrap();
    assert!(
        png == generate(&model, "fp8"),
        "the rolled-out pod does not serve the fp8 engine"
    );
    let _ = std::fs::remove_dir_all(mirror_dir);
}
