//! Stable Diffusion 3.5 text-to-image on candle.
//!
//! The pipeline reproduces diffusers' `StableDiffusion3Pipeline`: CLIP-L and CLIP-G (penultimate
//! hidden states, pooled and projected outputs), an optional T5 encoder (zeros when disabled),
//! the MMDiT of SD3.5 large / large-turbo and the MMDiT-X of SD3.5 medium, flow-matching Euler
//! sampling with classifier-free and skip-layer guidance, and the VAE decoder. Weights load from
//! the diffusers repository layout, the Stability single-file layout and ComfyUI `fp8_scaled`
//! checkpoints, memory-mapped, in f32, bf16 or fp8 storage.

pub mod attention;
pub mod clip;
pub mod control_image;
pub mod controlnet;
pub mod cuda_kernels;
pub mod device;
pub mod engine;
pub mod error;
pub mod fused;
pub mod image;
pub mod linear;
pub mod lora;
pub mod mmdit;
pub mod model_dir;
pub mod nn;
pub mod op_graph;
pub mod pipeline;
pub mod plan;
pub mod scheduler;
pub mod sentencepiece;
mod simd;
pub mod smoke;
pub mod t5;
pub mod tokenizer;
pub mod vae;
pub mod variant;
pub mod weights;

pub use error::{Error, Result};
pub use pipeline::{
    Control, Edit, GenerateRequest, ModelSource, Pipeline, PipelineOptions, PromptParts,
    PromptTokens, StepControl, VariantSource,
};
pub use sd35_contract::DeviceKind;
pub use variant::{Precision, SkipLayerGuidance, Variant, VariantDefaults, model_card};
