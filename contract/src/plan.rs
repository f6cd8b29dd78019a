//! The memory plan: how much device memory a request needs, computed from the model's shapes,
//! and whether any operation it runs would reach a CUDA kernel's index limit. Here because
//! both sides use it: `sd35-server` (`plan`, `/v1/models`, refusing what does not fit) and the
//! operator (whether a node's GPU can hold a deployment).
//!
//! The plan is arithmetic on the real shapes, never a measurement:
//! - **weights**: every tensor the pipeline's loaders keep, in the dtype they keep it in
//!   ([`WeightSpec`]; a pipeline test checks it against the bytes the tiny models really
//!   load);
//! - **activations**: the largest set of tensors alive at once in each stage — a transformer
//!   pass (its residual stream, the fused projections, the MLP's hidden state, one chunk of
//!   attention scores and their softmax, an FP8 weight being dequantised), the VAE decode of
//!   one image (one resnet's input and outputs, or an upsampler's input and output, plus one
//!   chunk's temporaries) and the text encoders — from the live-tensor counts of the op graph
//!   that runs (see the constants below);
//! - **runtime**: a fixed reserve for the CUDA context and cuBLAS's workspace
//!   ([`CUDA_RUNTIME_BYTES`]) or the process on the CPU ([`CPU_RUNTIME_BYTES`]).
//!
//! `peak = weights + max(stage activations) + runtime`. The same walk finds the largest element
//! count any single operation reaches: attention scores and im2col buffers are chunked (to
//! [`DEFAULT_CHUNK_ELEMENTS`] unless told otherwise), but whole activations (the MLP's hidden
//! state, a VAE activation) are not, and candle's CUDA element-wise kernels count elements in
//! 32 bits.

use serde::Serialize;

use crate::{DeviceKind, Precision, Variant};

/// Elements of the largest attention-score, im2col or GroupNorm block one operation creates:
/// 2²⁶ (256 MiB in f32, 128 MiB in bf16). Small enough that the chunks' temporaries keep SD3.5
/// Large within its memory goal at 1024², large enough that each chunk's matmul still fills a
/// GPU (Large's attention at 1024² with guidance: 23 blocks of about 200 query rows).
pub const DEFAULT_CHUNK_ELEMENTS: usize = 1 << 26;
/// candle's CUDA softmax indexes with a signed 32-bit `int`: fewer elements than this per call.
pub const CUDA_SOFTMAX_LIMIT: usize = 1 << 31;
/// candle's CUDA im2col and element-wise kernels count elements in 32 bits: fewer than this.
pub const CUDA_ELEMENTWISE_LIMIT: usize = 1 << 32;
/// Elements of an FP8 weight dequantised at once (2²⁴: 64 MiB of f32 per intermediate).
pub const DEQUANTISE_ELEMENTS: usize = 1 << 24;

/// Reserved for the CUDA context, cuBLAS's workspace and the allocator's slack: 768 MiB.
pub const CUDA_RUNTIME_BYTES: u64 = 768 << 20;
/// Reserved on the CPU for the process itself (code, tokenizers, runtime): 256 MiB.
pub const CPU_RUNTIME_BYTES: u64 = 256 << 20;
/// CLIP's sequence length.
pub const CLIP_TOKENS: usize = 77;
/// The timestep embedding's width (the transformer's first time linear reads it).
const TIMESTEP_WIDTH: usize = 256;
/// Residual-stream-sized tensors (`[B, N, hidden]`) alive at once in a transformer block on the
/// generic graph: the streams, their normalised copies, the fused q/k/v projections and their
/// concatenation, the attention output and its merged heads; the MLP's peak (its input, the
/// projection, the bias add and the GELU, each 4 wide) is below it.
const TRANSFORMER_UNITS_GENERIC: u64 = 14;
/// The same on the fused CPU graph (attention never materialises its scores; norms, biases and
/// GELU work in place).
const TRANSFORMER_UNITS_FUSED: u64 = 10;

/// The shapes of an MMDiT (SD3.5 Large) or MMDiT-X (Medium) that the plan needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MmditSpec {
    /// Latent patch size (2).
    pub patch_size: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Joint blocks.
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of the token streams.
    pub hidden: usize,
    /// Side of the position-embedding table, in patches.
    pub pos_embed_max_size: usize,
    /// Width of the text context.
    pub joint_attention_dim: usize,
    /// Width of the pooled text vector.
    pub pooled_projection_dim: usize,
    /// Blocks with a second, image-only attention.
    pub dual_attention_layers: Vec<usize>,
    /// Whether queries and keys are RMS-normalised.
    pub qk_norm: bool,
}

