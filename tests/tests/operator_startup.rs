#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

//! Operator start-up on a cluster without the CRD: it refuses to run, says how to install the
//! CRD, and exits non-zero instead of watching nothing. Its own cluster, since the shared one
//! has the CRD installed.

use std::time::{Duration, Instant};

use sd35_e2e::{Cluster, ClusterOptions, OperatorProcess};

#[tokio::test]
async fn without_the_crd_the_operator_exits_with_a_hint() {
    let cluster = Cluster::start(ClusterOptions {
        gpu_nodes: 0,
        ..Default::default()
    })
    .expect("start a cluster");
    let ns = cluster.temp_namespace("nocrd").await;
    let mut operator =
        OperatorProcess::start(&cluster, ns.name(), &[]).expect("start the operator");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = operator.try_status() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the operator kept running without its CRD:\n{}",
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(2), "log:\n{}", operator.log());
    let log = operator.log();
    assert!(
        log.contains("CRD (sd35deployments.sd35.io) is not installed"),
        "{log}"
    );
    assert!(log.contains("kubectl apply -f crds/"), "{log}");
}
