//! `sd35-fullsize`: SD3.5 at its real size with random weights, and a mirror to fetch it
//! from, for `make check-full-size` (`tools/check-full-size.sh`).
//!
//! `write` lays out SD3.5 Medium or Large as the diffusers repositories do: the published
//! configurations, diffusers' and transformers' tensor names and shapes (the VAE's encoder
//! included), bf16, the transformer and T5-XXL in `-0000N-of-0000M` shards with their
//! `*.safetensors.index.json`. The values are random and deterministic: linear and
//! convolution weights N(0, min(0.02, 1/√fan_in)), embeddings N(0, 0.02), norm weights 1,
//! biases 0, so activations stay finite through every layer. To write at disk speed, every
//! window of 64 Ki values is copied from a random place in a table of 4 Mi normal samples (one
//! table per standard deviation), the places drawn by a generator seeded per tensor. The
//! tokenizers are copied from a tiny test model: only shapes matter here, and the tiny
//! vocabularies' ids are valid ids of the real ones.
//!
//! `mirror` serves a directory as an air-gapped `http` model mirror (the file tree plus
//! `sha256sums.txt`): `GET` and `HEAD`, `Range: bytes=N-`, files streamed from disk, never
//! read whole into memory. `size` prints what `write` writes; `tensors` lists every tensor,
//! to compare with the reference libraries' own state dicts.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

/// SD3.5 at its real size with random weights, and a mirror to fetch it from.
#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write the model's diffusers repository tree.
    Write(WriteArgs),
    /// Print the bytes `write` writes, in all and per component folder, as JSON.
    Size {
        /// Which model.
        #[arg(long)]
        variant: Model,
    },
    /// Print every tensor `write` writes: folder, name, shape.
    Tensors {
        /// Which model.
        #[arg(long)]
        variant: Model,
    },
    /// Write a random LoRA in diffusers' PEFT format on every attention and MLP linear of the
    /// model's transformer (`transformer.<module>.lora_A.weight` / `lora_B.weight`, bf16, no
    /// metadata so its scale is 1), to time adapters at the published shapes.
    Lora {
        /// Which model.
        #[arg(long)]
        variant: Model,
        /// The adapter's rank.
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the values.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Serve a directory as an `http` model mirror on loopback until killed; prints its URL.
    Mirror {
        /// The directory served.
        #[arg(long)]
        root: PathBuf,
        /// Port (0 picks a free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
}

#[derive(clap::Args, Debug)]
struct WriteArgs {
    /// Which model.
    #[arg(long)]
    variant: Model,
    /// The repository directory to create (it must not exist).
    #[arg(long)]
    out: PathBuf,
    /// A model directory whose `tokenizer`, `tokenizer_2` and `tokenizer_3` folders are copied.
    #[arg(long)]
    tokenizers: PathBuf,
    /// Seed of the values.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest transformer shard, in bytes: below Medium's 4.9 GB, so Medium is sharded too.
    #[arg(long, default_value_t = 2_000_000_000)]
    transformer_shard_bytes: u64,
    /// Largest T5-XXL shard, in bytes: the published files' 5 GB.
    #[arg(long, default_value_t = 5_000_000_000)]
    t5_shard_bytes: u64,
}

/// The SD3.5 models written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Model {
    /// SD3.5 Medium: MMDiT-X, 24 blocks, dual attention in blocks 0 to 12.
    Medium,
    /// SD3.5 Large (and Large Turbo): MMDiT, 38 blocks.
    Large,
}

impl Model {
    /// Joint blocks (as many heads as blocks, each 64 wide).
    fn layers(self) -> usize {
        match self {
            Self::Medium => 24,
            Self::Large => 38,
        }
    }

    fn pos_embed_max_size(self) -> usize {
        match self {
            Self::Medium => 384,
            Self::Large => 192,
        }
    }

