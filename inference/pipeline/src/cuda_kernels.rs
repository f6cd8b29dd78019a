//! Every CUDA kernel the pipeline can ask candle for, under the name candle asks for it.
//!
//! candle 0.11's CUDA backend loads its kernels by name when an operation first runs
//! (`get_or_load_func(name, &kernels::MODULE)`). The name is built from the operation and the
//! tensor's dtype, and a name the module's PTX does not define fails only then, on a GPU, with
//! `named symbol not found`. The F8E4M3 kernels are the known case: candle asks for
//! `cast_f8e4m3_f32` and `ucopy_f8e4m3` while its PTX defines `cast_f8_e4m3_f32`, so the
//! pipeline keeps FP8 weights as bytes ([`crate::linear`]). [`inventory`] lists the kernels the
//! GPU path can request — the generic op graph of [`crate::op_graph`], in the dtypes a GPU
//! computes and stores in — and `tests/cuda_kernels.rs` (built with `--features cuda`, run by
//! `make cuda`, no GPU needed) checks each name against the PTX the binary embeds.
//!
//! # What the inventory covers
//! - The compute dtypes: F32 (precision f32) and BF16 (bf16 and fp8). Norms, GroupNorm, the
//!   guidance arithmetic, the Euler step and the image conversion run in F32 whatever the
//!   compute dtype.
//! - Weights cast on the device from the dtype they are stored in (BF16, F16, F32, F64) to
//!   their storage dtype; FP8 weights as U8 bytes looked up in an F32 table (`is_u8_f32`).
//! - Index tensors: U32 (token ids, T5's position buckets, the batch rows still sampled) and
//!   U8 (FP8 bytes). Nothing on the GPU path indexes with I64 or selects with `where_cond`
//!   (the Ternary module), and nothing there is F8E4M3.
//! - Not listed, because no PTX kernel is loaded for them: cuBLAS products (`matmul`,
//!   `broadcast_matmul`, conv2d's GEMM), uploads and downloads, `Tensor::zeros` (a memset),
//!   copies of contiguous tensors (a device memcpy), and whatever runs on the CPU on every
//!   device: tokenizers, the scheduler, the timestep frequencies, FP8 quantisation at load,
//!   LoRA factors (assembled, scaled and cast before upload), control images' edges and blur,
//!   the engine build.
//!
//! # Keeping it in step with the code
//! Every candle operation added to code that can run on a GPU (anything outside the fused CPU
//! kernels that [`crate::op_graph::fused_cpu`] guards) adds its use to [`USES`]: the
//! operation, every dtype it can see there, and the code that requests it. That includes the
//! kernels candle runs inside another operation: `Tensor::cat` and `slice_set` copy with
//! `copy2d` (or `ucopy` for parts it must transpose), `reshape` of a strided view and
//! `contiguous` with `ucopy`, `conv2d` with `im2col`, a GEMM and `ucopy`, `mean` with
//! `fast_sum` and `affine`, scalar arithmetic with `affine`, `clamp` with `maximum` then
//! `minimum`, `Tensor::full` with `const_set`. A dtype new to the GPU (F16 compute, say) is
//! added to every use it flows through. When candle is upgraded, the naming functions below
//! are read again against `candle-core/src/cuda_backend/mod.rs` and candle-nn's `ops.rs`.
//!
//! # What it guarantees
//! Where `make cuda` passes, every name listed here is an `.entry` of the candle-kernels PTX
//! the binary ships (compiled for `CUDA_COMPUTE_CAP`, 80 by default), and no listed name
//! involves F8E4M3. It cannot prove the list complete: that rests on the rule above. The
//! parity tests under `SD35_GENERIC_OPS=1` run the same sequence of operations on the CPU,
//! where every name exists, so they check the arithmetic, not the names.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::DType;

