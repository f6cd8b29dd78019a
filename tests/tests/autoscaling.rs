#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

//! The autoscaling examples against real schemas on the local control plane: the HPA of
//! `examples/autoscaling/hpa.yaml` is accepted by the apiserver and the HPA controller reads
//! the SD35Deployment's scale subresource through it; KEDA's `ScaledObject` of
//! `examples/autoscaling/keda-scaledobject.yaml` is accepted by KEDA's published CRD
//! (`tests/testdata/keda`), which also rejects what KEDA would refuse.

use std::time::Duration;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::Api;
use sd35_e2e::{Cluster, Probe, install_crd, kubectl_apply, poll_until, repo_root, shared_cluster};

const TIMEOUT: Duration = Duration::from_secs(90);

fn example(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("examples").join(name)).unwrap()
}

/// Installs KEDA's ScaledObject CRD and waits until it is served.
async fn install_keda_crd(cluster: &Cluster) {
    let crd = repo_root().join("tests/testdata/keda/keda.sh_scaledobjects.yaml");
    let out = cluster
        .kubectl()
        .args(["apply", "--server-side", "-f"])
        .arg(&crd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    poll_until("KEDA's CRD is served", TIMEOUT, || async {
        let out = cluster
            .kubectl()
            .args(["get", "scaledobjects.keda.sh", "-A"])
            .output()?;
        Ok(if out.status.success() {
            Probe::Ready(())
        } else {
            Probe::Pending(String::from_utf8_lossy(&out.stderr).into_owned())
        })
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_hpa_example_scales_the_sd35deployment_through_its_scale_subresource() {
    let cluster = shared_cluster();
    install_crd(cluster).unwrap();
    let ns = cluster.temp_namespace("hpa").await;
    for file in ["large-turbo-bf16.yaml", "autoscaling/hpa.yaml"] {
        let out = kubectl_apply(cluster, ns.name(), &example(file)).unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The HPA controller resolves the target's scale subresource (replicas and selector);
    // the metric itself needs a custom metrics API this cluster does not run.
    let hpas: Api<HorizontalPodAutoscaler> = ns.api();
    let condition = poll_until("the HPA reads the scale subresource", TIMEOUT, || async {
        let hpa = hpas.get("sd35-turbo").await?;
        let able = hpa
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "AbleToScale");
        Ok(match able {
            Some(c) if c.status == "True" => Probe::Ready(c),
            Some(c) => Probe::Pending(format!("{c:?}")),
            None => Probe::Pending("no AbleToScale condition yet".into()),
        })
    })
    .await
    .unwrap();
    assert_eq!(condition.reason.as_deref(), Some("SucceededGetScale"));
}

#[tokio::test]
async fn the_keda_example_is_valid_against_kedas_own_crd() {
    let cluster = shared_cluster();
    install_crd(cluster).unwrap();
    install_keda_crd(cluster).await;
    let ns = cluster.temp_namespace("keda").await;
    let yaml = example("autoscaling/keda-scaledobject.yaml");
    let out = kubectl_apply(cluster, ns.name(), &yaml).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = cluster
        .kubectl()
        .args([
            "get",
            "scaledobject",
            "sd35-turbo",
            "-n",
            ns.name(),
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&stored.stdout).unwrap();
    assert_eq!(stored["spec"]["scaleTargetRef"]["kind"], "SD35Deployment");
    assert_eq!(stored["spec"]["minReplicaCount"], 0);
    assert_eq!(stored["spec"]["triggers"][0]["type"], "prometheus");

    // The schema is really applied: what KEDA refuses, the apiserver refuses.
    for (broken, why) in [
        (
            yaml.replace("minReplicaCount:", "minReplicas:"),
            "unknown field",
        ),
        (
            yaml.replace("    - type: prometheus\n", "    - name: queue\n"),
            "type",
        ),
    ] {
        let broken = broken.replace("name: sd35-turbo\nspec", "name: broken\nspec");
        let out = kubectl_apply(cluster, ns.name(), &broken).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{broken}");
        assert!(err.contains(why), "{why}: {err}");
    }
}
