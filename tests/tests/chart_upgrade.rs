#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

//! CRD upgrades through Helm, on a cluster of its own (the test changes the cluster-wide
//! CRD): a CRD first installed with `kubectl apply -f crds/` is adopted by the release, a
//! `helm upgrade` whose chart carries a changed CRD changes it in the cluster, and neither
//! turning `crds.install` off nor uninstalling the release deletes the CRD or the
//! SD35Deployments.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use sd35_crds::SD35Deployment;
use sd35_e2e::{
    Cluster, Probe, crd_established, kubectl_apply, poll_until, repo_root, shared_cluster,
};
use serde_json::{Value, json};

const CRD: &str = "sd35deployments.sd35.io";
const RELEASE: &str = "sd35";
const TIMEOUT: Duration = Duration::from_secs(60);

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn kubectl(cluster: &Cluster, args: &[&str]) -> Output {
    let out = cluster.kubectl().args(args).output().unwrap();
    assert!(out.status.success(), "kubectl {args:?}: {}", stderr(&out));
    out
}

fn helm(cluster: &Cluster, args: &[&str]) -> Output {
    cluster.helm().args(args).output().unwrap()
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

/// A copy of the chart whose CRD has one more printer column: a CRD change as a new
/// version of the types would bring.
fn chart_with_changed_crd(cluster: &Cluster) -> PathBuf {
    let chart = cluster.state_dir().join("chart-next");
    copy_dir(&repo_root().join("charts/sd35-operator"), &chart);
    let file = chart.join("files/crds").join(sd35_crds::CRD_FILE_NAME);
    let mut crd: Value = serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "name": "Cache", "type": "string", "priority": 1,
            "jsonPath": ".status.cache.claimName"
        }));
    std::fs::write(&file, serde_yaml::to_string(&crd).unwrap()).unwrap();
    chart
}

async fn printer_columns(api: &Api<CustomResourceDefinition>) -> Vec<String> {
    let crd = api.get(CRD).await.unwrap();
    crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect()
}

#[tokio::test]
async fn helm_adopts_upgrades_and_keeps_the_crd() {
    let cluster = shared_cluster();
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client());
    let chart = repo_root().join("charts/sd35-operator");
    let chart = chart.to_str().unwrap();
    let release_ns = cluster.temp_namespace("sd35-system").await;
    let ns = release_ns.name();

    // The CRD as a kubectl user installed it, and an object that must survive everything.
    kubectl(
        cluster,
        &["apply", "-f", repo_root().join("crds").to_str().unwrap()],
    );
    poll_until("the CRD to be Established", TIMEOUT, || {
        crd_established(&crds, CRD)
    })
    .await
    .unwrap();
    let app = cluster.temp_namespace("keep-me").await;
    let out = kubectl_apply(
        cluster,
        app.name(),
        "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata:\n  name: survivor\nspec:\n  variant: medium\n",
    )
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // Helm refuses to take over an object it does not own, and says so.
    let out = helm(cluster, &["install", RELEASE, chart, "--namespace", ns]);
    assert!(
        !out.status.success(),
        "helm installed over a CRD it does not own"
    );
    assert!(
        stderr(&out).contains("invalid ownership metadata"),
        "{}",
        stderr(&out)
    );
    // The adoption the README documents.
    kubectl(
        cluster,
        &[
            "label",
            "crd",
            CRD,
            "app.kubernetes.io/managed-by=Helm",
            "--overwrite",
        ],
    );
    kubectl(
        cluster,
        &[
            "annotate",
            "crd",
            CRD,
            &format!("meta.helm.sh/release-name={RELEASE}"),
            &format!("meta.helm.sh/release-namespace={ns}"),
            "--overwrite",
        ],
    );
    let out = helm(cluster, &["install", RELEASE, chart, "--namespace", ns]);
    assert!(
        out.status.success(),
        "helm install after adoption: {}",
        stderr(&out)
    );
    let columns = printer_columns(&crds).await;
    assert!(!columns.contains(&"Cache".to_owned()), "{columns:?}");

    // Upgrade with a changed CRD: the cluster's CRD changes and the object stays.
    let next = chart_with_changed_crd(cluster);
    let out = helm(
        cluster,
        &[
            "upgrade",
            RELEASE,
            next.to_str().unwrap(),
            "--namespace",
            ns,
        ],
    );
    assert!(out.status.success(), "helm upgrade: {}", stderr(&out));
    let columns = printer_columns(&crds).await;
    assert!(
        columns.contains(&"Cache".to_owned()),
        "helm upgrade did not update the CRD: {columns:?}"
    );
    // The apiserver serves the new column.
    let out = poll_until("kubectl shows the new column", TIMEOUT, || async {
        let out = cluster
            .kubectl()
            .args(["get", "sd35", "-o", "wide", "-n", app.name()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(if text.contains("CACHE") {
            Probe::Ready(text)
        } else {
            Probe::Pending(text)
        })
    })
    .await
    .unwrap();
    assert!(out.contains("survivor"), "{out}");

    // Turning CRD management off, then uninstalling, leaves the CRD and the objects.
    let out = helm(
        cluster,
        &[
            "upgrade",
            RELEASE,
            next.to_str().unwrap(),
            "--namespace",
            ns,
            "--set",
            "crds.install=false",
        ],
    );
    assert!(
        out.status.success(),
        "helm upgrade crds.install=false: {}",
        stderr(&out)
    );
    let out = helm(cluster, &["uninstall", RELEASE, "--namespace", ns]);
    assert!(out.status.success(), "helm uninstall: {}", stderr(&out));
    let crd = crds.get(CRD).await.expect("the CRD was deleted");
    assert!(crd.metadata.deletion_timestamp.is_none());
    let objects: Api<SD35Deployment> = Api::namespaced(cluster.client(), app.name());
    objects
        .get("survivor")
        .await
        .expect("the SD35Deployment was deleted");
}
