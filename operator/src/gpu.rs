//! What the serving pods' GPUs are, which precision path a deployment gets on them, and
//! whether one of them holds it, from the nodes' GPU feature discovery labels and the memory
//! plan (pure; the nodes come from a metadata-only watch).
//!
//! The nodes looked at are those the serving pods run on; before any is scheduled, the nodes
//! with GPU labels that match `spec.scheduling.nodeSelector`. Nothing is refused: the
//! `GPUCompatible` condition says what the deployment gets, and is False only where the
//! server's CUDA build cannot run (a GPU older than compute capability 8.0) or where the
//! memory plan of the deployment's largest default request ([`Workload`]) exceeds one GPU's
//! memory (`nvidia.com/gpu.memory`). It never holds up `Ready`: the plan is arithmetic on the
//! published shapes, and the server itself refuses a request that does not fit its device.

use std::collections::BTreeMap;

use sd35_contract::plan::{self, MemoryPlan, PlanDevice, PlanRequest, gib};
use sd35_contract::{
    ComputeCapability, Fp8Path, GPU_COMPUTE_MAJOR_LABEL, GPU_COMPUTE_MINOR_LABEL,
    GPU_PRODUCT_LABEL, GpuFit, Variant, gpu_memory_bytes, gpu_memory_label,
};
use sd35_crds::Precision;

use crate::resolve::Resolved;

/// One node's GPU as its labels describe it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeGpu {
    /// `nvidia.com/gpu.product`, when set.
    pub product: Option<String>,
    /// From the compute labels, else the product table; `None` when neither says.
    pub capability: Option<ComputeCapability>,
    /// Memory of one GPU of the requested resource, in bytes, when a label says.
    pub memory_bytes: Option<u64>,
}

