//! SD3.5 ControlNets (Stability's canny, depth and blur models for SD3.5 Large), numerically
//! equivalent to diffusers' `SD3ControlNetModel` as those models configure it:
//!
//! - `joint_attention_dim: null`: no text stream. The blocks are diffusers'
//!   `SD3SingleTransformerBlock` (adaLN-Zero with six chunks in the order shift, scale, gate of
//!   the attention then of the MLP; LayerNorm without affine, eps 1e-6; self-attention with
//!   biased q/k/v and output projections, no qk-norm; tanh-GELU MLP of width 4·C), chained.
//! - `use_pos_embed: false`: the input is the *transformer's* patch embedding of the latents,
//!   its positional embedding added (diffusers' pipeline lends the ControlNet the transformer's
//!   `pos_embed`), so [`ControlNet::forward`] takes it already embedded.
//! - `pos_embed_input`: a patch convolution of the control image's latents, no positional
//!   embedding, added to that input.
//! - `time_text_embed` of the timestep and the pooled text vector, as the transformer's;
//!   `force_zeros_for_pooled_projection` (false for SD3.5's) makes the pooled vector zeros, as
//!   diffusers' pipeline does when the flag is set.
//! - `controlnet_blocks`: one linear per block; the residuals are scaled by the conditioning
//!   scale. [`block_residual`] says which residual each transformer block adds.
//!
//! Weights load from a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`,
//! sharded or not) or from the single file of Stability's sd3.5 repository (`ControlNetEmbedder`
//! names: `t_embedder.mlp.{0,2}`, `y_embedder.mlp.{0,2}`, `transformer_blocks.{i}.
//! adaLN_modulation.1`, fused `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`,
//! `controlnet_blocks.{i}`, `pos_embed_input.proj`, and an `x_embedder` the SD3.5 models never
//! use). The two layouts store the adaLN chunks in the same order: unlike the MMDiT's last
//! context block and final layer, no ControlNet block is "pre-only", so nothing is swapped.
//! A single file records no head count; the ControlNet shares the transformer's attention
//! geometry (Stability's code builds it with the transformer's heads), so the head width is
//! taken from the transformer it is loaded for.
//!
//! A ControlNet whose width, heads, patch size, latent channels or pooled width do not fit the
//! transformer is refused at load with the file and both shapes named; one with a text stream
//! (InstantX's SD3 ControlNets) or its own positional embedding is refused as unsupported.

use std::path::{Path, PathBuf};

use candle_core::{D, Device, Tensor};
use serde::Deserialize;

use crate::fused::{self, Norm};
use crate::linear::Linear;
use crate::mmdit::{MmditConfig, timestep_embedding};
use crate::nn::{self, Conv2d};
use crate::variant::Precision;
use crate::weights::{Weights, component_files};
use crate::{Error, Result};

/// The ControlNet's architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlNetConfig {
    /// Blocks, and residuals returned.
    pub num_layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Token width (heads × head width); equal to the transformer's.
    pub hidden: usize,
    /// Patch size of `pos_embed_input` (the transformer's).
    pub patch_size: usize,
    /// Channels of the control latents `pos_embed_input` takes (the VAE's latent channels
    /// plus diffusers' `extra_conditioning_channels`).
    pub in_channels: usize,
    /// Width of the pooled text vector.
    pub pooled_projection_dim: usize,
    /// Whether the pooled vector is replaced by zeros (diffusers' pipeline does it when the
    /// config says so, and then encodes the control image without the VAE's shift factor).
    pub force_zeros_for_pooled_projection: bool,
}

/// Which names the weights use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlNetLayout {
    /// diffusers `SD3ControlNetModel` names.
    Diffusers,
    /// The names of Stability's sd3.5 repository (`ControlNetEmbedder`).
    Stability,
}

