#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

//! The Helm chart: every `ci/` scenario lints and renders with secure defaults, the values
//! schema rejects bad values, the rendered CRD is the generated one, and the operator's RBAC
//! is exactly what it uses. On the real control plane: the chart installs, the operator run
//! with a token of the chart's ServiceAccount brings an SD35Deployment to Ready (in both the
//! all-namespaces and the one-namespace mode) without one forbidden request, and the
//! ServiceAccount cannot do more than it needs.

#[path = "support/argocd.rs"]
mod argocd;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::CustomResourceExt;
use sd35_crds::SD35Deployment;
use sd35_e2e::{
    Binaries, Cluster, OperatorProcess, kubectl_apply, repo_root, shared_cluster, wait_ready,
};
use serde_json::{Value, json};

const KUBE_VERSION: &str = "1.34.0";
const TIMEOUT: Duration = Duration::from_secs(120);

/// What the operator does with the API (operator/src/main.rs, reconcile.rs, apply.rs and
/// events.rs): (API group, resource, verbs). Server-side apply of a child
/// that does not exist yet is authorised as create.
const OPERATOR_RULES: &[(&str, &str, &[&str])] = &[
    ("sd35.io", "sd35deployments", &["list", "watch"]),
    ("sd35.io", "sd35deployments/status", &["patch"]),
    ("sd35.io", "sd35deployments/finalizers", &["update"]),
    (
        "",
        "persistentvolumeclaims",
        &["create", "get", "list", "patch", "watch"],
    ),
    (
        "batch",
        "jobs",
        &["create", "delete", "get", "list", "patch", "watch"],
    ),
    (
        "apps",
        "deployments",
        &["create", "get", "list", "patch", "watch"],
    ),
    (
        "",
        "services",
        &["create", "delete", "get", "list", "patch", "watch"],
    ),
    (
        "policy",
        "poddisruptionbudgets",
        &["create", "delete", "get", "list", "patch", "watch"],
    ),
    (
        "networking.k8s.io",
        "networkpolicies",
        &["create", "delete", "get", "list", "patch", "watch"],
    ),
    (
        "monitoring.coreos.com",
        "servicemonitors",
        &["create", "delete", "get", "list", "patch", "watch"],
    ),
    ("", "pods", &["list", "watch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];

fn chart_dir() -> PathBuf {
    repo_root().join("charts/sd35-operator")
}

/// The `ci/*-values.yaml` scenarios, sorted.
fn scenarios() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    files.sort();
    files
}

fn scenario(name: &str) -> PathBuf {
    chart_dir().join("ci").join(format!("{name}-values.yaml"))
}

/// `helm` with its homes in a scratch directory, for commands that need no cluster.
fn helm() -> Command {
    let binaries = Binaries::locate().expect("the control-plane binaries (helm)");
    let home = std::env::temp_dir().join(format!("sd35-helm-{}", std::process::id()));
    let mut command = Command::new(binaries.path("helm"));
    for (var, dir) in [
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_DATA_HOME", "data"),
    ] {
        command.env(var, home.join(dir));
    }
    command
}

fn run(mut command: Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Parses a multi-document YAML stream, dropping empty documents.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// `helm template` of the chart with `values` files and `--set` arguments.
fn try_render(chart: &Path, values: &[PathBuf], sets: &[&str]) -> Result<Vec<Value>, String> {
    let mut command = helm();
    command
        .args(["template", "sd35", "--namespace", "sd35-system"])
        .arg(chart)
        .args(["--kube-version", KUBE_VERSION]);
    for file in values {
        command.arg("--values").arg(file);
    }
    for set in sets {
        command.args(["--set", set]);
    }
    let out = run(command);
    if out.status.success() {
        Ok(documents(&String::from_utf8_lossy(&out.stdout)))
    } else {
        Err(stderr(&out))
    }
}

fn render(values: &[PathBuf], sets: &[&str]) -> Vec<Value> {
    try_render(&chart_dir(), values, sets).unwrap_or_else(|e| panic!("helm template: {e}"))
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(objects, kind);
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

fn operator_container(objects: &[Value]) -> &Value {
    &one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn args_of(objects: &[Value]) -> Vec<String> {
    operator_container(objects)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

fn values_of(file: &Path) -> Value {
    serde_yaml::from_str::<Option<Value>>(&std::fs::read_to_string(file).unwrap())
        .unwrap()
        .unwrap_or(json!({}))
}

#[test]
fn every_ci_scenario_lints_and_renders_secure_objects() {
    let files = scenarios();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "default",
        "ha",
        "single-namespace",
        "monitoring",
        "air-gapped",
    ] {
        assert!(
            names.contains(&format!("{expected}-values.yaml")),
            "ci/{expected}-values.yaml is missing: {names:?}"
        );
    }
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let mut lint = helm();
        lint.args(["lint", "--strict", "--kube-version", KUBE_VERSION])
            .arg(chart_dir())
            .arg("--values")
            .arg(file);
        let out = run(lint);
        assert!(
            out.status.success(),
            "helm lint {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );

        let objects = render(std::slice::from_ref(file), &[]);
        let values = values_of(file);
        for object in &objects {
            let labels = &object["metadata"]["labels"];
            for label in [
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/managed-by",
                "helm.sh/chart",
            ] {
                assert!(
                    labels[label].is_string(),
                    "{name}: {} {} lacks label {label}",
                    object["kind"],
                    object["metadata"]["name"]
                );
            }
        }

        // Secure pod defaults, whatever the scenario.
        let pod = &one(&objects, "Deployment")["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        let container = operator_container(&objects);
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{name}");
        assert!(container["resources"]["requests"]["memory"].is_string());
        assert!(container["livenessProbe"].is_object() && container["readinessProbe"].is_object());

        // Flags the binary has; leader election exactly when more than one replica runs or
        // it is asked for.
        let args = args_of(&objects);
        let replicas = values["replicas"].as_i64().unwrap_or(1);
        let elect = replicas > 1 || values["leaderElection"]["enabled"] == true;
        assert_eq!(args.contains(&"--leader-elect".to_owned()), elect, "{name}");
        assert_eq!(
            of_kind(&objects, "PodDisruptionBudget").len(),
            usize::from(replicas > 1),
            "{name}"
        );
        match values["watchNamespace"].as_str() {
            Some(ns) => assert!(args.contains(&format!("--namespace={ns}")), "{name}"),
            None => assert!(!args.iter().any(|a| a.starts_with("--namespace")), "{name}"),
        }
        let crds = of_kind(&objects, "CustomResourceDefinition").len();
        let install_crds = values["crds"]["install"] != false;
        assert_eq!(crds, usize::from(install_crds), "{name}");
        if values["metrics"]["serviceMonitor"]["enabled"] == true {
            one(&objects, "ServiceMonitor");
        }
        if values["networkPolicy"]["enabled"] == true {
            one(&objects, "NetworkPolicy");
        }
    }
}

#[test]
fn the_operator_accepts_every_flag_the_chart_passes() {
    // `--help` lists every flag; anything the chart passes must be one of them.
    let help = run({
        let mut c = Command::new(sd35_e2e::operator_binary().unwrap());
        c.arg("--help");
        c
    });
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    for file in scenarios() {
        for arg in args_of(&render(std::slice::from_ref(&file), &[])) {
            let flag = arg.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "{}: the operator has no flag {flag}",
                file.display()
            );
        }
    }
}

#[test]
fn chart_requires_kubernetes_1_29() {
    let mut command = helm();
    command
        .args(["template", "sd35", "--kube-version", "1.28.9"])
        .arg(chart_dir());
    let out = run(command);
    assert!(!out.status.success(), "1.28 accepted");
    assert!(stderr(&out).contains(">=1.29"), "{}", stderr(&out));
    try_render(&chart_dir(), &[], &["replicas=1"]).unwrap();
    let mut command = helm();
    command
        .args(["template", "sd35", "--kube-version", "1.29.0"])
        .arg(chart_dir());
    assert!(run(command).status.success(), "1.29 refused");
}

#[test]
fn values_schema_rejects_bad_values_with_the_field_named() {
    for (set, field) in [
        ("replicas=-1", "/replicas"),
        ("logFormat=xml", "/logFormat"),
        ("imageTypo.repository=x", "imageTypo"),
        ("image.digest=latest", "/image/digest"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("serverImage.tag=has space", "/serverImage/tag"),
        ("watchNamespace=Not_A_Namespace", "/watchNamespace"),
        ("metrics.port=70000", "/metrics/port"),
        (
            "metrics.serviceMonitor.interval=often",
            "/metrics/serviceMonitor/interval",
        ),
        (
            "leaderElection.leaseDurationSeconds=1",
            "/leaderElection/leaseDurationSeconds",
        ),
        ("huggingFaceEndpoint=ftp://mirror", "/huggingFaceEndpoint"),
        ("crds.install=maybe", "/crds/install"),
        ("concurrency=0", "/concurrency"),
    ] {
        let error = try_render(&chart_dir(), &[], &[set])
            .err()
            .unwrap_or_else(|| panic!("--set {set} was accepted"));
        assert!(
            error.contains(field),
            "--set {set}: the error does not name {field}: {error}"
        );
    }
}

#[test]
fn every_value_is_commented() {
    // Every key of values.yaml down to the third level has a comment right above it,
    // except inside values that are plain Kubernetes objects (documented upstream).
    let text = std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap();
    let kubernetes_objects = ["resources:", "podSecurityContext:", "securityContext:"];
    let mut previous = "";
    let mut inside_kubernetes_object: Option<usize> = None;
    let mut uncommented = Vec::new();
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        let is_key = !trimmed.starts_with('#')
            && !trimmed.starts_with('-')
            && trimmed.split_once(':').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_alphanumeric() || c == '_')
            });
        if let Some(level) = inside_kubernetes_object {
            if trimmed.is_empty() || indent > level {
                previous = line;
                continue;
            }
            inside_kubernetes_object = None;
        }
        if is_key && indent <= 4 {
            if !previous.trim_start().starts_with('#') {
                uncommented.push(trimmed.to_owned());
            }
            if kubernetes_objects.iter().any(|k| trimmed.starts_with(k)) {
                inside_kubernetes_object = Some(indent);
            }
        }
        previous = line;
    }
    assert!(
        uncommented.is_empty(),
        "values without a comment: {uncommented:?}"
    );
}

/// Numbers compared by value (YAML round trips turn 150.0 into 150).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn rendered_crd_is_the_generated_one_and_is_kept_on_uninstall() {
    let objects = render(&[], &[]);
    let crd = one(&objects, "CustomResourceDefinition");
    let generated = serde_json::to_value(SD35Deployment::crd()).unwrap();
    assert!(
        same_json(&crd["spec"], &generated["spec"]),
        "the chart's CRD differs from the types: run `make crds`"
    );
    assert_eq!(crd["metadata"]["name"], generated["metadata"]["name"]);
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let unkept = render(&[], &["crds.keep=false"]);
    assert!(
        one(&unkept, "CustomResourceDefinition")["metadata"]["annotations"]
            ["helm.sh/resource-policy"]
            .is_null()
    );
    assert!(
        of_kind(
            &render(&[], &["crds.install=false"]),
            "CustomResourceDefinition"
        )
        .is_empty()
    );
    // Helm never upgrades a chart's crds/ directory: the CRD must not be there.
    assert!(
        !chart_dir().join("crds").exists(),
        "charts/sd35-operator/crds/ would be installed once and never upgraded"
    );
}

/// One permission: (namespace or "" for cluster-wide, API group, resource, resource name or
/// "" for any, verb).
type Grant = (String, String, String, String, String);

/// Everything the bindings in `objects` grant to ServiceAccount `namespace/name`.
fn grants_to(objects: &[Value], namespace: &str, name: &str) -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    for binding in objects
        .iter()
        .filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
    {
        let bound = binding["subjects"].as_array().unwrap().iter().any(|s| {
            s["kind"] == "ServiceAccount" && s["name"] == name && s["namespace"] == namespace
        });
        if !bound {
            continue;
        }
        let scope = if binding["kind"] == "RoleBinding" {
            binding["metadata"]["namespace"]
                .as_str()
                .unwrap()
                .to_owned()
        } else {
            String::new()
        };
        let role = objects
            .iter()
            .find(|o| {
                o["kind"] == binding["roleRef"]["kind"]
                    && o["metadata"]["name"] == binding["roleRef"]["name"]
            })
            .unwrap_or_else(|| {
                panic!(
                    "{} refers to a role not in the chart",
                    binding["metadata"]["name"]
                )
            });
        for rule in role["rules"].as_array().unwrap() {
            let strings = |key: &str| -> Vec<String> {
                rule[key]
                    .as_array()
                    .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
                    .unwrap_or_default()
            };
            let mut names = strings("resourceNames");
            if names.is_empty() {
                names.push(String::new());
            }
            for group in strings("apiGroups") {
                for resource in strings("resources") {
                    for resource_name in &names {
                        for verb in strings("verbs") {
                            grants.insert((
                                scope.clone(),
                                group.clone(),
                                resource.clone(),
                                resource_name.clone(),
                                verb,
                            ));
                        }
                    }
                }
            }
        }
    }
    grants
}

