//! The fake GPU nodes: Node objects that kwok adopts and keeps Ready, each advertising
//! eight H100s through the labels GPU feature discovery would set (product, count and
//! memory) and the
//! `nvidia.com/gpu` extended resource, so the scheduler places GPU pods exactly as on a
//! real GPU cluster.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;

use crate::components::KWOK_NODE_ANNOTATION;

/// The extended resource each fake node offers.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// The `nvidia.com/gpu.product` label of each fake node.
pub const GPU_PRODUCT: &str = "NVIDIA-H100-80GB-HBM3";
/// How many GPUs each fake node has.
pub const GPUS_PER_NODE: u32 = 8;
/// The `nvidia.com/gpu.memory` label of each fake node: one H100 80GB HBM3's memory in MiB,
/// as GPU feature discovery reports it.
pub const GPU_MEMORY_MIB: u32 = 81559;

/// The name of the fake node with this index.
pub fn gpu_node_name(index: usize) -> String {
    format!("kwok-gpu-{index}")
}

/// The Node object of one fake GPU node.
pub(crate) fn gpu_node(name: &str) -> Node {
    let (annotation_key, annotation_value) = KWOK_NODE_ANNOTATION;
    let labels = [
        ("type", "kwok"),
        ("kubernetes.io/hostname", name),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
        ("nvidia.com/gpu.present", "true"),
        ("nvidia.com/gpu.product", GPU_PRODUCT),
        ("nvidia.com/gpu.count", &GPUS_PER_NODE.to_string()),
        ("nvidia.com/gpu.memory", &GPU_MEMORY_MIB.to_string()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .collect();
    let resources: BTreeMap<String, Quantity> = [
        ("cpu", "64".to_owned()),
        ("memory", "512Gi".to_owned()),
        ("pods", "110".to_owned()),
        (GPU_RESOURCE, GPUS_PER_NODE.to_string()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), Quantity(value)))
    .collect();
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some(BTreeMap::from([(
                annotation_key.to_owned(),
                annotation_value.to_owned(),
            )])),
            labels: Some(labels),
            ..Default::default()
        },
        spec: None,
        status: Some(NodeStatus {
            capacity: Some(resources.clone()),
            allocatable: Some(resources),
            ..Default::default()
        }),
    }
}

/// Creates `count` fake GPU nodes and returns their names.
pub(crate) async fn create_gpu_nodes(client: &kube::Client, count: usize) -> Result<Vec<String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut names = Vec::with_capacity(count);
    for index in 0..count {
        let name = gpu_node_name(index);
        nodes
            .create(&PostParams::default(), &gpu_node(&name))
            .await
            .with_context(|| format!("creating node {name}"))?;
        names.push(name);
    }
    Ok(names)
}

/// Whether the node reports the Ready condition as True.
pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|condition| condition.type_ == "Ready" && condition.status == "True")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_node_offers_eight_gpus_to_kwok() {
        let node = gpu_node("kwok-gpu-0");
        let annotations = node.metadata.annotations.unwrap();
        assert_eq!(annotations["kwok.x-k8s.io/node"], "fake");
        let labels = node.metadata.labels.unwrap();
        assert_eq!(labels["nvidia.com/gpu.product"], GPU_PRODUCT);
        assert_eq!(labels["nvidia.com/gpu.count"], "8");
        assert_eq!(labels["nvidia.com/gpu.memory"], "81559");
        let status = node.status.unwrap();
        assert_eq!(status.allocatable.unwrap()[GPU_RESOURCE].0, "8");
        assert_eq!(status.capacity.unwrap()["memory"].0, "512Gi");
    }

    #[test]
    fn a_node_without_conditions_is_not_ready() {
        assert!(!is_ready(&gpu_node("n")));
    }
}