/// The fields of diffusers' `config.json` that matter here, with diffusers' defaults.
#[derive(Deserialize)]
struct DiffusersConfig {
    #[serde(default = "defaults::patch_size")]
    patch_size: usize,
    #[serde(default = "defaults::in_channels")]
    in_channels: usize,
    #[serde(default)]
    extra_conditioning_channels: usize,
    #[serde(default = "defaults::num_layers")]
    num_layers: usize,
    #[serde(default = "defaults::attention_head_dim")]
    attention_head_dim: usize,
    #[serde(default = "defaults::num_layers")]
    num_attention_heads: usize,
    #[serde(default = "defaults::joint_attention_dim")]
    joint_attention_dim: Option<usize>,
    #[serde(default = "defaults::pooled_projection_dim")]
    pooled_projection_dim: usize,
    #[serde(default = "defaults::yes")]
    use_pos_embed: bool,
    #[serde(default = "defaults::yes")]
    force_zeros_for_pooled_projection: bool,
}

/// diffusers' `SD3ControlNetModel.__init__` defaults, for keys a config leaves out.
mod defaults {
    pub fn patch_size() -> usize {
        2
    }
    pub fn in_channels() -> usize {
        16
    }
    pub fn num_layers() -> usize {
        18
    }
    pub fn attention_head_dim() -> usize {
        64
    }
    pub fn joint_attention_dim() -> Option<usize> {
        Some(4096)
    }
    pub fn pooled_projection_dim() -> usize {
        2048
    }
    pub fn yes() -> bool {
        true
    }
}

/// Where a ControlNet's weights are: its files, its config (diffusers folders), and the name
/// messages give it.
struct Source {
    files: Vec<PathBuf>,
    config: Option<PathBuf>,
    shown: PathBuf,
}

impl Source {
    fn locate(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let config = path.join("config.json");
            if !config.is_file() {
                return Err(Error::Layout(format!(
                    "{}: a ControlNet folder needs diffusers' config.json",
                    path.display()
                )));
            }
            return Ok(Self {
                files: component_files(path, "diffusion_pytorch_model")?,
                config: Some(config),
                shown: path.to_path_buf(),
            });
        }
        if path.is_file() {
            return Ok(Self {
                files: vec![path.to_path_buf()],
                config: None,
                shown: path.to_path_buf(),
            });
        }
        Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such ControlNet file or folder",
            ),
        ))
    }
}

/// The ControlNet's weight names: its layout and the prefix its names sit under.
#[derive(Debug, Clone)]
struct Names {
    layout: ControlNetLayout,
    prefix: String,
}

impl Names {
    fn detect(w: &Weights, shown: &Path) -> Result<Self> {
        let all = w.names();
        let prefix = all
            .iter()
            .find_map(|n| n.strip_suffix("controlnet_blocks.0.weight"))
            .ok_or_else(|| {
                Error::Layout(format!(
                    "{}: no `controlnet_blocks.0.weight`: not an SD3 ControlNet",
                    shown.display()
                ))
            })?
            .to_string();
        let has = |name: &str| w.contains(&format!("{prefix}{name}"));
        if has("context_embedder.weight") || has("transformer_blocks.0.attn.add_q_proj.weight") {
            return Err(Error::Layout(format!(
                "{}: this ControlNet has a text stream (`context_embedder`), as SD3 Medium's \
                 InstantX ControlNets do; only SD3.5's ControlNets, which have none, are supported",
                shown.display()
            )));
        }
        let layout = if has("transformer_blocks.0.attn.qkv.weight") {
            ControlNetLayout::Stability
        } else if has("transformer_blocks.0.attn.to_q.weight") {
            ControlNetLayout::Diffusers
        } else {
            return Err(Error::Layout(format!(
                "{}: neither `transformer_blocks.0.attn.qkv.weight` (Stability's names) nor \
                 `transformer_blocks.0.attn.to_q.weight` (diffusers' names)",
                shown.display()
            )));
        };
        Ok(Self { layout, prefix })
    }