fn operator_grants(scope: &str) -> BTreeSet<Grant> {
    OPERATOR_RULES
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(move |verb| {
                (
                    scope.to_owned(),
                    (*group).to_owned(),
                    (*resource).to_owned(),
                    String::new(),
                    (*verb).to_owned(),
                )
            })
        })
        .collect()
}

fn grant(scope: &str, group: &str, resource: &str, name: &str, verb: &str) -> Grant {
    (
        scope.into(),
        group.into(),
        resource.into(),
        name.into(),
        verb.into(),
    )
}

#[test]
fn the_operator_gets_exactly_the_permissions_it_uses() {
    let sa = "sd35-sd35-operator";
    let lease = |scope: &str| -> BTreeSet<Grant> {
        BTreeSet::from([
            grant(scope, "coordination.k8s.io", "leases", "", "create"),
            grant(scope, "coordination.k8s.io", "leases", sa, "get"),
            grant(scope, "coordination.k8s.io", "leases", sa, "update"),
        ])
    };

    // Reading StorageClasses (may a cache claim grow?) and Nodes (their GPU labels) is
    // cluster-wide in every mode.
    let cluster_reads = BTreeSet::from([
        grant("", "storage.k8s.io", "storageclasses", "", "get"),
        grant("", "", "nodes", "", "get"),
        grant("", "", "nodes", "", "list"),
        grant("", "", "nodes", "", "watch"),
    ]);

    // All namespaces: one ClusterRole, and nothing else.
    let default = render(&[scenario("default")], &[]);
    let mut expected = operator_grants("");
    expected.extend(cluster_reads.clone());
    assert_eq!(grants_to(&default, "sd35-system", sa), expected);

    // High availability adds the Lease, in the release namespace only, by name.
    let ha = render(&[scenario("ha")], &[]);
    let mut expected = operator_grants("");
    expected.extend(lease("sd35-system"));
    expected.extend(cluster_reads.clone());
    assert_eq!(grants_to(&ha, "sd35-system", sa), expected);

    // One namespace: everything there; cluster-wide, only reading StorageClasses and Nodes.
    let single = render(&[scenario("single-namespace")], &["replicas=2"]);
    let mut expected = operator_grants("ml-serving");
    expected.extend(lease("sd35-system"));
    expected.extend(cluster_reads);
    assert_eq!(grants_to(&single, "sd35-system", sa), expected);

    // Nothing in any role of any scenario is a wildcard or touches what the operator never
    // needs, and the roles for people are bound to nobody by the chart. Pods and Nodes are
    // only read.
    let forbidden_resources = [
        "secrets",
        "pods/exec",
        "nodes/proxy",
        "configmaps",
        "serviceaccounts",
        "serviceaccounts/token",
        "roles",
        "rolebindings",
        "clusterroles",
        "clusterrolebindings",
        "customresourcedefinitions",
        "namespaces",
    ];
    for file in scenarios() {
        let objects = render(std::slice::from_ref(&file), &[]);
        for role in objects
            .iter()
            .filter(|o| o["kind"] == "Role" || o["kind"] == "ClusterRole")
        {
            let text = serde_json::to_string(&role["rules"]).unwrap();
            let at = format!(
                "{}: {} {}",
                file.display(),
                role["kind"],
                role["metadata"]["name"]
            );
            assert!(!text.contains("\"*\""), "{at} has a wildcard: {text}");
            for rule in role["rules"].as_array().unwrap() {
                for resource in rule["resources"].as_array().unwrap() {
                    assert!(
                        !forbidden_resources.contains(&resource.as_str().unwrap()),
                        "{at} grants {resource}"
                    );
                }
                for verb in rule["verbs"].as_array().unwrap() {
                    assert!(
                        !["escalate", "bind", "impersonate"].contains(&verb.as_str().unwrap()),
                        "{at} grants {verb}"
                    );
                    let on = |kind: &str| {
                        rule["resources"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|r| r == kind)
                    };
                    assert!(
                        !on("pods") || ["list", "watch"].contains(&verb.as_str().unwrap()),
                        "{at} grants {verb} on pods"
                    );
                    assert!(
                        !on("nodes") || ["get", "list", "watch"].contains(&verb.as_str().unwrap()),
                        "{at} grants {verb} on nodes"
                    );
                }
            }
        }
    }
}