/// The shapes of the VAE decoder that the plan needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VaeSpec {
    /// Channels of the encoder blocks (the decoder walks them in reverse).
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (the decoder has one more).
    pub layers_per_block: usize,
    /// Latent channels.
    pub latent_channels: usize,
    /// Whether the encoder is loaded too (image editing, ControlNet conditions).
    pub encoder: bool,
}

/// The shapes of a T5 encoder that the plan needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct T5Spec {
    /// Vocabulary (rows of the embedding table).
    pub vocab: usize,
    /// Model width.
    pub d_model: usize,
    /// Attention width (`heads · d_kv`).
    pub inner: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// Blocks.
    pub layers: usize,
    /// Heads.
    pub heads: usize,
    /// Relative-position buckets.
    pub buckets: usize,
}

/// The shapes of a CLIP text encoder that the plan needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClipSpec {
    /// Vocabulary.
    pub vocab: usize,
    /// Positions.
    pub positions: usize,
    /// Width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Layers.
    pub layers: usize,
    /// The text projection's width, when the file has one.
    pub projection: Option<usize>,
}

/// Everything the weights and activations of a model depend on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelSpec {
    /// The transformer.
    pub mmdit: MmditSpec,
    /// CLIP-L.
    pub clip_l: ClipSpec,
    /// CLIP-G.
    pub clip_g: ClipSpec,
    /// T5, when it is loaded (or planned for).
    pub t5: Option<T5Spec>,
    /// The VAE.
    pub vae: VaeSpec,
}

impl ModelSpec {
    /// The published configurations of SD3.5 Large (and large-turbo, the same architecture)
    /// and Medium, with CLIP-L, CLIP-G and (when `t5`) T5-XXL as Stability ships them.
    pub fn published(variant: Variant, t5: bool) -> Self {
        let mmdit = match variant {
            Variant::Large | Variant::LargeTurbo => MmditSpec {
                patch_size: 2,
                in_channels: 16,
                out_channels: 16,
                depth: 38,
                heads: 38,
                hidden: 38 * 64,
                pos_embed_max_size: 192,
                joint_attention_dim: 4096,
                pooled_projection_dim: 2048,
                dual_attention_layers: Vec::new(),
                qk_norm: true,
            },
            Variant::Medium => MmditSpec {
                patch_size: 2,
                in_channels: 16,
                out_channels: 16,
                depth: 24,
                heads: 24,
                hidden: 24 * 64,
                pos_embed_max_size: 384,
                joint_attention_dim: 4096,
                pooled_projection_dim: 2048,
                dual_attention_layers: (0..13).collect(),
                qk_norm: true,
            },
        };
        Self {
            mmdit,
            clip_l: ClipSpec {
                vocab: 49408,
                positions: 77,
                hidden: 768,
                intermediate: 3072,
                layers: 12,
                projection: Some(768),
            },
            clip_g: ClipSpec {
                vocab: 49408,
                positions: 77,
                hidden: 1280,
                intermediate: 5120,
                layers: 32,
                projection: Some(1280),
            },
            t5: t5.then_some(T5Spec {
                vocab: 32128,
                d_model: 4096,
                inner: 4096,
                d_ff: 10240,
                layers: 24,
                heads: 64,
                buckets: 32,
            }),
            vae: VaeSpec {
                block_out_channels: vec![128, 256, 512, 512],
                layers_per_block: 2,
                latent_channels: 16,
                encoder: true,
            },
        }
    }
}

/// Bytes of weights per component.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WeightBytes {
    /// The transformer.
    pub mmdit: u64,
    /// CLIP-L and CLIP-G.
    pub clip: u64,
    /// T5 (0 when not loaded).
    pub t5: u64,
    /// The VAE (decoder, and encoder when loaded).
    pub vae: u64,
    /// What is served beside the model: the ControlNets, and the LoRA adapters' updates as a
    /// request naming every one of them has them compiled (with the files as read, where the
    /// model runs on the CPU); 0 when nothing is.
    pub adapters: u64,
}

impl WeightBytes {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.mmdit + self.clip + self.t5 + self.vae + self.adapters
    }
}

