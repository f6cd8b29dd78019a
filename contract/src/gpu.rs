//! GPU generations and the FP8 path each gets, decided in one place for both sides: the
//! operator reads it off the nodes' GPU feature discovery labels, the server off the CUDA
//! device it opened.
//!
//! FP8 tensor cores (F8E4M3 × F8E4M3 matrix products) start with compute capability 8.9 (Ada:
//! L4, L40S; Hopper: H100, H200; and later). Older GPUs store fp8 weights compactly and
//! dequantise them to bf16 one layer at a time.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// GPU feature discovery's product label, e.g. `NVIDIA-H100-80GB-HBM3`.
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// GPU feature discovery's compute capability labels (`9` and `0` for an H100).
pub const GPU_COMPUTE_MAJOR_LABEL: &str = "nvidia.com/gpu.compute.major";
/// See [`GPU_COMPUTE_MAJOR_LABEL`].
pub const GPU_COMPUTE_MINOR_LABEL: &str = "nvidia.com/gpu.compute.minor";
/// GPU feature discovery's memory label: one GPU's memory in MiB (`81559` for an H100 80GB
/// HBM3). With the `mixed` MIG strategy each profile has its own (see [`gpu_memory_label`]).
pub const GPU_MEMORY_LABEL: &str = "nvidia.com/gpu.memory";

/// The node label that states the memory (MiB) of one GPU of the extended resource
/// `resource_name`: a MIG profile's own `<resource>.memory` (`nvidia.com/mig-3g.40gb.memory`,
/// as GPU feature discovery writes it for the `mixed` strategy), else [`GPU_MEMORY_LABEL`]
/// (which, with the `single` strategy, already describes the slice).
pub fn gpu_memory_label(resource_name: &str) -> String {
    if resource_name.starts_with("nvidia.com/mig-") {
        format!("{resource_name}.memory")
    } else {
        GPU_MEMORY_LABEL.to_owned()
    }
}

/// The memory in bytes of one GPU of `resource_name` on a node with these labels, when the
/// labels say (a MiB count).
pub fn gpu_memory_bytes(labels: &BTreeMap<String, String>, resource_name: &str) -> Option<u64> {
    let mib: u64 = labels
        .get(&gpu_memory_label(resource_name))?
        .trim()
        .parse()
        .ok()?;
    Some(mib << 20)
}

/// A CUDA compute capability, `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ComputeCapability {
    /// Major version (9 for Hopper).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl fmt::Display for ComputeCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// How fp8 weights are computed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fp8Path {
    /// F8E4M3 weights resident on the GPU multiplied on FP8 tensor cores (compute capability
    /// 8.9 or later), with per-tensor weight and activation scales.
    TensorCore,
    /// F8E4M3 weights resident on the GPU, dequantised to bf16 one layer at a time and
    /// multiplied in bf16: half the weight memory of bf16, bf16 speed.
    WeightOnly,
    /// On the CPU: weights stored in F8E4M3, computed in f32.
    Cpu,
}

impl Fp8Path {
    /// The name in `/v1/models` and in condition messages.
    pub const fn as_str(self) -> &'static str {
        match self {
            Fp8Path::TensorCore => "tensor-core",
            Fp8Path::WeightOnly => "weight-only",
            Fp8Path::Cpu => "cpu",
        }
    }

    /// One sentence for people.
    pub const fn describe(self) -> &'static str {
        match self {
            Fp8Path::TensorCore => {
                "FP8 tensor cores: F8E4M3 matrix products with per-tensor scales"
            }
            Fp8Path::WeightOnly => {
                "weight-only FP8: F8E4M3 weights dequantised to bf16 per layer (half the weight memory of bf16, bf16 speed)"
            }
            Fp8Path::Cpu => "on the CPU: F8E4M3 weights computed in f32",
        }
    }
}

/// The FP8 path the server takes on every GPU in this build: fp8 weights stay F8E4M3 in memory
/// and are dequantised to bf16 one layer at a time. FP8 tensor-core products are not wired in
/// yet, so a GPU with them is reported as able to take that path, not as taking it.
pub const SERVED_GPU_FP8_PATH: Fp8Path = Fp8Path::WeightOnly;

