//! The `sd35-localcluster` commands: one long-lived local cluster for development, in a
//! fixed state directory, that outlives the command that started it.
//!
//! `start` records every process in the state directory's `pids` file; `stop` ends only
//! processes from that record whose command line still names the state directory, so a
//! recycled pid is never killed, tears down the real node if there is one (restoring the
//! host), then removes the directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cluster::{Cluster, ClusterOptions};
use crate::layout::Layout;
use crate::node::{self, Images};
use crate::process::{Lifetime, runs_for_state_dir};

/// `${XDG_CACHE_HOME:-~/.cache}/sd35-operator/localcluster`.
pub fn default_state_dir() -> Result<PathBuf> {
    let cache = match std::env::var_os("XDG_CACHE_HOME").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(
            std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?,
        )
        .join(".cache"),
    };
    Ok(cache.join("sd35-operator").join("localcluster"))
}

/// What `sd35-localcluster start` starts.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// How many fake GPU nodes.
    pub gpu_nodes: usize,
    /// The real node `real-0`, running these images.
    pub real_node: Option<Images>,
    /// Flux's controllers beside the control plane.
    pub flux: bool,
}

/// Starts a detached cluster in `state_dir` and prints how to use it.
pub fn start(state_dir: &Path, options: StartOptions) -> Result<()> {
    let running = recorded_processes(state_dir)?
        .into_iter()
        .filter(|process| process.is_alive(state_dir))
        .count();
    if running > 0 {
        bail!(
            "a cluster is already running in {} ({running} processes); run `sd35-localcluster stop` first",
            state_dir.display()
        );
    }
    if state_dir.exists() {
        // A crashed cluster may have left its real node's shims and settings behind.
        node::teardown(state_dir)?;
        std::fs::remove_dir_all(state_dir)
            .with_context(|| format!("removing the stale {}", state_dir.display()))?;
    }
    let cluster = Cluster::start(ClusterOptions {
        gpu_nodes: options.gpu_nodes,
        state_dir: Some(state_dir.to_path_buf()),
        provisioner: None,
        lifetime: Lifetime::Detached,
        real_node: options.real_node,
        flux: options.flux,
        ..ClusterOptions::default()
    })?;
    let kubeconfig = cluster.kubeconfig_path();
    let server = cluster.server_url().to_owned();
    cluster.detach();
    println!("{}", kubeconfig.display());
    eprintln!("API server: {server}");
    eprintln!("export KUBECONFIG={}", kubeconfig.display());
    Ok(())
}

/// Stops the cluster recorded in `state_dir` and removes the directory.
pub fn stop(state_dir: &Path) -> Result<()> {
    let processes: Vec<_> = recorded_processes(state_dir)?
        .into_iter()
        .filter(|process| process.is_alive(state_dir))
        .collect();
    for process in &processes {
        signal(process.pid, "TERM");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while processes.iter().any(|process| process.is_alive(state_dir)) {
        if Instant::now() >= deadline {
            for process in processes
                .iter()
                .filter(|process| process.is_alive(state_dir))
            {
                signal(process.pid, "KILL");
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    node::teardown(state_dir)?;
    if state_dir.exists() {
        std::fs::remove_dir_all(state_dir)
            .with_context(|| format!("removing {}", state_dir.display()))?;
    }
    eprintln!("stopped {} processes", processes.len());
    Ok(())
}

/// Prints each recorded process and whether it runs; true when all of them do.
pub fn status(state_dir: &Path) -> Result<bool> {
    let processes = recorded_processes(state_dir)?;
    if processes.is_empty() {
        println!("no cluster in {}", state_dir.display());
        return Ok(false);
    }
    let mut all_running = true;
    for process in &processes {
        let alive = process.is_alive(state_dir);
        all_running &= alive;
        let state = if alive { "running" } else { "stopped" };
        println!("{:<24} {:>8}  {state}", process.name, process.pid);
    }
    println!("kubeconfig: {}", kubeconfig_path(state_dir)?.display());
    Ok(all_running)
}

/// The administrator kubeconfig of the cluster in `state_dir`.
pub fn kubeconfig_path(state_dir: &Path) -> Result<PathBuf> {
    let path = Layout::new(state_dir.to_path_buf()).admin_kubeconfig();
    if !path.is_file() {
        bail!(
            "no cluster in {}; start one with `sd35-localcluster start`",
            state_dir.display()
        );
    }
    Ok(path)
}

#[derive(Debug, PartialEq, Eq)]
struct RecordedProcess {
    name: String,
    pid: u32,
}

impl RecordedProcess {
    fn is_alive(&self, state_dir: &Path) -> bool {
        runs_for_state_dir(self.pid, state_dir)
    }
}

fn recorded_processes(state_dir: &Path) -> Result<Vec<RecordedProcess>> {
    let path = Layout::new(state_dir.to_path_buf()).pids();
    let record = match std::fs::read_to_string(&path) {
        Ok(record) => record,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    parse_pids(&record).with_context(|| format!("parsing {}", path.display()))
}

fn parse_pids(record: &str) -> Result<Vec<RecordedProcess>> {
    record
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let (name, pid) = line
                .split_once(' ')
                .with_context(|| format!("malformed line {line:?}"))?;
            Ok(RecordedProcess {
                name: name.to_owned(),
                pid: pid
                    .trim()
                    .parse()
                    .with_context(|| format!("malformed pid in {line:?}"))?,
            })
        })
        .collect()
}

fn signal(pid: u32, signal: &str) {
    // A process that is already gone is what we want; nothing to report.
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_record_round_trips() {
        let parsed = parse_pids("etcd 10\nkube-apiserver 11\n\n").unwrap();
        assert_eq!(
            parsed,
            vec![
                RecordedProcess {
                    name: "etcd".into(),
                    pid: 10
                },
                RecordedProcess {
                    name: "kube-apiserver".into(),
                    pid: 11
                },
            ]
        );
        assert!(parse_pids("etcd ten").is_err());
    }

    #[test]
    fn a_process_not_naming_the_state_dir_is_not_ours() {
        let me = RecordedProcess {
            name: "test".into(),
            pid: std::process::id(),
        };
        assert!(!me.is_alive(Path::new("/definitely/not/a/state/dir")));
    }
}
