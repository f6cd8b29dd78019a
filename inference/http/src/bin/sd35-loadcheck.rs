//! `sd35-loadcheck`: concurrent clients against `sd35-server serve` with a model, unbatched
//! and batched in the same run; prints throughput, latency percentiles, the 429 rate and the
//! server's peak RSS. A measurement command, not a test.
//!
//! cargo build --release -p sd35-server -p sd35-http
//! target/release/sd35-loadcheck --server target/release/sd35-server \
//!     --model inference/testdata/sd35-tiny-large

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use sd35_http::client;

/// Load check of the HTTP server.
#[derive(Debug, Parser)]
struct Args {
    /// The `sd35-server` binary.
    #[arg(long)]
    server: PathBuf,
    /// Model directory to serve.
    #[arg(long)]
    model: PathBuf,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Requests per client.
    #[arg(long, default_value_t = 6)]
    requests: usize,
    /// Image width and height.
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Sampling steps per image.
    #[arg(long, default_value_t = 4)]
    steps: u32,
    /// Server queue size.
    #[arg(long, default_value_t = 16)]
    queue_size: u32,
    /// Batch sizes to compare.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    batch_sizes: Vec<u32>,
}

struct Running {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &Args, batch: u32) -> anyhow::Result<Running> {
    let mut child = Command::new(&args.server)
        .arg("serve")
        .arg("--model")
        .arg(&args.model)
        .args(["--host", "127.0.0.1", "--port", "0", "--log-format", "json"])
        .args(["--queue-size", &args.queue_size.to_string()])
        .args(["--max-batch-size", &batch.to_string()])
        .env("RUST_LOG", "warn,sd35_http::server=info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", args.server.display()))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            bail!("the server exited before listening");
        };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "listening" {
            break v["fields"]["addr"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .context("no address in the log")?;
        }
    };
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let ready = Instant::now();
    while client::get(addr, "/readyz").map_or(true, |r| r.status != 200) {
        if ready.elapsed() > Duration::from_secs(300) {
            bail!("not ready after 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Running { child, addr })
}

/// Peak resident set of a process in MiB (Linux).
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Row {
    batch: u32,
    ok: usize,
    busy: usize,
    failed: usize,
    seconds: f64,
    latencies: Vec<f64>,
    rss: Option<f64>,
    mean_batch: f64,
}

fn run(args: &Args, batch: u32) -> anyhow::Result<Row> {
    let server = start(args, batch)?;
    let addr = server.addr;
    let started = Instant::now();
    let workers: Vec<_> = (0..args.clients)
        .map(|c| {
            let (n, size, steps) = (args.requests, args.size, args.steps);
            std::thread::spawn(move || {
                let mut out = Vec::with_capacity(n);
                for r in 0..n {
                    let body = format!(
                        r#"{{"prompt":"load check {c} {r}","width":{size},"height":{size},"steps":{steps},"seed":{}}}"#,
                        c * 1000 + r
                    );
                    let t = Instant::now();
                    let status = client::post_json(addr, "/v1/txt2img", &body).map_or(0, |r| r.status);
                    out.push((status, t.elapsed().as_secs_f64()));
                    if status == 429 {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                out
            })
        })
        .collect();
    let mut results = Vec::new();
    for w in workers {
        results.extend(w.join().map_err(|_| anyhow::anyhow!("a client panicked"))?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let metrics = client::get(addr, "/metrics")?.text();
    let sum = client::metric(&metrics, "sd35_batch_size_sum").unwrap_or(0.0);
    let count = client::metric(&metrics, "sd35_batch_size_count").unwrap_or(0.0);
    let mut latencies: Vec<f64> = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, l)| *l)
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok(Row {
        batch,
        ok: latencies.len(),
        busy: results.iter().filter(|(s, _)| *s == 429).count(),
        failed: results
            .iter()
            .filter(|(s, _)| *s != 200 && *s != 429)
            .count(),
        seconds,
        latencies,
        rss: peak_rss_mib(server.child.id()),
        mean_batch: if count > 0.0 { sum / count } else { 0.0 },
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "{} clients × {} requests, {}x{} px, {} steps, queue {}",
        args.clients, args.requests, args.size, args.size, args.steps, args.queue_size
    );
    println!(
        "| max batch | images/s | p50 s | p95 s | p99 s | 429 rate | errors | mean batch | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &batch in &args.batch_sizes {
        let r = run(&args, batch)?;
        let total = (r.ok + r.busy + r.failed).max(1);
        println!(
            "| {} | {:.2} | {:.3} | {:.3} | {:.3} | {:.1} % | {} | {:.2} | {} |",
            r.batch,
            r.ok as f64 / r.seconds,
            percentile(&r.latencies, 0.50),
            percentile(&r.latencies, 0.95),
            percentile(&r.latencies, 0.99),
            100.0 * r.busy as f64 / total as f64,
            r.failed,
            r.mean_batch,
            r.rss
                .map_or_else(|| "n/a".to_owned(), |m| format!("{m:.0}")),
        );
    }
    Ok(())
}