// ---- On the control plane ----

fn helm_in(cluster: &Cluster, args: &[&str]) -> Output {
    let mut command = cluster.helm();
    command.args(args);
    run(command)
}

fn kubectl_can(cluster: &Cluster, who: &str, args: &[&str]) -> bool {
    let out = run({
        let mut c = cluster.kubectl();
        c.args(["auth", "can-i"])
            .args(args)
            .arg(format!("--as={who}"));
        c
    });
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl auth can-i {args:?}: {answer} {}",
        stderr(&out)
    );
    answer == "yes"
}

/// Requests of `user` that the API server refused with 403, from the audit log.
fn forbidden_requests(cluster: &Cluster, user: &str) -> Vec<String> {
    std::fs::read_to_string(cluster.audit_log_path())
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["user"]["username"] == user && e["responseStatus"]["code"] == 403)
        .map(|e| {
            format!(
                "{} {} (namespace {})",
                e["verb"], e["objectRef"]["resource"], e["objectRef"]["namespace"]
            )
        })
        .collect()
}

/// Requests of `user`, as "verb resource", from the audit log.
fn requests_by(cluster: &Cluster, user: &str) -> BTreeSet<String> {
    std::fs::read_to_string(cluster.audit_log_path())
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["user"]["username"] == user)
        .map(|e| {
            let resource = match e["objectRef"]["subresource"].as_str() {
                Some(sub) => format!(
                    "{}/{sub}",
                    e["objectRef"]["resource"].as_str().unwrap_or("")
                ),
                None => e["objectRef"]["resource"].as_str().unwrap_or("").to_owned(),
            };
            format!("{} {resource}", e["verb"].as_str().unwrap_or(""))
        })
        .collect()
}