    /// Blocks with the second, image-only attention.
    fn dual_attention_layers(self) -> Vec<usize> {
        match self {
            Self::Medium => (0..=12).collect(),
            Self::Large => Vec::new(),
        }
    }
}

const HEAD_DIM: usize = 64;
const LATENT_CHANNELS: usize = 16;
const PATCH: usize = 2;
const JOINT_ATTENTION_DIM: usize = 4096;
const POOLED_PROJECTION_DIM: usize = 2048;
const TIMESTEP_WIDTH: usize = 256;
const CLIP_VOCAB: usize = 49408;
const CLIP_POSITIONS: usize = 77;
const T5_VOCAB: usize = 32128;
const T5_D_MODEL: usize = 4096;
const T5_HEADS: usize = 64;
const T5_D_FF: usize = 10240;
const T5_LAYERS: usize = 24;
const T5_BUCKETS: usize = 32;
const VAE_CHANNELS: [usize; 4] = [128, 256, 512, 512];
const VAE_LAYERS_PER_BLOCK: usize = 2;
const VAE_GROUPS: usize = 32;
const EMBEDDING_STD: f32 = 0.02;

/// How a tensor is filled.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fill {
    /// Normal samples with this standard deviation.
    Normal(f32),
    /// Every value 1 (norm weights).
    Ones,
    /// Every value 0 (biases).
    Zeros,
}

#[derive(Clone, Debug)]
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    fill: Fill,
}

impl TensorSpec {
    fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes in bf16.
    fn bytes(&self) -> u64 {
        2 * self.elements() as u64
    }
}

/// The tensors of one model file set, in the order the modules declare them (the order
/// shards are filled in).
#[derive(Debug, Default)]
struct Tensors(Vec<TensorSpec>);

impl Tensors {
    fn push(&mut self, name: String, shape: &[usize], fill: Fill) {
        self.0.push(TensorSpec {
            name,
            shape: shape.to_vec(),
            fill,
        });
    }

    /// A weight read by products over `fan_in` inputs.
    fn weight(&mut self, name: String, shape: &[usize], fan_in: usize) {
        let std = EMBEDDING_STD.min(1.0 / (fan_in as f32).sqrt());
        self.push(name, shape, Fill::Normal(std));
    }

    fn linear(&mut self, prefix: &str, out: usize, input: usize, bias: bool) {
        self.weight(format!("{prefix}.weight"), &[out, input], input);
        if bias {
            self.push(format!("{prefix}.bias"), &[out], Fill::Zeros);
        }
    }

    fn conv(&mut self, prefix: &str, out: usize, input: usize, kernel: usize) {
        self.weight(
            format!("{prefix}.weight"),
            &[out, input, kernel, kernel],
            input * kernel * kernel,
        );
        self.push(format!("{prefix}.bias"), &[out], Fill::Zeros);
    }

    /// A LayerNorm or GroupNorm (`bias`) or an RMSNorm (weight only).
    fn norm(&mut self, prefix: &str, width: usize, bias: bool) {
        self.push(format!("{prefix}.weight"), &[width], Fill::Ones);
        if bias {
            self.push(format!("{prefix}.bias"), &[width], Fill::Zeros);
        }
    }

    fn embedding(&mut self, name: String, shape: &[usize]) {
        self.push(name, shape, Fill::Normal(EMBEDDING_STD));
    }

    fn bytes(&self) -> u64 {
        self.0.iter().map(TensorSpec::bytes).sum()
    }
}

