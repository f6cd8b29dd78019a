//! The HTTP/1.1 connection loop (hyper), in place of `axum::serve`, which exposes no timeouts.
//!
//! Guarantees:
//! - a client has `header_read_timeout` to send each request head, counted from the
//!   connection's start or the end of the previous response; then the connection is closed
//!   (slowloris holds nothing for long);
//! - at most `max_reading` connections are being read at once (sending a head, or idle between
//!   requests). A connection accepted beyond that is answered 503 with the JSON error body and
//!   closed, and counted in `sd35_http_connections_refused_total`; a response that finds no
//!   room left to wait for the next request says `Connection: close`;
//! - on shutdown the listener closes at once and the connections are handed to the caller's
//!   [`GracefulShutdown`], which closes idle ones and lets running requests finish.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// Limits of the connection loop.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLimits {
    /// Time to send a request head.
    pub header_read_timeout: Duration,
    /// Connections being read at once.
    pub max_reading: usize,
}

/// The answer to a connection beyond the cap, written without reading anything.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 97\r\n\
\r\n\
{\"error\":{\"message\":\"too many connections are sending requests; retry in a second\",\"field\":null}}";

/// Refused connections being closed politely at once, at most.
const MAX_CLOSING: usize = 64;

/// One connection's place among the connections being read.
struct Reading {
    slots: Arc<Semaphore>,
    held: Mutex<Option<OwnedSemaphorePermit>>,
    metrics: Arc<Metrics>,
}

impl Reading {
    fn new(slots: Arc<Semaphore>, permit: OwnedSemaphorePermit, metrics: Arc<Metrics>) -> Self {
        metrics.connections_reading.inc();
        Self {
            slots,
            held: Mutex::new(Some(permit)),
            metrics,
        }
    }

    /// The request head arrived: the connection is no longer being read.
    fn release(&self) {
        if let Ok(mut held) = self.held.lock()
            && held.take().is_some()
        {
            self.metrics.connections_reading.dec();
        }
    }

    /// The response is ready and the connection will wait for the next request: whether there
    /// is room for it among the connections being read.
    fn reacquire(&self) -> bool {
        let Ok(mut held) = self.held.lock() else {
            return false;
        };
        if held.is_some() {
            return true;
        }
        match self.slots.clone().try_acquire_owned() {
            Ok(p) => {
                *held = Some(p);
                self.metrics.connections_reading.inc();
                true
            }
            Err(_) => false,
        }
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.release();
    }
}

/// Answers a connection beyond the cap with 503 and closes it: the answer and a FIN at once,
/// then what the client sent is read and dropped for a quarter second, so the close is not a reset that
/// could destroy the answer before the client reads it.
fn refuse(stream: TcpStream, closing: &Arc<Semaphore>) {
    let Ok(permit) = closing.clone().try_acquire_owned() else {
        // Too many being closed already: answer if the socket takes it, and drop.
        let _ = stream.try_write(REFUSED);
        return;
    };
    tokio::spawn(async move {
        let mut stream = stream;
        let mut sink = [0u8; 4096];
        let answer = async {
            stream.write_all(REFUSED).await?;
            stream.shutdown().await?;
            let mut total = 0usize;
            loop {
                let n = stream.read(&mut sink).await?;
                total += n;
                if n == 0 || total > 64 * 1024 {
                    return Ok::<_, std::io::Error>(());
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(250), answer).await;
        drop(permit);
    });
}

/// Accepts connections on `listener` and serves `app` on each until `shutdown` completes;
/// returns the watcher of the connections still open.
pub async fn accept_until(
    listener: TcpListener,
    app: Router,
    limits: EdgeLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_reading.max(1)));
    let closing = Arc::new(Semaphore::new(MAX_CLOSING));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            refuse(stream, &closing);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let reading = Arc::new(Reading::new(slots.clone(), permit, metrics.clone()));
        let tower = TowerToHyperService::new(app.clone());
        let service = {
            let reading = reading.clone();
            hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                reading.release();
                let call = hyper::service::Service::call(&tower, req);
                let reading = reading.clone();
                async move {
                    let mut resp = match call.await {
                        Ok(resp) => resp,
                        Err(never) => match never {},
                    };
                    if !reading.reacquire() {
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(resp)
                }
            })
        };
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                if e.is_timeout() {
                    metrics.header_read_timeouts.inc();
                }
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(reading);
        });
    }
    graceful
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_refusal_is_one_well_formed_response() {
        let text = std::str::from_utf8(super::REFUSED).unwrap_or("");
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or(("", ""));
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert_eq!(length, body.len());
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        assert!(json["error"]["message"].is_string(), "{body}");
    }
}
