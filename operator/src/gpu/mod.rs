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
mod tests;