/// diffusers' `SD3Transformer2DModel`.
fn transformer(model: Model) -> Tensors {
    let layers = model.layers();
    let h = layers * HEAD_DIM;
    let p = model.pos_embed_max_size();
    let dual = model.dual_attention_layers();
    let mut t = Tensors::default();
    t.embedding("pos_embed.pos_embed".into(), &[1, p * p, h]);
    t.conv("pos_embed.proj", h, LATENT_CHANNELS, PATCH);
    t.linear(
        "time_text_embed.timestep_embedder.linear_1",
        h,
        TIMESTEP_WIDTH,
        true,
    );
    t.linear("time_text_embed.timestep_embedder.linear_2", h, h, true);
    t.linear(
        "time_text_embed.text_embedder.linear_1",
        h,
        POOLED_PROJECTION_DIM,
        true,
    );
    t.linear("time_text_embed.text_embedder.linear_2", h, h, true);
    t.linear("context_embedder", h, JOINT_ATTENTION_DIM, true);
    for i in 0..layers {
        let b = format!("transformer_blocks.{i}");
        let last = i + 1 == layers;
        let second = dual.contains(&i);
        t.linear(
            &format!("{b}.norm1.linear"),
            if second { 9 } else { 6 } * h,
            h,
            true,
        );
        t.linear(
            &format!("{b}.norm1_context.linear"),
            if last { 2 } else { 6 } * h,
            h,
            true,
        );
        for name in [
            "to_q",
            "to_k",
            "to_v",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
        ] {
            t.linear(&format!("{b}.attn.{name}"), h, h, true);
        }
        for name in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
            t.norm(&format!("{b}.attn.{name}"), HEAD_DIM, false);
        }
        t.linear(&format!("{b}.attn.to_out.0"), h, h, true);
        if !last {
            t.linear(&format!("{b}.attn.to_add_out"), h, h, true);
        }
        if second {
            for name in ["to_q", "to_k", "to_v"] {
                t.linear(&format!("{b}.attn2.{name}"), h, h, true);
            }
            for name in ["norm_q", "norm_k"] {
                t.norm(&format!("{b}.attn2.{name}"), HEAD_DIM, false);
            }
            t.linear(&format!("{b}.attn2.to_out.0"), h, h, true);
        }
        let streams: &[&str] = if last { &["ff"] } else { &["ff", "ff_context"] };
        for ff in streams {
            t.linear(&format!("{b}.{ff}.net.0.proj"), 4 * h, h, true);
            t.linear(&format!("{b}.{ff}.net.2"), h, 4 * h, true);
        }
    }
    t.linear("norm_out.linear", 2 * h, h, true);
    t.linear("proj_out", PATCH * PATCH * LATENT_CHANNELS, h, true);
    t
}

/// transformers' `CLIPTextModelWithProjection`.
fn clip(hidden: usize, layers: usize, intermediate: usize) -> Tensors {
    let mut t = Tensors::default();
    t.embedding(
        "text_model.embeddings.token_embedding.weight".into(),
        &[CLIP_VOCAB, hidden],
    );
    t.embedding(
        "text_model.embeddings.position_embedding.weight".into(),
        &[CLIP_POSITIONS, hidden],
    );
    for i in 0..layers {
        let l = format!("text_model.encoder.layers.{i}");
        for name in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            t.linear(&format!("{l}.self_attn.{name}"), hidden, hidden, true);
        }
        t.norm(&format!("{l}.layer_norm1"), hidden, true);
        t.linear(&format!("{l}.mlp.fc1"), intermediate, hidden, true);
        t.linear(&format!("{l}.mlp.fc2"), hidden, intermediate, true);
        t.norm(&format!("{l}.layer_norm2"), hidden, true);
    }
    t.norm("text_model.final_layer_norm", hidden, true);
    t.linear("text_projection", hidden, hidden, false);
    t
}

