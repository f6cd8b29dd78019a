//! The status step: the GPUs the serving pods get (and whether one holds the memory plan), the status written when it changed (one
//! server-side apply under the operator's field manager), and the reconcile's one event.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use sd35_crds::{SD35Deployment, SD35DeploymentStatus};
use serde_json::json;
use tracing::warn;

use crate::controller::context::{ChildStores, Context};
use crate::gpu::{GpuReport, NodeGpu, Workload, matches_selector, report};
use crate::index::namespaced;
use crate::labels::MANAGER;
use crate::resolve::Resolved;
use crate::status::{self, Note};

/// The GPUs the serving pods of `resolved` get: those of the nodes they run on, else of the
/// GPU nodes their nodeSelector admits. `None` when they request no GPU.
pub(super) fn gpu_report(children: &ChildStores, resolved: &Resolved) -> Option<GpuReport> {
    if resolved.spec.server.gpu.count == 0 {
        return None;
    }
    let resource = &resolved.spec.server.gpu.resource_name;
    let node_gpu = |node: &PartialObjectMeta<Node>| {
        NodeGpu::of_labels(
            node.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
            resource,
        )
    };
    let scheduled: Vec<NodeGpu> = children
        .pods_by_instance
        .get(&namespaced(&resolved.namespace, &resolved.name))
        .iter()
        .filter_map(|p| children.pods.get(p))
        .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
        .filter_map(|n| children.nodes.get(&ObjectRef::new(&n)))
        .filter_map(|n| node_gpu(&n))
        .collect();
    let gpus = if scheduled.is_empty() {
        let selector = &resolved.spec.scheduling.node_selector;
        children
            .nodes
            .state()
            .iter()
            .filter(|n| {
                matches_selector(
                    n.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
                    selector,
                )
            })
            .filter_map(|n| node_gpu(n))
            .collect()
    } else {
        scheduled
    };
    Some(report(&Workload::of(resolved), resource, &gpus))
}

async fn publish(ctx: &Context, obj: &SD35Deployment, note: Note) {
    if let Err(e) = ctx.recorder.publish(&note, &obj.object_ref(&())).await {
        warn!(error = %e, reason = %note.reason, "could not publish event");
    }
}

/// Writes the status if it changed, and publishes this reconcile's one event: its actions
/// and the condition transitions worth telling.
pub(super) async fn write_status(
    ctx: &Context,
    obj: &SD35Deployment,
    namespace: &str,
    status: SD35DeploymentStatus,
    actions: Vec<Note>,
) -> kube::Result<()> {
    let previous = obj.status.as_ref();
    ctx.metrics.set_phase(
        &format!("{namespace}/{}", obj.name_any()),
        status
            .phase
            .map(|p| {
                serde_json::to_value(p)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            })
            .as_deref(),
    );
    let event = status::event(&actions, previous, &status);
    if previous != Some(&status) {
        let api: Api<SD35Deployment> = Api::namespaced(ctx.client.clone(), namespace);
        let patch =
            json!({"apiVersion": "sd35.io/v1alpha1", "kind": "SD35Deployment", "status": status});
        api.patch_status(
            &obj.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    // After the status: what a watcher of the object waits for is not held up by the event.
    if let Some(note) = event {
        publish(ctx, obj, note).await;
    }
    Ok(())
}