/// What a deployment gets on a GPU of a given capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuFit {
    /// The server runs there; with the FP8 path it takes for fp8 and the one the GPU could
    /// take.
    Runs {
        /// The path the server takes ([`SERVED_GPU_FP8_PATH`]).
        served: Fp8Path,
        /// The best path the GPU has.
        capable: Fp8Path,
    },
    /// Older than [`ComputeCapability::CUDA_BUILD_MIN`]: the server's CUDA kernels do not run.
    TooOld,
}

impl GpuFit {
    /// The fit of a GPU of capability `cc`.
    pub fn of(cc: ComputeCapability) -> Self {
        if cc < ComputeCapability::CUDA_BUILD_MIN {
            GpuFit::TooOld
        } else {
            GpuFit::Runs {
                served: SERVED_GPU_FP8_PATH,
                capable: cc.fp8_path(),
            }
        }
    }
}

/// Compute capabilities of the data-centre and workstation GPUs people serve on, by a word of
/// their product name as GPU feature discovery writes it (`NVIDIA-L40S`, `Tesla-T4`).
const PRODUCTS: &[(&str, u32, u32)] = &[
    ("B200", 10, 0),
    ("B100", 10, 0),
    ("GB200", 10, 0),
    ("H200", 9, 0),
    ("H100", 9, 0),
    ("H800", 9, 0),
    ("H20", 9, 0),
    ("GH200", 9, 0),
    ("L40S", 8, 9),
    ("L40", 8, 9),
    ("L20", 8, 9),
    ("L4", 8, 9),
    ("RTX-4090", 8, 9),
    ("RTX-6000-Ada", 8, 9),
    ("A100", 8, 0),
    ("A800", 8, 0),
    ("A30", 8, 0),
    ("A40", 8, 6),
    ("A10G", 8, 6),
    ("A10", 8, 6),
    ("A16", 8, 6),
    ("A6000", 8, 6),
    ("RTX-3090", 8, 6),
    ("T4", 7, 5),
    ("V100", 7, 0),
];

impl ComputeCapability {
    /// The first compute capability with FP8 tensor cores.
    pub const FP8_TENSOR_CORES: ComputeCapability = ComputeCapability { major: 8, minor: 9 };

    /// The oldest GPU generation the CUDA build of the server runs on: its kernels are compiled
    /// for compute capability 8.0 (Ampere) and later, which also have bf16 tensor cores.
    pub const CUDA_BUILD_MIN: ComputeCapability = ComputeCapability { major: 8, minor: 0 };

    /// The FP8 path a GPU of this capability can take.
    pub fn fp8_path(self) -> Fp8Path {
        if self >= Self::FP8_TENSOR_CORES {
            Fp8Path::TensorCore
        } else {
            Fp8Path::WeightOnly
        }
    }

    /// The capability of a GPU product as GPU feature discovery names it; `None` for one this
    /// table does not know.
    pub fn of_product(product: &str) -> Option<Self> {
        let words: Vec<String> = product
            .split(['-', ' ', '_'])
            .map(str::to_ascii_uppercase)
            .collect();
        let joined = words.join("-");
        PRODUCTS.iter().find_map(|&(name, major, minor)| {
            let name = name.to_ascii_uppercase();
            // Whole words only: `L4` must not match `L40S`, nor `A10` match `A100`.
            let hit = if name.contains('-') {
                joined.contains(&name)
            } else {
                words.contains(&name)
            };
            hit.then_some(Self { major, minor })
        })
    }

