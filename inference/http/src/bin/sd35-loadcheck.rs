//! `sd35-loadcheck`: `sd35-server serve` with a model, under the loads a demanding user brings,
//! each phase against a fresh server process on loopback; prints what it saw. A measurement
//! command, not a test: nothing here is asserted, every figure is printed.
//!
//! - `overload`: ten times as many clients as the queue holds, for a while: the 429 share,
//!   whether every 429 says Retry-After, p50/p99 of the 200s, connection errors, peak RSS
//!   against idle;
//! - `slow`: many connections that send half a request head and stop (slowloris): how many
//!   are refused at once, closed by the header timeout, or still held; whether a new client
//!   gets through meanwhile; peak RSS against idle;
//! - `sigterm`: SIGTERM with requests queued, with the default drain and with a drain shorter
//!   than the work: answers by status, requests lost (no answer at all), the exit code;
//! - `throughput` (not in the default set): images/s and latency unbatched against batched.
//!
//! make loadcheck    # debug builds: the figures are about HTTP behaviour, not speed
//! target/debug/sd35-loadcheck --server target/debug/sd35-server \
//!     --model inference/testdata/sd35-tiny-large

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use sd35_http::client;

/// A phase of the load check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    /// Ten times the queue's worth of clients.
    Overload,
    /// Half-sent request heads.
    Slow,
    /// SIGTERM under load.
    Sigterm,
    /// Unbatched against batched throughput.
    Throughput,
}

/// Load check of the HTTP server.
#[derive(Debug, Parser)]
struct Args {
    /// The `sd35-server` binary.
    #[arg(long)]
    server: PathBuf,
    /// Model directory to serve.
    #[arg(long)]
    model: PathBuf,
    /// Phases to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "overload,slow,sigterm"
    )]
    phases: Vec<Phase>,
    /// Image width and height.
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Sampling steps per image (overload, throughput and the default-drain SIGTERM).
    #[arg(long, default_value_t = 2)]
    steps: u32,
    /// Server queue size in the overload phase; the clients are ten times as many.
    #[arg(long, default_value_t = 4)]
    overload_queue: u32,
    /// Seconds of overload.
    #[arg(long, default_value_t = 20)]
    overload_seconds: u64,
    /// Half-sent connections in the slow phase (at most the open-file limit allows).
    #[arg(long, default_value_t = 1100)]
    slow_connections: usize,
    /// Seconds the slow connections are held before counting which are still open (longer
    /// than the server's header-read timeout, 10 s by default).
    #[arg(long, default_value_t = 15)]
    slow_hold_seconds: u64,
    /// `--drain-seconds` of the short-drain SIGTERM run.
    #[arg(long, default_value_t = 2)]
    short_drain_seconds: u64,
    /// Concurrent clients (throughput).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Requests per client (throughput).
    #[arg(long, default_value_t = 6)]
    requests: usize,
    /// Server queue size (throughput).
    #[arg(long, default_value_t = 16)]
    queue_size: u32,
    /// Batch sizes to compare (throughput).
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

impl Running {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let text = client::get(self.addr, "/metrics").ok()?.text();
        client::metric(&text, name)
    }

    fn sigterm(&self) -> anyhow::Result<()> {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .context("kill")?
            .success();
        if !ok {
            bail!("kill -TERM {} failed", self.pid());
        }
        Ok(())
    }

    /// Waits for the process to exit; its exit code, or how it ended.
    fn wait_exit(&mut self, limit: Duration) -> String {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status
                    .code()
                    .map_or_else(|| format!("{status}"), |c| c.to_string());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        format!("still running after {} s", limit.as_secs())
    }
}