/// A PTX module of candle-kernels: the `candle_kernels::*` constant candle-core loads a kernel
/// from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    /// `affine.cu`: `x · mul + add` with scalars.
    Affine,
    /// `binary.cu`: element-wise binary operations, broadcast or not.
    Binary,
    /// `cast.cu`: `to_dtype`.
    Cast,
    /// `conv.cu`: im2col, upsampling, direct convolutions.
    Conv,
    /// `fill.cu`: `copy2d` and `const_set`.
    Fill,
    /// `indexing.cu`: `index_select`, gather, scatter.
    Indexing,
    /// `reduce.cu`: sums, maxima, softmax, norms.
    Reduce,
    /// `ternary.cu`: `where_cond`.
    Ternary,
    /// `unary.cu`: element-wise unary operations and strided copies.
    Unary,
}

impl Module {
    /// Every module the inventory can name.
    pub const ALL: [Module; 9] = [
        Module::Affine,
        Module::Binary,
        Module::Cast,
        Module::Conv,
        Module::Fill,
        Module::Indexing,
        Module::Reduce,
        Module::Ternary,
        Module::Unary,
    ];

    /// The name of the module's constant in `candle_kernels` (`CAST`, `UNARY`, ...).
    pub fn constant(self) -> &'static str {
        match self {
            Module::Affine => "AFFINE",
            Module::Binary => "BINARY",
            Module::Cast => "CAST",
            Module::Conv => "CONV",
            Module::Fill => "FILL",
            Module::Indexing => "INDEXING",
            Module::Reduce => "REDUCE",
            Module::Ternary => "TERNARY",
            Module::Unary => "UNARY",
        }
    }
}

/// `{root}_{dtype}`: candle-core's `kernel_name::<T>(root)`, with candle's own dtype names
/// (`DType::as_str`: `f32`, `bf16`, `u8`, `f8e4m3`, ...).
pub fn typed(root: &str, dtype: DType) -> String {
    format!("{root}_{}", dtype.as_str())
}

/// `cast_{src}_{dst}`: the kernel candle-core's `to_dtype` asks for (a cast to the same dtype
/// is no kernel at all: `Tensor::to_dtype` returns the tensor).
pub fn cast(src: DType, dst: DType) -> String {
    format!("cast_{}_{}", src.as_str(), dst.as_str())
}