    /// The capability a node's labels state: the compute labels when present, else the product
    /// label looked up in the table.
    pub fn of_node_labels(labels: &BTreeMap<String, String>) -> Option<Self> {
        let num = |k: &str| labels.get(k).and_then(|v| v.trim().parse::<u32>().ok());
        match (num(GPU_COMPUTE_MAJOR_LABEL), num(GPU_COMPUTE_MINOR_LABEL)) {
            (Some(major), Some(minor)) => Some(Self { major, minor }),
            _ => labels
                .get(GPU_PRODUCT_LABEL)
                .and_then(|p| Self::of_product(p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(major: u32, minor: u32) -> ComputeCapability {
        ComputeCapability { major, minor }
    }

    #[test]
    fn fp8_tensor_cores_start_at_ada() {
        assert_eq!(cc(8, 0).fp8_path(), Fp8Path::WeightOnly);
        assert_eq!(cc(8, 6).fp8_path(), Fp8Path::WeightOnly);
        assert_eq!(cc(8, 9).fp8_path(), Fp8Path::TensorCore);
        assert_eq!(cc(9, 0).fp8_path(), Fp8Path::TensorCore);
        assert_eq!(cc(10, 0).fp8_path(), Fp8Path::TensorCore);
        assert_eq!(cc(7, 5).fp8_path(), Fp8Path::WeightOnly);
    }

    #[test]
    fn the_cuda_build_runs_from_ampere_and_serves_fp8_weight_only() {
        assert_eq!(GpuFit::of(cc(7, 5)), GpuFit::TooOld);
        assert_eq!(GpuFit::of(cc(7, 0)), GpuFit::TooOld);
        assert_eq!(
            GpuFit::of(cc(8, 0)),
            GpuFit::Runs {
                served: Fp8Path::WeightOnly,
                capable: Fp8Path::WeightOnly
            }
        );
        assert_eq!(
            GpuFit::of(cc(9, 0)),
            GpuFit::Runs {
                served: Fp8Path::WeightOnly,
                capable: Fp8Path::TensorCore
            }
        );
    }

    #[test]
    fn products_are_matched_by_whole_words() {
        for (product, want) in [
            ("NVIDIA-H100-80GB-HBM3", Some(cc(9, 0))),
            ("NVIDIA-H200", Some(cc(9, 0))),
            ("NVIDIA-L40S", Some(cc(8, 9))),
            ("NVIDIA-L4", Some(cc(8, 9))),
            ("NVIDIA-A100-SXM4-80GB", Some(cc(8, 0))),
            ("NVIDIA-A10G", Some(cc(8, 6))),
            ("NVIDIA-A10", Some(cc(8, 6))),
            ("Tesla-T4", Some(cc(7, 5))),
            ("NVIDIA-GeForce-RTX-4090", Some(cc(8, 9))),
            ("NVIDIA RTX 6000 Ada Generation", Some(cc(8, 9))),
            ("Some-Future-GPU", None),
        ] {
            assert_eq!(ComputeCapability::of_product(product), want, "{product}");
        }
    }

    #[test]
    fn memory_comes_from_the_label_of_the_resource_in_mib() {
        let labels = BTreeMap::from([
            (GPU_MEMORY_LABEL.to_owned(), "81559".to_owned()),
            (
                "nvidia.com/mig-3g.40gb.memory".to_owned(),
                "40192".to_owned(),
            ),
        ]);
        assert_eq!(
            gpu_memory_bytes(&labels, "nvidia.com/gpu"),
            Some(81559 << 20)
        );
        assert_eq!(
            gpu_memory_bytes(&labels, "nvidia.com/mig-3g.40gb"),
            Some(40192 << 20)
        );
        // A profile without its own label says nothing: the whole GPU's is not the slice's.
        assert_eq!(gpu_memory_bytes(&labels, "nvidia.com/mig-1g.10gb"), None);
        let odd = BTreeMap::from([(GPU_MEMORY_LABEL.to_owned(), "80GB".to_owned())]);
        assert_eq!(gpu_memory_bytes(&odd, "nvidia.com/gpu"), None);
    }

    #[test]
    fn compute_labels_win_over_the_product_table() {
        let mut labels = BTreeMap::from([(
            GPU_PRODUCT_LABEL.to_owned(),
            "NVIDIA-A100-SXM4-40GB".to_owned(),
        )]);
        assert_eq!(ComputeCapability::of_node_labels(&labels), Some(cc(8, 0)));
        labels.insert(GPU_COMPUTE_MAJOR_LABEL.into(), "9".into());
        labels.insert(GPU_COMPUTE_MINOR_LABEL.into(), "0".into());
        assert_eq!(ComputeCapability::of_node_labels(&labels), Some(cc(9, 0)));
        assert_eq!(ComputeCapability::of_node_labels(&BTreeMap::new()), None);
    }
}
