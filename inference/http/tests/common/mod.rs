//! The server running in the test process with the fake backend, on loopback.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sd35_http::backend::{Backend, FakeBackend};
use sd35_http::client::{self, metric};
use sd35_http::{ServeConfig, server};

/// `serve` with the fake backend and `flags`, in this process on loopback, until dropped (or
/// [`TestServer::shutdown`]).
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    /// The batch sizes the fake backend saw, in order.
    pub batches: Arc<Mutex<Vec<usize>>>,
}

impl TestServer {
    /// The fake backend with steps of `step_ms`.
    pub fn start(step_ms: u64, flags: &[&str]) -> Self {
        Self::start_fake(FakeBackend::new(Duration::from_millis(step_ms)), flags)
    }

    /// `fake` as the backend.
    pub fn start_fake(fake: FakeBackend, flags: &[&str]) -> Self {
        let mut argv = vec!["serve", "--model", "unused", "--host", "127.0.0.1"];
        argv.extend_from_slice(flags);
        let config = ServeConfig::try_parse_from(argv).expect("flags parse");
        let batches = fake.batches.clone();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                addr_tx.send(listener.local_addr()?)?;
                let load = Box::new(move || Ok(Box::new(fake) as Box<dyn Backend>));
                server::serve(config, load, listener, async {
                    let _ = stop_rx.await;
                })
                .await
            })
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server listens");
        let s = Self {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
            batches,
        };
        wait_until("ready", || {
            client::get(s.addr, "/readyz").is_ok_and(|r| r.status == 200)
        });
        s
    }

    pub fn metric(&self, name: &str) -> f64 {
        let text = client::get(self.addr, "/metrics").expect("metrics").text();
        metric(&text, name).unwrap_or(0.0)
    }

    pub fn post(&self, path: &str, body: &str) -> client::Response {
        client::post_json(self.addr, path, body).expect("request")
    }

    /// Begins shutdown and waits for `serve` to return.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("server thread")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls `cond` until it holds (a generous limit; no test asserts on time).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}

/// The server-sent events of a body: (event name, data as JSON).
pub fn events(body: &[u8]) -> Vec<(String, serde_json::Value)> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            (name, serde_json::from_str(&data).unwrap_or_default())
        })
        .collect()
}