/// How the pipeline's loaders store weights of a precision: f32, or bf16 for every tensor but
/// the transformer's and T5's linears in fp8, which are F8E4M3 bytes with f32 row scales and a
/// 256-entry value table.
#[derive(Debug, Clone, Copy)]
pub struct WeightSpec {
    precision: Precision,
}

impl WeightSpec {
    /// Weights stored in `precision`.
    pub fn new(precision: Precision) -> Self {
        Self { precision }
    }

    /// Bytes of a non-linear tensor (norms, biases, embeddings, convolutions).
    fn plain(&self, elements: usize) -> u64 {
        let bytes = if self.precision == Precision::F32 {
            4
        } else {
            2
        };
        (elements * bytes) as u64
    }

    /// Bytes of a linear `[out, in]` with an optional bias; `quantisable` linears (the
    /// transformer's and T5's) are F8E4M3 bytes with f32 row scales and a 256-entry table in
    /// fp8, the others bf16.
    fn linear(&self, out: usize, input: usize, bias: bool, quantisable: bool) -> u64 {
        let weight = match self.precision {
            Precision::Fp8 if quantisable => (out * input + out * 4 + 256 * 4) as u64,
            Precision::F32 => (out * input * 4) as u64,
            _ => (out * input * 2) as u64,
        };
        weight + if bias { self.plain(out) } else { 0 }
    }

    /// The transformer's weights.
    pub fn mmdit(&self, c: &MmditSpec) -> u64 {
        let (h, p) = (c.hidden, c.patch_size);
        let hd = h / c.heads.max(1);
        let q = |out, input| self.linear(out, input, true, true);
        let norms = if c.qk_norm { self.plain(2 * hd) } else { 0 };
        let attention = |proj: bool| q(3 * h, h) + norms + if proj { q(h, h) } else { 0 };
        let mlp = q(4 * h, h) + q(h, 4 * h);
        let mut total = self.plain(h * c.in_channels * p * p + h)
            + self.plain(c.pos_embed_max_size * c.pos_embed_max_size * h)
            + q(h, TIMESTEP_WIDTH)
            + q(h, h)
            + q(h, c.pooled_projection_dim)
            + q(h, h)
            + q(h, c.joint_attention_dim)
            + q(2 * h, h)
            + q(p * p * c.out_channels, h);
        for i in 0..c.depth {
            let last = i + 1 == c.depth;
            let dual = c.dual_attention_layers.contains(&i);
            total += q(if dual { 9 } else { 6 } * h, h) + attention(true) + mlp;
            if dual {
                total += attention(true);
            }
            total += q(if last { 2 } else { 6 } * h, h) + attention(!last);
            if !last {
                total += mlp;
            }
        }
        total
    }

    /// A CLIP encoder's weights (kept bf16 when the model is served in fp8).
    pub fn clip(&self, c: &ClipSpec) -> u64 {
        let spec = Self::new(match self.precision {
            Precision::Fp8 => Precision::Bf16,
            p => p,
        });
        let d = c.hidden;
        let l = |out, input| spec.linear(out, input, true, false);
        let layer =
            spec.plain(4 * d) + l(3 * d, d) + l(d, d) + l(c.intermediate, d) + l(d, c.intermediate);
        spec.plain((c.vocab + c.positions) * d + 2 * d)
            + layer * c.layers as u64
            + c.projection.map_or(0, |p| spec.linear(p, d, false, false))
    }

    /// T5's weights.
    pub fn t5(&self, c: &T5Spec) -> u64 {
        let d = c.d_model;
        let l = |out, input| self.linear(out, input, false, true);
        let block =
            self.plain(2 * d) + l(3 * c.inner, d) + l(d, c.inner) + 2 * l(c.d_ff, d) + l(d, c.d_ff);
        self.plain(c.vocab * d + c.buckets * c.heads + d) + block * c.layers as u64
    }

    /// The VAE decoder's weights.
    pub fn vae_decoder(&self, c: &VaeSpec) -> u64 {
        let channels = &c.block_out_channels;
        let Some(&top) = channels.last() else {
            return 0;
        };
        let conv = |o: usize, i: usize, k: usize| self.plain(o * i * k * k + o);
        let resnet = |a: usize, b: usize| {
            self.plain(2 * a + 2 * b)
                + conv(b, a, 3)
                + conv(b, b, 3)
                + if a == b { 0 } else { conv(b, a, 1) }
        };
        let mut total = conv(top, c.latent_channels, 3)
            + 2 * resnet(top, top)
            + self.plain(2 * top)
            + 4 * self.plain(top * top + top);
        let mut previous = top;
        for (i, &ch) in channels.iter().rev().enumerate() {
            total += resnet(previous, ch) + c.layers_per_block as u64 * resnet(ch, ch);
            if i + 1 < channels.len() {
                total += conv(ch, ch, 3);
            }
            previous = ch;
        }
        let first = channels[0];
        total + self.plain(2 * first) + conv(3, first, 3)
    }

