#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

//! GitOps for real: Flux's own controllers (source-, kustomize- and helm-controller, run by the
//! local cluster beside its real node) reconcile a fleet repository this test makes from
//! `gitops/flux/` and serves on loopback with git's `http-backend`. The fleet installs the chart
//! through a HelmRelease (from a second repository, the chart's, pinned by tag), then two
//! environments, `staging` and `production`, each an SD35Deployment of the tiny model fetched
//! from an `http` mirror and served for real on the real node.
//!
//! Each test is a commit to the fleet, as a platform team would make it, and what Flux and the
//! operator do with it: both environments Ready through Flux alone, and Flux calling each Ready
//! only once its SD35Deployment is; a precision change rolled out with no failed request; a
//! missing model file failing the Kustomization through the operator's Stalled condition, and
//! the next commit recovering it; a chart version upgrading the operator and its CRD, leaving
//! the SD35Deployments untouched; replicas owned by `kubectl scale` and an HPA with no Flux
//! correction, and two quiet minutes with no write from the operator or Flux beyond Flux's
//! bookkeeping of its own objects (the audit log's count).
//!
//! The tests take turns on the one fleet (each holds its lock). Like the real-node tests they
//! skip only where a real node cannot run (not root), never under `CI=true`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use sd35_crds::SD35Deployment;
use sd35_e2e::mirror::{ModelMirror, write_mirror};
use sd35_e2e::{
    Cluster, ClusterOptions, FLUX_NAMESPACE, GitServer, HOST_ADDRESS, Images, Probe, condition,
    flux_user, has_condition, poll_until, repo_root, skip_without_real_node, summary,
};
use serde_json::{Value, json};

/// Where the chart puts the operator (`gitops/flux/infrastructure/sd35-operator`).
const OPERATOR_NAMESPACE: &str = "sd35-system";
/// The environments, one Flux Kustomization and one namespace each.
const ENVIRONMENTS: [&str; 2] = ["staging", "production"];
/// The SD35Deployment every environment serves (`gitops/flux/apps/base`).
const APP: &str = "sd35-large";
/// The chart's version in this repository (the fleet pins its tag; the gitops test checks).
fn chart_version() -> String {
    let chart =
        std::fs::read_to_string(repo_root().join("charts/sd35-operator/Chart.yaml")).unwrap();
    let chart: Value = serde_yaml::from_str(&chart).unwrap();
    chart["version"].as_str().unwrap().to_owned()
}

/// The next patch version, which the upgrade test releases.
fn next_chart_version() -> String {
    let version = chart_version();
    let (head, patch) = version.rsplit_once('.').unwrap();
    format!("{head}.{}", patch.parse::<u32>().unwrap() + 1)
}
/// The printer column the next chart version adds to the CRD.
const NEW_PRINTER_COLUMN: &str = "Cache";
/// How long one change may take to roll out (a fetch, an engine build, a model load).
const TIMEOUT: Duration = Duration::from_secs(300);
/// The first sync: the chart, then two environments fetching and building at once.
const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------------------
// The fleet: the cluster, the repositories, the servers.

/// The cluster, the fleet repository the tests commit to, and the model mirror's address.
struct Fleet {
    cluster: &'static Cluster,
    /// The fleet repository's work tree (served as `fleet`).
    repository: PathBuf,
    mirror_url: String,
    /// What the SD35Deployments said when Flux first reported their Kustomizations Ready.
    first_sync: Vec<FirstSync>,
    /// One test at a time changes the fleet.
    turn: tokio::sync::Mutex<()>,
}

/// The git server and the model mirror, on a runtime of their own: they outlive each test's.
struct Servers {
    _runtime: tokio::runtime::Runtime,
    git: GitServer,
    mirror: ModelMirror,
}

fn flux_cluster() -> &'static Cluster {
    static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
    let started = SHARED.get_or_init(|| {
        let start = || {
            Cluster::start(ClusterOptions {
                gpu_nodes: 1,
                real_node: Some(Images::locate()?),
                flux: true,
                ..ClusterOptions::default()
            })
        };
        start().map_err(|error: anyhow::Error| format!("{error:#}"))
    });
    match started {
        Ok(cluster) => cluster,
        Err(message) => panic!("the Flux cluster did not start: {message}"),
    }
}

/// The fleet, synced and Ready; `None` (after saying why) where a real node cannot run.
async fn fleet() -> Option<&'static Fleet> {
    static FLEET: tokio::sync::OnceCell<Result<Fleet, String>> = tokio::sync::OnceCell::const_new();
    if skip_without_real_node() {
        return None;
    }
    let fleet = FLEET
        .get_or_init(|| async { set_up().await.map_err(|error| format!("{error:#}")) })
        .await;
    match fleet {
        Ok(fleet) => Some(fleet),
        Err(message) => panic!("the fleet did not sync: {message}"),
    }
}