    fn t_embedder(&self) -> [&'static str; 2] {
        match self.layout {
            ControlNetLayout::Diffusers => [
                "time_text_embed.timestep_embedder.linear_1",
                "time_text_embed.timestep_embedder.linear_2",
            ],
            ControlNetLayout::Stability => ["t_embedder.mlp.0", "t_embedder.mlp.2"],
        }
    }

    fn y_embedder(&self) -> [&'static str; 2] {
        match self.layout {
            ControlNetLayout::Diffusers => [
                "time_text_embed.text_embedder.linear_1",
                "time_text_embed.text_embedder.linear_2",
            ],
            ControlNetLayout::Stability => ["y_embedder.mlp.0", "y_embedder.mlp.2"],
        }
    }

    /// adaLN, q/k/v (one fused name or three), output projection, fc1, fc2 of block `i`.
    fn block(&self, i: usize) -> BlockNames {
        let b = format!("transformer_blocks.{i}");
        match self.layout {
            ControlNetLayout::Diffusers => BlockNames {
                ada: format!("{b}.norm1.linear"),
                qkv: ["to_q", "to_k", "to_v"]
                    .iter()
                    .map(|p| format!("{b}.attn.{p}"))
                    .collect(),
                proj: format!("{b}.attn.to_out.0"),
                fc1: format!("{b}.ff.net.0.proj"),
                fc2: format!("{b}.ff.net.2"),
            },
            ControlNetLayout::Stability => BlockNames {
                ada: format!("{b}.adaLN_modulation.1"),
                qkv: vec![format!("{b}.attn.qkv")],
                proj: format!("{b}.attn.proj"),
                fc1: format!("{b}.mlp.fc1"),
                fc2: format!("{b}.mlp.fc2"),
            },
        }
    }
}

struct BlockNames {
    ada: String,
    qkv: Vec<String>,
    proj: String,
    fc1: String,
    fc2: String,
}

/// What [`ControlNet::inspect`] reads: headers and config, no weights.
struct Opened {
    weights: Weights,
    names: Names,
    cfg: ControlNetConfig,
    shown: PathBuf,
}

fn open(
    path: &Path,
    transformer: &MmditConfig,
    device: &Device,
    precision: Precision,
) -> Result<Opened> {
    let source = Source::locate(path)?;
    let weights = Weights::open(&source.files, device, precision)?;
    let names = Names::detect(&weights, &source.shown)?;
    let w = weights.with_prefix(&names.prefix);
    let cfg = match &source.config {
        Some(config) => from_diffusers_config(config)?,
        None => infer_config(&w, transformer, &source.shown)?,
    };
    cfg.check_fits(&source.shown, transformer)?;
    check_shapes(&w, &names, &cfg, &source.shown)?;
    Ok(Opened {
        weights: w,
        names,
        cfg,
        shown: source.shown,
    })
}

fn from_diffusers_config(path: &Path) -> Result<ControlNetConfig> {
    let c: DiffusersConfig = crate::error::read_json(path)?;
    if let Some(dim) = c.joint_attention_dim {
        return Err(Error::Layout(format!(
            "{}: joint_attention_dim {dim}: this ControlNet has a text stream, as SD3 Medium's \
             InstantX ControlNets do; only SD3.5's ControlNets (joint_attention_dim null) are \
             supported",
            path.display()
        )));
    }
    if c.use_pos_embed {
        return Err(Error::Layout(format!(
            "{}: use_pos_embed true: this ControlNet embeds the latents itself; only SD3.5's \
             ControlNets, which share the transformer's embedding (use_pos_embed false), are \
             supported",
            path.display()
        )));
    }
    Ok(ControlNetConfig {
        num_layers: c.num_layers,
        heads: c.num_attention_heads,
        hidden: c.num_attention_heads * c.attention_head_dim,
        patch_size: c.patch_size,
        in_channels: c.in_channels + c.extra_conditioning_channels,
        pooled_projection_dim: c.pooled_projection_dim,
        force_zeros_for_pooled_projection: c.force_zeros_for_pooled_projection,
    })
}

