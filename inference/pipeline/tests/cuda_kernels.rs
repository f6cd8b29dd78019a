//! Every CUDA kernel the pipeline can request is in the PTX the binary ships.
//!
//! Reads the PTX modules of the candle-kernels build this crate links (the same build
//! candle-core loads its kernels from, compiled for `CUDA_COMPUTE_CAP`) and checks each name of
//! [`sd35_pipeline::cuda_kernels::inventory`] against the `.entry` directives of its module.
//! Needs the CUDA toolchain to build and no GPU to run: `make cuda` runs it.
#![cfg(feature = "cuda")]

use candle_core::DType;
use sd35_pipeline::cuda_kernels::{self, Kernel, Module, Op};

fn ptx(module: Module) -> &'static str {
    match module {
        Module::Affine => candle_kernels::AFFINE.ptx(),
        Module::Binary => candle_kernels::BINARY.ptx(),
        Module::Cast => candle_kernels::CAST.ptx(),
        Module::Conv => candle_kernels::CONV.ptx(),
        Module::Fill => candle_kernels::FILL.ptx(),
        Module::Indexing => candle_kernels::INDEXING.ptx(),
        Module::Reduce => candle_kernels::REDUCE.ptx(),
        Module::Ternary => candle_kernels::TERNARY.ptx(),
        Module::Unary => candle_kernels::UNARY.ptx(),
    }
}

fn listing(kernels: &[&Kernel]) -> String {
    kernels
        .iter()
        .map(|k| {
            format!(
                "  {} ({}), requested by: {}",
                k.name,
                k.module.constant(),
                k.requested_by.join("; ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_kernel_the_pipeline_can_request_is_in_the_shipped_ptx() {
    for module in Module::ALL {
        assert!(
            !cuda_kernels::ptx_entries(ptx(module)).is_empty(),
            "candle_kernels::{} has no .entry: not PTX text?",
            module.constant()
        );
    }
    let kernels = cuda_kernels::inventory();
    let missing = cuda_kernels::missing(&kernels, ptx);
    assert!(
        missing.is_empty(),
        "{} of the {} CUDA kernels the pipeline can request are not in candle-kernels' PTX; \
         each would fail with `named symbol not found` the first time it runs on a GPU:\n{}",
        missing.len(),
        kernels.len(),
        listing(&missing)
    );
}

/// The names the F8E4M3 route requested before FP8 weights became bytes: every cast to and
/// from F8E4M3 and the strided copy of an F8E4M3 tensor.
fn former_fp8_route() -> Vec<Kernel> {
    cuda_kernels::kernels_of(&[
        cuda_kernels::Use {
            op: Op::CastTo(DType::F32),
            dtypes: &[DType::F8E4M3],
            by: "dequantisation to f32",
        },
        cuda_kernels::Use {
            op: Op::CastTo(DType::BF16),
            dtypes: &[DType::F8E4M3],
            by: "dequantisation to bf16",
        },
        cuda_kernels::Use {
            op: Op::CastTo(DType::F8E4M3),
            dtypes: &[DType::F32, DType::BF16],
            by: "quantisation at load",
        },
        cuda_kernels::Use {
            op: Op::StridedCopy,
            dtypes: &[DType::F8E4M3],
            by: "a strided F8E4M3 weight",
        },
    ])
}

#[test]
fn the_former_fp8_route_would_fail_the_check() {
    let former = former_fp8_route();
    let names: Vec<&str> = former.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "cast_bf16_f8e4m3",
            "cast_f32_f8e4m3",
            "cast_f8e4m3_bf16",
            "cast_f8e4m3_f32",
            "ucopy_f8e4m3"
        ]
    );
    let missing = cuda_kernels::missing(&former, ptx);
    assert_eq!(
        missing.len(),
        former.len(),
        "these F8E4M3 names are in candle-kernels' PTX after all:\n{}",
        listing(
            &former
                .iter()
                .filter(|k| !missing.contains(k))
                .collect::<Vec<_>>()
        )
    );
    // What the PTX does define, under the other spelling.
    let cast = cuda_kernels::ptx_entries(ptx(Module::Cast));
    assert!(cast.contains("cast_f8_e4m3_f32") && cast.contains("cast_bf16_f8_e4m3"));
}
