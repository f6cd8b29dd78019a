#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

//! GitOps integration: the Argo CD health check gives Healthy, Progressing, Degraded and
//! Suspended for the status fixtures (in Argo CD's own `health_test.yaml` layout), the
//! argocd-cm patch carries the same script, and the Flux example builds with kustomize,
//! health-checks the SD35Deployments it applies and installs the chart with valid values.

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
    for case in cases["tests"].as_array().unwrap() {
        let input = case["inputPath"].as_str().unwrap();
        inputs.insert(input.to_owned());
        let object = yaml_file(&dir.join(input));
        // The fixtures are statuses the operator can write: they parse into the types.
        serde_json::from_value::<SD35Deployment>(object.clone())
            .unwrap_or_else(|e| panic!("{input} is not an SD35Deployment: {e}"));
        let (status, message) =
            argocd::health(&object).unwrap_or_else(|e| panic!("health.lua failed on {input}: {e}"));
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

fn kustomize(binaries: &Binaries, dir: &Path) -> Vec<Value> {
    let out = Command::new(binaries.path("kubectl"))
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    documents(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn flux_example_health_checks_what_it_applies() {
    let binaries = Binaries::locate().unwrap();
    let text = std::fs::read_to_string(gitops("flux/sync.yaml")).unwrap();
    let sync = documents(&text);
    let kustomizations: Vec<&Value> = sync
        .iter()
        .filter(|o| o["kind"] == "Kustomization")
        .collect();
    assert!(kustomizations.len() >= 2);
    let crd = sd35_crds::crd_yaml();
    let mut checked = 0;
    for k in &kustomizations {
        assert_eq!(k["apiVersion"], "kustomize.toolkit.fluxcd.io/v1");
        let path = k["spec"]["path"].as_str().unwrap();
        let dir = repo_root().join(path.trim_start_matches("./"));
        let objects = kustomize(&binaries, &dir);
        for object in objects.iter().filter(|o| o["kind"] == "SD35Deployment") {
            serde_json::from_value::<SD35Deployment>(object.clone()).unwrap();
            let checks = k["spec"]["healthChecks"].as_array().unwrap_or_else(|| {
                panic!("{path} applies SD35Deployments but its Kustomization health-checks none")
            });
            let name = &object["metadata"]["name"];
            let namespace = &object["metadata"]["namespace"];
            assert!(
                checks.iter().any(|c| c["kind"] == "SD35Deployment"
                    && c["apiVersion"] == object["apiVersion"]
                    && &c["name"] == name
                    && &c["namespace"] == namespace),
                "{path}: no health check for SD35Deployment {namespace}/{name}"
            );
            checked += 1;
        }
        // Health checks name objects the Kustomization applies, of a served API version.
        for check in k["spec"]["healthChecks"].as_array().into_iter().flatten() {
            assert!(
                objects
                    .iter()
                    .any(|o| o["kind"] == check["kind"] && o["metadata"]["name"] == check["name"]),
                "{path}: health check for {} {} which it does not apply",
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
        // The operator's HelmRelease uses this repository's chart with values it accepts.
        for release in objects.iter().filter(|o| o["kind"] == "HelmRelease") {
            let chart = release["spec"]["chart"]["spec"]["chart"].as_str().unwrap();
            let chart_dir = repo_root().join(chart.trim_start_matches("./"));
            assert!(chart_dir.join("Chart.yaml").is_file(), "{chart}");
            let values =
                std::env::temp_dir().join(format!("sd35-flux-values-{}.yaml", std::process::id()));
            std::fs::write(
                &values,
                serde_yaml::to_string(&release["spec"]["values"]).unwrap(),
            )
            .unwrap();
            let out = Command::new(binaries.path("helm"))
                .args(["template", "sd35", "--kube-version", "1.34.0", "--values"])
                .arg(&values)
                .arg(&chart_dir)
                .env("HELM_CONFIG_HOME", std::env::temp_dir())
                .output()
                .unwrap();
            let _ = std::fs::remove_file(&values);
            assert!(
                out.status.success(),
                "the HelmRelease's values do not render: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert!(checked >= 1, "the Flux example applies no SD35Deployment");
}
