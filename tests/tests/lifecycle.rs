//! A cluster never outlives its owner: dropping it stops its processes and removes its
//! state directory, and a test process that aborts takes its processes (at once, through
//! their parent-death signal) and its state directory (through the janitor) with it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use sd35_e2e::{
    Cluster, ClusterOptions, KEEP_STATE_ENV, Probe, poll_until, runs_for_state_dir as runs_for,
};

const ABORT_PROBE_ENV: &str = "SD35_E2E_ABORT_PROBE";

fn small_cluster() -> Cluster {
    Cluster::start(ClusterOptions {
        gpu_nodes: 1,
        provisioner: Some(env!("CARGO_BIN_EXE_sd35-localcluster").into()),
        ..ClusterOptions::default()
    })
    .expect("a small cluster starts")
}

#[test]
fn dropping_a_cluster_stops_its_processes_and_removes_its_state() {
    let cluster = small_cluster();
    let state_dir = cluster.state_dir().to_path_buf();
    let pids = cluster.process_ids();
    assert_eq!(pids.len(), 6, "{pids:?}");
    for (name, pid) in &pids {
        assert!(runs_for(*pid, &state_dir), "{name} ({pid}) is not running");
    }
    drop(cluster);
    for (name, pid) in &pids {
        assert!(
            !runs_for(*pid, &state_dir),
            "{name} ({pid}) survived the drop"
        );
    }
    assert!(
        !state_dir.exists(),
        "{} survived the drop",
        state_dir.display()
    );
}

#[tokio::test]
async fn an_aborted_test_process_takes_its_cluster_with_it() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "aborting_owner", "--ignored", "--nocapture"])
        .env(ABORT_PROBE_ENV, "1")
        .env_remove(KEEP_STATE_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut state_dir = None;
    let mut pids = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(dir) = line.strip_prefix("state_dir=") {
            state_dir = Some(PathBuf::from(dir));
        } else if let Some(pid) = line.strip_prefix("pid=") {
            pids.push(pid.parse::<u32>().unwrap());
        }
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the owner did not abort: {status}");
    let state_dir = state_dir.expect("the owner printed its state dir");
    assert_eq!(pids.len(), 6, "{pids:?}");

    poll_until(
        "the aborted owner's processes and state to go",
        Duration::from_secs(20),
        || async {
            let survivors: Vec<u32> = pids
                .iter()
                .copied()
                .filter(|pid| runs_for(*pid, &state_dir))
                .collect();
            Ok(if !survivors.is_empty() {
                Probe::Pending(format!("still running: {survivors:?}"))
            } else if state_dir.exists() {
                Probe::Pending(format!("{} still exists", state_dir.display()))
            } else {
                Probe::Ready(())
            })
        },
    )
    .await
    .unwrap();
}

/// The owner that `an_aborted_test_process_takes_its_cluster_with_it` runs as a child: it
/// starts a cluster, reports it, and aborts without unwinding.
#[test]
#[ignore = "run as a child process by an_aborted_test_process_takes_its_cluster_with_it"]
fn aborting_owner() {
    if std::env::var_os(ABORT_PROBE_ENV).is_none() {
        return;
    }
    let cluster = small_cluster();
    println!("state_dir={}", cluster.state_dir().display());
    for (_, pid) in cluster.process_ids() {
        println!("pid={pid}");
    }
    std::process::abort();
}