/// transformers' `T5EncoderModel` (T5 v1.1 XXL) as `save_pretrained` writes it: the embedding
/// once, as `shared.weight` (`encoder.embed_tokens` is the same tensor).
fn t5() -> Tensors {
    let (d, inner) = (T5_D_MODEL, T5_HEADS * HEAD_DIM);
    let mut t = Tensors::default();
    t.embedding("shared.weight".into(), &[T5_VOCAB, d]);
    for i in 0..T5_LAYERS {
        let b = format!("encoder.block.{i}.layer");
        for name in ["q", "k", "v"] {
            t.linear(&format!("{b}.0.SelfAttention.{name}"), inner, d, false);
        }
        t.linear(&format!("{b}.0.SelfAttention.o"), d, inner, false);
        if i == 0 {
            t.embedding(
                format!("{b}.0.SelfAttention.relative_attention_bias.weight"),
                &[T5_BUCKETS, T5_HEADS],
            );
        }
        t.norm(&format!("{b}.0.layer_norm"), d, false);
        t.linear(&format!("{b}.1.DenseReluDense.wi_0"), T5_D_FF, d, false);
        t.linear(&format!("{b}.1.DenseReluDense.wi_1"), T5_D_FF, d, false);
        t.linear(&format!("{b}.1.DenseReluDense.wo"), d, T5_D_FF, false);
        t.norm(&format!("{b}.1.layer_norm"), d, false);
    }
    t.norm("encoder.final_layer_norm", d, false);
    t
}

fn vae_resnet(t: &mut Tensors, prefix: &str, input: usize, out: usize) {
    t.norm(&format!("{prefix}.norm1"), input, true);
    t.conv(&format!("{prefix}.conv1"), out, input, 3);
    t.norm(&format!("{prefix}.norm2"), out, true);
    t.conv(&format!("{prefix}.conv2"), out, out, 3);
    if input != out {
        t.conv(&format!("{prefix}.conv_shortcut"), out, input, 1);
    }
}

fn vae_mid_block(t: &mut Tensors, prefix: &str, c: usize) {
    vae_resnet(t, &format!("{prefix}.resnets.0"), c, c);
    let a = format!("{prefix}.attentions.0");
    t.norm(&format!("{a}.group_norm"), c, true);
    for name in ["to_q", "to_k", "to_v", "to_out.0"] {
        t.linear(&format!("{a}.{name}"), c, c, true);
    }
    vae_resnet(t, &format!("{prefix}.resnets.1"), c, c);
}

/// diffusers' `AutoencoderKL` of SD3: encoder and decoder, no quant convolutions.
fn vae() -> Tensors {
    let top = VAE_CHANNELS[VAE_CHANNELS.len() - 1];
    let mut t = Tensors::default();
    t.conv("encoder.conv_in", VAE_CHANNELS[0], 3, 3);
    let mut previous = VAE_CHANNELS[0];
    for (i, &c) in VAE_CHANNELS.iter().enumerate() {
        for j in 0..VAE_LAYERS_PER_BLOCK {
            let input = if j == 0 { previous } else { c };
            vae_resnet(
                &mut t,
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                input,
                c,
            );
        }
        if i + 1 < VAE_CHANNELS.len() {
            t.conv(
                &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                c,
                c,
                3,
            );
        }
        previous = c;
    }
    vae_mid_block(&mut t, "encoder.mid_block", top);
    t.norm("encoder.conv_norm_out", top, true);
    t.conv("encoder.conv_out", 2 * LATENT_CHANNELS, top, 3);
    t.conv("decoder.conv_in", top, LATENT_CHANNELS, 3);
    vae_mid_block(&mut t, "decoder.mid_block", top);
    let mut previous = top;
    for (i, &c) in VAE_CHANNELS.iter().rev().enumerate() {
        for j in 0..=VAE_LAYERS_PER_BLOCK {
            let input = if j == 0 { previous } else { c };
            vae_resnet(
                &mut t,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                input,
                c,
            );
        }
        if i + 1 < VAE_CHANNELS.len() {
            t.conv(&format!("decoder.up_blocks.{i}.upsamplers.0.conv"), c, c, 3);
        }
        previous = c;
    }
    t.norm("decoder.conv_norm_out", VAE_CHANNELS[0], true);
    t.conv("decoder.conv_out", 3, VAE_CHANNELS[0], 3);
    t
}