    /// The VAE encoder's weights.
    pub fn vae_encoder(&self, c: &VaeSpec) -> u64 {
        let channels = &c.block_out_channels;
        let (Some(&first), Some(&top)) = (channels.first(), channels.last()) else {
            return 0;
        };
        let conv = |o: usize, i: usize, k: usize| self.plain(o * i * k * k + o);
        let resnet = |a: usize, b: usize| {
            self.plain(2 * a + 2 * b)
                + conv(b, a, 3)
                + conv(b, b, 3)
                + if a == b { 0 } else { conv(b, a, 1) }
        };
        let mut total = conv(first, 3, 3);
        let mut previous = first;
        for (i, &ch) in channels.iter().enumerate() {
            total +=
                resnet(previous, ch) + c.layers_per_block.saturating_sub(1) as u64 * resnet(ch, ch);
            if i + 1 < channels.len() {
                total += conv(ch, ch, 3);
            }
            previous = ch;
        }
        total
            + 2 * resnet(top, top)
            + self.plain(2 * top)
            + 4 * self.plain(top * top + top)
            + self.plain(2 * top)
            + conv(2 * c.latent_channels, top, 3)
    }

    /// Every component's weights.
    pub fn model(&self, spec: &ModelSpec) -> WeightBytes {
        WeightBytes {
            mmdit: self.mmdit(&spec.mmdit),
            clip: self.clip(&spec.clip_l) + self.clip(&spec.clip_g),
            t5: spec.t5.as_ref().map_or(0, |t5| self.t5(t5)),
            vae: self.vae_decoder(&spec.vae)
                + if spec.vae.encoder {
                    self.vae_encoder(&spec.vae)
                } else {
                    0
                },
            adapters: 0,
        }
    }
}

/// What a plan is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlanRequest {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Images sampled together.
    pub batch: usize,
    /// Classifier-free guidance doubles the transformer's batch.
    pub guidance: bool,
    /// T5's sequence length (the context is `77 + t5_tokens` long whether T5 is loaded or not).
    pub t5_tokens: usize,
}

/// Where and how the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlanDevice {
    /// CUDA or the CPU.
    pub kind: DeviceKind,
    /// The weights' precision.
    pub precision: Precision,
    /// Whether the generic op graph runs (always on CUDA; on the CPU under
    /// `SD35_GENERIC_OPS=1`), rather than the CPU's fused kernels.
    pub generic: bool,
    /// The op graph's chunk size.
    pub chunk_elements: usize,
}

impl PlanDevice {
    /// Bytes of one activation value: bf16 on GPUs for reduced precisions, else f32.
    pub fn compute_bytes(&self) -> u64 {
        match (self.kind, self.precision) {
            (DeviceKind::Cuda, Precision::Bf16 | Precision::Fp8) => 2,
            _ => 4,
        }
    }

    /// A GPU: bf16 compute for reduced precisions, the generic graph, the default chunks.
    pub fn cuda(precision: Precision) -> Self {
        Self {
            kind: DeviceKind::Cuda,
            precision,
            generic: true,
            chunk_elements: DEFAULT_CHUNK_ELEMENTS,
        }
    }

    fn generic(&self) -> bool {
        self.kind == DeviceKind::Cuda || self.generic
    }
}

/// A request's memory, and the largest operation it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryPlan {
    /// Peak device memory: weights + the largest stage + the runtime reserve.
    pub peak_bytes: u64,
    /// All weights.
    pub weights_bytes: u64,
    /// The largest stage's activations.
    pub activation_bytes: u64,
    /// The runtime reserve.
    pub runtime_bytes: u64,
    /// Which stage is the largest: `transformer`, `vae` or `text`.
    pub largest_stage: &'static str,
    /// Weights per component.
    pub weights: WeightBytes,
    /// A transformer pass.
    pub transformer_bytes: u64,
    /// The VAE decode of one image.
    pub vae_bytes: u64,
    /// The text encoders.
    pub text_bytes: u64,
    /// The most elements one softmax call sees (after chunking).
    pub max_softmax_elements: u64,
    /// The most elements of one tensor an element-wise kernel walks.
    pub max_tensor_elements: u64,
}

