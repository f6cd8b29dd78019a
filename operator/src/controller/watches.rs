//! The watches that feed the controller: each one a stream of changed objects for the
//! controller's triggers and a cache (and, where asked, an index) for the reconciler.
//!
//! Guarantee: managedFields, and every field the reconciler never reads, are dropped before
//! an object is cached; an index sees each event before its store, so an object that triggers
//! a reconcile can be found by key.

use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{ContainerStatus, Node, PodSpec, PodStatus};
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use super::context::Owned;
use crate::index::{self, Index};
use crate::labels;

/// A kind that can be watched and cached.
pub trait Watched:
    Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// A namespaced API of `K`: in `namespace`, or in all namespaces.
pub fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Selects the operator's children by its label.
pub fn ours() -> watcher::Config {
    watcher::Config::default().labels(&format!("{}={}", labels::MANAGED_BY, labels::MANAGER))
}

/// Selects the operator's pods: serving pods (their exit codes say why a server could not
/// start) and the pods of fetch, adapter fetch and build Jobs (their termination messages say
/// why an attempt failed).
pub fn our_pods() -> watcher::Config {
    watcher::Config::default().labels(&format!(
        "{}={},{} in ({},{},{},{})",
        labels::MANAGED_BY,
        labels::MANAGER,
        labels::NAME,
        labels::SERVER_NAME,
        labels::FETCH_NAME,
        labels::BUILD_NAME,
        labels::ADAPTER_NAME
    ))
}

/// One watch of `K`: the store the reconciler reads and the stream of touched objects for
/// the controller. `trim` drops what is never read; the `indexes` are fed first.
pub fn cached<K>(
    api: Api<K>,
    config: watcher::Config,
    indexes: Vec<Index<K>>,
    trim: fn(&mut K),
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Watched,
{
    let (store, writer) = reflector::store();
    // managedFields (and what `trim` drops) are never read; dropping them keeps the caches
    // small. The indexes see each event before the store, so an object that triggers a
    // reconcile is indexed.
    let events = watcher(api, config)
        .default_backoff()
        .modify(move |o| {
            o.managed_fields_mut().clear();
            trim(o);
        })
        .inspect_ok(move |event| {
            for index in &indexes {
                index.apply_watcher_event(event);
            }
        });
    let stream = reflector(writer, events).touched_objects();
    (store, stream)
}

/// One watch of a kind of controlled child, with its index by controller UID (for the sweep).
pub fn owned<K>(
    api: Api<K>,
) -> (
    Owned<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Watched,
{
    let by_owner = Index::new(index::controller_uid::<K>);
    let (store, stream) = cached(api, ours(), vec![by_owner.clone()], |_| {});
    (Owned { store, by_owner }, stream)
}

/// Of a pod only what the reconciler reads: its labels, the node it runs on (which GPU it
/// got), and how each container ran and ended (why a server could not start, why a Job's
/// attempt failed).
pub fn trim_pod(p: &mut k8s_openapi::api::core::v1::Pod) {
    p.annotations_mut().clear();
    p.spec = p.spec.take().map(|s| PodSpec {
        node_name: s.node_name,
        ..PodSpec::default()
    });
    p.status = p.status.take().map(|s| PodStatus {
        container_statuses: s.container_statuses.map(|statuses| {
            statuses
                .into_iter()
                .map(|c| ContainerStatus {
                    name: c.name,
                    state: c.state,
                    last_state: c.last_state,
                    ..ContainerStatus::default()
                })
                .collect()
        }),
        ..PodStatus::default()
    });
}

/// Nodes, metadata only (their labels say which GPU they have), watched in a task of their
/// own: read when a status is computed, never a trigger, so a relabelled node shows at the
/// next reconcile.
pub fn nodes(client: &Client) -> Store<PartialObjectMeta<Node>> {
    let (nodes, writer) = reflector::store();
    let events = reflector(
        writer,
        watcher(
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|n| {
            n.managed_fields_mut().clear();
            n.annotations_mut().clear();
        }),
    );
    tokio::spawn(events.for_each(|event| async move {
        if let Err(e) = event {
            warn!(error = %e, "watching nodes (for their GPU labels)");
        }
    }));
    nodes
}

/// Returns once the ServiceMonitor CRD is served, checking at once and then every minute.
pub async fn wait_for_service_monitor_crd(client: &Client) {
    loop {
        match client
            .list_api_group_resources("monitoring.coreos.com/v1")
            .await
        {
            Ok(list) if list.resources.iter().any(|r| r.name == "servicemonitors") => {
                info!("the ServiceMonitor CRD is installed: ServiceMonitors are managed");
                return;
            }
            Ok(_) | Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}
