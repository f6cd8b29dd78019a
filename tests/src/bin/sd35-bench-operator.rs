//! Operator benchmark: creates N SD35Deployments in a fresh local cluster (each with its own
//! model source, so each runs its own cache claim, fetch Job, build Job, Deployment and
//! Service) and prints, per run: the time until all are Ready, the operator's own latency
//! (from a serving Deployment becoming ready to its SD35Deployment's status saying so, both
//! seen by this process's watches), the operator's API requests per object by verb and kind,
//! its peak RSS and CPU seconds, and how the run compares with the goals.
//!
//! The control plane runs with raised client limits and sync concurrency
//! (`ClusterOptions::high_throughput`), so that it is not the ceiling. Not a test: numbers,
//! side by side for each N.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use sd35_crds::SD35Deployment;
use sd35_e2e::{Cluster, ClusterOptions, OperatorProcess, has_condition, install_crd};

/// Times the operator against N SD35Deployments.
#[derive(Parser, Debug)]
struct Args {
    /// Object counts to run, each in a fresh cluster.
    #[arg(long, value_delimiter = ',', default_value = "100,500")]
    objects: Vec<usize>,
    /// Simulated nodes (110 pods each); 0 picks one per 80 objects, at least 10.
    #[arg(long, default_value_t = 0)]
    nodes: usize,
    /// Give up after this many seconds per run.
    #[arg(long, default_value_t = 1200)]
    timeout: u64,
    /// Run the control plane with its default client limits (to compare with earlier runs).
    #[arg(long)]
    default_control_plane: bool,
    /// Extra flags for the operator, for example `--concurrency=16`.
    #[arg(long = "operator-arg", allow_hyphen_values = true)]
    operator_args: Vec<String>,
}

struct Row {
    objects: usize,
    /// Objects Ready at the end (all of them unless the run timed out).
    ready: usize,
    seconds: f64,
    latency_p50: f64,
    latency_p99: f64,
    /// Requests by (verb, resource).
    requests: BTreeMap<(String, String), usize>,
    /// Every client's (requests, writes), by the first word of its user agent.
    clients: BTreeMap<String, (usize, usize)>,
    rss_mib: f64,
    cpu_seconds: f64,
    /// CPU seconds each cluster process spent during the run, to show what else the
    /// machine's cores were busy with.
    cluster_cpu: Vec<(&'static str, f64)>,
}

impl Row {
    fn per_object(&self, n: usize) -> f64 {
        n as f64 / self.objects as f64
    }
    fn writes(&self) -> usize {
        self.requests
            .iter()
            .filter(|((verb, _), _)| is_write(verb))
            .map(|(_, n)| n)
            .sum()
    }
    fn total(&self) -> usize {
        self.requests.values().sum()
    }
}

fn is_write(verb: &str) -> bool {
    matches!(
        verb,
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

fn proc_stats(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses): utime is 14th, stime 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok((hwm_kib / 1024.0, ticks / 100.0))
}

/// What the audit log holds.
struct Audit {
    /// The operator's requests (by its user agent), by verb and resource.
    operator: BTreeMap<(String, String), usize>,
    /// Every client's (requests, writes), by the first word of its user agent.
    clients: BTreeMap<String, (usize, usize)>,
}

/// The requests in the audit log: the operator's by verb and resource, every client's in all. The
/// API server rotates its audit log every 100 MB (`audit-<time>.log` beside `audit.log`, all
/// kept), which a run of a few thousand objects exceeds: every part is read.
fn audit_requests(cluster: &Cluster) -> Result<Audit> {
    let path = cluster.audit_log_path();
    let dir = path.parent().context("the audit log has a directory")?;
    let mut text = String::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("audit") && name.ends_with(".log") {
            text.push_str(&std::fs::read_to_string(dir.join(&*name))?);
            text.push('\n');
        }
    }
    let mut counts = BTreeMap::new();
    let mut clients: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let agent = e["userAgent"].as_str().unwrap_or("");
        let client = agent
            .split(['/', ' '])
            .next()
            .filter(|c| !c.is_empty())
            .unwrap_or("(none)");
        let verb = e["verb"].as_str().unwrap_or("?").to_owned();
        let tally = clients.entry(client.to_owned()).or_default();
        tally.0 += 1;
        tally.1 += usize::from(is_write(&verb));
        if !agent.starts_with("sd35-operator/") {
            continue;
        }
        let resource = match (
            e["objectRef"]["resource"].as_str(),
            e["objectRef"]["subresource"].as_str(),
        ) {
            (Some(r), Some(sub)) => format!("{r}/{sub}"),
            (Some(r), None) => r.to_owned(),
            (None, _) => "(discovery)".to_owned(),
        };
        *counts.entry((verb, resource)).or_default() += 1;
    }
    Ok(Audit {
        operator: counts,
        clients,
    })
}

