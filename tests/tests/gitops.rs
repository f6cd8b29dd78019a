#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

//! GitOps integration without a cluster: Argo CD's own code (the argo-cd Go module, pinned in
//! `tests/argocd/`) gives Healthy, Progressing, Degraded and Suspended for the status fixtures
//! (in Argo CD's own `health_test.yaml` layout) through the argocd-cm patch, which carries the
//! same script as `health.lua`; and the Flux fleet in `gitops/flux/` builds with kustomize, waits
//! for or health-checks every SD35Deployment it applies, substitutes only settings its cluster
//! defines, and installs the chart with valid values. `tests/tests/flux.rs` runs that fleet
//! with Flux's own controllers.

#[path = "support/argocd.rs"]
mod argocd;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use sd35_crds::SD35Deployment;
use sd35_e2e::{Binaries, repo_root};
use serde_json::Value;

fn gitops(path: &str) -> PathBuf {
    repo_root().join("gitops").join(path)
}

fn yaml_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[test]
fn argo_cd_health_matches_every_fixture() {
    let dir = gitops("argocd");
    let cases = yaml_file(&dir.join("health_test.yaml"));
    let mut statuses = BTreeSet::new();
    let mut inputs = BTreeSet::new();
    let cases = cases["tests"].as_array().unwrap();
    let paths: Vec<PathBuf> = cases
        .iter()
        .map(|case| dir.join(case["inputPath"].as_str().unwrap()))
        .collect();
    let results = argocd::health_of_files(&paths);
    for (case, result) in cases.iter().zip(results) {
        let input = case["inputPath"].as_str().unwrap();
        inputs.insert(input.to_owned());
        let object = yaml_file(&dir.join(input));
        // The fixtures are statuses the operator can write: they parse into the types.
        serde_json::from_value::<SD35Deployment>(object.clone())
            .unwrap_or_else(|e| panic!("{input} is not an SD35Deployment: {e}"));
        let (status, message) = result.unwrap_or_else(|e| panic!("Argo CD failed on {input}: {e}"));
        let expected = &case["healthStatus"];
        assert_eq!(
            status,
            expected["status"].as_str().unwrap(),
            "{input}: {message}"
        );
        assert_eq!(message, expected["message"].as_str().unwrap(), "{input}");
        statuses.insert(status);
    }
    for needed in ["Healthy", "Progressing", "Degraded", "Suspended"] {
        assert!(statuses.contains(needed), "no fixture is {needed}");
    }
    // Every fixture on disk is used.
    for entry in std::fs::read_dir(dir.join("testdata")).unwrap() {
        let name = format!("testdata/{}", entry.unwrap().file_name().to_string_lossy());
        assert!(inputs.contains(&name), "{name} is not in health_test.yaml");
    }
}

#[test]
fn argo_cd_health_is_progressing_for_an_object_without_metadata_generation() {
    // Objects from older API servers or hand-made manifests may lack fields; the script
    // must not raise (Argo CD would show the error instead of a health).
    let bare: Value = serde_json::json!({
        "apiVersion": "sd35.io/v1alpha1", "kind": "SD35Deployment",
        "metadata": {"name": "x"}, "spec": {"variant": "medium"},
        "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}
    });
    assert_eq!(argocd::health(&bare).unwrap().0, "Healthy");
    let empty_conditions: Value = serde_json::json!({
        "apiVersion": "sd35.io/v1alpha1", "kind": "SD35Deployment",
        "metadata": {"name": "x", "generation": 1}, "spec": {},
        "status": {"observedGeneration": 1, "conditions": []}
    });
    assert_eq!(argocd::health(&empty_conditions).unwrap().0, "Progressing");
}

#[test]
fn argocd_cm_patch_carries_the_health_script() {
    let patch = yaml_file(&gitops("argocd/argocd-cm-patch.yaml"));
    assert_eq!(patch["kind"], "ConfigMap");
    assert_eq!(patch["metadata"]["name"], "argocd-cm");
    let embedded = patch["data"]["resource.customizations.health.sd35.io_SD35Deployment"]
        .as_str()
        .expect("the health key for group sd35.io, kind SD35Deployment");
    let script = std::fs::read_to_string(argocd::script_path()).unwrap();
    assert_eq!(
        embedded, script,
        "argocd-cm-patch.yaml and health.lua differ: paste health.lua into it again"
    );
}

