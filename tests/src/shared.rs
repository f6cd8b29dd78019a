//! One cluster per test binary, started on first use and shared by all its tests.
//!
//! Tests run on many threads, each `#[tokio::test]` with a runtime of its own: the first
//! caller starts the cluster (the others block until it is up), and each test builds its own
//! clients with [`Cluster::client`]. A failed start is remembered, so every test fails with
//! the same message instead of starting another cluster. The cluster lives until the test
//! binary exits; its processes die with it and its state directory is then removed.

use std::sync::OnceLock;

use crate::cluster::{Cluster, ClusterOptions};

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
