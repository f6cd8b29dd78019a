//! A ControlNet's configuration and the names of its weights: read from a diffusers folder's
//! `config.json` or inferred from a single file's shapes (in Stability's or diffusers' naming),
//! and checked against the transformer it is loaded for.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Deserialize;

use crate::mmdit::MmditConfig;
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
pub(super) struct Names {
    pub(super) layout: ControlNetLayout,
    pub(super) prefix: String,
}

impl Names {
    pub(super) fn detect(w: &Weights, shown: &Path) -> Result<Self> {
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

    pub(super) fn t_embedder(&self) -> [&'static str; 2] {
        match self.layout {
            ControlNetLayout::Diffusers => [
                "time_text_embed.timestep_embedder.linear_1",
                "time_text_embed.timestep_embedder.linear_2",
            ],
            ControlNetLayout::Stability => ["t_embedder.mlp.0", "t_embedder.mlp.2"],
        }
    }

    pub(super) fn y_embedder(&self) -> [&'static str; 2] {
        match self.layout {
            ControlNetLayout::Diffusers => [
                "time_text_embed.text_embedder.linear_1",
                "time_text_embed.text_embedder.linear_2",
            ],
            ControlNetLayout::Stability => ["y_embedder.mlp.0", "y_embedder.mlp.2"],
        }
    }

    /// adaLN, q/k/v (one fused name or three), output projection, fc1, fc2 of block `i`.
    pub(super) fn block(&self, i: usize) -> BlockNames {
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

pub(super) struct BlockNames {
    pub(super) ada: String,
    pub(super) qkv: Vec<String>,
    pub(super) proj: String,
    pub(super) fc1: String,
    pub(super) fc2: String,
}

/// What [`ControlNet::inspect`] reads: headers and config, no weights.
pub(super) struct Opened {
    pub(super) weights: Weights,
    pub(super) names: Names,
    pub(super) cfg: ControlNetConfig,
    pub(super) shown: PathBuf,
}

pub(super) fn open(
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