/// One folder of the repository: its config and its weights.
#[derive(Debug)]
struct Component {
    folder: &'static str,
    config_file: &'static str,
    config: Value,
    /// `<stem>.safetensors`, or `<stem>-0000N-of-0000M.safetensors` with
    /// `<stem>.safetensors.index.json` when sharded.
    stem: &'static str,
    tensors: Tensors,
    /// Largest shard; `None` writes one file.
    shard_bytes: Option<u64>,
}

fn clip_config(hidden: usize, layers: usize, intermediate: usize, act: &str) -> Value {
    json!({
        "architectures": ["CLIPTextModelWithProjection"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": act,
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": CLIP_POSITIONS,
        "model_type": "clip_text_model",
        "num_attention_heads": hidden / HEAD_DIM,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": hidden,
        "torch_dtype": "bfloat16",
        "vocab_size": CLIP_VOCAB,
    })
}

/// The published configurations, with the shard sizes asked for.
fn components(model: Model, transformer_shard: u64, t5_shard: u64) -> Vec<Component> {
    let layers = model.layers();
    vec![
        Component {
            folder: "transformer",
            config_file: "config.json",
            config: json!({
                "_class_name": "SD3Transformer2DModel",
                "_diffusers_version": "0.31.0.dev0",
                "attention_head_dim": HEAD_DIM,
                "caption_projection_dim": layers * HEAD_DIM,
                "dual_attention_layers": model.dual_attention_layers(),
                "in_channels": LATENT_CHANNELS,
                "joint_attention_dim": JOINT_ATTENTION_DIM,
                "num_attention_heads": layers,
                "num_layers": layers,
                "out_channels": LATENT_CHANNELS,
                "patch_size": PATCH,
                "pooled_projection_dim": POOLED_PROJECTION_DIM,
                "pos_embed_max_size": model.pos_embed_max_size(),
                "qk_norm": "rms_norm",
                "sample_size": 128,
            }),
            stem: "diffusion_pytorch_model",
            tensors: transformer(model),
            shard_bytes: Some(transformer_shard),
        },
        Component {
            folder: "text_encoder",
            config_file: "config.json",
            config: clip_config(768, 12, 3072, "quick_gelu"),
            stem: "model",
            tensors: clip(768, 12, 3072),
            shard_bytes: None,
        },
        Component {
            folder: "text_encoder_2",
            config_file: "config.json",
            config: clip_config(1280, 32, 5120, "gelu"),
            stem: "model",
            tensors: clip(1280, 32, 5120),
            shard_bytes: None,
        },
        Component {
            folder: "text_encoder_3",
            config_file: "config.json",
            config: json!({
                "architectures": ["T5EncoderModel"],
                "classifier_dropout": 0.0,
                "d_ff": T5_D_FF,
                "d_kv": HEAD_DIM,
                "d_model": T5_D_MODEL,
                "decoder_start_token_id": 0,
                "dense_act_fn": "gelu_new",
                "dropout_rate": 0.1,
                "eos_token_id": 1,
                "feed_forward_proj": "gated-gelu",
                "initializer_factor": 1.0,
                "is_encoder_decoder": true,
                "is_gated_act": true,
                "layer_norm_epsilon": 1e-06,
                "model_type": "t5",
                "num_decoder_layers": T5_LAYERS,
                "num_heads": T5_HEADS,
                "num_layers": T5_LAYERS,
                "output_past": true,
                "pad_token_id": 0,
                "relative_attention_max_distance": 128,
                "relative_attention_num_buckets": T5_BUCKETS,
                "tie_word_embeddings": false,
                "torch_dtype": "bfloat16",
                "use_cache": true,
                "vocab_size": T5_VOCAB,
            }),
            stem: "model",
            tensors: t5(),
            shard_bytes: Some(t5_shard),
        },
        Component {
            folder: "vae",
            config_file: "config.json",
            config: json!({
                "_class_name": "AutoencoderKL",
                "_diffusers_version": "0.31.0.dev0",
                "act_fn": "silu",
                "block_out_channels": VAE_CHANNELS,
                "down_block_types": vec!["DownEncoderBlock2D"; 4],
                "force_upcast": true,
                "in_channels": 3,
                "latent_channels": LATENT_CHANNELS,
                "latents_mean": null,
                "latents_std": null,
                "layers_per_block": VAE_LAYERS_PER_BLOCK,
                "mid_block_add_attention": true,
                "norm_num_groups": VAE_GROUPS,
                "out_channels": 3,
                "sample_size": 1024,
                "scaling_factor": 1.5305,
                "shift_factor": 0.0609,
                "up_block_types": vec!["UpDecoderBlock2D"; 4],
                "use_post_quant_conv": false,
                "use_quant_conv": false,
            }),
            stem: "diffusion_pytorch_model",
            tensors: vae(),
            shard_bytes: None,
        },
    ]
}

fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": "0.31.0.dev0",
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

fn scheduler_config() -> Value {
    json!({
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.31.0.dev0",
        "num_train_timesteps": 1000,
        "shift": 3.0,
    })
}

/// splitmix64: small, fast, and good enough to place windows.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// FNV-1a, to seed each tensor from its name.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    })
}