/// A release of the chart installed into `namespace`.
struct Release {
    namespace: String,
    fullname: String,
    service_account: String,
}

impl Release {
    fn user(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

async fn install(cluster: &Cluster, name: &str, namespace: &str, extra: &[&str]) -> Release {
    let chart = chart_dir();
    let mut args = vec![
        "install",
        name,
        chart.to_str().unwrap(),
        "--namespace",
        namespace,
        "--wait",
        "--timeout",
        "120s",
    ];
    args.extend_from_slice(extra);
    let out = helm_in(cluster, &args);
    assert!(out.status.success(), "helm install: {}", stderr(&out));
    let notes = String::from_utf8_lossy(&out.stdout);
    assert!(notes.contains("kubectl get sd35"), "NOTES missing: {notes}");
    let fullname = format!("{name}-sd35-operator");
    let deployments: Api<Deployment> = Api::namespaced(cluster.client(), namespace);
    let deployment = deployments.get(&fullname).await.unwrap();
    let service_account = deployment
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .service_account_name
        .unwrap();
    Release {
        namespace: namespace.to_owned(),
        fullname,
        service_account,
    }
}

/// Runs the operator process the way the chart's pod would: the container's flags and
/// environment from the installed Deployment, and a token of the chart's ServiceAccount.
async fn run_as_chart_pod(cluster: &Cluster, release: &Release) -> (OperatorProcess, String) {
    let deployments: Api<Deployment> = Api::namespaced(cluster.client(), &release.namespace);
    let deployment = deployments.get(&release.fullname).await.unwrap();
    let pod_spec = deployment.spec.unwrap().template.spec.unwrap();
    let container = &pod_spec.containers[0];
    let args: Vec<String> = container
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| !a.starts_with("--admin-addr"))
        .collect();
    let pod_name = format!("{}-7d9c5b-x2k4q", release.fullname);
    let mut env = Vec::new();
    for var in container.env.clone().unwrap_or_default() {
        let value = match (var.value, var.value_from.and_then(|v| v.field_ref)) {
            (Some(value), _) => value,
            (None, Some(field)) if field.field_path == "metadata.namespace" => {
                release.namespace.clone()
            }
            (None, Some(field)) if field.field_path == "metadata.name" => pod_name.clone(),
            (None, other) => panic!("the chart sets {} from {other:?}", var.name),
        };
        // The test keeps its own debug log filter.
        if var.name != "RUST_LOG" {
            env.push((var.name, value));
        }
    }
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let kubeconfig = cluster
        .service_account_kubeconfig(&release.namespace, &release.service_account)
        .await
        .unwrap();
    let operator =
        OperatorProcess::start_with_kubeconfig(cluster, &kubeconfig, &args, &env).unwrap();
    (operator, pod_name)
}

/// Applies a small SD35Deployment in `namespace` and waits until it is Ready.
async fn serve_one(cluster: &Cluster, namespace: &str, operator: &OperatorProcess) -> Value {
    let yaml = "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata:\n  name: chart-check\nspec:\n  variant: medium\n  replicas: 2\n";
    let out = kubectl_apply(cluster, namespace, yaml).unwrap();
    assert!(out.status.success(), "apply: {}", stderr(&out));
    let api: Api<SD35Deployment> = Api::namespaced(cluster.client(), namespace);
    match wait_ready(&api, "chart-check", TIMEOUT).await {
        Ok(obj) => serde_json::to_value(&obj).unwrap(),
        Err(e) => panic!("{e:#}\noperator log:\n{}", operator.log()),
    }
}

#[tokio::test]
async fn operator_with_the_chart_service_account_reaches_ready_in_both_modes() {
    let cluster = shared_cluster();

    // All namespaces, three replicas electing a leader; the release installs the CRD.
    let release_ns = cluster.temp_namespace("sd35-system").await;
    let release = install(
        cluster,
        "sd35",
        release_ns.name(),
        &["--values", scenario("ha").to_str().unwrap()],
    )
    .await;
    let app_ns = cluster.temp_namespace("chart-app").await;
    let (operator, pod_name) = run_as_chart_pod(cluster, &release).await;
    let ready = serve_one(cluster, app_ns.name(), &operator).await;
    // The same status Argo CD would see is Healthy by the shipped health check.
    let (health, message) = argocd::health(&ready).unwrap();
    assert_eq!(health, "Healthy", "{message}");
    // It led through its own Lease, under the pod's name.
    let leases: Api<Lease> = Api::namespaced(cluster.client(), release_ns.name());
    let lease = leases.get(&release.fullname).await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(pod_name.as_str())
    );
    let user = release.user();
    let forbidden = forbidden_requests(cluster, &user);
    assert!(
        forbidden.is_empty(),
        "the API server refused the operator: {forbidden:?}\nrequests made: {:?}",
        requests_by(cluster, &user)
    );
    // No more than it needs.
    let other = app_ns.name();
    let ns_flag = format!("--namespace={other}");
    for (allowed, args) in [
        (
            true,
            vec!["list", "sd35deployments.sd35.io", "--all-namespaces"],
        ),
        (true, vec!["patch", "deployments.apps", ns_flag.as_str()]),
        (false, vec!["get", "secrets", ns_flag.as_str()]),
        (false, vec!["list", "secrets", "--all-namespaces"]),
        (false, vec!["create", "pods", ns_flag.as_str()]),
        (false, vec!["delete", "deployments.apps", ns_flag.as_str()]),
        (
            false,
            vec!["delete", "persistentvolumeclaims", ns_flag.as_str()],
        ),
        (false, vec!["update", "customresourcedefinitions"]),
        (
            false,
            vec!["create", "leases.coordination.k8s.io", ns_flag.as_str()],
        ),
        (
            false,
            vec![
                "update",
                "leases.coordination.k8s.io/another",
                "--namespace",
                release_ns.name(),
            ],
        ),
        (false, vec!["create", "clusterrolebindings"]),
        (false, vec!["*", "*"]),
    ] {
        assert_eq!(
            kubectl_can(cluster, &user, &args),
            allowed,
            "can-i {args:?} for the all-namespaces ServiceAccount"
        );
    }
    drop(operator);