impl MemoryPlan {
    /// On CUDA, the first kernel limit the request reaches, in words; `None` when it reaches
    /// none (always `None` on the CPU, whose kernels count in 64 bits).
    pub fn kernel_limit(&self, device: DeviceKind) -> Option<String> {
        if device != DeviceKind::Cuda {
            return None;
        }
        if self.max_softmax_elements >= CUDA_SOFTMAX_LIMIT as u64 {
            return Some(format!(
                "one attention softmax would cover {} elements, over the 2^31 candle's CUDA \
                 softmax can index",
                self.max_softmax_elements
            ));
        }
        if self.max_tensor_elements >= CUDA_ELEMENTWISE_LIMIT as u64 {
            return Some(format!(
                "one activation would hold {} elements, over the 2^32 candle's CUDA \
                 element-wise kernels can count",
                self.max_tensor_elements
            ));
        }
        None
    }
}

/// The activations of each stage.
#[derive(Debug, Clone, Copy)]
struct Stages {
    transformer: u64,
    vae: u64,
    text: u64,
    max_softmax: u64,
    max_tensor: u64,
}

/// Elements of one attention chunk of `heads_batch · rows · keys`, as the unfused attention
/// splits it.
fn softmax_chunk(heads_batch: u64, queries: u64, keys: u64, chunk: u64) -> u64 {
    let row = heads_batch * keys;
    let rows = (chunk / row.max(1)).clamp(1, queries.max(1));
    rows * row
}

fn stages(spec: &ModelSpec, precision: Precision, req: &PlanRequest, dev: &PlanDevice) -> Stages {
    let e = dev.compute_bytes();
    let chunk = dev.chunk_elements as u64;
    let generic = dev.generic();
    let m = &spec.mmdit;
    let (h, heads) = (m.hidden as u64, m.heads as u64);
    let latent_h = (req.height / 8) as u64;
    let latent_w = (req.width / 8) as u64;
    let patch = m.patch_size.max(1) as u64;
    let image_tokens = (latent_h / patch) * (latent_w / patch);
    let tokens = image_tokens + (CLIP_TOKENS + req.t5_tokens) as u64;
    let rows = req.batch as u64 * if req.guidance { 2 } else { 1 };
    let unit = rows * tokens * h;

    // The transformer: the streams and projections, one chunk of scores and its softmax, and
    // the largest linear's dequantised copy where weights are not kept in the compute dtype.
    let softmax = softmax_chunk(rows * heads, tokens, tokens, chunk);
    let largest_linear = [
        if m.dual_attention_layers.is_empty() {
            6
        } else {
            9
        } * m.hidden
            * m.hidden,
        4 * m.hidden * m.hidden,
        m.hidden * m.joint_attention_dim,
    ]
    .into_iter()
    .max()
    .unwrap_or(0) as u64;
    let dequantised = match (precision, dev.kind) {
        // The result in the compute dtype, and one block's table[bytes] and · scale in f32.
        (Precision::Fp8, _) => {
            largest_linear * e + 8 * largest_linear.min(DEQUANTISE_ELEMENTS as u64)
        }
        // bf16 weights computed in f32 on the CPU.
        (Precision::Bf16, DeviceKind::Cpu) => largest_linear * 4,
        _ => 0,
    };
    let transformer = if generic {
        e * (TRANSFORMER_UNITS_GENERIC * unit + 2 * softmax) + dequantised
    } else {
        e * TRANSFORMER_UNITS_FUSED * unit + dequantised
    };
    let mlp_hidden = 4 * unit;

    // The VAE decodes one image at a time: per level, a resnet's input and outputs or an
    // upsampler's input and output are alive, plus one chunk's temporaries.
    let channels = &spec.vae.block_out_channels;
    let top = channels.last().copied().unwrap_or(0) as u64;
    let mut vae_live = 0u64;
    // The largest im2col (a 3x3 convolution reads 9 values per input channel and output
    // position) or GroupNorm temporary, before the chunk size caps it.
    let mut vae_chunk = 0u64;
    let mut max_tensor = 0u64;
    let mut res = latent_h * latent_w;
    let mut previous = top;
    // The mid block's attention over the latent grid: its projections and one score chunk.
    let mid = e * (7 * top * res + 2 * softmax_chunk(1, res, res, chunk));
    for (i, &ch) in channels.iter().rev().enumerate() {
        let ch = ch as u64;
        let resnet = |a: u64, b: u64| res * (a + b).max(3 * b);
        vae_live = vae_live.max(resnet(previous, ch)).max(resnet(ch, ch));
        vae_chunk = vae_chunk.max(9 * res * previous.max(ch));
        max_tensor = max_tensor.max(res * previous.max(ch));
        if i + 1 < channels.len() {
            // Upsampled 2x: its input (at this level) and its output (at the next).
            vae_live = vae_live.max(res * ch + 4 * res * ch);
            res *= 4;
            vae_chunk = vae_chunk.max(9 * res * ch);
            max_tensor = max_tensor.max(res * ch);
        }
        previous = ch;
    }
    // Chunk temporaries: im2col and the band's normalised f32 input, or GroupNorm's f32
    // statistics temporaries: at most 4 bytes a chunk element either way.
    let vae = (e * vae_live + 4 * vae_chunk.min(chunk)).max(mid);

    // The text encoders run one prompt at a time; T5's gated MLP dominates.
    let t5_live = spec.t5.as_ref().map_or(0, |t5| {
        req.t5_tokens as u64 * (3 * t5.d_ff as u64 + 6 * t5.d_model as u64)
            + (t5.heads * req.t5_tokens * req.t5_tokens) as u64 * 2
    });
    let clip_live = (CLIP_TOKENS * (3 * spec.clip_g.intermediate + 6 * spec.clip_g.hidden)) as u64;
    let text = e * t5_live.max(clip_live);

    Stages {
        transformer,
        vae,
        text,
        max_softmax: softmax,
        max_tensor: max_tensor.max(mlp_hidden).max(vae_chunk.min(chunk)),
    }
}

