//! Bounded polling: the only way this crate waits for a cluster to reach a state.
//!
//! A probe is retried every [`POLL_INTERVAL`] until it yields a value or the timeout passes;
//! the timeout error names what was awaited and the last thing the probe reported, so a
//! failed wait says why.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How long to wait between two probes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What one probe found.
#[derive(Debug)]
pub enum Probe<T> {
    /// The state was reached.
    Ready(T),
    /// Not yet, and why (shown if the wait times out).
    Pending(String),
}

/// Polls `probe` until it is [`Probe::Ready`]; an `Err` from the probe counts as pending.
///
/// Fails after `timeout` with `what` and the last pending reason.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Probe<T>>>,
{
    poll_while_healthy(what, timeout, || Ok(()), probe).await
}

/// Like [`poll_until`], and fails at once when `healthy` fails (e.g. a process died).
pub(crate) async fn poll_while_healthy<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut healthy: impl FnMut() -> Result<()>,
    mut probe: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Probe<T>>>,
{
    let started = Instant::now();
    loop {
        healthy()?;
        let last = match probe().await {
            Ok(Probe::Ready(value)) => return Ok(value),
            Ok(Probe::Pending(reason)) => reason,
            Err(error) => format!("{error:#}"),
        };
        if started.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Runs `future` to completion on a fresh single-threaded runtime in a scoped thread, so it
/// works whether or not the caller is already inside a tokio runtime.
pub(crate) fn block_on<F>(future: F) -> Result<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<F::Output> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(runtime.block_on(future))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the cluster start-up thread panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_value_is_returned() {
        let mut calls = 0;
        let value = poll_until("third call", Duration::from_secs(5), || {
            calls += 1;
            let done = calls == 3;
            async move {
                Ok(if done {
                    Probe::Ready(7)
                } else {
                    Probe::Pending("not yet".into())
                })
            }
        })
        .await
        .unwrap();
        assert_eq!(value, 7);
    }

    #[tokio::test]
    async fn timeout_names_the_last_reason() {
        let error = poll_until::<(), _, _>("never", Duration::from_millis(300), || async {
            Ok(Probe::Pending("still pending".into()))
        })
        .await
        .unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("never") && message.contains("still pending"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn unhealthy_fails_at_once() {
        let error = poll_while_healthy::<(), _, _>(
            "anything",
            Duration::from_secs(30),
            || anyhow::bail!("etcd exited"),
            || async { Ok(Probe::Pending(String::new())) },
        )
        .await
        .unwrap_err();
        assert_eq!(error.to_string(), "etcd exited");
    }

    #[test]
    fn block_on_works_inside_a_runtime() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let value = runtime.block_on(async { block_on(async { 5 }).unwrap() });
        assert_eq!(value, 5);
    }
}