    // One namespace: a second release (the CRD is the first's) with a Role there.
    let single_ns = cluster.temp_namespace("sd35-team").await;
    let watched = cluster.temp_namespace("chart-team-app").await;
    let watch_flag = format!("watchNamespace={}", watched.name());
    let single = install(
        cluster,
        "team",
        single_ns.name(),
        &[
            "--values",
            scenario("single-namespace").to_str().unwrap(),
            "--set",
            &watch_flag,
        ],
    )
    .await;
    let (operator, _) = run_as_chart_pod(cluster, &single).await;
    serve_one(cluster, watched.name(), &operator).await;
    let user = single.user();
    let forbidden = forbidden_requests(cluster, &user);
    assert!(
        forbidden.is_empty(),
        "the API server refused the one-namespace operator: {forbidden:?}\nrequests made: {:?}",
        requests_by(cluster, &user)
    );
    let watched_flag = format!("--namespace={}", watched.name());
    for (allowed, args) in [
        (
            true,
            vec!["patch", "deployments.apps", watched_flag.as_str()],
        ),
        (false, vec!["patch", "deployments.apps", ns_flag.as_str()]),
        (false, vec!["list", "deployments.apps", "--all-namespaces"]),
        (
            false,
            vec!["list", "sd35deployments.sd35.io", "--all-namespaces"],
        ),
        (false, vec!["get", "secrets", watched_flag.as_str()]),
    ] {
        assert_eq!(
            kubectl_can(cluster, &user, &args),
            allowed,
            "can-i {args:?} for the one-namespace ServiceAccount"
        );
    }
}