/// f32 to bf16, rounding to nearest even.
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let round = ((bits >> 16) & 1) + 0x7FFF;
    (bits.wrapping_add(round) >> 16) as u16
}

const TABLE_VALUES: usize = 1 << 22;
const WINDOW_VALUES: usize = 1 << 16;

/// Tables of bf16 values (little-endian bytes), one per fill.
#[derive(Debug)]
struct Values {
    seed: u64,
    tables: HashMap<u32, Vec<u8>>,
}

impl Values {
    fn new(seed: u64) -> Self {
        Self {
            seed,
            tables: HashMap::new(),
        }
    }

    fn table(&mut self, fill: Fill) -> &[u8] {
        let key = match fill {
            Fill::Normal(std) => std.to_bits(),
            Fill::Ones => 1.0_f32.to_bits() | 1,
            Fill::Zeros => 0,
        };
        let seed = self.seed ^ u64::from(key);
        self.tables.entry(key).or_insert_with(|| {
            let mut rng = SplitMix64(seed);
            let mut bytes = Vec::with_capacity(2 * TABLE_VALUES);
            for _ in 0..TABLE_VALUES {
                let value = match fill {
                    Fill::Normal(std) => {
                        // Box-Muller.
                        let (u, v) = (rng.unit(), rng.unit());
                        let normal = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                        (normal * f64::from(std)) as f32
                    }
                    Fill::Ones => 1.0,
                    Fill::Zeros => 0.0,
                };
                bytes.extend_from_slice(&bf16_bits(value).to_le_bytes());
            }
            bytes
        })
    }

    /// Writes `spec`'s values.
    fn write(&mut self, out: &mut impl Write, spec: &TensorSpec) -> Result<()> {
        let mut rng = SplitMix64(self.seed ^ fnv1a(&spec.name));
        let table = self.table(spec.fill);
        let mut left = spec.elements();
        while left > 0 {
            let n = left.min(WINDOW_VALUES);
            let start = (rng.next() % (TABLE_VALUES - n + 1) as u64) as usize;
            out.write_all(&table[2 * start..2 * (start + n)])?;
            left -= n;
        }
        Ok(())
    }
}

/// Writes one safetensors file holding `tensors` (data in name order, like the reference
/// writer) and returns its size.
fn write_safetensors(path: &Path, tensors: &[&TensorSpec], values: &mut Values) -> Result<u64> {
    let mut sorted = tensors.to_vec();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0_u64;
    for t in &sorted {
        header.insert(
            t.name.clone(),
            json!({ "dtype": "BF16", "shape": t.shape, "data_offsets": [offset, offset + t.bytes()] }),
        );
        offset += t.bytes();
    }
    let mut text = serde_json::to_vec(&Value::Object(header))?;
    // The data starts 8-byte aligned, as the reference writer pads it.
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::with_capacity(8 << 20, file);
    out.write_all(&(text.len() as u64).to_le_bytes())?;
    out.write_all(&text)?;
    for t in sorted {
        values.write(&mut out, t)?;
    }
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|file| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(8 + text.len() as u64 + offset)
}

