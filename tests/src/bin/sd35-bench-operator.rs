//! Operator benchmark: creates N SD35Deployments in a fresh local cluster (each with its own
//! model source, so each runs its own cache claim, fetch Job, build Job, Deployment and
//! Service) and prints the time until all are Ready, the operator's API requests per object,
//! its peak RSS and CPU seconds. Not a test: numbers, side by side for each N.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use kube::Api;
use kube::api::{ListParams, PostParams};
use sd35_crds::SD35Deployment;
use sd35_e2e::{Cluster, ClusterOptions, OperatorProcess, has_condition, install_crd};

/// Times the operator against N SD35Deployments.
#[derive(Parser, Debug)]
struct Args {
    /// Object counts to run, each in a fresh cluster.
    #[arg(long, value_delimiter = ',', default_value = "100,500")]
    objects: Vec<usize>,
    /// Simulated nodes (110 pods each).
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Give up after this many seconds per run.
    #[arg(long, default_value_t = 1200)]
    timeout: u64,
}

struct Row {
    objects: usize,
    seconds: f64,
    reads: usize,
    writes: usize,
    rss_mib: f64,
    cpu_seconds: f64,
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

fn audit_requests(cluster: &Cluster) -> Result<(usize, usize)> {
    let text = std::fs::read_to_string(cluster.audit_log_path())?;
    let (mut reads, mut writes) = (0, 0);
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if !e["userAgent"]
            .as_str()
            .is_some_and(|ua| ua.starts_with("sd35-operator/"))
        {
            continue;
        }
        match e["verb"].as_str() {
            Some("create" | "update" | "patch" | "delete" | "deletecollection") => writes += 1,
            Some(_) => reads += 1,
            None => {}
        }
    }
    Ok((reads, writes))
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

async fn run(n: usize, args: &Args) -> Result<Row> {
    let cluster = Cluster::start(ClusterOptions {
        gpu_nodes: args.nodes,
        provisioner: std::env::current_exe()?
            .parent()
            .map(|dir| dir.join("sd35-localcluster")),
        ..Default::default()
    })?;
    install_crd(&cluster)?;
    let ns = cluster.temp_namespace("bench").await;
    let operator = OperatorProcess::start(&cluster, ns.name(), &[])?;
    let api: Api<SD35Deployment> = ns.api();
    let started = Instant::now();
    for i in 0..n {
        api.create(&PostParams::default(), &object(i)?).await?;
    }
    let deadline = Duration::from_secs(args.timeout);
    loop {
        let list = api.list(&ListParams::default()).await?;
        let ready = list
            .items
            .iter()
            .filter(|o| has_condition(o, "Ready", "True"))
            .count();
        if ready == n {
            break;
        }
        if started.elapsed() > deadline {
            anyhow::bail!(
                "{ready} of {n} Ready after {deadline:?}; operator log:\n{}",
                operator.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (rss_mib, cpu_seconds) = proc_stats(operator.pid())?;
    let (reads, writes) = audit_requests(&cluster)?;
    Ok(Row {
        objects: n,
        seconds,
        reads,
        writes,
        rss_mib,
        cpu_seconds,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut rows = Vec::new();
    for &n in &args.objects {
        eprintln!("running {n} objects ...");
        rows.push(run(n, &args).await?);
    }
    println!(
        "| objects | all Ready (s) | API requests / object (reads + writes) | operator peak RSS (MiB) | operator CPU (s) |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for r in rows {
        let per = |x: usize| x as f64 / r.objects as f64;
        println!(
            "| {} | {:.1} | {:.1} ({:.1} + {:.1}) | {:.1} | {:.1} |",
            r.objects,
            r.seconds,
            per(r.reads + r.writes),
            per(r.reads),
            per(r.writes),
            r.rss_mib,
            r.cpu_seconds
        );
    }
    Ok(())
}