impl NodeGpu {
    /// The GPU of a node with these labels, for pods requesting `resource_name`; `None` for a
    /// node without GPU labels.
    pub fn of_labels(labels: &BTreeMap<String, String>, resource_name: &str) -> Option<Self> {
        let product = labels.get(GPU_PRODUCT_LABEL).cloned();
        let has_compute = labels.contains_key(GPU_COMPUTE_MAJOR_LABEL)
            || labels.contains_key(GPU_COMPUTE_MINOR_LABEL);
        let memory_bytes = gpu_memory_bytes(labels, resource_name);
        if product.is_none() && !has_compute && memory_bytes.is_none() {
            return None;
        }
        Some(NodeGpu {
            product,
            capability: ComputeCapability::of_node_labels(labels),
            memory_bytes,
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

/// What one serving pod asks of its GPU: the largest request its defaults let through, which
/// the memory plan is computed for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Workload {
    pub variant: Variant,
    pub precision: Precision,
    /// The default width (`spec.server.defaults.width`, else the model card's).
    pub width: u32,
    /// The default height (`spec.server.defaults.height`, else the model card's).
    pub height: u32,
    /// `spec.server.limits.maxBatchSize`: the most images sampled together.
    pub batch: u32,
    /// Whether the default guidance scale (the spec's, else the model card's) runs
    /// classifier-free guidance, which doubles the transformer's batch.
    pub guidance: bool,
    /// Whether T5-XXL is loaded (`spec.model.textEncoders.t5`).
    pub t5: bool,
    /// T5's sequence length (`spec.model.textEncoders.t5MaxTokens`).
    pub t5_tokens: u32,
}

impl Workload {
    /// The workload of a resolved spec.
    pub fn of(resolved: &Resolved) -> Self {
        let spec = &resolved.spec;
        let defaults = &spec.server.defaults;
        let side = |v: Option<i32>| {
            v.and_then(|v| u32::try_from(v).ok())
                .unwrap_or_else(|| resolved.variant.card_size())
        };
        let guidance = defaults
            .guidance_scale
            .unwrap_or_else(|| resolved.variant.card_guidance());
        Self {
            variant: resolved.variant,
            precision: resolved.precision.into(),
            width: side(defaults.width),
            height: side(defaults.height),
            batch: u32::try_from(spec.server.limits.max_batch_size)
                .unwrap_or(1)
                .max(1),
            guidance: guidance > 1.0,
            t5: spec.model.text_encoders.t5,
            t5_tokens: u32::try_from(spec.model.text_encoders.t5_max_tokens).unwrap_or(256),
        }
    }

    /// The memory plan of this workload on one GPU.
    pub fn plan(&self) -> MemoryPlan {
        let request = PlanRequest {
            width: self.width as usize,
            height: self.height as usize,
            batch: self.batch as usize,
            guidance: self.guidance,
            t5_tokens: self.t5_tokens as usize,
        };
        plan::published(
            self.variant,
            &request,
            &PlanDevice::cuda(self.precision),
            self.t5,
        )
    }

    fn describe(&self) -> String {
        format!(
            "{} {} at {}x{}, batch {}, {}, {}",
            self.variant,
            self.precision,
            self.width,
            self.height,
            self.batch,
            if self.guidance {
                "with guidance"
            } else {
                "without guidance"
            },
            if self.t5 { "with T5" } else { "without T5" }
        )
    }

    /// The changes of the spec that each lower the plan, with the workload each gives: fp8,
    /// T5 off, one image per batch, and the largest square default size (down to 256) that
    /// fits `memory` with nothing else changed.
    fn remedies(&self, memory: u64) -> Vec<(String, Workload)> {
        let mut out = Vec::new();
        if self.precision != Precision::Fp8 {
            out.push((
                "precision: fp8".to_owned(),
                Workload {
                    precision: Precision::Fp8,
                    ..*self
                },
            ));
        }
        if self.t5 {
            out.push((
                "model.textEncoders.t5: false".to_owned(),
                Workload { t5: false, ..*self },
            ));
        }
        if self.batch > 1 {
            out.push((
                "server.limits.maxBatchSize: 1".to_owned(),
                Workload { batch: 1, ..*self },
            ));
        }
        let largest = self.width.max(self.height);
        let square = |side: u32| Workload {
            width: side,
            height: side,
            ..*self
        };
        // Memory grows with the side: the largest multiple of 16 that fits, by bisection.
        let (mut lo, mut hi) = (256 / 16 - 1, largest / 16 - 1);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if square(mid * 16).plan().peak_bytes <= memory {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        if lo * 16 >= 256 {
            let side = lo * 16;
            out.push((
                format!("server.defaults width and height: {side} or less"),
                square(side),
            ));
        }
        out
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

/// The message of GPUs too small for `workload`'s plan: the figures, then what to change.
fn insufficient_memory(
    workload: &Workload,
    plan: &MemoryPlan,
    short: &[&NodeGpu],
    resource_name: &str,
) -> String {
    let memory = short
        .iter()
        .filter_map(|g| g.memory_bytes)
        .min()
        .unwrap_or(0);
    let gpus = short
        .iter()
        .map(|g| {
            format!(
                "{} with {}",
                g.product
                    .as_deref()
                    .unwrap_or("a GPU without a product label"),
                gib(g.memory_bytes.unwrap_or(0))
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let remedies = workload.remedies(memory);
    let fits = |w: &Workload| w.plan().peak_bytes <= memory;
    let mut changes: Vec<String> = remedies
        .iter()
        .map(|(change, w)| {
            let peak = w.plan().peak_bytes;
            let verdict = if fits(w) { "fits" } else { "still too much" };
            format!("{change} ({}, {verdict})", gib(peak))
        })
        .collect();
    if !remedies.iter().any(|(_, w)| fits(w)) {
        // No single change is enough: all of them together.
        let together = remedies.iter().fold(*workload, |acc, (_, w)| Workload {
            precision: if w.precision == Precision::Fp8 {
                Precision::Fp8
            } else {
                acc.precision
            },
            t5: acc.t5 && w.t5,
            batch: acc.batch.min(w.batch),
            width: acc.width.min(w.width),
            height: acc.height.min(w.height),
            ..acc
        });
        if together != *workload {
            changes.push(format!(
                "all of these together ({}, {})",
                gib(together.plan().peak_bytes),
                if fits(&together) {
                    "fits"
                } else {
                    "still too much"
                }
            ));
        }
    }
    let changes = if changes.is_empty() {
        String::new()
    } else {
        format!("lower it with {}; or ", changes.join(", "))
    };
    format!(
        "{} needs {} of GPU memory by the memory plan (weights {}, {} activations {}, runtime \
         reserve {}), more than one GPU holds: {gpus} ({} label): {changes}schedule the serving \
         pods onto GPUs with more memory with spec.scheduling.nodeSelector",
        workload.describe(),
        gib(plan.peak_bytes),
        gib(plan.weights_bytes),
        plan.largest_stage,
        gib(plan.activation_bytes),
        gib(plan.runtime_bytes),
        gpu_memory_label(resource_name),
    )
}

/// The report for `workload` on pods requesting `resource_name` that run on (or may go to)
/// these GPUs.
pub fn report(workload: &Workload, resource_name: &str, gpus: &[NodeGpu]) -> GpuReport {
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
    let plan = workload.plan();
    let short: Vec<&NodeGpu> = gpus
        .iter()
        .filter(|g| g.memory_bytes.is_some_and(|m| m < plan.peak_bytes))
        .collect();
    if !short.is_empty() {
        return GpuReport {
            status: "False",
            reason: "InsufficientGPUMemory",
            message: insufficient_memory(workload, &plan, &short, resource_name),
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
    // What the plan needs, and of how much where the labels say.
    let memory = match gpus.iter().filter_map(|g| g.memory_bytes).min() {
        Some(least) => format!(
            "; the memory plan of {} needs {} of each GPU's {}",
            workload.describe(),
            gib(plan.peak_bytes),
            gib(least)
        ),
        None => format!(
            "; the memory plan of {} needs {} of each GPU (no {} label to check it against)",
            workload.describe(),
            gib(plan.peak_bytes),
            gpu_memory_label(resource_name)
        ),
    };
    match workload.precision {
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
                    message: format!("fp8 on {on}: {}{memory}", Fp8Path::TensorCore.describe()),
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
                    message: format!(
                        "fp8 on {on}: {}{note}{memory}",
                        Fp8Path::WeightOnly.describe()
                    ),
                }
            }
        }
        other => GpuReport {
            status: "True",
            reason: "Supported",
            message: format!("{} on {on}{memory}", other.as_str()),
        },
    }
}

#[cfg(test)]
mod tests {
    use sd35_contract::GPU_MEMORY_LABEL;

    use super::*;
    use crate::config::OperatorConfig;

    const GPU: &str = "nvidia.com/gpu";

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn gpu(product: &str) -> NodeGpu {
        NodeGpu::of_labels(&labels(&[(GPU_PRODUCT_LABEL, product)]), GPU).unwrap()
    }

    /// A GPU with its product and memory labels (MiB), as GPU feature discovery writes them.
    fn gpu_with_memory(product: &str, mib: &str) -> NodeGpu {
        NodeGpu::of_labels(
            &labels(&[(GPU_PRODUCT_LABEL, product), (GPU_MEMORY_LABEL, mib)]),
            GPU,
        )
        .unwrap()
    }

    fn workload(spec_yaml: &str) -> Workload {
        let indented: String = spec_yaml.lines().map(|l| format!("  {l}\n")).collect();
        let obj: sd35_crds::SD35Deployment = serde_yaml::from_str(&format!(
            "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata: {{name: a, namespace: ns}}\nspec:\n{indented}"
        ))
        .unwrap();
        Workload::of(&crate::resolve::resolve(&obj, &OperatorConfig::default()).unwrap())
    }

    fn plain(precision: &str) -> Workload {
        workload(&format!("variant: large\nprecision: {precision}"))
    }

    #[test]
    fn nodes_without_gpu_labels_have_no_gpu() {
        assert_eq!(
            NodeGpu::of_labels(&labels(&[("kubernetes.io/os", "linux")]), GPU),
            None
        );
        let g = NodeGpu::of_labels(
            &labels(&[
                (GPU_COMPUTE_MAJOR_LABEL, "8"),
                (GPU_COMPUTE_MINOR_LABEL, "9"),
            ]),
            GPU,
        )
        .unwrap();
        assert_eq!(g.capability, Some(ComputeCapability { major: 8, minor: 9 }));
        assert_eq!(g.memory_bytes, None);
        assert_eq!(
            gpu_with_memory("NVIDIA-H100-80GB-HBM3", "81559").memory_bytes,
            Some(81559 << 20)
        );
    }

    #[test]
    fn the_workload_is_the_largest_default_request_of_the_spec() {
        // The model card: 1024², guidance for large and medium, none for turbo; T5 on.
        let turbo = workload("variant: large-turbo");
        assert_eq!(
            (
                turbo.width,
                turbo.height,
                turbo.batch,
                turbo.guidance,
                turbo.t5
            ),
            (1024, 1024, 1, false, true)
        );
        assert!(workload("variant: medium").guidance);
        assert_eq!(turbo.t5_tokens, 256);
        // The spec's defaults and limits win.
        let custom = workload(
            "variant: large\nprecision: fp8\nmodel: {textEncoders: {t5: false, t5MaxTokens: 128}}\n\
             server:\n  defaults: {width: 768, height: 1344, guidanceScale: 1.0}\n  limits: {maxBatchSize: 4}",
        );
        assert_eq!(
            custom,
            Workload {
                variant: Variant::Large,
                precision: Precision::Fp8,
                width: 768,
                height: 1344,
                batch: 4,
                guidance: false,
                t5: false,
                t5_tokens: 128,
            }
        );
        // Each of these raises the plan.
        let base = plain("fp8").plan().peak_bytes;
        assert!(plain("bf16").plan().peak_bytes > base);
        assert!(
            workload("variant: large\nprecision: fp8\nserver: {limits: {maxBatchSize: 2}}")
                .plan()
                .peak_bytes
                > base
        );
        assert!(
            workload("variant: large\nprecision: fp8\nmodel: {textEncoders: {t5: false}}")
                .plan()
                .peak_bytes
                < base
        );
    }

    #[test]
    fn a_gpu_too_small_for_the_plan_is_false_with_the_figures_and_what_to_change() {
        // Large bf16 with T5 at 1024² with guidance on an L4 (22.5 GiB).
        let w = plain("bf16");
        let l4 = gpu_with_memory("NVIDIA-L4", "23034");
        let r = report(&w, GPU, &[l4]);
        assert_eq!((r.status, r.reason), ("False", "InsufficientGPUMemory"));
        let plan = w.plan();
        let without_t5 = Workload { t5: false, ..w }.plan().peak_bytes;
        let fp8 = Workload {
            precision: Precision::Fp8,
            ..w
        }
        .plan()
        .peak_bytes;
        assert!(plan.peak_bytes > 23034 << 20 && without_t5 < 23034 << 20);
        let expected_start = format!(
            "large bf16 at 1024x1024, batch 1, with guidance, with T5 needs {} of GPU memory by \
             the memory plan (weights {}, ",
            gib(plan.peak_bytes),
            gib(plan.weights_bytes)
        );
        assert!(r.message.starts_with(&expected_start), "{}", r.message);
        for part in [
            "more than one GPU holds: NVIDIA-L4 with 22.5 GiB (nvidia.com/gpu.memory label)"
                .to_owned(),
            format!("precision: fp8 ({}, ", gib(fp8)),
            format!("model.textEncoders.t5: false ({}, fits)", gib(without_t5)),
            "spec.scheduling.nodeSelector".to_owned(),
        ] {
            assert!(r.message.contains(&part), "{part:?} not in {}", r.message);
        }
        // One image per batch is only offered when the batch is larger; a smaller size only
        // when one fits (here the weights alone are more than the GPU holds).
        assert!(plan.weights_bytes > 23034 << 20);
        assert!(!r.message.contains("maxBatchSize"), "{}", r.message);
        assert!(!r.message.contains("width and height"), "{}", r.message);
    }

    #[test]
    fn a_default_size_too_large_for_the_gpu_is_offered_the_largest_square_that_fits() {
        let w = workload(
            "variant: large\nprecision: fp8\nmodel: {textEncoders: {t5: false}}\n\
             server: {defaults: {width: 2048, height: 2048}, limits: {maxBatchSize: 4}}",
        );
        let memory: u64 = 16 << 30;
        let mib = (memory >> 20).to_string();
        let r = report(&w, GPU, &[gpu_with_memory("NVIDIA-A16", &mib)]);
        assert_eq!(r.reason, "InsufficientGPUMemory", "{}", r.message);
        let (change, smaller) = w
            .remedies(memory)
            .into_iter()
            .find(|(c, _)| c.contains("width and height"))
            .unwrap_or_else(|| panic!("no size offered: {}", r.message));
        let side = smaller.width;
        assert_eq!((smaller.height, side % 16), (side, 0));
        let at = |side| {
            Workload {
                width: side,
                height: side,
                ..w
            }
            .plan()
            .peak_bytes
        };
        assert!(at(side) <= memory && at(side + 16) > memory, "{side}");
        assert!(
            r.message
                .contains(&format!("{change} ({}, fits)", gib(at(side)))),
            "{}",
            r.message
        );
    }

    #[test]
    fn when_no_single_change_is_enough_all_of_them_together_are_named() {
        let w = workload("variant: large\nserver: {limits: {maxBatchSize: 2}}");
        let small = gpu_with_memory("NVIDIA-A10", "12288");
        let r = report(&w, GPU, &[small]);
        assert_eq!(r.reason, "InsufficientGPUMemory");
        assert!(
            r.message.contains("server.limits.maxBatchSize: 1 ("),
            "{}",
            r.message
        );
        assert!(r.message.contains("still too much"), "{}", r.message);
        assert!(
            r.message.contains("all of these together ("),
            "{}",
            r.message
        );
    }

    #[test]
    fn a_gpu_that_holds_the_plan_says_how_much_of_it_is_used() {
        let w = plain("bf16");
        let h100 = gpu_with_memory("NVIDIA-H100-80GB-HBM3", "81559");
        let r = report(&w, GPU, &[h100]);
        assert_eq!((r.status, r.reason), ("True", "Supported"));
        assert_eq!(
            r.message,
            format!(
                "bf16 on NVIDIA-H100-80GB-HBM3 (compute capability 9.0); the memory plan of \
                 large bf16 at 1024x1024, batch 1, with guidance, with T5 needs {} of each GPU's \
                 79.6 GiB",
                gib(w.plan().peak_bytes)
            )
        );
        // A MIG slice is judged by its own memory label, not the whole GPU's.
        let mig = "nvidia.com/mig-1g.10gb";
        let sliced = NodeGpu::of_labels(
            &labels(&[
                (GPU_PRODUCT_LABEL, "NVIDIA-H100-80GB-HBM3"),
                (GPU_MEMORY_LABEL, "81559"),
                ("nvidia.com/mig-1g.10gb.memory", "9856"),
            ]),
            mig,
        )
        .unwrap();
        let r = report(&w, mig, &[sliced]);
        assert_eq!(r.reason, "InsufficientGPUMemory");
        assert!(
            r.message.contains("(nvidia.com/mig-1g.10gb.memory label)"),
            "{}",
            r.message
        );
    }

    #[test]
    fn fp8_on_hopper_is_weight_only_and_says_the_tensor_cores_are_unused() {
        let r = report(&plain("fp8"), GPU, &[gpu("NVIDIA-H100-80GB-HBM3")]);
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
        let r = report(&plain("fp8"), GPU, &[gpu("NVIDIA-A100-SXM4-80GB")]);
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
        let w = plain("bf16");
        let r = report(&w, GPU, &[h100.clone(), h100, gpu("NVIDIA-L40S")]);
        assert_eq!((r.status, r.reason), ("True", "Supported"));
        assert_eq!(
            r.message,
            format!(
                "bf16 on NVIDIA-H100-80GB-HBM3 (compute capability 9.0), NVIDIA-L40S (compute \
                 capability 8.9); the memory plan of large bf16 at 1024x1024, batch 1, with \
                 guidance, with T5 needs {} of each GPU (no nvidia.com/gpu.memory label to check \
                 it against)",
                gib(w.plan().peak_bytes)
            )
        );
    }

    #[test]
    fn a_gpu_older_than_ampere_is_false_and_names_the_fix() {
        // Too old is said first, whatever the memory.
        let t4 = gpu_with_memory("Tesla-T4", "15360");
        let r = report(&plain("bf16"), GPU, &[gpu("NVIDIA-H100-80GB-HBM3"), t4]);
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
        let r = report(&plain("fp8"), GPU, &[gpu("Vendor-X-9000")]);
        assert_eq!(
            (r.status, r.reason),
            ("Unknown", "ComputeCapabilityUnknown")
        );
        assert!(
            r.message
                .starts_with("Vendor-X-9000 (compute capability unknown)")
        );
        let r = report(&plain("fp8"), GPU, &[]);
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
