//! What the serving pods' GPUs are and which precision path a deployment gets on them, from the
//! nodes' GPU feature discovery labels (pure; the nodes come from a metadata-only watch).
//!
//! The nodes looked at are those the serving pods run on; before any is scheduled, the nodes
//! with GPU labels that match `spec.scheduling.nodeSelector`. Nothing is refused: the
//! `GPUCompatible` condition says what the deployment gets, and is False only where the
//! server's CUDA build cannot run (a GPU older than compute capability 8.0). It never holds up
//! `Ready`.

use std::collections::BTreeMap;

use sd35_contract::{
    ComputeCapability, Fp8Path, GPU_COMPUTE_MAJOR_LABEL, GPU_COMPUTE_MINOR_LABEL,
    GPU_PRODUCT_LABEL, GpuFit,
};
use sd35_crds::Precision;

/// One node's GPU as its labels describe it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeGpu {
    /// `nvidia.com/gpu.product`, when set.
    pub product: Option<String>,
    /// From the compute labels, else the product table; `None` when neither says.
    pub capability: Option<ComputeCapability>,
}

impl NodeGpu {
    /// The GPU of a node with these labels; `None` for a node without GPU labels.
    pub fn of_labels(labels: &BTreeMap<String, String>) -> Option<Self> {
        let product = labels.get(GPU_PRODUCT_LABEL).cloned();
        let has_compute = labels.contains_key(GPU_COMPUTE_MAJOR_LABEL)
            || labels.contains_key(GPU_COMPUTE_MINOR_LABEL);
        if product.is_none() && !has_compute {
            return None;
        }
        Some(NodeGpu {
            product,
            capability: ComputeCapability::of_node_labels(labels),
        })
    }

    fn describe(&self) -> String {
        let product = self
            .product
            .as_deref()
            .unwrap_or("a GPU without a product label");
        match self.capability {
            Some(cc) => format!("{product} (compute capability {cc})"),
            None => format!("{product} (compute capability unknown)"),
        }
    }
}