/// A candle operation as the CUDA backend names its kernel; the dtype is the tensor's (for a
/// cast, the source's; for `index_select`, the selected values').
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `to_dtype(dst)`: `cast_{dtype}_{dst}` (Cast).
    CastTo(DType),
    /// A unary operation by its name in candle's `UnaryOpT::KERNEL` without the `u` (`silu`,
    /// `gelu` (tanh), `gelu_erf`, `sqr`, `sqrt`, `recip`), or candle-nn's `sigmoid`, which asks
    /// for `usigmoid` the same way: `u{op}_{dtype}` (Unary).
    Unary(&'static str),
    /// A strided copy (`contiguous`, `reshape` of a strided view, `cat` of parts it must
    /// transpose, conv2d's output layout): `ucopy_{dtype}` (Unary).
    StridedCopy,
    /// An element-wise binary operation (`add`, `sub`, `mul`, `div`, `maximum`, `minimum`),
    /// broadcast or not: `b{op}_{dtype}` (Binary).
    Binary(&'static str),
    /// Arithmetic with a scalar (`t * 2.0`, `t + eps`, `t / n`): `affine_{dtype}` (Affine).
    Affine,
    /// `sum` and `mean` over dimensions: `fast_sum_{dtype}`, or `fast_sum_small_{dtype}` when
    /// each output sums at most 32 values (candle chooses at run time, so both) (Reduce).
    Sum,
    /// candle-nn's `softmax_last_dim`: `softmax_{dtype}` (Reduce).
    SoftmaxLastDim,
    /// `index_select` with indices of dtype `ids`: `is_{ids}_{dtype}` (Indexing).
    IndexSelect {
        /// The indices' dtype.
        ids: DType,
    },
    /// conv2d's unfolding (candle's CUDA conv2d is im2col + GEMM): `im2col_{dtype}` (Conv).
    Im2col,
    /// `upsample_nearest2d_{dtype}` (Conv).
    UpsampleNearest2d,
    /// `Tensor::cat` of contiguous or row-strided parts, and `slice_set`: `copy2d_{dtype}`
    /// (Fill).
    Copy2d,
    /// `Tensor::full` and `Tensor::ones`: `const_set_{dtype}` (Fill).
    ConstSet,
}

impl Op {
    /// The module candle-core loads the kernels from.
    pub fn module(self) -> Module {
        match self {
            Op::CastTo(_) => Module::Cast,
            Op::Unary(_) | Op::StridedCopy => Module::Unary,
            Op::Binary(_) => Module::Binary,
            Op::Affine => Module::Affine,
            Op::Sum | Op::SoftmaxLastDim => Module::Reduce,
            Op::IndexSelect { .. } => Module::Indexing,
            Op::Im2col | Op::UpsampleNearest2d => Module::Conv,
            Op::Copy2d | Op::ConstSet => Module::Fill,
        }
    }

    /// The names candle asks for when the operation runs on a `dtype` tensor (one, or two
    /// where candle chooses between kernels at run time).
    pub fn kernel_names(self, dtype: DType) -> Vec<String> {
        match self {
            Op::CastTo(dst) => vec![cast(dtype, dst)],
            Op::Unary(op) => vec![typed(&format!("u{op}"), dtype)],
            Op::StridedCopy => vec![typed("ucopy", dtype)],
            Op::Binary(op) => vec![typed(&format!("b{op}"), dtype)],
            Op::Affine => vec![typed("affine", dtype)],
            Op::Sum => vec![typed("fast_sum", dtype), typed("fast_sum_small", dtype)],
            Op::SoftmaxLastDim => vec![typed("softmax", dtype)],
            Op::IndexSelect { ids } => vec![typed(&format!("is_{}", ids.as_str()), dtype)],
            Op::Im2col => vec![typed("im2col", dtype)],
            Op::UpsampleNearest2d => vec![typed("upsample_nearest2d", dtype)],
            // candle spells these two as literals per dtype; for every dtype but F8E4M3 the
            // literal is `{root}_{as_str}`.
            Op::Copy2d => vec![typed("copy2d", dtype)],
            Op::ConstSet => vec![typed("const_set", dtype)],
        }
    }
}

/// One use of a candle operation on the GPU path: the operation, every dtype it sees there,
/// and the code that requests it.
#[derive(Debug, Clone, Copy)]
pub struct Use {
    /// The operation.
    pub op: Op,
    /// The dtypes of the tensors it runs on (for a cast, the sources).
    pub dtypes: &'static [DType],
    /// Where the pipeline requests it.
    pub by: &'static str,
}

/// The compute dtypes of a GPU: F32 (precision f32) and BF16 (bf16, fp8).
const COMPUTE: &[DType] = &[DType::F32, DType::BF16];
/// F32 only: norms, GroupNorm, guidance, the Euler step, the image, FP8 dequantisation.
const F32: &[DType] = &[DType::F32];

/// Every candle operation the pipeline runs on a GPU, by operation. Paths are relative to
/// `inference/pipeline/src`.
pub const USES: &[Use] = &[
    // Cast.
    Use {
        op: Op::CastTo(DType::BF16),
        dtypes: &[DType::F32, DType::F16, DType::F64],
        by: "weights.rs get and linear.rs load (a stored weight to bf16 storage); f32 values \
             to the compute dtype: fused.rs norm, nn.rs GroupNorm, linear.rs FP8 \
             dequantisation, clip.rs causal mask, mmdit/mod.rs and controlnet/mod.rs timestep \
             embeddings, pipeline/sample.rs latents into the transformer, images into the VAE \
             encoder, control latents, pipeline/mod.rs latents into the VAE decoder",
    },
    Use {
        op: Op::CastTo(DType::F32),
        dtypes: &[DType::BF16, DType::F16, DType::F64],
        by: "linear.rs load (every float linear weight passes through f32), weights.rs get at \
             f32 precision; bf16 to f32: fused.rs norm and nn.rs GroupNorm inputs and \
             parameters, pipeline/sample.rs the transformer's prediction and encoded images, \
             pipeline/adapters.rs control images' latents, pipeline/mod.rs the decoded image",
    },
    // Unary.
    Use {
        op: Op::StridedCopy,
        dtypes: COMPUTE,
        by: "attention.rs keys transposed and values made contiguous; reshapes of strided views \
             (heads merged, linear.rs 3-D inputs, mmdit/mod.rs position crop and unpatchify, \
             t5.rs position bias, vae.rs mid-block attention, pipeline/sample.rs inpainting \
             mask on the latent grid); contiguous() of mmdit/mod.rs and controlnet/mod.rs \
             embedded patches; candle's conv2d output layout; Tensor::cat of parts copy2d \
             cannot take; image.rs HWC to CHW (to_tensor) and back (to_rgb)",
    },
    Use {
        op: Op::Unary("silu"),
        dtypes: COMPUTE,
        by: "mmdit/mod.rs and controlnet/mod.rs timestep and pooled embeddings, adaLN input; \
             nn.rs GroupNorm's SiLU (f32)",
    },
    Use {
        op: Op::Unary("gelu"),
        dtypes: COMPUTE,
        by: "nn.rs gelu_tanh through fused.rs bias_in_place: MMDiT and ControlNet MLPs, T5's \
             gated GELU",
    },
    Use {
        op: Op::Unary("gelu_erf"),
        dtypes: COMPUTE,
        by: "clip.rs CLIP-G activation",
    },
    Use {
        op: Op::Unary("sigmoid"),
        dtypes: COMPUTE,
        by: "nn.rs quick_gelu (CLIP-L), candle-nn's sigmoid",
    },
    Use {
        op: Op::Unary("sqr"),
        dtypes: F32,
        by: "fused.rs norm (LayerNorm variance, RMSNorm), nn.rs GroupNorm variance",
    },
    Use {
        op: Op::Unary("sqrt"),
        dtypes: F32,
        by: "fused.rs norm, nn.rs GroupNorm",
    },
    Use {
        op: Op::Unary("recip"),
        dtypes: F32,
        by: "nn.rs GroupNorm statistics (1 / sqrt(var + eps))",
    },
    // Binary.
    Use {
        op: Op::Binary("add"),
        dtypes: COMPUTE,
        by: "residuals and biases (linear.rs, fused.rs, nn.rs conv bias), linear.rs LoRA \
             updates, mmdit/mod.rs position embedding, t + y embeddings and ControlNet \
             residuals, controlnet/mod.rs control embedding, attention.rs mask and T5 position \
             bias, clip.rs token + position, vae.rs shortcuts; f32: fused.rs norm shift, nn.rs \
             GroupNorm bias, pipeline/sample.rs guidance, Euler step, scale_noise and \
             inpainting blend",
    },
    Use {
        op: Op::Binary("sub"),
        dtypes: F32,
        by: "fused.rs LayerNorm centring, nn.rs GroupNorm, pipeline/sample.rs guidance and \
             previews",
    },
    Use {
        op: Op::Binary("mul"),
        dtypes: COMPUTE,
        by: "fused.rs gated residuals, nn.rs quick_gelu, t5.rs gated product; f32: fused.rs norm \
             scale, nn.rs GroupNorm, linear.rs FP8 dequantisation (table[bytes] * scale), \
             pipeline/sample.rs inpainting blend",
    },
    Use {
        op: Op::Binary("div"),
        dtypes: F32,
        by: "fused.rs norm",
    },
    Use {
        op: Op::Binary("maximum"),
        dtypes: F32,
        by: "image.rs to_rgb clamp",
    },
    Use {
        op: Op::Binary("minimum"),
        dtypes: F32,
        by: "image.rs to_rgb clamp",
    },
    // Affine.
    Use {
        op: Op::Affine,
        dtypes: COMPUTE,
        by: "attention.rs queries * scale, nn.rs quick_gelu 1.702 x, vae.rs latent scaling and \
             shift (decoder and encoder), controlnet/mod.rs conditioning scale; f32: means \
             (sum / n), var + eps, adaLN 1 + scale, pipeline/sample.rs guidance, Euler step, \
             previews, scale_noise and 1 - mask, pipeline/adapters.rs control latents' shift \
             and scale, image.rs x / 2 + 0.5",
    },
    // Reduce.
    Use {
        op: Op::Sum,
        dtypes: F32,
        by: "means over the last dimension: fused.rs norm, nn.rs GroupNorm statistics",
    },
    Use {
        op: Op::SoftmaxLastDim,
        dtypes: COMPUTE,
        by: "attention.rs unfused attention (MMDiT, ControlNet, CLIP, T5, VAE mid-blocks)",
    },
    // Indexing.
    Use {
        op: Op::IndexSelect { ids: DType::U32 },
        dtypes: COMPUTE,
        by: "clip.rs and t5.rs token embeddings, t5.rs relative position bias, \
             pipeline/sample.rs the batch rows still sampled (latents, control latents and \
             inpainting tensors f32, context and pooled in the compute dtype)",
    },
    Use {
        op: Op::IndexSelect { ids: DType::U8 },
        dtypes: F32,
        by: "linear.rs FP8 dequantisation: the F8E4M3 value table indexed by the weight's bytes",
    },
    // Conv.
    Use {
        op: Op::Im2col,
        dtypes: COMPUTE,
        by: "nn.rs conv2d_in_bands: mmdit/mod.rs patch embedding, controlnet/mod.rs control \
             embedding, vae.rs decoder and encoder convolutions (stride 2 in the encoder's \
             downsamplers)",
    },
    Use {
        op: Op::UpsampleNearest2d,
        dtypes: COMPUTE,
        by: "nn.rs Conv2d::forward_upsampled: vae.rs decoder upsamplers, band by band",
    },
    // Fill.
    Use {
        op: Op::Copy2d,
        dtypes: COMPUTE,
        by: "Tensor::cat: linear.rs fused qkv weights and biases, attention.rs query blocks and \
             joint sequence, pipeline/sample.rs context, pooled, CFG, edit and control batches, \
             nn.rs zero padding of conv bands, vae.rs images decoded or encoded one by one; \
             slice_set: nn.rs conv bands, linear.rs FP8 dequantisation blocks",
    },
    Use {
        op: Op::ConstSet,
        dtypes: F32,
        by: "pipeline/sample.rs Tensor::full of the step's timestep",
    },
];

/// One kernel the pipeline can request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The module candle loads it from.
    pub module: Module,
    /// The name candle asks for.
    pub name: String,
    /// The uses that request it.
    pub requested_by: Vec<&'static str>,
}