/// Splits `tensors` into shards of at most `max_bytes` (a larger tensor gets one alone),
/// filled in module order as the reference writers do.
fn shards(tensors: &Tensors, max_bytes: Option<u64>) -> Vec<Vec<&TensorSpec>> {
    let mut out: Vec<Vec<&TensorSpec>> = vec![Vec::new()];
    let mut bytes = 0;
    for t in &tensors.0 {
        let full = max_bytes.is_some_and(|max| bytes + t.bytes() > max);
        if full && out.last().is_some_and(|shard| !shard.is_empty()) {
            out.push(Vec::new());
            bytes = 0;
        }
        if let Some(shard) = out.last_mut() {
            shard.push(t);
        }
        bytes += t.bytes();
    }
    out
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        if path.is_file()
            && let Some(name) = path.file_name()
        {
            std::fs::copy(&path, to.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

fn write(args: &WriteArgs) -> Result<()> {
    if args.out.exists() {
        bail!("{} exists: remove it first", args.out.display());
    }
    let started = Instant::now();
    std::fs::create_dir_all(&args.out)?;
    write_json(&args.out.join("model_index.json"), &model_index())?;
    std::fs::create_dir_all(args.out.join("scheduler"))?;
    write_json(
        &args.out.join("scheduler/scheduler_config.json"),
        &scheduler_config(),
    )?;
    for tokenizer in ["tokenizer", "tokenizer_2", "tokenizer_3"] {
        copy_dir(&args.tokenizers.join(tokenizer), &args.out.join(tokenizer))?;
    }
    let mut values = Values::new(args.seed);
    let mut total = 0;
    for c in components(
        args.variant,
        args.transformer_shard_bytes,
        args.t5_shard_bytes,
    ) {
        let dir = args.out.join(c.folder);
        std::fs::create_dir_all(&dir)?;
        write_json(&dir.join(c.config_file), &c.config)?;
        let shards = shards(&c.tensors, c.shard_bytes);
        let count = shards.len();
        let mut weight_map = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let name = if count == 1 {
                format!("{}.safetensors", c.stem)
            } else {
                format!("{}-{:05}-of-{count:05}.safetensors", c.stem, i + 1)
            };
            let file_started = Instant::now();
            let bytes = write_safetensors(&dir.join(&name), shard, &mut values)?;
            total += bytes;
            let seconds = file_started.elapsed().as_secs_f64();
            println!(
                "wrote {}/{name}: {} tensors, {} in {seconds:.1} s ({:.0} MB/s)",
                c.folder,
                shard.len(),
                gb(bytes),
                bytes as f64 / 1e6 / seconds.max(1e-3)
            );
            for t in shard {
                weight_map.insert(t.name.clone(), name.clone());
            }
        }
        if count > 1 {
            write_json(
                &dir.join(format!("{}.safetensors.index.json", c.stem)),
                &json!({ "metadata": { "total_size": c.tensors.bytes() }, "weight_map": weight_map }),
            )?;
        }
    }
    println!(
        "wrote {} ({}) in {:.0} s",
        args.out.display(),
        gb(total),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Bytes of the weights per component folder (the configs and tokenizers add a few kB).
fn size(model: Model) -> Value {
    let parts: BTreeMap<&str, u64> = components(model, u64::MAX, u64::MAX)
        .iter()
        .map(|c| (c.folder, c.tensors.bytes()))
        .collect();
    json!({ "total_bytes": parts.values().sum::<u64>(), "components": parts })
}

/// Decodes `%XX` escapes of a request path.
fn percent_decode(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Answers one request (one per connection; clients reconnect).
fn serve_connection(stream: TcpStream, root: &Path) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range_from = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("range")
        {
            range_from = value
                .trim()
                .strip_prefix("bytes=")
                .and_then(|spec| spec.strip_suffix('-'))
                .and_then(|from| from.parse::<u64>().ok());
        }
    }
    let mut words = request_line.split_whitespace();
    let method = words.next().unwrap_or_default();
    let target = words.next().unwrap_or("/");
    let path = percent_decode(
        target
            .split('?')
            .next()
            .unwrap_or("/")
            .trim_start_matches('/'),
    );
    let mut out = stream;
    let file = match path {
        Some(path)
            if (method == "GET" || method == "HEAD") && !path.split('/').any(|s| s == "..") =>
        {
            File::open(root.join(path))
                .ok()
                .filter(|f| f.metadata().is_ok_and(|m| m.is_file()))
        }
        _ => {
            out.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
            return Ok(());
        }
    };
    let Some(mut file) = file else {
        out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        return Ok(());
    };
    let total = file.metadata()?.len();
    let from = range_from.unwrap_or(0).min(total);
    let mut head = match range_from {
        Some(_) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{total}\r\n",
            total.saturating_sub(1)
        ),
        None => "HTTP/1.1 200 OK\r\n".to_owned(),
    };
    head.push_str(&format!(
        "Content-Length: {}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        total - from
    ));
    out.write_all(head.as_bytes())?;
    if method == "GET" {
        file.seek(SeekFrom::Start(from))?;
        // File to socket: the standard library hands this to the kernel (sendfile).
        std::io::copy(&mut file, &mut out)?;
    }
    out.flush()?;
    Ok(())
}

fn mirror(root: &Path, port: u16) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).context("binding the mirror")?;
    println!("http://{}/", listener.local_addr()?);
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let stream = stream?;
        let root = root.to_path_buf();
        std::thread::spawn(move || {
            // A client that goes away mid-transfer is no error of the mirror's.
            if let Err(e) = serve_connection(stream, &root) {
                eprintln!("mirror: {e:#}");
            }
        });
    }
    Ok(())
}