/// The plan of `req` for a model of `spec` whose weights take `weights`.
pub fn plan(
    spec: &ModelSpec,
    weights: WeightBytes,
    req: &PlanRequest,
    dev: &PlanDevice,
) -> MemoryPlan {
    let s = stages(spec, dev.precision, req, dev);
    let (largest_stage, activation_bytes) = [
        ("transformer", s.transformer),
        ("vae", s.vae),
        ("text", s.text),
    ]
    .into_iter()
    .max_by_key(|&(_, b)| b)
    .unwrap_or(("transformer", 0));
    let runtime_bytes = match dev.kind {
        DeviceKind::Cuda => CUDA_RUNTIME_BYTES,
        _ => CPU_RUNTIME_BYTES,
    };
    let weights_bytes = weights.total();
    MemoryPlan {
        peak_bytes: weights_bytes + activation_bytes + runtime_bytes,
        weights_bytes,
        activation_bytes,
        runtime_bytes,
        largest_stage,
        weights,
        transformer_bytes: s.transformer,
        vae_bytes: s.vae,
        text_bytes: s.text,
        max_softmax_elements: s.max_softmax,
        max_tensor_elements: s.max_tensor,
    }
}

/// The plan of a published variant (weights from [`ModelSpec::published`]).
pub fn published(variant: Variant, req: &PlanRequest, dev: &PlanDevice, t5: bool) -> MemoryPlan {
    let spec = ModelSpec::published(variant, t5);
    let weights = WeightSpec::new(dev.precision).model(&spec);
    plan(&spec, weights, req, dev)
}

/// What a server checks requests against: the loaded model's shapes and weights, its device,
/// and the memory left for activations once the model is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryGate {
    /// The model's shapes.
    pub spec: ModelSpec,
    /// Its weights as loaded.
    pub weights: WeightBytes,
    /// Where it runs.
    pub device: PlanDevice,
    /// T5's sequence length.
    pub t5_tokens: usize,
    /// Bytes a request's activations may take: what the device had free once the model was
    /// loaded (or what `--memory-limit` leaves after the weights), less a margin.
    pub activation_budget_bytes: u64,
    /// Free device bytes measured after loading, for the report.
    pub free_bytes: Option<u64>,
    /// The device's total bytes, for the report.
    pub total_bytes: Option<u64>,
}

impl MemoryGate {
    /// The plan of `batch` images of `width` × `height`.
    pub fn plan(&self, width: u32, height: u32, batch: usize, guidance: bool) -> MemoryPlan {
        let req = PlanRequest {
            width: width as usize,
            height: height as usize,
            batch,
            guidance,
            t5_tokens: self.t5_tokens,
        };
        plan(&self.spec, self.weights, &req, &self.device)
    }

