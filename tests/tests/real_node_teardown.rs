#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

//! A real node leaves the host as it found it: sysctls, links, addresses, routes, iptables
//! and nftables rules, mounts, network namespaces, cgroups and the directories container
//! tools write by default are the same before the node started and after it stopped —
//! whether the cluster was dropped or crashed (everything but the containers and their
//! shims killed at once) and was then stopped with `sd35-localcluster stop`.
//!
//! Each case starts a real node of its own, so the cases run one after the other and this
//! file is a test binary of its own (no other real node runs beside them).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use sd35_e2e::{
    Cluster, ClusterOptions, HostState, Images, Probe, REAL_NODE_NAME, kubectl_apply, poll_until,
};

/// One real node at a time.
static ONE_NODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A pod with the mounts a real workload has (an emptyDir, a projected service-account
/// token, a sandbox with its own network namespace), running until it is killed.
fn busy_pod(images: &Images) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: busy
spec:
  nodeSelector: {{kubernetes.io/hostname: {REAL_NODE_NAME}}}
  tolerations: [{{operator: Exists}}]
  securityContext: {{runAsNonRoot: true, runAsUser: 65532, seccompProfile: {{type: RuntimeDefault}}}}
  containers:
    - name: pause
      image: "{pause}"
      securityContext: {{allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {{drop: [ALL]}}}}
      volumeMounts: [{{name: scratch, mountPath: /scratch}}]
  volumes:
    - name: scratch
      emptyDir: {{}}
"#,
        pause = images.pause
    )
}

async fn wait_running(client: kube::Client) {
    let pods: Api<Pod> = Api::namespaced(client, "default");
    poll_until("the busy pod to run", Duration::from_secs(90), || async {
        let pod = pods.get("busy").await?;
        let phase = pod
            .status
            .and_then(|status| status.phase)
            .unwrap_or_default();
        Ok(if phase == "Running" {
            Probe::Ready(())
        } else {
            Probe::Pending(phase)
        })
    })
    .await
    .unwrap();
}

fn assert_restored(before: &HostState, what: &str) {
    // The kernel may take a moment to drop a namespace's link after its last process.
    let mut differences = Vec::new();
    for _ in 0..50 {
        differences = HostState::capture().differences(before);
        if differences.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "after {what}, the host differs from before the node started:\n{}",
        differences.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_cluster_restores_the_host() {
    if sd35_e2e::skip_without_real_node() {
        return;
    }
    let _one = ONE_NODE.lock().await;
    let images = Images::locate().unwrap();
    // The previous test binary's real node may still be on its way out.
    sd35_e2e::node::wait_for_no_real_node(Duration::from_secs(60)).unwrap();
    let before = HostState::capture();
    let cluster = Cluster::start(ClusterOptions {
        gpu_nodes: 0,
        provisioner: Some(env!("CARGO_BIN_EXE_sd35-localcluster").into()),
        real_node: Some(images.clone()),
        ..ClusterOptions::default()
    })
    .unwrap();
    let out = kubectl_apply(&cluster, "default", &busy_pod(&images)).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_running(cluster.client()).await;
    let changed = HostState::capture().differences(&before);
    assert!(
        changed.iter().any(|line| line.starts_with("links")),
        "a running node shows on the host (its link), or this test checks nothing: {changed:?}"
    );
    assert!(!sd35_e2e::node::container_processes().is_empty());
    drop(cluster);
    assert_restored(&before, "dropping the cluster");
    assert!(sd35_e2e::node::container_processes().is_empty());
}

fn localcluster(args: &[&str], state_dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sd35-localcluster"))
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_cluster_is_cleaned_up_by_stop() {
    if sd35_e2e::skip_without_real_node() {
        return;
    }
    let _one = ONE_NODE.lock().await;
    let images = Images::locate().unwrap();
    let state_dir = std::env::temp_dir().join(format!("sd35-crash-{}", std::process::id()));
    sd35_e2e::node::wait_for_no_real_node(Duration::from_secs(60)).unwrap();
    let before = HostState::capture();
    let out = localcluster(&["start", "--real-node", "--gpu-nodes", "0"], &state_dir);
    assert!(
        out.status.success(),
        "start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kubeconfig = state_dir.join("kubeconfig");
    let apply = Command::new(sd35_e2e::Binaries::locate().unwrap().path("kubectl"))
        .args(["--kubeconfig"])
        .arg(&kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(busy_pod(&images).as_bytes())?;
            child.wait()
        })
        .unwrap();
    assert!(apply.success());
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    wait_running(kube::Client::try_from(config).unwrap()).await;

    // The crash: every recorded process dies at once; the containers and their shims live on.
    let pids = std::fs::read_to_string(state_dir.join("pids")).unwrap();
    for line in pids.lines() {
        let pid = line.split_whitespace().nth(1).unwrap();
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !sd35_e2e::node::container_processes().is_empty(),
        "the containers outlive the crash, or this test checks nothing"
    );
    let out = localcluster(&["stop"], &state_dir);
    assert!(
        out.status.success(),
        "stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!state_dir.exists());
    assert_restored(&before, "a crash and `sd35-localcluster stop`");
    assert!(sd35_e2e::node::container_processes().is_empty());
}
