//! One cluster per test binary, started on first use and shared by all its tests.
//!
//! Tests run on many threads, each `#[tokio::test]` with a runtime of its own: the first
//! caller starts the cluster (the others block until it is up), and each test builds its own
//! clients with [`Cluster::client`]. A failed start is remembered, so every test fails with
//! the same message instead of starting another cluster. The cluster lives until the test
//! binary exits; its processes die with it and its state directory is then removed (and, for
//! a cluster with a real node, the host restored).

use std::io::Write;
use std::sync::OnceLock;

use crate::cluster::{Cluster, ClusterOptions};
use crate::node::{self, Images};

/// The cluster shared by the tests of this binary, with the default options.
///
/// # Panics
/// If the cluster cannot start; the message says why.
pub fn shared_cluster() -> &'static Cluster {
    static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
    let started = SHARED.get_or_init(|| {
        Cluster::start(ClusterOptions::default()).map_err(|error| format!("{error:#}"))
    });
    match started {
        Ok(cluster) => cluster,
        Err(message) => panic!("the shared test cluster did not start: {message}"),
    }
}

/// The cluster with a real node shared by the tests of this binary, or `None` (after saying
/// why on stderr) where this machine cannot run a real node — only a non-root user; under
/// `CI=true` that is a failure instead, so CI never skips these tests.
///
/// # Panics
/// If the cluster cannot start (the images missing, say: `make images`), or under `CI=true`
/// on a machine that cannot run a real node.
pub fn shared_real_node_cluster() -> Option<&'static Cluster> {
    static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
    if skip_without_real_node() {
        return None;
    }
    let started = SHARED.get_or_init(|| {
        let start = || {
            Cluster::start(ClusterOptions {
                gpu_nodes: 1,
                real_node: Some(Images::locate()?),
                ..ClusterOptions::default()
            })
        };
        start().map_err(|error: anyhow::Error| format!("{error:#}"))
    });
    match started {
        Ok(cluster) => Some(cluster),
        Err(message) => panic!("the shared real-node cluster did not start: {message}"),
    }
}

/// Whether a real-node test must skip on this machine (it cannot run a real node: not root);
/// says why on stderr.
///
/// # Panics
/// Under `CI=true` instead of skipping, so CI never skips the real-node tests.
pub fn skip_without_real_node() -> bool {
    let Some(reason) = node::unsupported_reason() else {
        return false;
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true, and the real-node tests cannot run here: {reason}"
    );
    let _ = writeln!(
        std::io::stderr(),
        "sd35-e2e: skipping a real-node test: {reason}"
    );
    true
}