fn object(i: usize) -> Result<SD35Deployment> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "sd35.io/v1alpha1",
        "kind": "SD35Deployment",
        "metadata": {"name": format!("bench-{i}")},
        "spec": {
            "variant": "medium",
            "model": {"source": {"http": {"url": format!("https://mirror.example/model-{i}/")}}},
            "cache": {"size": "1Gi"},
            "server": {"gpu": {"count": 0}, "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}
        }
    }))?)
}

/// When each object's first serving Deployment became ready, and when its SD35Deployment
/// first said Ready, as this process's watches saw them.
#[derive(Default)]
struct Seen {
    deployment_ready: HashMap<String, Instant>,
    status_ready: HashMap<String, Instant>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn run(n: usize, args: &Args) -> Result<Row> {
    let nodes = if args.nodes > 0 {
        args.nodes
    } else {
        (n / 80).max(10)
    };
    let cluster = Cluster::start(ClusterOptions {
        gpu_nodes: nodes,
        provisioner: std::env::current_exe()?
            .parent()
            .map(|dir| dir.join("sd35-localcluster")),
        high_throughput: !args.default_control_plane,
        ..Default::default()
    })?;
    install_crd(&cluster)?;
    let ns = cluster.temp_namespace("bench").await;
    let extra: Vec<&str> = args.operator_args.iter().map(String::as_str).collect();
    let operator = OperatorProcess::start(&cluster, ns.name(), &extra)?;
    let api: Api<SD35Deployment> = ns.api();
    let deployments: Api<Deployment> = ns.api();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watch_deployments = {
        let seen = seen.clone();
        tokio::spawn(
            watcher(deployments, watcher::Config::default())
                .applied_objects()
                .for_each(move |d| {
                    if let Ok(d) = d {
                        let st = d.status.clone().unwrap_or_default();
                        let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                        let ready = st.ready_replicas.unwrap_or(0) >= want
                            && st.updated_replicas.unwrap_or(0) >= want
                            && st.observed_generation >= d.metadata.generation;
                        if ready
                            && let Some(name) = d.metadata.name.clone()
                            && let Ok(mut s) = seen.lock()
                        {
                            s.deployment_ready.entry(name).or_insert_with(Instant::now);
                        }
                    }
                    std::future::ready(())
                }),
        )
    };
    let watch_objects = {
        let seen = seen.clone();
        tokio::spawn(
            watcher(api.clone(), watcher::Config::default())
                .applied_objects()
                .for_each(move |o| {
                    if let Ok(o) = o
                        && has_condition(&o, "Ready", "True")
                        && let Some(name) = o.metadata.name.clone()
                        && let Ok(mut s) = seen.lock()
                    {
                        s.status_ready.entry(name).or_insert_with(Instant::now);
                    }
                    std::future::ready(())
                }),
        )
    };
    let cluster_cpu_before = cluster_cpu(&cluster);
    let started = Instant::now();
    for i in 0..n {
        api.create(&PostParams::default(), &object(i)?).await?;
    }
    let deadline = Duration::from_secs(args.timeout);
    let ready = loop {
        let ready = seen.lock().map(|s| s.status_ready.len()).unwrap_or(0);
        if ready >= n {
            break ready;
        }
        if started.elapsed() > deadline {
            eprintln!("{ready} of {n} Ready after {deadline:?}: reporting what was done");
            break ready;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    let (rss_mib, cpu_seconds) = proc_stats(operator.pid())?;
    let cluster_cpu = cluster_cpu(&cluster)
        .into_iter()
        .map(|(name, after)| {
            let before = cluster_cpu_before
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0.0, |(_, b)| *b);
            (name, after - before)
        })
        .collect();
    watch_deployments.abort();
    watch_objects.abort();
    let mut latencies: Vec<f64> = {
        let s = seen
            .lock()
            .map_err(|_| anyhow::anyhow!("a watch panicked"))?;
        s.status_ready
            .iter()
            .filter_map(|(name, at)| {
                s.deployment_ready
                    .get(name)
                    .map(|d| at.saturating_duration_since(*d).as_secs_f64())
            })
            .collect()
    };
    latencies.sort_by(f64::total_cmp);
    // Let the last requests reach the audit log.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let audit = audit_requests(&cluster)?;
    Ok(Row {
        objects: n,
        ready,
        seconds,
        latency_p50: percentile(&latencies, 50.0),
        latency_p99: percentile(&latencies, 99.0),
        requests: audit.operator,
        clients: audit.clients,
        rss_mib,
        cpu_seconds,
        cluster_cpu,
    })
}

/// CPU seconds used so far by each of the cluster's processes.
fn cluster_cpu(cluster: &Cluster) -> Vec<(&'static str, f64)> {
    cluster
        .process_ids()
        .into_iter()
        .filter_map(|(name, pid)| proc_stats(pid).ok().map(|(_, cpu)| (name, cpu)))
        .collect()
}

fn print_row(r: &Row) {
    let writes = r.writes();
    let ready = if r.ready == r.objects {
        format!("{:.1}", r.seconds)
    } else {
        format!("{} of {} after {:.0}", r.ready, r.objects, r.seconds)
    };
    println!(
        "| {} | {ready} | {:.2} / {:.2} | {:.1} ({:.1} + {:.1}) | {:.1} | {:.1} | {:.1} |",
        r.objects,
        r.latency_p50,
        r.latency_p99,
        r.per_object(r.total()),
        r.per_object(r.total() - writes),
        r.per_object(writes),
        r.rss_mib,
        r.cpu_seconds,
        1000.0 * r.cpu_seconds / r.objects as f64,
    );
}

const HEADER: &str = "| objects | all Ready (s) | operator latency p50 / p99 (s) | API requests / object (reads + writes) | operator peak RSS (MiB) | operator CPU (s) | CPU / object (ms) |\n|---:|---:|---:|---:|---:|---:|---:|";

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut rows = Vec::new();
    for &n in &args.objects {
        eprintln!("running {n} objects ...");
        let row = run(n, &args).await?;
        // Each run's line as soon as it is done, so a long run loses no earlier one.
        eprintln!("{HEADER}");
        print_row(&row);
        rows.push(row);
    }
    println!();
    println!("{HEADER}");
    for r in &rows {
        print_row(r);
    }
    // Requests per object by verb and kind, one column per run.
    let mut keys: Vec<(String, String)> = rows
        .iter()
        .flat_map(|r| r.requests.keys().cloned())
        .collect();
    keys.sort();
    keys.dedup();
    println!();
    print!("| verb | resource |");
    for r in &rows {
        print!(" {} objects |", r.objects);
    }
    println!();
    print!("|---|---|");
    for _ in &rows {
        print!("---:|");
    }
    println!();
    for key in &keys {
        print!("| {} | {} |", key.0, key.1);
        for r in &rows {
            print!(" {:.2} |", r.per_object(*r.requests.get(key).unwrap_or(&0)));
        }
        println!();
    }
    println!();
    for r in &rows {
        let mut goals = vec![format!(
            "{:.1} writes per object (goal ≤ 15)",
            r.per_object(r.writes())
        )];
        if r.objects == 500 {
            goals.push(format!("all Ready in {:.1} s (goal ≤ 60 s)", r.seconds));
        }
        if r.objects == 2000 {
            goals.push(format!("peak RSS {:.1} MiB (goal ≤ 128 MiB)", r.rss_mib));
        }
        println!("{} objects: {}", r.objects, goals.join("; "));
        let cluster: Vec<String> = r
            .cluster_cpu
            .iter()
            .map(|(name, cpu)| format!("{name} {cpu:.1}"))
            .collect();
        println!(
            "{} objects: CPU seconds during the run — operator {:.1}, {} ({:.1} s wall)",
            r.objects,
            r.cpu_seconds,
            cluster.join(", "),
            r.seconds
        );
        let clients: Vec<String> = r
            .clients
            .iter()
            .map(|(name, (all, writes))| {
                format!(
                    "{name} {:.1} ({:.1} writes)",
                    r.per_object(*all),
                    r.per_object(*writes)
                )
            })
            .collect();
        println!(
            "{} objects: API requests per object by client — {}",
            r.objects,
            clients.join(", ")
        );
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last())
        && last.objects > first.objects
    {
        println!(
            "operator CPU per object: {:.1} ms at {} objects, {:.1} ms at {} (goal: linear in N, so about equal)",
            1000.0 * first.cpu_seconds / first.objects as f64,
            first.objects,
            1000.0 * last.cpu_seconds / last.objects as f64,
            last.objects
        );
    }
    Ok(())
}