fn servers(git_root: PathBuf, mirror_dir: PathBuf) -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(|| {
        // Built on a thread of its own: a runtime cannot start inside the test's.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let (git, mirror) = runtime.block_on(async {
                let git = GitServer::serve(&git_root, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                    .await
                    .unwrap();
                // On the host's end of the node's link, so the fetch pods reach it.
                let mirror =
                    ModelMirror::serve(&mirror_dir, SocketAddr::from((HOST_ADDRESS, 0)), None)
                        .await
                        .unwrap();
                (git, mirror)
            });
            Servers {
                _runtime: runtime,
                git,
                mirror,
            }
        })
        .join()
        .unwrap()
    })
}

async fn set_up() -> anyhow::Result<Fleet> {
    let started = Instant::now();
    let cluster = flux_cluster();
    let root = cluster.state_dir().join("gitops");
    let git_root = root.join("git");
    let mirror_dir = root.join("mirror");
    write_mirror(
        &repo_root().join("inference/testdata/sd35-tiny-large"),
        &mirror_dir,
    )?;
    let servers = servers(git_root.clone(), mirror_dir);
    let mirror_url = servers.mirror.url();

    // The chart's repository, as its project publishes it: the chart at two release tags.
    let chart_repository = git_root.join("sd35-operator");
    copy_dir(
        &repo_root().join("charts/sd35-operator"),
        &chart_repository.join("charts/sd35-operator"),
    );
    git(
        &chart_repository,
        &["init", "--quiet", "--initial-branch=main"],
    );
    commit(
        &chart_repository,
        &format!("sd35-operator chart {}", chart_version()),
    );
    git(
        &chart_repository,
        &["tag", &format!("v{}", chart_version())],
    );
    release_next_chart_version(&chart_repository);

    // The fleet: gitops/flux as a user copies it, with this cluster's settings.
    let repository = git_root.join("fleet");
    copy_dir(&repo_root().join("gitops/flux"), &repository);
    let images = cluster.real_node_images().unwrap();
    let (operator_image, operator_tag) = split_image(&images.operator);
    let (server_image, server_tag) = split_image(&images.server);
    let settings = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cluster-settings", "namespace": FLUX_NAMESPACE},
        "data": {
            "SD35_CHART_REPOSITORY": servers.git.url("sd35-operator"),
            "SD35_OPERATOR_IMAGE": operator_image, "SD35_OPERATOR_TAG": operator_tag,
            "SD35_SERVER_IMAGE": server_image, "SD35_SERVER_TAG": server_tag,
            "SD35_MODEL_MIRROR": mirror_url,
        }
    });
    std::fs::write(
        repository.join("clusters/local/cluster-settings.yaml"),
        format!(
            "# This cluster's settings (written by the Flux tests).\n{}",
            serde_yaml::to_string(&settings)?
        ),
    )?;
    git(&repository, &["init", "--quiet", "--initial-branch=main"]);
    let revision = commit(
        &repository,
        "The local cluster: the operator, staging and production",
    );

    // What `flux bootstrap` would write: the fleet as a source, and its cluster directory.
    let bootstrap = format!(
        r"apiVersion: source.toolkit.fluxcd.io/v1
kind: GitRepository
metadata:
  name: flux-system
  namespace: {FLUX_NAMESPACE}
spec:
  interval: 1m
  url: {url}
  ref:
    branch: main
---
apiVersion: kustomize.toolkit.fluxcd.io/v1
kind: Kustomization
metadata:
  name: flux-system
  namespace: {FLUX_NAMESPACE}
spec:
  interval: 10m
  path: ./clusters/local
  prune: true
  sourceRef:
    kind: GitRepository
    name: flux-system
",
        url = servers.git.url("fleet")
    );
    let out = sd35_e2e::kubectl_apply(cluster, FLUX_NAMESPACE, &bootstrap)?;
    anyhow::ensure!(
        out.status.success(),
        "applying the bootstrap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Flux's word first: each Kustomization Ready at the fleet's first revision. What each
    // SD35Deployment said at that moment is kept for the first test to judge.
    let client = cluster.client();
    for name in ["flux-system", "sd35-operator"] {
        kustomization_ready(&client, name, &revision, FIRST_SYNC_TIMEOUT)
            .await
            .map_err(|error| anyhow::anyhow!("{error:#}\n{}", diagnostics(cluster)))?;
    }
    let mut first_sync = Vec::new();
    for environment in ENVIRONMENTS {
        kustomization_ready(&client, environment, &revision, FIRST_SYNC_TIMEOUT)
            .await
            .map_err(|error| anyhow::anyhow!("{error:#}\n{}", diagnostics(cluster)))?;
        let api: Api<SD35Deployment> = Api::namespaced(client.clone(), environment);
        let object = api.get(APP).await?;
        first_sync.push(FirstSync {
            environment,
            sd35_ready: has_condition(&object, "Ready", "True")
                && object.status.as_ref().and_then(|s| s.observed_generation)
                    == object.metadata.generation,
            sd35_summary: summary(&object),
        });
    }
    // Then the objects' own word: every test starts from both environments really serving.
    for environment in ENVIRONMENTS {
        let api: Api<SD35Deployment> = Api::namespaced(client.clone(), environment);
        sd35_e2e::wait_ready(&api, APP, FIRST_SYNC_TIMEOUT)
            .await
            .map_err(|error| anyhow::anyhow!("{error:#}\n{}", diagnostics(cluster)))?;
    }
    eprintln!(
        "flux: both environments Ready {:.0}s after the bootstrap",
        started.elapsed().as_secs_f64()
    );
    Ok(Fleet {
        cluster,
        repository,
        mirror_url,
        first_sync,
        turn: tokio::sync::Mutex::new(()),
    })
}