/// `kubectl kustomize` of `dir` with `components` added, as Flux's kustomize-controller builds
/// a Kustomization's path (it adds `spec.components` to the generated kustomization).
fn kustomize(binaries: &Binaries, dir: &Path, components: &[PathBuf]) -> String {
    let work = tempfile::tempdir().unwrap();
    // Kustomize takes only relative paths, so each is written from the work dir up to `/`.
    let up = "../".repeat(work.path().components().count().saturating_sub(1));
    let list = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|path| {
                let absolute = path.canonicalize().unwrap();
                format!(
                    "  - {up}{}\n",
                    absolute.display().to_string().trim_start_matches('/')
                )
            })
            .collect::<String>()
    };
    std::fs::write(
        work.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n{}{}",
            list(&[dir.to_path_buf()]),
            if components.is_empty() {
                String::new()
            } else {
                format!("components:\n{}", list(components))
            }
        ),
    )
    .unwrap();
    let out = Command::new(binaries.path("kubectl"))
        .arg("kustomize")
        .arg(work.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Flux's `postBuild.substitute`: every `${NAME}` replaced from `settings`; the names used.
fn substitute(text: &str, settings: &serde_json::Map<String, Value>) -> (String, BTreeSet<String>) {
    let mut out = String::new();
    let mut used = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("an unterminated ${") + start;
        let name = &rest[start + 2..end];
        used.insert(name.to_owned());
        let value = settings
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("${{{name}}} is not in cluster-settings.yaml"));
        out.push_str(value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    (out, used)
}

#[test]
fn the_flux_fleet_waits_for_every_sd35deployment_and_renders_the_chart() {
    let binaries = Binaries::locate().unwrap();
    let fleet = gitops("flux");
    let cluster = fleet.join("clusters/local");
    let settings = yaml_file(&cluster.join("cluster-settings.yaml"));
    let settings = settings["data"].as_object().unwrap().clone();
    let mut kustomizations = Vec::new();
    for entry in std::fs::read_dir(&cluster).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        kustomizations.extend(
            documents(&text)
                .into_iter()
                .filter(|o| o["kind"] == "Kustomization"),
        );
    }
    assert!(
        kustomizations.len() >= 3,
        "the operator and two environments"
    );
    let crd = sd35_crds::crd_yaml();
    let chart_version = yaml_file(&repo_root().join("charts/sd35-operator/Chart.yaml"))["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut used = BTreeSet::new();
    let mut checked = 0;
    let mut releases = 0;
    for k in &kustomizations {
        assert_eq!(k["apiVersion"], "kustomize.toolkit.fluxcd.io/v1");
        let name = k["metadata"]["name"].as_str().unwrap();
        let path = k["spec"]["path"].as_str().unwrap();
        let dir = fleet.join(path.trim_start_matches("./"));
        let components: Vec<PathBuf> = k["spec"]["components"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| dir.join(c.as_str().unwrap()))
            .collect();
        let substituted = k["spec"]["postBuild"]["substituteFrom"]
            .as_array()
            .is_some_and(|from| from.iter().any(|f| f["name"] == "cluster-settings"));
        let built = kustomize(&binaries, &dir, &components);
        assert!(
            substituted || !built.contains("${"),
            "{name}: ${{...}} without postBuild.substituteFrom"
        );
        let (text, names) = substitute(&built, &settings);
        used.extend(names);
        let objects = documents(&text);
        for object in objects.iter().filter(|o| o["kind"] == "SD35Deployment") {
            serde_json::from_value::<SD35Deployment>(object.clone())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let (object_name, namespace) = (
                &object["metadata"]["name"],
                &object["metadata"]["namespace"],
            );
            let checked_by_health_checks = k["spec"]["healthChecks"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| {
                    c["kind"] == "SD35Deployment"
                        && c["apiVersion"] == object["apiVersion"]
                        && &c["name"] == object_name
                        && &c["namespace"] == namespace
                });
            assert!(
                k["spec"]["wait"] == true || checked_by_health_checks,
                "{name}: nothing waits for SD35Deployment {namespace}/{object_name}"
            );
            assert!(
                k["spec"]["dependsOn"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|d| d["name"] == "sd35-operator"),
                "{name} applies SD35Deployments before the operator is there"
            );
            assert!(
                object["spec"].get("replicas").is_none(),
                "{name}: replicas in git would fight kubectl scale and the HPA"
            );
            checked += 1;
        }
        // Health checks name objects the Kustomization applies, of a served API version.
        for check in k["spec"]["healthChecks"].as_array().into_iter().flatten() {
            assert!(
                objects
                    .iter()
                    .any(|o| o["kind"] == check["kind"] && o["metadata"]["name"] == check["name"]),
                "{name}: health check for {} {} which it does not apply",
                check["kind"],
                check["name"]
            );
            if check["kind"] == "SD35Deployment" {
                let version = check["apiVersion"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap();
                assert!(crd.contains(&format!("name: {version}\n")));
            }
        }
        // The chart's source pins the chart's current version.
        for source in objects
            .iter()
            .filter(|o| o["kind"] == "GitRepository" && o["metadata"]["name"] == "sd35-operator")
        {
            assert_eq!(
                source["spec"]["ref"]["tag"],
                format!("v{chart_version}"),
                "{name}: the fleet pins another chart version than charts/sd35-operator's"
            );
        }
        // The operator's HelmRelease: this repository's chart with values it accepts.
        for release in objects.iter().filter(|o| o["kind"] == "HelmRelease") {
            let chart = release["spec"]["chart"]["spec"]["chart"].as_str().unwrap();
            let chart_dir = repo_root().join(chart.trim_start_matches("./"));
            assert!(chart_dir.join("Chart.yaml").is_file(), "{chart}");
            let values = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(
                values.path(),
                serde_yaml::to_string(&release["spec"]["values"]).unwrap(),
            )
            .unwrap();
            let out = Command::new(binaries.path("helm"))
                .args(["template", "sd35", "--kube-version", "1.34.0", "--values"])
                .arg(values.path())
                .arg(&chart_dir)
                .env("HELM_CONFIG_HOME", std::env::temp_dir())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "the HelmRelease's values do not render: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            releases += 1;
        }
    }
    assert!(checked >= 2, "the fleet applies {checked} SD35Deployments");
    assert_eq!(releases, 1, "one HelmRelease of the chart");
    let unused: Vec<&String> = settings.keys().filter(|key| !used.contains(*key)).collect();
    assert!(
        unused.is_empty(),
        "cluster-settings.yaml defines unused {unused:?}"
    );
}