/// The `GPUCompatible` condition's status, reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuReport {
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// Whether a node's labels match a nodeSelector (every key present with the same value).
pub fn matches_selector(
    labels: &BTreeMap<String, String>,
    selector: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The report for a deployment of `precision` whose pods run on (or may go to) these GPUs.
pub fn report(precision: Precision, gpus: &[NodeGpu]) -> GpuReport {
    let mut gpus: Vec<NodeGpu> = gpus.to_vec();
    gpus.sort();
    gpus.dedup();
    if gpus.is_empty() {
        return GpuReport {
            status: "Unknown",
            reason: "NoGPULabels",
            message: format!(
                "no node the serving pods run on or may be scheduled to has GPU feature discovery \
                 labels ({GPU_PRODUCT_LABEL}, {GPU_COMPUTE_MAJOR_LABEL}, \
                 {GPU_COMPUTE_MINOR_LABEL}); each server reports its GPU and FP8 path in /v1/models"
            ),
        };
    }
    let too_old: Vec<String> = gpus
        .iter()
        .filter(|g| g.capability.map(GpuFit::of) == Some(GpuFit::TooOld))
        .map(NodeGpu::describe)
        .collect();
    if !too_old.is_empty() {
        return GpuReport {
            status: "False",
            reason: "ComputeCapabilityTooLow",
            message: format!(
                "{} is older than compute capability {}, the oldest the server's CUDA build runs \
                 on: schedule the serving pods onto Ampere or newer GPUs with \
                 spec.scheduling.nodeSelector (for example {GPU_PRODUCT_LABEL}: \
                 NVIDIA-H100-80GB-HBM3)",
                too_old.join(", "),
                ComputeCapability::CUDA_BUILD_MIN
            ),
        };
    }
    let unknown: Vec<String> = gpus
        .iter()
        .filter(|g| g.capability.is_none())
        .map(NodeGpu::describe)
        .collect();
    if !unknown.is_empty() {
        return GpuReport {
            status: "Unknown",
            reason: "ComputeCapabilityUnknown",
            message: format!(
                "{}: neither {GPU_COMPUTE_MAJOR_LABEL}/{GPU_COMPUTE_MINOR_LABEL} labels nor a \
                 known product; each server reports its GPU and FP8 path in /v1/models",
                unknown.join(", ")
            ),
        };
    }
    let on = gpus
        .iter()
        .map(NodeGpu::describe)
        .collect::<Vec<_>>()
        .join(", ");
    match precision {
        Precision::Fp8 => {
            // The path every node gets: the served one where the GPU has it, else weight-only.
            let fits = gpus
                .iter()
                .filter_map(|g| g.capability.map(GpuFit::of))
                .collect::<Vec<_>>();
            let tensor_cores = fits.iter().all(|f| {
                matches!(
                    f,
                    GpuFit::Runs {
                        served: Fp8Path::TensorCore,
                        capable: Fp8Path::TensorCore
                    }
                )
            });
            let capable = fits.iter().all(|f| {
                matches!(
                    f,
                    GpuFit::Runs {
                        capable: Fp8Path::TensorCore,
                        ..
                    }
                )
            });
            if tensor_cores {
                GpuReport {
                    status: "True",
                    reason: "FP8TensorCores",
                    message: format!("fp8 on {on}: {}", Fp8Path::TensorCore.describe()),
                }
            } else {
                let note = if capable {
                    "; these GPUs have FP8 tensor cores, which this server build does not use yet"
                } else {
                    "; these GPUs have no FP8 tensor cores (compute capability 8.9 or later has them)"
                };
                GpuReport {
                    status: "True",
                    reason: "FP8WeightOnly",
                    message: format!("fp8 on {on}: {}{note}", Fp8Path::WeightOnly.describe()),
                }
            }
        }
        other => GpuReport {
            status: "True",
            reason: "Supported",
            message: format!("{} on {on}", other.as_str()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn gpu(product: &str) -> NodeGpu {
        NodeGpu::of_labels(&labels(&[(GPU_PRODUCT_LABEL, product)])).unwrap()
    }

    #[test]
    fn nodes_without_gpu_labels_have_no_gpu() {
        assert_eq!(
            NodeGpu::of_labels(&labels(&[("kubernetes.io/os", "linux")])),
            None
        );
        let g = NodeGpu::of_labels(&labels(&[
            (GPU_COMPUTE_MAJOR_LABEL, "8"),
            (GPU_COMPUTE_MINOR_LABEL, "9"),
        ]))
        .unwrap();
        assert_eq!(g.capability, Some(ComputeCapability { major: 8, minor: 9 }));
    }

    #[test]
    fn fp8_on_hopper_is_weight_only_and_says_the_tensor_cores_are_unused() {
        let r = report(Precision::Fp8, &[gpu("NVIDIA-H100-80GB-HBM3")]);
        assert_eq!((r.status, r.reason), ("True", "FP8WeightOnly"));
        assert!(
            r.message
                .starts_with("fp8 on NVIDIA-H100-80GB-HBM3 (compute capability 9.0): weight-only"),
            "{}",
            r.message
        );
        assert!(r.message.contains("have FP8 tensor cores"), "{}", r.message);
    }

    #[test]
    fn fp8_on_ampere_is_weight_only_without_tensor_cores() {
        let r = report(Precision::Fp8, &[gpu("NVIDIA-A100-SXM4-80GB")]);
        assert_eq!((r.status, r.reason), ("True", "FP8WeightOnly"));
        assert!(
            r.message.contains("compute capability 8.0"),
            "{}",
            r.message
        );
        assert!(r.message.contains("no FP8 tensor cores"), "{}", r.message);
    }

    #[test]
    fn bf16_names_the_gpus_once_each() {
        let h100 = gpu("NVIDIA-H100-80GB-HBM3");
        let r = report(Precision::Bf16, &[h100.clone(), h100, gpu("NVIDIA-L40S")]);
        assert_eq!((r.status, r.reason), ("True", "Supported"));
        assert_eq!(
            r.message,
            "bf16 on NVIDIA-H100-80GB-HBM3 (compute capability 9.0), NVIDIA-L40S (compute capability 8.9)"
        );
    }

    #[test]
    fn a_gpu_older_than_ampere_is_false_and_names_the_fix() {
        let r = report(
            Precision::Bf16,
            &[gpu("NVIDIA-H100-80GB-HBM3"), gpu("Tesla-T4")],
        );
        assert_eq!((r.status, r.reason), ("False", "ComputeCapabilityTooLow"));
        assert!(
            r.message.starts_with(
                "Tesla-T4 (compute capability 7.5) is older than compute capability 8.0"
            ),
            "{}",
            r.message
        );
        assert!(r.message.contains("spec.scheduling.nodeSelector"));
    }

    #[test]
    fn an_unknown_product_or_no_labels_is_unknown() {
        let r = report(Precision::Fp8, &[gpu("Vendor-X-9000")]);
        assert_eq!(
            (r.status, r.reason),
            ("Unknown", "ComputeCapabilityUnknown")
        );
        assert!(
            r.message
                .starts_with("Vendor-X-9000 (compute capability unknown)")
        );
        let r = report(Precision::Fp8, &[]);
        assert_eq!((r.status, r.reason), ("Unknown", "NoGPULabels"));
    }

    #[test]
    fn selectors_match_on_every_key() {
        let node = labels(&[(GPU_PRODUCT_LABEL, "NVIDIA-L4"), ("zone", "a")]);
        assert!(matches_selector(&node, &BTreeMap::new()));
        assert!(matches_selector(&node, &labels(&[("zone", "a")])));
        assert!(!matches_selector(
            &node,
            &labels(&[("zone", "a"), ("pool", "x")])
        ));
        assert!(!matches_selector(&node, &labels(&[("zone", "b")])));
    }
}