    /// Whether `batch` images of that size fit and reach no kernel limit.
    pub fn fits(&self, width: u32, height: u32, batch: usize, guidance: bool) -> bool {
        let p = self.plan(width, height, batch, guidance);
        p.kernel_limit(self.device.kind).is_none()
            && p.activation_bytes <= self.activation_budget_bytes
    }

    /// The largest square side (a multiple of 16, at most `max_side`) one image fits at.
    pub fn largest_square(&self, guidance: bool, max_side: u32) -> Option<u32> {
        let (mut lo, mut hi) = (0u32, max_side / 16);
        // Memory grows with the side: binary search over multiples of 16.
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if self.fits(mid * 16, mid * 16, 1, guidance) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        (lo > 0).then_some(lo * 16)
    }

    /// Why one image of that size cannot be served, naming what to lower; `None` when it can.
    pub fn refusal(
        &self,
        width: u32,
        height: u32,
        guidance: bool,
        max_side: u32,
    ) -> Option<String> {
        let p = self.plan(width, height, 1, guidance);
        let lower = match self.largest_square(guidance, max_side) {
            Some(side) => {
                format!("lower width and height (the largest square that fits is {side}x{side})")
            }
            None => "no size fits: serve a smaller precision (fp8) or give the server a device \
             with more memory"
                .to_owned(),
        };
        if let Some(why) = p.kernel_limit(self.device.kind) {
            return Some(format!(
                "{width}x{height} cannot run on this device: {why}; {lower}"
            ));
        }
        if p.activation_bytes > self.activation_budget_bytes {
            return Some(format!(
                "{width}x{height} needs {} for its activations (the {} stage, computed from the \
                 model's shapes) but only {} of device memory is left beside the {} of weights; \
                 {lower}",
                gib(p.activation_bytes),
                p.largest_stage,
                gib(self.activation_budget_bytes),
                gib(p.weights_bytes)
            ));
        }
        None
    }
}