/// What an environment's SD35Deployment said when Flux first called its Kustomization Ready.
#[derive(Debug)]
struct FirstSync {
    environment: &'static str,
    sd35_ready: bool,
    sd35_summary: String,
}

impl Fleet {
    /// Commits the fleet's work tree, asks Flux to look at the fleet now (as `flux reconcile
    /// source git` does; it would on its own within a minute), and returns the revision Flux
    /// will name (`main@sha1:<hash>`).
    async fn push(&self, message: &str) -> String {
        let revision = commit(&self.repository, message);
        request_reconcile(&self.cluster.client(), "gitrepositories", "flux-system").await;
        revision
    }

    /// Replaces `from` with `to` in one file of the fleet (exactly once).
    fn edit(&self, file: &str, from: &str, to: &str) {
        let path = self.repository.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches(from).count(), 1, "{file}: {from:?}");
        std::fs::write(&path, text.replace(from, to)).unwrap();
    }

    fn sd35(&self, environment: &str) -> Api<SD35Deployment> {
        Api::namespaced(self.cluster.client(), environment)
    }

    /// What Flux and the operator say, for a failed wait's message.
    fn diagnostics(&self) -> String {
        diagnostics(self.cluster)
    }
}

/// The state of Flux's objects and of the workloads, for a failed wait's message.
fn diagnostics(cluster: &Cluster) -> String {
    let kubectl = |args: &[&str]| {
        let out = cluster.kubectl().args(args).output().unwrap();
        format!(
            "$ kubectl {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    [
        kubectl(&[
            "get",
            "gitrepositories,kustomizations,helmreleases,helmcharts",
            "-A",
        ]),
        kubectl(&["get", "sd35,pods,jobs", "-A", "-o", "wide"]),
        // Why a pod does not start (a full disk, a missing image, a failed mount).
        kubectl(&[
            "get",
            "events",
            "-A",
            "--field-selector",
            "type=Warning",
            "--sort-by",
            ".lastTimestamp",
        ]),
    ]
    .join("\n")
}

/// The chart's next release in its repository: the version bumped, and the CRD with one
/// more printer column (a schema change as a new version of the types brings), tagged.
fn release_next_chart_version(chart_repository: &Path) {
    let chart = chart_repository.join("charts/sd35-operator");
    let manifest = chart.join("Chart.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let (current, next) = (chart_version(), next_chart_version());
    let from = format!("\nversion: {current}\n");
    assert!(text.contains(&from), "Chart.yaml is not at {current}");
    std::fs::write(
        &manifest,
        text.replace(&from, &format!("\nversion: {next}\n")),
    )
    .unwrap();
    let file = chart.join("files/crds").join(sd35_crds::CRD_FILE_NAME);
    let mut crd: Value = serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "name": NEW_PRINTER_COLUMN, "type": "string", "priority": 1,
            "jsonPath": ".status.cache.claimName"
        }));
    std::fs::write(&file, serde_yaml::to_string(&crd).unwrap()).unwrap();
    commit(
        chart_repository,
        &format!("sd35-operator chart {next}: a printer column for the cache"),
    );
    git(chart_repository, &["tag", &format!("v{next}")]);
}

// ---------------------------------------------------------------------------------------
// git, files, images.

/// `git args...` in `dir`, with a fixed identity and no user or system configuration.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "sd35 fleet")
        .env("GIT_AUTHOR_EMAIL", "fleet@sd35.invalid")
        .env("GIT_COMMITTER_NAME", "sd35 fleet")
        .env("GIT_COMMITTER_EMAIL", "fleet@sd35.invalid")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Commits everything in `dir`; the revision as Flux names it.