/// A random rank-`rank` LoRA on the transformer's attention and MLP linears (every 2-D weight
/// of `attn`, `attn2`, `ff` and `ff_context`): `A` drawn at the scale of its input, `B` small,
/// so the adapter changes the image without swamping it.
fn lora(model: Model, rank: usize, out: &Path, seed: u64) -> Result<()> {
    let mut t = Tensors::default();
    for weight in &transformer(model).0 {
        let Some(module) = weight.name.strip_suffix(".weight") else {
            continue;
        };
        let adapted = [".attn.", ".attn2.", ".ff.", ".ff_context."]
            .iter()
            .any(|part| module.contains(part));
        if let ([rows, cols], true) = (weight.shape.as_slice(), adapted) {
            t.weight(
                format!("transformer.{module}.lora_A.weight"),
                &[rank, *cols],
                *cols,
            );
            t.push(
                format!("transformer.{module}.lora_B.weight"),
                &[*rows, rank],
                Fill::Normal(EMBEDDING_STD),
            );
        }
    }
    let all: Vec<&TensorSpec> = t.0.iter().collect();
    let bytes = write_safetensors(out, &all, &mut Values::new(seed))?;
    eprintln!(
        "{}: {} tensors ({} adapted linears), rank {rank}, {}",
        out.display(),
        all.len(),
        all.len() / 2,
        gb(bytes)
    );
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Write(args) => write(&args),
        Command::Size { variant } => {
            println!("{}", serde_json::to_string_pretty(&size(variant))?);
            Ok(())
        }
        Command::Tensors { variant } => {
            for c in components(variant, u64::MAX, u64::MAX) {
                for t in &c.tensors.0 {
                    println!("{}\t{}\t{:?}", c.folder, t.name, t.shape);
                }
            }
            Ok(())
        }
        Command::Mirror { root, port } => mirror(&root, port),
        Command::Lora {
            variant,
            rank,
            out,
            seed,
        } => lora(variant, rank, &out, seed),
    }
}