fn start(args: &Args, flags: &[String]) -> anyhow::Result<Running> {
    let mut child = Command::new(&args.server)
        .arg("serve")
        .arg("--model")
        .arg(&args.model)
        .args(["--host", "127.0.0.1", "--port", "0", "--log-format", "json"])
        .arg("--no-warmup")
        .args(flags)
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

/// A line of `/proc/PID/status` in MiB (Linux): `VmRSS` now, `VmHWM` the peak.
fn memory_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn mib(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |m| format!("{m:.0} MiB"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn body(tag: &str, size: u32, steps: u32, seed: u64) -> String {
    format!(
        r#"{{"prompt":"load check {tag}","width":{size},"height":{size},"steps":{steps},"seed":{seed}}}"#
    )
}

/// What one request got: the status (0 for no answer) and whether a Retry-After came.
struct Outcome {
    status: u16,
    retry_after: bool,
    seconds: f64,
}

fn post(addr: SocketAddr, body: &str) -> Outcome {
    let t = Instant::now();
    let r = client::post_json(addr, "/v1/txt2img", body);
    Outcome {
        status: r.as_ref().map_or(0, |r| r.status),
        retry_after: r.as_ref().is_ok_and(|r| r.header("retry-after").is_some()),
        seconds: t.elapsed().as_secs_f64(),
    }
}

fn by_status(outcomes: &[Outcome]) -> String {
    let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
    for o in outcomes {
        *counts.entry(o.status).or_default() += 1;
    }
    counts
        .iter()
        .map(|(s, n)| {
            if *s == 0 {
                format!("{n} × no answer")
            } else {
                format!("{n} × {s}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn overload(args: &Args) -> anyhow::Result<()> {
    let queue = args.overload_queue.max(1);
    let clients = queue as usize * 10;
    let server = start(
        args,
        &[
            "--queue-size".into(),
            queue.to_string(),
            "--max-batch-size".into(),
            "1".into(),
        ],
    )?;
    let idle = memory_mib(server.pid(), "VmRSS");
    let addr = server.addr;
    let until = Instant::now() + Duration::from_secs(args.overload_seconds);
    let (size, steps) = (args.size, args.steps);
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let mut r = 0u64;
                while Instant::now() < until {
                    let o = post(
                        addr,
                        &body(&format!("{c} {r}"), size, steps, c as u64 * 100_000 + r),
                    );
                    let busy = o.status == 429;
                    out.push(o);
                    r += 1;
                    if busy {
                        // A client that honours nothing, but does not spin.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.join().map_err(|_| anyhow::anyhow!("a client panicked"))?);
    }
    let peak = memory_mib(server.pid(), "VmHWM");
    let busy: Vec<&Outcome> = all.iter().filter(|o| o.status == 429).collect();
    let with_retry = busy.iter().filter(|o| o.retry_after).count();
    let mut ok: Vec<f64> = all
        .iter()
        .filter(|o| o.status == 200)
        .map(|o| o.seconds)
        .collect();
    ok.sort_by(f64::total_cmp);
    println!(
        "## overload: {clients} clients against a queue of {queue} for {} s ({}x{} px, {steps} steps)",
        args.overload_seconds, size, size
    );
    println!("requests:              {} ({})", all.len(), by_status(&all));
    println!(
        "429 share:             {:.2} %",
        100.0 * busy.len() as f64 / all.len().max(1) as f64
    );
    println!("429 with Retry-After:  {with_retry} of {}", busy.len());
    println!(
        "200 latency:           p50 {:.2} s, p99 {:.2} s ({} answers)",
        percentile(&ok, 0.50),
        percentile(&ok, 0.99),
        ok.len()
    );
    println!(
        "connection errors:     {}",
        all.iter().filter(|o| o.status == 0).count()
    );
    println!(
        "server RSS:            idle {}, peak {}",
        mib(idle),
        mib(peak)
    );
    println!();
    Ok(())
}

/// The soft open-file limit of this process (Linux), which the server inherits.
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// What became of a half-sent connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Answered 503 (the server refused it).
    Refused,
    /// Closed by the server without an answer, or with another one (a timeout).
    Closed,
    /// Still open and silent.
    Open,
}

fn held_state(s: &mut TcpStream) -> Held {
    let _ = s.set_nonblocking(true);
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 503") => Held::Refused,
        Ok(_) => Held::Closed,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Held::Open,
        Err(_) => Held::Closed,
    }
}

fn slow(args: &Args) -> anyhow::Result<()> {
    let limit = open_file_limit().unwrap_or(1024);
    let count = args.slow_connections.min(limit.saturating_sub(64)).max(1);
    let server = start(args, &[])?;
    let idle = memory_mib(server.pid(), "VmRSS");
    let mut conns = Vec::with_capacity(count);
    let mut connect_errors = 0;
    for _ in 0..count {
        match TcpStream::connect_timeout(&server.addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                if s.write_all(b"POST /v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: applic")
                    .is_ok()
                {
                    conns.push(s);
                } else {
                    connect_errors += 1;
                }
            }
            Err(_) => connect_errors += 1,
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let refused = conns
        .iter_mut()
        .map(held_state)
        .filter(|h| *h == Held::Refused)
        .count();
    let during = client::get(server.addr, "/healthz").map_or_else(
        |e| format!("no answer ({})", e.kind()),
        |r| r.status.to_string(),
    );
    std::thread::sleep(Duration::from_secs(args.slow_hold_seconds));
    let states: Vec<Held> = conns.iter_mut().map(held_state).collect();
    let open = states.iter().filter(|h| **h == Held::Open).count();
    let closed = states.len() - open;
    let peak = memory_mib(server.pid(), "VmHWM");
    drop(conns);
    std::thread::sleep(Duration::from_millis(300));
    let after = client::get(server.addr, "/healthz").map_or(0, |r| r.status);
    println!(
        "## slow clients: {count} connections send half a request head and stop (open-file limit {limit})"
    );
    println!("connect errors:        {connect_errors}");
    println!("refused at once (503): {refused}");
    println!("closed within {} s:    {}", args.slow_hold_seconds, closed);
    println!("still open after {} s: {open}", args.slow_hold_seconds);
    println!("a new client meanwhile: {during}; after they left: {after}");
    if let Some(n) = server.metric("sd35_http_connections_refused_total") {
        println!("sd35_http_connections_refused_total: {n}");
    }
    println!(
        "server RSS:            idle {}, peak {}",
        mib(idle),
        mib(peak)
    );
    println!();
    Ok(())
}

/// SIGTERM once `requests` requests are admitted; what each got and how the process ended.
fn sigterm_run(
    args: &Args,
    flags: &[String],
    requests: usize,
    steps: u32,
) -> anyhow::Result<(Vec<Outcome>, String, f64)> {
    let mut server = start(args, flags)?;
    let addr = server.addr;
    let size = args.size;
    let clients: Vec<_> = (0..requests)
        .map(|i| {
            std::thread::spawn(move || {
                post(addr, &body(&format!("term {i}"), size, steps, i as u64))
            })
        })
        .collect();
    let admitted = Instant::now();
    while server.metric("sd35_queue_depth").unwrap_or(0.0) < requests as f64
        && admitted.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    server.sigterm()?;
    let mut out = Vec::new();
    for c in clients {
        out.push(c.join().map_err(|_| anyhow::anyhow!("a client panicked"))?);
    }
    let code = server.wait_exit(Duration::from_secs(300));
    Ok((out, code, t.elapsed().as_secs_f64()))
}

fn sigterm(args: &Args) -> anyhow::Result<()> {
    let lost = |o: &[Outcome]| o.iter().filter(|o| o.status == 0).count();
    let (out, code, secs) =
        sigterm_run(args, &["--queue-size".into(), "16".into()], 8, args.steps)?;
    println!(
        "## SIGTERM with 8 requests queued ({} px, {} steps), default drain (60 s)",
        args.size, args.steps
    );
    println!("answers:               {}", by_status(&out));
    println!("requests lost:         {}", lost(&out));
    println!("exit:                  {code} after {secs:.1} s");
    println!();
    let drain = args.short_drain_seconds;
    let flags = [
        "--queue-size".into(),
        "16".into(),
        "--drain-seconds".into(),
        drain.to_string(),
    ];
    let (out, code, secs) = sigterm_run(args, &flags, 10, 100)?;
    println!("## SIGTERM with 10 requests of 100 steps queued, --drain-seconds {drain}");
    println!("answers:               {}", by_status(&out));
    println!("requests lost:         {}", lost(&out));
    println!("exit:                  {code} after {secs:.1} s");
    println!();
    Ok(())
}

fn throughput(args: &Args) -> anyhow::Result<()> {
    println!(
        "## throughput: {} clients × {} requests, {}x{} px, {} steps, queue {}",
        args.clients, args.requests, args.size, args.size, args.steps, args.queue_size
    );
    println!(
        "| max batch | images/s | p50 s | p95 s | p99 s | 429 rate | errors | mean batch | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &batch in &args.batch_sizes {
        let server = start(
            args,
            &[
                "--queue-size".into(),
                args.queue_size.to_string(),
                "--max-batch-size".into(),
                batch.to_string(),
            ],
        )?;
        let addr = server.addr;
        let started = Instant::now();
        let workers: Vec<_> = (0..args.clients)
            .map(|c| {
                let (n, size, steps) = (args.requests, args.size, args.steps);
                std::thread::spawn(move || {
                    (0..n)
                        .map(|r| {
                            let o = post(
                                addr,
                                &body(&format!("{c} {r}"), size, steps, (c * 1000 + r) as u64),
                            );
                            if o.status == 429 {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            o
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.join().map_err(|_| anyhow::anyhow!("a client panicked"))?);
        }
        let seconds = started.elapsed().as_secs_f64();
        let sum = server.metric("sd35_batch_size_sum").unwrap_or(0.0);
        let count = server.metric("sd35_batch_size_count").unwrap_or(0.0);
        let mut ok: Vec<f64> = all
            .iter()
            .filter(|o| o.status == 200)
            .map(|o| o.seconds)
            .collect();
        ok.sort_by(f64::total_cmp);
        let busy = all.iter().filter(|o| o.status == 429).count();
        println!(
            "| {batch} | {:.2} | {:.3} | {:.3} | {:.3} | {:.1} % | {} | {:.2} | {} |",
            ok.len() as f64 / seconds,
            percentile(&ok, 0.50),
            percentile(&ok, 0.95),
            percentile(&ok, 0.99),
            100.0 * busy as f64 / all.len().max(1) as f64,
            all.len() - ok.len() - busy,
            if count > 0.0 { sum / count } else { 0.0 },
            memory_mib(server.pid(), "VmHWM")
                .map_or_else(|| "n/a".to_owned(), |m| format!("{m:.0}")),
        );
    }
    println!();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "sd35-loadcheck: {} serving {}",
        args.server.display(),
        args.model.display()
    );
    println!();
    for phase in &args.phases {
        match phase {
            Phase::Overload => overload(&args)?,
            Phase::Slow => slow(&args)?,
            Phase::Sigterm => sigterm(&args)?,
            Phase::Throughput => throughput(&args)?,
        }
    }
    Ok(())
}