fn commit(dir: &Path, message: &str) -> String {
    git(dir, &["add", "--all"]);
    git(dir, &["commit", "--quiet", "--message", message]);
    format!("main@sha1:{}", git(dir, &["rev-parse", "HEAD"]))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// `repository` and `tag` of an image reference.
fn split_image(image: &str) -> (&str, &str) {
    let slash = image.rfind('/').unwrap_or(0);
    match image[slash..].rfind(':') {
        Some(colon) => (&image[..slash + colon], &image[slash + colon + 1..]),
        None => (image, ""),
    }
}

// ---------------------------------------------------------------------------------------
// Flux's objects.

fn flux_api(client: &kube::Client, plural: &str) -> Api<DynamicObject> {
    let (group, version, kind) = match plural {
        "gitrepositories" => ("source.toolkit.fluxcd.io", "v1", "GitRepository"),
        "kustomizations" => ("kustomize.toolkit.fluxcd.io", "v1", "Kustomization"),
        "helmreleases" => ("helm.toolkit.fluxcd.io", "v2", "HelmRelease"),
        other => panic!("no Flux kind for {other}"),
    };
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    let namespace = if plural == "helmreleases" {
        OPERATOR_NAMESPACE
    } else {
        FLUX_NAMESPACE
    };
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// What `flux reconcile` does: the annotation its controllers answer at once.
async fn request_reconcile(client: &kube::Client, plural: &str, name: &str) {
    let now = format!("{:?}", std::time::SystemTime::now());
    let patch = json!({"metadata": {"annotations": {"reconcile.fluxcd.io/requestedAt": now}}});
    flux_api(client, plural)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// The condition `type_` of a Flux object: (status, reason, message).
fn flux_condition(object: &DynamicObject, type_: &str) -> Option<(String, String, String)> {
    object.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            let text = |key: &str| c[key].as_str().unwrap_or_default().to_owned();
            (text("status"), text("reason"), text("message"))
        })
}

fn flux_summary(object: &DynamicObject) -> String {
    format!(
        "lastAppliedRevision={} lastAttemptedRevision={} Ready={:?}",
        object.data["status"]["lastAppliedRevision"],
        object.data["status"]["lastAttemptedRevision"],
        flux_condition(object, "Ready")
    )
}

/// Waits until Kustomization `name` reports Ready for `revision`.
async fn kustomization_ready(
    client: &kube::Client,
    name: &str,
    revision: &str,
    timeout: Duration,
) -> anyhow::Result<DynamicObject> {
    let api = flux_api(client, "kustomizations");
    poll_until(
        &format!("Kustomization {name} Ready at {revision}"),
        timeout,
        || async {
            let object = api.get(name).await?;
            let ready =
                flux_condition(&object, "Ready").is_some_and(|(status, _, _)| status == "True");
            let current =
                object.data["status"]["observedGeneration"].as_i64() == object.metadata.generation;
            Ok(
                if ready && current && object.data["status"]["lastAppliedRevision"] == revision {
                    Probe::Ready(object)
                } else {
                    Probe::Pending(flux_summary(&object))
                },
            )
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------
// Serving and the audit log.

/// `POST /v1/txt2img` of a tiny request at `base`: Ok, or the failure.
async fn txt2img(client: &reqwest::Client, base: &str) -> Result<(), String> {
    let body =
        json!({"prompt": "a lighthouse at dusk", "seed": 7, "steps": 2, "width": 64, "height": 64});
    let response = client
        .post(format!("{base}/v1/txt2img"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|error| format!("{error:#}"))?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|error| format!("{error:#}"))?;
    if status.is_success() && bytes.starts_with(b"\x89PNG") {
        Ok(())
    } else {
        Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)))
    }
}

/// The Service's address in `environment` (the host routes Service addresses into the node).
async fn service_url(fleet: &Fleet, environment: &str) -> String {
    let services: Api<Service> = Api::namespaced(fleet.cluster.client(), environment);
    let ip = services
        .get(APP)
        .await
        .unwrap()
        .spec
        .unwrap()
        .cluster_ip
        .unwrap();
    format!("http://{ip}:8080")
}

/// The serving pods of `environment`'s SD35Deployment.
async fn server_pods(fleet: &Fleet, environment: &str) -> Vec<Pod> {
    let deployments: Api<Deployment> = Api::namespaced(fleet.cluster.client(), environment);
    let selector = deployments
        .get(APP)
        .await
        .unwrap()
        .spec
        .unwrap()
        .selector
        .match_labels
        .unwrap();
    let selector: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let pods: Api<Pod> = Api::namespaced(fleet.cluster.client(), environment);
    pods.list(&ListParams::default().labels(&selector.join(",")))
        .await
        .unwrap()
        .items
}

/// The audit log's events from line `from` on.
fn audit_events(cluster: &Cluster, from: usize) -> Vec<Value> {
    std::fs::read_to_string(cluster.audit_log_path())
        .unwrap()
        .lines()
        .skip(from)
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn audit_lines(cluster: &Cluster) -> usize {
    std::fs::read_to_string(cluster.audit_log_path())
        .unwrap()
        .lines()
        .count()
}

fn is_write(event: &Value) -> bool {
    matches!(
        event["verb"].as_str(),
        Some("create" | "update" | "patch" | "delete" | "deletecollection")
    ) && !event["requestURI"]
        .as_str()
        .unwrap_or_default()
        .contains("dryRun=")
}

fn is_dry_run(event: &Value) -> bool {
    event["requestURI"]
        .as_str()
        .unwrap_or_default()
        .contains("dryRun=")
}

fn user(event: &Value) -> &str {
    event["user"]["username"].as_str().unwrap_or_default()
}

/// The operator: the chart's ServiceAccount in its namespace.
fn is_operator(event: &Value) -> bool {
    user(event).starts_with(&format!("system:serviceaccount:{OPERATOR_NAMESPACE}:"))
}

fn is_flux(event: &Value) -> bool {
    user(event).starts_with("flux:")
}

/// A write to one of Flux's own objects, or an event (Flux's controllers record events only
/// about their own objects).
fn is_flux_bookkeeping(event: &Value) -> bool {
    event["objectRef"]["resource"] == "events"
        || event["objectRef"]["apiGroup"]
            .as_str()
            .is_some_and(|group| group.ends_with(".toolkit.fluxcd.io"))
}

fn describe(event: &Value) -> String {
    format!(
        "{} {} {} {}/{} {}",
        user(event),
        event["verb"].as_str().unwrap_or_default(),
        event["objectRef"]["resource"].as_str().unwrap_or_default(),
        event["objectRef"]["namespace"].as_str().unwrap_or_default(),
        event["objectRef"]["name"].as_str().unwrap_or_default(),
        event["objectRef"]["subresource"]
            .as_str()
            .unwrap_or_default(),
    )
}

// ---------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread")]
async fn both_environments_become_ready_through_flux_alone() {
    let Some(fleet) = fleet().await else {
        return;
    };
    let _turn = fleet.turn.lock().await;
    let client = fleet.cluster.client();
    let head = format!(
        "main@sha1:{}",
        git(&fleet.repository, &["rev-parse", "HEAD"])
    );
    for name in ["flux-system", "sd35-operator", "staging", "production"] {
        kustomization_ready(&client, name, &head, TIMEOUT)
            .await
            .unwrap();
    }
    let release = flux_api(&client, "helmreleases")
        .get("sd35-operator")
        .await
        .unwrap();
    assert_eq!(
        flux_condition(&release, "Ready").map(|c| c.0).as_deref(),
        Some("True"),
        "{}",
        flux_summary(&release)
    );
    for environment in ENVIRONMENTS {
        let object = fleet.sd35(environment).get(APP).await.unwrap();
        assert!(
            has_condition(&object, "Ready", "True"),
            "{}",
            summary(&object)
        );
        // Flux applied its spec (server-side apply as kustomize-controller), nobody else; the
        // operator applies only its status.
        let managers: Vec<_> = object
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|entry| {
                entry.operation.as_deref() == Some("Apply") && entry.subresource.is_none()
            })
            .filter_map(|entry| entry.manager.clone())
            .collect();
        assert_eq!(managers, ["kustomize-controller"], "{environment}");
        let url = service_url(fleet, environment).await;
        txt2img(&reqwest::Client::new(), &url).await.unwrap();
    }
    // The test applied only the bootstrap (a GitRepository and a Kustomization in
    // flux-system); everything in the operator's and the environments' namespaces was
    // created by Flux, the operator and Kubernetes' own controllers.
    let admin_creates: Vec<String> = audit_events(fleet.cluster, 0)
        .iter()
        .filter(|event| user(event) == "admin" && event["verb"] == "create")
        .filter(|event| {
            let namespace = event["objectRef"]["namespace"].as_str().unwrap_or_default();
            namespace == OPERATOR_NAMESPACE || ENVIRONMENTS.contains(&namespace)
        })
        .map(describe)
        .collect();
    assert!(admin_creates.is_empty(), "{admin_creates:?}");
    let flux_creates = audit_events(fleet.cluster, 0)
        .iter()
        .filter(|event| user(event) == flux_user("kustomize-controller").unwrap())
        .filter(|event| is_write(event) && event["objectRef"]["resource"] == "sd35deployments")
        .count();
    assert!(
        flux_creates >= 2,
        "kustomize-controller applied {flux_creates} SD35Deployments"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn flux_calls_a_new_environment_ready_only_once_its_sd35deployment_is() {
    let Some(fleet) = fleet().await else {
        return;
    };
    // Flux's health check (kstatus) waited for the operator: when it first called each
    // environment's Kustomization Ready, the SD35Deployment was Ready at its generation. An
    // object the operator has not written a status for yet must read as in progress.
    for sync in &fleet.first_sync {
        eprintln!(
            "flux: Kustomization {} first Ready while its SD35Deployment said: {}",
            sync.environment, sync.sd35_summary
        );
    }
    let early: Vec<String> = fleet
        .first_sync
        .iter()
        .filter(|sync| !sync.sd35_ready)
        .map(|sync| format!("{}: {}", sync.environment, sync.sd35_summary))
        .collect();
    assert!(
        early.is_empty(),
        "Flux called Kustomizations Ready before their SD35Deployments were: {early:?} \
         (kstatus counts an object with no status yet as Current)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_precision_commit_rolls_out_without_a_failed_request() {
    let Some(fleet) = fleet().await else {
        return;
    };
    let _turn = fleet.turn.lock().await;
    let client = fleet.cluster.client();
    let api = fleet.sd35("staging");
    let before: Vec<String> = server_pods(fleet, "staging")
        .await
        .iter()
        .filter_map(|pod| pod.metadata.name.clone())
        .collect();
    let base = service_url(fleet, "staging").await;

    // A client polls the Service for the whole rollout.
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<(usize, Vec<String>)>> = Arc::default();
    let poller = {
        let (stop, outcomes, base) = (Arc::clone(&stop), Arc::clone(&outcomes), base.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let outcome = txt2img(&http, &base).await;
                let mut outcomes = outcomes.lock().unwrap();
                match outcome {
                    Ok(()) => outcomes.0 += 1,
                    Err(error) => outcomes.1.push(error),
                }
            }
        })
    };
    poll_until(
        "the poller's first answer",
        Duration::from_secs(60),
        || async {
            let outcomes = outcomes.lock().unwrap();
            Ok(if outcomes.0 + outcomes.1.len() > 0 {
                Probe::Ready(())
            } else {
                Probe::Pending("none yet".into())
            })
        },
    )
    .await
    .unwrap();

    fleet.edit(
        "apps/staging/kustomization.yaml",
        "value: bf16",
        "value: fp8",
    );
    let revision = fleet.push("staging: serve the fp8 engine").await;
    kustomization_ready(&client, "staging", &revision, TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{error:#}\n{}", fleet.diagnostics()));
    let rolled = api.get(APP).await.unwrap();
    assert_eq!(
        serde_json::to_value(rolled.spec.precision).unwrap(),
        "fp8",
        "{}",
        summary(&rolled)
    );
    poll_until("the old server pods to be gone", TIMEOUT, || async {
        let pods = server_pods(fleet, "staging").await;
        let names: Vec<String> = pods
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        Ok(
            if !pods.is_empty() && names.iter().all(|name| !before.contains(name)) {
                Probe::Ready(())
            } else {
                Probe::Pending(format!("pods {names:?}"))
            },
        )
    })
    .await
    .unwrap();
    let settled = outcomes.lock().unwrap().0;
    poll_until(
        "answers from the new pods",
        Duration::from_secs(90),
        || async {
            let outcomes = outcomes.lock().unwrap();
            Ok(if outcomes.0 >= settled + 2 {
                Probe::Ready(())
            } else {
                Probe::Pending(format!("{outcomes:?}"))
            })
        },
    )
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    poller.await.unwrap();
    let (succeeded, failures) = outcomes.lock().unwrap().clone();
    eprintln!(
        "flux: {succeeded} requests answered during the precision rollout, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "requests failed during the rollout: {failures:?}"
    );
    assert!(succeeded >= 3, "only {succeeded} requests answered");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_model_file_fails_the_kustomization_with_the_cause_and_the_next_commit_recovers()
{
    let Some(fleet) = fleet().await else {
        return;
    };
    let _turn = fleet.turn.lock().await;
    let client = fleet.cluster.client();
    let api = fleet.sd35("staging");
    let kustomization = "apps/staging/kustomization.yaml";
    let good = std::fs::read_to_string(fleet.repository.join(kustomization)).unwrap();
    let bad_url = format!("{}no-such-model/", fleet.mirror_url);
    std::fs::write(
        fleet.repository.join(kustomization),
        format!(
            "{good}  - target:\n      kind: SD35Deployment\n      name: {APP}\n    patch: |\n      \
             - op: replace\n        path: /spec/model/source/http/url\n        \
             value: ${{SD35_MODEL_MIRROR}}no-such-model/\n"
        ),
    )
    .unwrap();
    let bad = fleet
        .push("staging: a model path that does not exist")
        .await;

    // Flux's health check reads the operator's Stalled condition (kstatus: Failed) and fails
    // the Kustomization early, naming the object.
    let api_k = flux_api(&client, "kustomizations");
    let failed = poll_until(
        "Kustomization staging to fail its health check",
        TIMEOUT,
        || async {
            let object = api_k.get("staging").await?;
            Ok(match flux_condition(&object, "Ready") {
                Some((status, reason, message))
                    if status == "False"
                        && reason == "HealthCheckFailed"
                        && object.data["status"]["lastAttemptedRevision"] == bad =>
                {
                    Probe::Ready(message)
                }
                _ => Probe::Pending(flux_summary(&object)),
            })
        },
    )
    .await
    .unwrap_or_else(|error| panic!("{error:#}\n{}", fleet.diagnostics()));
    eprintln!("flux: the staging Kustomization says: {failed}");
    assert!(
        failed.contains(&format!("SD35Deployment/staging/{APP} status: 'Failed'")),
        "{failed}"
    );
    // The cause, where Flux found the failure: the SD35Deployment's Stalled message names the
    // file and the answer.
    let stalled = api.get(APP).await.unwrap();
    let message = condition(&stalled, "Stalled")
        .filter(|c| c.status == "True")
        .map(|c| c.message.clone())
        .unwrap_or_else(|| panic!("not Stalled: {}", summary(&stalled)));
    eprintln!("flux: the SD35Deployment's Stalled message: {message}");
    assert!(
        message.contains(&format!("{bad_url}sha256sums.txt")) && message.contains("404"),
        "the Stalled message does not name the missing file and the HTTP 404: {message}"
    );
    // The pods of the last good spec kept serving.
    let url = service_url(fleet, "staging").await;
    txt2img(&reqwest::Client::new(), &url).await.unwrap();

    // The next good commit recovers it.
    std::fs::write(fleet.repository.join(kustomization), good).unwrap();
    let fixed = fleet.push("staging: the model path back").await;
    kustomization_ready(&client, "staging", &fixed, TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{error:#}\n{}", fleet.diagnostics()));
    let recovered = api.get(APP).await.unwrap();
    assert!(
        has_condition(&recovered, "Ready", "True"),
        "{}",
        summary(&recovered)
    );
    assert!(
        !has_condition(&recovered, "Stalled", "True"),
        "{}",
        summary(&recovered)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chart_version_commit_upgrades_the_operator_and_its_crd_and_leaves_the_services_alone() {
    let Some(fleet) = fleet().await else {
        return;
    };
    let _turn = fleet.turn.lock().await;
    let next = next_chart_version();
    let client = fleet.cluster.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let columns = |crd: CustomResourceDefinition| -> Vec<String> {
        crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect()
    };
    assert!(
        !columns(crds.get("sd35deployments.sd35.io").await.unwrap())
            .contains(&NEW_PRINTER_COLUMN.to_owned())
    );

    // What must not change: each SD35Deployment, its serving Deployment and pods.
    let mut before = Vec::new();
    for environment in ENVIRONMENTS {
        let object = fleet.sd35(environment).get(APP).await.unwrap();
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), environment);
        let deployment = deployments.get(APP).await.unwrap();
        let mut pods: Vec<String> = server_pods(fleet, environment)
            .await
            .iter()
            .filter_map(|pod| pod.metadata.uid.clone())
            .collect();
        pods.sort();
        before.push((
            object.metadata.uid.clone(),
            object.metadata.generation,
            deployment.metadata.resource_version.clone(),
            pods,
        ));
    }

    fleet.edit(
        "infrastructure/sd35-operator/source.yaml",
        &format!("tag: v{}", chart_version()),
        &format!("tag: v{next}"),
    );
    let revision = fleet.push(&format!("sd35-operator {next}")).await;
    kustomization_ready(&client, "sd35-operator", &revision, TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{error:#}\n{}", fleet.diagnostics()));
    let releases = flux_api(&client, "helmreleases");
    let release = poll_until("the HelmRelease to upgrade", TIMEOUT, || async {
        let release = releases.get("sd35-operator").await?;
        let latest = &release.data["status"]["history"][0];
        let ready = flux_condition(&release, "Ready").is_some_and(|c| c.0 == "True");
        Ok(if ready && latest["chartVersion"] == next.as_str() {
            Probe::Ready(release)
        } else {
            Probe::Pending(format!("{} history[0]={latest}", flux_summary(&release)))
        })
    })
    .await
    .unwrap_or_else(|error| panic!("{error:#}\n{}", fleet.diagnostics()));
    let latest = &release.data["status"]["history"][0];
    assert_eq!(latest["status"], "deployed", "{latest}");
    assert_eq!(
        latest["version"], 2,
        "an upgrade, not a reinstall: {latest}"
    );
    assert!(
        columns(crds.get("sd35deployments.sd35.io").await.unwrap())
            .contains(&NEW_PRINTER_COLUMN.to_owned())
    );
    let operators: Api<Deployment> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let operator = operators
        .list(&ListParams::default().labels("app.kubernetes.io/name=sd35-operator"))
        .await
        .unwrap()
        .items;
    assert_eq!(operator.len(), 1);
    assert_eq!(
        operator[0].metadata.labels.as_ref().unwrap()["helm.sh/chart"],
        format!("sd35-operator-{next}")
    );
    poll_until("the upgraded operator to be available", TIMEOUT, || async {
        let deployment = operators
            .get(operator[0].metadata.name.as_deref().unwrap())
            .await?;
        let status = deployment.status.unwrap_or_default();
        Ok(
            if status.updated_replicas == Some(1)
                && status.available_replicas == Some(1)
                && status.replicas == Some(1)
            {
                Probe::Ready(())
            } else {
                Probe::Pending(format!("{status:?}"))
            },
        )
    })
    .await
    .unwrap();
    // The new operator has looked at everything; give it a moment to (not) write.
    tokio::time::sleep(Duration::from_secs(10)).await;
    for (environment, (uid, generation, resource_version, pods)) in ENVIRONMENTS.iter().zip(before)
    {
        let object = fleet.sd35(environment).get(APP).await.unwrap();
        assert_eq!(object.metadata.uid, uid, "{environment}: recreated");
        assert_eq!(
            object.metadata.generation, generation,
            "{environment}: spec changed"
        );
        assert!(
            has_condition(&object, "Ready", "True"),
            "{environment}: {}",
            summary(&object)
        );
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), environment);
        let deployment = deployments.get(APP).await.unwrap();
        assert_eq!(
            deployment.metadata.resource_version, resource_version,
            "{environment}: the serving Deployment was written"
        );
        let mut now: Vec<String> = server_pods(fleet, environment)
            .await
            .iter()
            .filter_map(|pod| pod.metadata.uid.clone())
            .collect();
        now.sort();
        assert_eq!(now, pods, "{environment}: serving pods replaced");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_scaled_by_hand_and_by_an_hpa_get_no_flux_correction_and_two_quiet_minutes_see_no_write()
 {
    let Some(fleet) = fleet().await else {
        return;
    };
    let _turn = fleet.turn.lock().await;
    let client = fleet.cluster.client();
    // production: its HPA (minReplicas 2, from git) has scaled it through /scale. staging:
    // `kubectl scale`, as a person would.
    let out = fleet
        .cluster
        .kubectl()
        .args([
            "scale",
            "--namespace",
            "staging",
            &format!("sd35/{APP}"),
            "--replicas=2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for environment in ENVIRONMENTS {
        sd35_e2e::wait_for(
            &fleet.sd35(environment),
            APP,
            "two Ready replicas",
            TIMEOUT,
            |o| {
                has_condition(o, "Ready", "True")
                    && o.spec.replicas == 2
                    && o.status.as_ref().is_some_and(|s| {
                        s.ready_replicas == 2
                            && s.updated_replicas == 2
                            && s.observed_generation == o.metadata.generation
                    })
            },
        )
        .await
        .unwrap_or_else(|error| panic!("{error:#}\n{}", fleet.diagnostics()));
    }
    for name in ENVIRONMENTS {
        let head = format!(
            "main@sha1:{}",
            git(&fleet.repository, &["rev-parse", "HEAD"])
        );
        kustomization_ready(&client, name, &head, TIMEOUT)
            .await
            .unwrap();
    }
    // Let the last status writes land, then count.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let generations: Vec<Option<i64>> =
        futures::future::join_all(ENVIRONMENTS.map(|environment| async move {
            fleet
                .sd35(environment)
                .get(APP)
                .await
                .unwrap()
                .metadata
                .generation
        }))
        .await;
    let from = audit_lines(fleet.cluster);
    let window = Duration::from_secs(120);
    tokio::time::sleep(window).await;
    let events = audit_events(fleet.cluster, from);

    // Flux looked: each environment's Kustomization (interval 30 s) diffed its SD35Deployment
    // against git with a dry-run apply several times.
    let kustomize = flux_user("kustomize-controller").unwrap();
    for environment in ENVIRONMENTS {
        let dry_runs = events
            .iter()
            .filter(|e| user(e) == kustomize && is_dry_run(e))
            .filter(|e| {
                e["objectRef"]["resource"] == "sd35deployments"
                    && e["objectRef"]["namespace"] == environment
            })
            .count();
        eprintln!("flux: {dry_runs} drift checks of {environment}/{APP} in {window:?}");
        assert!(
            dry_runs >= 2,
            "Flux checked {environment} only {dry_runs} times"
        );
    }
    // ... and corrected nothing: no write to an SD35Deployment, whose replicas stayed.
    let corrections: Vec<String> = events
        .iter()
        .filter(|e| is_flux(e) && is_write(e) && e["objectRef"]["resource"] == "sd35deployments")
        .map(describe)
        .collect();
    eprintln!("flux: {} Flux corrections in {window:?}", corrections.len());
    assert!(corrections.is_empty(), "Flux corrected: {corrections:?}");
    for (environment, generation) in ENVIRONMENTS.iter().zip(generations) {
        let object = fleet.sd35(environment).get(APP).await.unwrap();
        assert_eq!(object.spec.replicas, 2, "{environment}");
        assert_eq!(object.metadata.generation, generation, "{environment}");
    }
    // Nobody wrote: not the operator (to its children, its status, events), not Flux outside
    // its own objects. Flux's writes to its own Kustomizations and sources (their status) and
    // its events (each about one of its own objects: a reconciliation finished) come with
    // every interval; they are Flux's bookkeeping, not a loop with ours, and are counted apart.
    let bookkeeping = events
        .iter()
        .filter(|e| is_flux(e) && is_write(e) && is_flux_bookkeeping(e))
        .count();
    eprintln!("flux: {bookkeeping} writes by Flux to its own objects and events in {window:?}");
    let writes: Vec<String> = events
        .iter()
        .filter(|e| is_write(e) && (is_operator(e) || is_flux(e)))
        .filter(|e| !(is_flux(e) && is_flux_bookkeeping(e)))
        .map(describe)
        .collect();
    eprintln!(
        "flux: {} writes by the operator and Flux in {window:?}",
        writes.len()
    );
    assert!(writes.is_empty(), "writes in a quiet state: {writes:#?}");

    // Back to what git and the CRD's default say.
    let out = fleet
        .cluster
        .kubectl()
        .args([
            "scale",
            "--namespace",
            "staging",
            &format!("sd35/{APP}"),
            "--replicas=1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