/// The kernels of `uses`, one entry per name, sorted by module and name.
pub fn kernels_of(uses: &[Use]) -> Vec<Kernel> {
    let mut by_name: BTreeMap<(Module, String), Vec<&'static str>> = BTreeMap::new();
    for u in uses {
        for &dtype in u.dtypes {
            for name in u.op.kernel_names(dtype) {
                let notes = by_name.entry((u.op.module(), name)).or_default();
                if !notes.contains(&u.by) {
                    notes.push(u.by);
                }
            }
        }
    }
    by_name
        .into_iter()
        .map(|((module, name), requested_by)| Kernel {
            module,
            name,
            requested_by,
        })
        .collect()
}

/// Every CUDA kernel the pipeline can request: the kernels of [`USES`].
pub fn inventory() -> Vec<Kernel> {
    kernels_of(USES)
}

/// The kernel names a PTX module defines: the identifiers after `.entry`.
pub fn ptx_entries(ptx: &str) -> BTreeSet<&str> {
    ptx.lines()
        .filter_map(|line| {
            let rest = line.split(".entry").nth(1)?;
            let rest = rest.trim_start();
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
                .unwrap_or(rest.len());
            (end > 0).then(|| &rest[..end])
        })
        .collect()
}

/// The kernels of `kernels` that the PTX of their module (`ptx_of`) does not define.
pub fn missing<'k, 'p>(
    kernels: &'k [Kernel],
    ptx_of: impl Fn(Module) -> &'p str,
) -> Vec<&'k Kernel> {
    let entries: BTreeMap<Module, BTreeSet<&str>> = Module::ALL
        .iter()
        .map(|&m| (m, ptx_entries(ptx_of(m))))
        .collect();
    kernels
        .iter()
        .filter(|k| {
            !entries
                .get(&k.module)
                .is_some_and(|names| names.contains(k.name.as_str()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_candle_cuda_backend() {
        // candle-core 0.11.1: `kernel_name::<T>(root)`, `format!("cast_{}_{}", ..)`, the
        // unary and binary ops' `KERNEL` constants, the index_select names.
        assert_eq!(typed("affine", DType::BF16), "affine_bf16");
        assert_eq!(cast(DType::F32, DType::BF16), "cast_f32_bf16");
        assert_eq!(
            Op::Unary("gelu_erf").kernel_names(DType::F32),
            ["ugelu_erf_f32"]
        );
        assert_eq!(Op::Binary("add").kernel_names(DType::BF16), ["badd_bf16"]);
        assert_eq!(
            Op::IndexSelect { ids: DType::U8 }.kernel_names(DType::F32),
            ["is_u8_f32"]
        );
        assert_eq!(
            Op::Sum.kernel_names(DType::F32),
            ["fast_sum_f32", "fast_sum_small_f32"]
        );
        assert_eq!(Op::StridedCopy.kernel_names(DType::U32), ["ucopy_u32"]);
        // The F8E4M3 names candle asks for, which its PTX spells `f8_e4m3`.
        assert_eq!(cast(DType::F8E4M3, DType::F32), "cast_f8e4m3_f32");
        assert_eq!(
            Op::StridedCopy.kernel_names(DType::F8E4M3),
            ["ucopy_f8e4m3"]
        );
    }

    #[test]
    fn the_inventory_has_one_entry_per_name_and_no_f8() {
        let kernels = inventory();
        let names: BTreeSet<&str> = kernels.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names.len(), kernels.len());
        for k in &kernels {
            assert!(!k.name.contains("f8"), "{} involves F8E4M3", k.name);
            assert!(!k.requested_by.is_empty(), "{} has no use", k.name);
        }
        for u in USES {
            assert!(!u.dtypes.is_empty(), "{:?} lists no dtype", u.op);
            assert!(!u.dtypes.contains(&DType::F8E4M3), "{:?} on F8E4M3", u.op);
        }
        // The FP8 route on the GPU is the U8 table lookup.
        assert!(names.contains("is_u8_f32"));
        assert!(names.contains("cast_f32_bf16") && names.contains("cast_bf16_f32"));
    }

    #[test]
    fn ptx_entries_are_read_from_entry_directives() {
        let ptx = "//\n.version 8.0\n.target sm_80\n\n\t// .globl\tcast_f32_bf16\n\
                   .visible .entry cast_f32_bf16(\n\t.param .u64 cast_f32_bf16_param_0\n)\n\
                   .visible .entry ucopy_bf16(\n.entry affine_f32 (\n";
        let entries = ptx_entries(ptx);
        assert_eq!(
            entries.into_iter().collect::<Vec<_>>(),
            ["affine_f32", "cast_f32_bf16", "ucopy_bf16"]
        );
    }

    #[test]
    fn missing_names_every_kernel_its_module_lacks() {
        let kernels = kernels_of(&[
            Use {
                op: Op::CastTo(DType::BF16),
                dtypes: &[DType::F32, DType::F8E4M3],
                by: "a test",
            },
            Use {
                op: Op::Affine,
                dtypes: &[DType::F32],
                by: "a test",
            },
        ]);
        let ptx = |m: Module| match m {
            Module::Cast => ".visible .entry cast_f32_bf16(\n.visible .entry cast_f8_e4m3_bf16(",
            // The right name in the wrong module does not count.
            Module::Unary => ".visible .entry affine_f32(",
            _ => "",
        };
        let missing: Vec<&str> = missing(&kernels, ptx)
            .iter()
            .map(|k| k.name.as_str())
            .collect();
        assert_eq!(missing, ["affine_f32", "cast_f8e4m3_bf16"]);
    }
}