/// The configuration of a single file, from its shapes; the head width is the transformer's.
fn infer_config(w: &Weights, transformer: &MmditConfig, shown: &Path) -> Result<ControlNetConfig> {
    let num_layers = w
        .names()
        .iter()
        .filter_map(|n| n.strip_prefix("controlnet_blocks."))
        .filter_map(|n| n.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    let patch = w.shape("pos_embed_input.proj.weight")?;
    let [hidden, in_channels, patch_size, patch_w] = patch[..] else {
        return Err(Error::Layout(format!(
            "{}: pos_embed_input.proj.weight has shape {patch:?}, expected a 4-D convolution",
            shown.display()
        )));
    };
    if patch_size != patch_w {
        return Err(Error::Layout(format!(
            "{}: pos_embed_input.proj.weight has shape {patch:?}: the patch is not square",
            shown.display()
        )));
    }
    let y_names = ["y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"];
    let pooled = y_names
        .iter()
        .find(|n| w.contains(&format!("{n}.weight")))
        .map(|n| w.shape(&format!("{n}.weight")))
        .transpose()?
        .and_then(|s| s.get(1).copied())
        .ok_or_else(|| {
            Error::Layout(format!(
                "{}: no pooled-text embedder (`y_embedder.mlp.0.weight`)",
                shown.display()
            ))
        })?;
    let head_width = transformer.hidden / transformer.heads.max(1);
    if head_width == 0 || hidden % head_width != 0 {
        return Err(Error::Mismatch(format!(
            "ControlNet {}: width {hidden} is not a whole number of the transformer's \
             {head_width}-wide heads (transformer: {})",
            shown.display(),
            describe_transformer(transformer)
        )));
    }
    Ok(ControlNetConfig {
        num_layers,
        heads: hidden / head_width,
        hidden,
        patch_size,
        in_channels,
        pooled_projection_dim: pooled,
        force_zeros_for_pooled_projection: false,
    })
}

fn describe_transformer(t: &MmditConfig) -> String {
    format!(
        "width {} ({} heads of {}), patch {}, {} latent channels, pooled width {}",
        t.hidden,
        t.heads,
        t.hidden / t.heads.max(1),
        t.patch_size,
        t.in_channels,
        t.pooled_projection_dim
    )
}

impl ControlNetConfig {
    /// Width of one head.
    pub fn head_width(&self) -> usize {
        self.hidden / self.heads.max(1)
    }

    fn describe(&self) -> String {
        format!(
            "width {} ({} heads of {}), patch {}, {} latent channels, pooled width {}",
            self.hidden,
            self.heads,
            self.head_width(),
            self.patch_size,
            self.in_channels,
            self.pooled_projection_dim
        )
    }

    /// Refuses a ControlNet (read from `file`) that does not fit `transformer`: its residuals
    /// must be the transformer's tokens (width, patch), its attention split the same way, its
    /// control latents the VAE's, its pooled vector the transformer's.
    pub fn check_fits(&self, file: &Path, transformer: &MmditConfig) -> Result<()> {
        let fits = self.hidden == transformer.hidden
            && self.heads == transformer.heads
            && self.patch_size == transformer.patch_size
            && self.in_channels == transformer.in_channels
            && self.pooled_projection_dim == transformer.pooled_projection_dim;
        if fits && self.num_layers > 0 {
            return Ok(());
        }
        if self.num_layers == 0 {
            return Err(Error::Layout(format!(
                "ControlNet {}: no blocks",
                file.display()
            )));
        }
        Err(Error::Mismatch(format!(
            "ControlNet {} does not fit this model, it is made for another variant: the \
             ControlNet has {}; the transformer has {}",
            file.display(),
            self.describe(),
            describe_transformer(transformer)
        )))
    }
}

/// Checks the shapes of every weight against the configuration, so a damaged or mislabelled
/// file is refused with the weight named rather than failing in the middle of a request.
fn check_shapes(w: &Weights, names: &Names, cfg: &ControlNetConfig, shown: &Path) -> Result<()> {
    let c = cfg.hidden;
    let expect = |name: &str, shape: &[usize]| -> Result<()> {
        let got = w.shape(name)?;
        if got != shape {
            return Err(Error::Layout(format!(
                "{}: `{}{name}` has shape {got:?}, a ControlNet of {} expects {shape:?}",
                shown.display(),
                names.prefix,
                cfg.describe()
            )));
        }
        Ok(())
    };
    let linear = |name: &str, out: usize, inp: usize| -> Result<()> {
        expect(&format!("{name}.weight"), &[out, inp])?;
        expect(&format!("{name}.bias"), &[out])
    };
    let p = cfg.patch_size;
    expect("pos_embed_input.proj.weight", &[c, cfg.in_channels, p, p])?;
    expect("pos_embed_input.proj.bias", &[c])?;
    let [t1, t2] = names.t_embedder();
    linear(t1, c, 256)?;
    linear(t2, c, c)?;
    let [y1, y2] = names.y_embedder();
    linear(y1, c, cfg.pooled_projection_dim)?;
    linear(y2, c, c)?;
    for i in 0..cfg.num_layers {
        let b = names.block(i);
        linear(&b.ada, 6 * c, c)?;
        let per = 3 * c / b.qkv.len();
        for q in &b.qkv {
            linear(q, per, c)?;
        }
        linear(&b.proj, c, c)?;
        linear(&b.fc1, 4 * c, c)?;
        linear(&b.fc2, c, 4 * c)?;
        linear(&format!("controlnet_blocks.{i}"), c, c)?;
    }
    Ok(())
}

/// One `SD3SingleTransformerBlock`.
#[derive(Debug, Clone)]
struct Block {
    ada: Linear,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// `x` layer-normalised (no affine, eps 1e-6) and modulated: `ln(x) * (1 + scale) + shift`.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    fused::norm(x, Norm::Layer, 1e-6, Some(scale), 1.0, Some(shift))
}

/// The `i`-th of the `[B, k*C]` modulation chunks, as `[B, 1, C]`.
fn chunk(m: &Tensor, i: usize, c: usize) -> Result<Tensor> {
    Ok(m.narrow(1, i * c, c)?.unsqueeze(1)?)
}

impl Block {
    fn forward(&self, x: &Tensor, temb_silu: &Tensor, heads: usize) -> Result<Tensor> {
        let c = x.dim(D::Minus1)?;
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
        let m = self.ada.forward(temb_silu)?;
        let norm_x = modulate(x, &chunk(&m, 0, c)?, &chunk(&m, 1, c)?)?;
        let (q, k, v) = nn::split_qkv_heads(&self.qkv.forward(&norm_x)?, heads)?;
        let scale = 1.0 / ((c / heads) as f64).sqrt();
        let a = crate::attention::attention(&q, &k, &v, scale, None)?;
        let x = fused::gated_residual_in_place(
            self.proj.forward_unbiased(&a)?,
            self.proj.bias(),
            &chunk(&m, 2, c)?,
            x,
        )?;
        let ff_in = modulate(&x, &chunk(&m, 3, c)?, &chunk(&m, 4, c)?)?;
        let h = fused::bias_in_place(self.fc1.forward_unbiased(&ff_in)?, self.fc1.bias(), true)?;
        fused::gated_residual_in_place(
            self.fc2.forward_unbiased(&h)?,
            self.fc2.bias(),
            &chunk(&m, 5, c)?,
            &x,
        )
    }
}

/// An SD3.5 ControlNet, loaded for one transformer.
#[derive(Debug, Clone)]
pub struct ControlNet {
    cfg: ControlNetConfig,
    layout: ControlNetLayout,
    source: PathBuf,
    pos_embed_input: Conv2d,
    t_fc1: Linear,
    t_fc2: Linear,
    y_fc1: Linear,
    y_fc2: Linear,
    blocks: Vec<Block>,
    controlnet_blocks: Vec<Linear>,
    weight_bytes: u64,
}

impl ControlNet {
    /// Reads a ControlNet's configuration (a diffusers folder's `config.json`, or a single
    /// file's shapes) and checks that it fits `transformer`, loading no weight: what a fetch
    /// or a start-up check can afford.
    pub fn inspect(path: &Path, transformer: &MmditConfig) -> Result<ControlNetConfig> {
        Ok(open(path, transformer, &Device::Cpu, Precision::F32)?.cfg)
    }

    /// Loads the ControlNet at `path` (a diffusers folder, or a single `.safetensors` file in
    /// either naming) for `transformer`, its linears stored as `precision` says (f32, bf16, or
    /// F8E4M3 with scales, like the transformer's). Refused, with the file and both shapes
    /// named, when it does not fit the transformer.
    pub fn load(
        path: &Path,
        transformer: &MmditConfig,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        let Opened {
            weights: w,
            names,
            cfg,
            shown,
        } = open(path, transformer, device, precision)?;
        let [t1, t2] = names.t_embedder();
        let [y1, y2] = names.y_embedder();
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        let mut controlnet_blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let b = names.block(i);
            let qkv: Vec<&str> = b.qkv.iter().map(String::as_str).collect();
            blocks.push(Block {
                ada: Linear::load(&w, &b.ada, true)?,
                qkv: Linear::load_fused(&w, &qkv, true)?,
                proj: Linear::load(&w, &b.proj, true)?,
                fc1: Linear::load(&w, &b.fc1, true)?,
                fc2: Linear::load(&w, &b.fc2, true)?,
            });
            controlnet_blocks.push(Linear::load(&w, &format!("controlnet_blocks.{i}"), true)?);
        }
        Ok(Self {
            pos_embed_input: Conv2d::load(&w, "pos_embed_input.proj", cfg.patch_size, 0)?,
            t_fc1: Linear::load(&w, t1, true)?,
            t_fc2: Linear::load(&w, t2, true)?,
            y_fc1: Linear::load(&w, y1, true)?,
            y_fc2: Linear::load(&w, y2, true)?,
            blocks,
            controlnet_blocks,
            weight_bytes: w.kept_bytes(),
            layout: names.layout,
            source: shown,
            cfg,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ControlNetConfig {
        &self.cfg
    }

    /// Which names the file used.
    pub fn layout(&self) -> ControlNetLayout {
        self.layout
    }

    /// The folder or file it was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Bytes of the weights it keeps in memory.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Refuses the ControlNet for a transformer it does not fit (see
    /// [`ControlNetConfig::check_fits`]); [`ControlNet::load`] already checked the one it was
    /// loaded for.
    pub fn fits(&self, transformer: &MmditConfig) -> Result<()> {
        self.cfg.check_fits(&self.source, transformer)
    }

    /// The VAE shift factor to encode control images with: the VAE's own, or 0 when the config
    /// forces a zero pooled vector (diffusers ties the two together for InstantX's models).
    pub fn control_latent_shift(&self, vae_shift: f64) -> f64 {
        if self.cfg.force_zeros_for_pooled_projection {
            0.0
        } else {
            vae_shift
        }
    }

    /// The residuals, one `[B, N, hidden]` per block, already multiplied by `scale`.
    ///
    /// - `x_embedded` `[B, N, hidden]`: the transformer's patch embedding of the latents with
    ///   its positional embedding added (the tokens its first block takes);
    /// - `control_latents` `[B, in_channels, h, w]`: the control image's VAE latents (posterior
    ///   mean, shifted and scaled like the latents), with `h/p · w/p = N`;
    /// - `pooled` `[B, pooled_dim]`: the prompt's pooled vector (zeros are used instead when
    ///   the config forces them);
    /// - `timestep` `[B]`: the transformer's timestep (0..1000).
    ///
    /// Computed in `x_embedded`'s dtype.
    pub fn forward(
        &self,
        x_embedded: &Tensor,
        control_latents: &Tensor,
        pooled: &Tensor,
        timestep: &Tensor,
        scale: f64,
    ) -> Result<Vec<Tensor>> {
        let dtype = x_embedded.dtype();
        let (b, n, c) = x_embedded.dims3()?;
        let (cb, cc, h, w) = control_latents.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.hidden {
            return Err(Error::Mismatch(format!(
                "ControlNet {}: tokens of width {c}, the ControlNet's is {}",
                self.source.display(),
                self.cfg.hidden
            )));
        }
        if cb != b
            || cc != self.cfg.in_channels
            || h % p != 0
            || w % p != 0
            || (h / p) * (w / p) != n
        {
            return Err(Error::invalid(
                "control_image",
                format!(
                    "control latents {:?} do not match {b} images of {n} tokens ({} channels, \
                     patch {p})",
                    control_latents.dims(),
                    self.cfg.in_channels
                ),
            ));
        }
        let pooled = if self.cfg.force_zeros_for_pooled_projection {
            pooled.zeros_like()?
        } else {
            pooled.clone()
        }
        .to_dtype(dtype)?;

        let t_emb = timestep_embedding(timestep, 256)?
            .to_device(x_embedded.device())?
            .to_dtype(dtype)?;
        let t_emb = self.t_fc2.forward(&self.t_fc1.forward(&t_emb)?.silu()?)?;
        let y_emb = self.y_fc2.forward(&self.y_fc1.forward(&pooled)?.silu()?)?;
        let temb_silu = (t_emb + y_emb)?.silu()?;

        let cond = self
            .pos_embed_input
            .forward(&control_latents.to_dtype(dtype)?)? // [B, C, h/p, w/p]
            .flatten_from(2)?
            .transpose(1, 2)?;
        let mut x = (x_embedded + cond)?.contiguous()?;
        let mut residuals = Vec::with_capacity(self.blocks.len());
        for (block, out) in self.blocks.iter().zip(&self.controlnet_blocks) {
            x = block.forward(&x, &temb_silu, self.cfg.heads)?;
            let r = out.forward(&x)?;
            residuals.push(if scale == 1.0 { r } else { (r * scale)? });
        }
        Ok(residuals)
    }
}

/// Which of `residuals` ControlNet outputs transformer block `block` (of `depth`) adds to its
/// image tokens after it runs, as diffusers' `SD3Transformer2DModel` picks it:
/// `int(block / (depth / residuals))` in floating point, and none for the last block (its
/// context stream is "pre-only", which diffusers' condition excludes). SD3.5 Large's 38 blocks
/// with a 19-block ControlNet: blocks 2k and 2k+1 add residual k, block 37 none.
pub fn block_residual(block: usize, depth: usize, residuals: usize) -> Option<usize> {
    if residuals == 0 || block + 1 >= depth {
        return None;
    }
    let interval = depth as f64 / residuals as f64;
    let index = (block as f64 / interval) as usize;
    (index < residuals).then_some(index)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::block_residual;

    #[test]
    fn residuals_map_to_blocks_as_diffusers_does() {
        // Large with a 19-block ControlNet: pairs of blocks share a residual, the last none.
        let map: Vec<Option<usize>> = (0..38).map(|i| block_residual(i, 38, 19)).collect();
        assert_eq!(map[0], Some(0));
        assert_eq!(map[1], Some(0));
        assert_eq!(map[2], Some(1));
        assert_eq!(map[36], Some(18));
        assert_eq!(map[37], None);
        // The tiny model: two blocks, two residuals; the second block is the last.
        assert_eq!(block_residual(0, 2, 2), Some(0));
        assert_eq!(block_residual(1, 2, 2), None);
        // Uneven: 24 blocks, 5 residuals: int(i / 4.8).
        let uneven: Vec<Option<usize>> = (0..24).map(|i| block_residual(i, 24, 5)).collect();
        assert_eq!(uneven[4], Some(0));
        assert_eq!(uneven[5], Some(1));
        assert_eq!(uneven[19], Some(3));
        assert_eq!(uneven[20], Some(4));
        assert_eq!(block_residual(0, 4, 0), None);
    }
}
