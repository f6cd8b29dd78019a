//! Brings a freshly started control plane to the state tests rely on: the API server
//! reports `/readyz`, the controller-manager works (it created the `default`
//! ServiceAccount), the default StorageClass exists, and the fake GPU nodes are Ready.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::Api;

use crate::nodes;
use crate::storage;
use crate::wait::{Probe, poll_while_healthy};

/// How long each start-up milestone may take; start-up as a whole takes far less.
const MILESTONE_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the API server reports `/readyz`; `healthy` fails once a process has died.
pub(crate) async fn wait_api_ready(
    client: &kube::Client,
    healthy: &(dyn Fn() -> Result<()> + Sync),
) -> Result<()> {
    poll_while_healthy(
        "the API server's /readyz",
        MILESTONE_TIMEOUT,
        healthy,
        || readyz(client),
    )
    .await
}

/// Creates the StorageClass and the GPU nodes and waits for the controller-manager and
/// kwok to do their part; returns the node names.
pub(crate) async fn populate(
    client: &kube::Client,
    gpu_nodes: usize,
    healthy: &(dyn Fn() -> Result<()> + Sync),
) -> Result<Vec<String>> {
    storage::create_default_storage_class(client).await?;
    let names = nodes::create_gpu_nodes(client, gpu_nodes).await?;
    let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    poll_while_healthy(
        "the controller-manager to create the default ServiceAccount",
        MILESTONE_TIMEOUT,
        healthy,
        || async {
            Ok(match service_accounts.get_opt("default").await? {
                Some(_) => Probe::Ready(()),
                None => Probe::Pending("not created yet".into()),
            })
        },
    )
    .await?;
    let nodes_api: Api<Node> = Api::all(client.clone());
    for name in &names {
        poll_while_healthy(
            &format!("kwok to make node {name} Ready"),
            MILESTONE_TIMEOUT,
            healthy,
            || async {
                let node = nodes_api.get(name).await?;
                Ok(if nodes::is_ready(&node) {
                    Probe::Ready(())
                } else {
                    Probe::Pending("Ready condition not True".into())
                })
            },
        )
        .await?;
    }
    Ok(names)
}

async fn readyz(client: &kube::Client) -> Result<Probe<()>> {
    let request = http::Request::get("/readyz").body(Vec::new())?;
    let body = client.request_text(request).await?;
    Ok(if body.trim() == "ok" {
        Probe::Ready(())
    } else {
        Probe::Pending(body)
    })
}