/// `bytes` as GiB with one decimal, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cuda(precision: Precision) -> PlanDevice {
        PlanDevice::cuda(precision)
    }

    fn square(size: usize, batch: usize, guidance: bool) -> PlanRequest {
        PlanRequest {
            width: size,
            height: size,
            batch,
            guidance,
            t5_tokens: 256,
        }
    }

    #[test]
    fn published_parameter_counts_are_the_model_cards() {
        // bf16 stores two bytes a parameter; the counts published for each component.
        let bf16 = WeightSpec::new(Precision::Bf16);
        let params = |bytes: u64| bytes as f64 / 2.0;
        let large = ModelSpec::published(Variant::Large, true);
        let near = |got: f64, want: f64, what: &str| {
            assert!(
                (got / want - 1.0).abs() < 0.01,
                "{what}: {got:.4e} vs {want:.4e}"
            );
        };
        // The position table (192² × 2432 and 384² × 1536) is a saved buffer, not a parameter.
        near(
            params(bf16.mmdit(&large.mmdit)),
            8.06e9 + 89.6e6,
            "Large MMDiT",
        );
        near(params(bf16.clip(&large.clip_l)), 123.65e6, "CLIP-L");
        near(params(bf16.clip(&large.clip_g)), 694.66e6, "CLIP-G");
        near(
            params(bf16.t5(&large.t5.unwrap())),
            4.762e9,
            "T5-XXL encoder",
        );
    }

    #[test]
    fn large_at_1024_with_guidance_meets_the_memory_goals() {
        let req = square(1024, 1, true);
        let bf16 = published(Variant::Large, &req, &cuda(Precision::Bf16), false);
        let fp8 = published(Variant::Large, &req, &cuda(Precision::Fp8), false);
        assert!(
            bf16.peak_bytes <= 20_000_000_000,
            "bf16 {}",
            gib(bf16.peak_bytes)
        );
        assert!(
            fp8.peak_bytes <= 12_000_000_000,
            "fp8 {}",
            gib(fp8.peak_bytes)
        );
        assert!(fp8.weights_bytes < bf16.weights_bytes * 6 / 10);
        // T5 adds its 9.5 GB in bf16.
        let t5 = published(Variant::Large, &req, &cuda(Precision::Bf16), true);
        assert!(t5.weights.t5 > 9_000_000_000 && t5.weights.t5 < 10_000_000_000);
    }

    #[test]
    fn no_accepted_request_reaches_a_kernel_limit_up_to_3072_and_four_images() {
        // Every size the server accepts for Large (up to 3072, multiples of 16) and Medium up
        // to the same, square and at extreme aspect ratios, one to four images, with and
        // without guidance: the chunked operations stay under the softmax limit and no whole
        // activation reaches the element-wise limit.
        for variant in [Variant::Large, Variant::Medium] {
            for precision in [Precision::Bf16, Precision::Fp8] {
                let dev = cuda(precision);
                for w in (16..=3072).step_by(16) {
                    for h in [16, 512, 1024, 1152, 1376, 2048, 3072] {
                        for batch in 1..=4 {
                            for guidance in [false, true] {
                                let req = PlanRequest {
                                    width: w,
                                    height: h,
                                    batch,
                                    guidance,
                                    t5_tokens: 256,
                                };
                                let p = published(variant, &req, &dev, false);
                                assert!(
                                    p.kernel_limit(DeviceKind::Cuda).is_none(),
                                    "{variant} {w}x{h} x{batch}: {:?}",
                                    p.kernel_limit(DeviceKind::Cuda)
                                );
                                assert!(p.max_softmax_elements <= dev.chunk_elements as u64);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn what_unchunked_attention_and_vae_would_have_reached() {
        // The issue the chunking answers: Large with guidance at 1152² has 2.3e9 scores per
        // layer, and the VAE's last convolution at 1376² an im2col over 2^32; both are now
        // chunked, and the chunks are below 2^26.
        let m = ModelSpec::published(Variant::Large, false).mmdit;
        let tokens = (1152 / 16) * (1152 / 16) + 77 + 256;
        let scores = 2 * m.heads as u64 * (tokens * tokens) as u64;
        assert!(scores >= CUDA_SOFTMAX_LIMIT as u64);
        let im2col = 1376u64 * 1376 * 256 * 9;
        assert!(im2col >= CUDA_ELEMENTWISE_LIMIT as u64);
        let p = published(
            Variant::Large,
            &square(1152, 1, true),
            &cuda(Precision::Bf16),
            false,
        );
        assert!(p.max_softmax_elements < 1 << 26);
    }

    #[test]
    fn a_size_over_the_elementwise_limit_is_named() {
        // Medium's position table allows 6144²: its VAE activations would hold 9.7e9 values.
        let p = published(
            Variant::Medium,
            &square(6144, 1, true),
            &cuda(Precision::Bf16),
            false,
        );
        let why = p.kernel_limit(DeviceKind::Cuda).unwrap();
        assert!(why.contains("2^32"), "{why}");
        assert!(p.kernel_limit(DeviceKind::Cpu).is_none());
    }

    #[test]
    fn a_gate_refuses_what_does_not_fit_and_names_the_largest_square() {
        let spec = ModelSpec::published(Variant::Large, false);
        let device = PlanDevice::cuda(Precision::Bf16);
        let weights = WeightSpec::new(Precision::Bf16).model(&spec);
        let at_1024 = published(Variant::Large, &square(1024, 1, true), &device, false);
        let gate = MemoryGate {
            spec,
            weights,
            device,
            t5_tokens: 256,
            activation_budget_bytes: at_1024.activation_bytes,
            free_bytes: None,
            total_bytes: None,
        };
        assert!(gate.fits(1024, 1024, 1, true));
        assert!(gate.refusal(1024, 1024, true, 3072).is_none());
        assert!(!gate.fits(1024, 1024, 2, true));
        let why = gate.refusal(2048, 2048, true, 3072).unwrap();
        assert!(
            why.contains("2048x2048") && why.contains("1024x1024"),
            "{why}"
        );
        assert_eq!(gate.largest_square(true, 3072), Some(1024));
        let none = MemoryGate {
            activation_budget_bytes: 0,
            ..gate
        };
        assert!(
            none.refusal(16, 16, true, 3072)
                .unwrap()
                .contains("no size fits")
        );
    }

    #[test]
    fn memory_grows_with_size_and_batch() {
        let dev = cuda(Precision::Bf16);
        let a = published(Variant::Large, &square(1024, 1, true), &dev, false);
        let b = published(Variant::Large, &square(1024, 2, true), &dev, false);
        let c = published(Variant::Large, &square(2048, 1, true), &dev, false);
        assert!(b.activation_bytes > a.activation_bytes);
        assert!(c.activation_bytes > a.activation_bytes);
        assert_eq!(a.weights_bytes, c.weights_bytes);
    }
}
