//! SD3's `AutoencoderKL` (16 latent channels), from diffusers or Stability
//! (`first_stage_model.`) names: the decoder, and the encoder whose posterior mean turns an
//! image into latents (image editing, ControlNet conditions).

use candle_core::Tensor;
use serde::Deserialize;

use crate::attention::attention;
use crate::nn::{Conv2d, GroupNorm, Pad};
use crate::weights::Weights;
use crate::{Error, Result};

/// SD3's latent scaling factor.
pub const SD3_SCALING_FACTOR: f64 = 1.5305;
/// SD3's latent shift factor.
pub const SD3_SHIFT_FACTOR: f64 = 0.0609;

/// Decoder hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    /// Channels of the encoder blocks (the decoder walks them in reverse).
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (the decoder has one more).
    pub layers_per_block: usize,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// Latent channels.
    pub latent_channels: usize,
    /// `latents / scaling + shift` before decoding.
    pub scaling_factor: f64,
    /// See `scaling_factor`.
    pub shift_factor: f64,
}

#[derive(Deserialize)]
struct DiffusersConfig {
    block_out_channels: Vec<usize>,
    layers_per_block: usize,
    norm_num_groups: usize,
    latent_channels: usize,
    scaling_factor: f64,
    #[serde(default)]
    shift_factor: Option<f64>,
}

impl VaeConfig {
    /// Reads diffusers' `vae/config.json`.
    pub fn from_diffusers(path: &std::path::Path) -> Result<Self> {
        let c: DiffusersConfig = crate::error::read_json(path)?;
        Ok(Self {
            block_out_channels: c.block_out_channels,
            layers_per_block: c.layers_per_block,
            norm_num_groups: c.norm_num_groups,
            latent_channels: c.latent_channels,
            scaling_factor: c.scaling_factor,
            shift_factor: c.shift_factor.unwrap_or(0.0),
        })
    }

    /// Infers the decoder from Stability-layout weights, with SD3's scaling and shift. GroupNorm
    /// uses 32 groups, or fewer when the channel counts do not allow 32.
    pub fn infer_stability(w: &Weights) -> Result<Self> {
        let n_up = (0..)
            .take_while(|i| w.contains(&format!("decoder.up.{i}.block.0.conv1.weight")))
            .count();
        if n_up == 0 {
            return Err(Error::Layout(
                "no VAE decoder weights (`decoder.up.*`)".into(),
            ));
        }
        let layers = (0..)
            .take_while(|j| w.contains(&format!("decoder.up.0.block.{j}.conv1.weight")))
            .count();
        let mut channels = Vec::with_capacity(n_up);
        for i in 0..n_up {
            channels.push(w.shape(&format!("decoder.up.{i}.block.0.conv2.weight"))?[0]);
        }
        let latent = w.shape("decoder.conv_in.weight")?[1];
        let g = channels.iter().fold(0, |a, &c| gcd(a, c));
        Ok(Self {
            block_out_channels: channels,
            layers_per_block: layers.saturating_sub(1),
            norm_num_groups: g.min(32),
            latent_channels: latent,
            scaling_factor: SD3_SCALING_FACTOR,
            shift_factor: SD3_SHIFT_FACTOR,
        })
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Which naming scheme the weights use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeNames {
    /// diffusers `AutoencoderKL`.
    Diffusers,
    /// The original LDM names (below `first_stage_model.`).
    Stability,
}

#[derive(Debug, Clone)]
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

/// The VAE's norms: GroupNorm with eps 1e-6.
fn norm(w: &Weights, name: &str, groups: usize) -> Result<GroupNorm> {
    GroupNorm::load(w, name, groups, 1e-6)
}

impl Resnet {
    fn load(w: &Weights, names: VaeNames, groups: usize) -> Result<Self> {
        let sc = match names {
            VaeNames::Diffusers => "conv_shortcut",
            VaeNames::Stability => "nin_shortcut",
        };
        Ok(Self {
            norm1: norm(w, "norm1", groups)?,
            conv1: Conv2d::load(w, "conv1", 1, 1)?,
            norm2: norm(w, "norm2", groups)?,
            conv2: Conv2d::load(w, "conv2", 1, 1)?,
            shortcut: if w.contains(&format!("{sc}.weight")) {
                Some(Conv2d::load(w, sc, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`. Takes `x` by value so it is
    /// freed as soon as the shortcut has read it: at full resolution, at most the input and
    /// one output, or three outputs, are alive (the memory plan counts on it).
    fn forward(&self, x: Tensor) -> Result<Tensor> {
        let h = self.conv1.forward_normed(&x, &self.norm1, true)?;
        let x = match &self.shortcut {
            Some(s) => s.forward(&x)?,
            None => x,
        };
        let h = self.conv2.forward_normed(&h, &self.norm2, true)?;
        Ok((x + h)?)
    }
}

#[derive(Debug, Clone)]
struct MidAttention {
    norm: GroupNorm,
    q: (Tensor, Tensor),
    k: (Tensor, Tensor),
    v: (Tensor, Tensor),
    out: (Tensor, Tensor),
}

impl MidAttention {
    fn load(w: &Weights, names: VaeNames, groups: usize) -> Result<Self> {
        let n = match names {
            VaeNames::Diffusers => ["group_norm", "to_q", "to_k", "to_v", "to_out.0"],
            VaeNames::Stability => ["norm", "q", "k", "v", "proj_out"],
        };
        // 1x1 convolutions in the LDM layout, linears in diffusers: both as [C, C].
        let lin = |name: &str| -> Result<(Tensor, Tensor)> {
            let wt = w.get(&format!("{name}.weight"))?;
            let c = wt.dim(0)?;
            Ok((wt.reshape((c, c))?, w.get(&format!("{name}.bias"))?))
        };
        Ok(Self {
            norm: norm(w, n[0], groups)?,
            q: lin(n[1])?,
            k: lin(n[2])?,
            v: lin(n[3])?,
            out: lin(n[4])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, wd) = x.dims4()?;
        let dtype = x.dtype();
        let n = self.norm.forward(x, false)?;
        let n = n.reshape((b, c, h * wd))?.transpose(1, 2)?.contiguous()?; // [B, HW, C]
        let lin = |t: &Tensor, p: &(Tensor, Tensor)| -> Result<Tensor> {
            let y = t.broadcast_matmul(&p.0.to_dtype(dtype)?.t()?)?;
            Ok(y.broadcast_add(&p.1.to_dtype(dtype)?)?)
        };
        let q = lin(&n, &self.q)?.unsqueeze(1)?;
        let k = lin(&n, &self.k)?.unsqueeze(1)?;
        let v = lin(&n, &self.v)?.unsqueeze(1)?;
        let a = attention(&q, &k, &v, 1.0 / (c as f64).sqrt(), None)?; // [B, HW, C]
        let o = lin(&a, &self.out)?; // [B, HW, C]
        let o = o.transpose(1, 2)?.reshape((b, c, h, wd))?;
        Ok((o + x)?)
    }
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<Resnet>,
    downsample: Option<Conv2d>,
}

/// The VAE encoder. Images encode to the posterior's mean (diffusers'
/// `retrieve_latents(..., sample_mode="argmax")`), so an image encodes the same way every time.
#[derive(Debug, Clone)]
pub struct VaeEncoder {
    cfg: VaeConfig,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid1: Resnet,
    mid_attn: MidAttention,
    mid2: Resnet,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeEncoder {
    /// Whether `w` (the root of the autoencoder) holds an encoder (in either naming).
    pub fn present(w: &Weights) -> bool {
        w.contains("encoder.conv_in.weight")
    }

    /// Loads the encoder from `w` (the root of the autoencoder).
    pub fn load(w: &Weights, cfg: VaeConfig, names: VaeNames) -> Result<Self> {
        let e = w.pp("encoder");
        let groups = cfg.norm_num_groups;
        let n = cfg.block_out_channels.len();
        let (mid1, attn, mid2, norm_out) = match names {
            VaeNames::Diffusers => (
                "mid_block.resnets.0",
                "mid_block.attentions.0",
                "mid_block.resnets.1",
                "conv_norm_out",
            ),
            VaeNames::Stability => ("mid.block_1", "mid.attn_1", "mid.block_2", "norm_out"),
        };
        // diffusers' Downsample2D pads the right and bottom by one, then convolves with
        // stride 2 and no padding.
        let downsample_pad = Pad {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        };
        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            let (block, down_name) = match names {
                VaeNames::Diffusers => (
                    format!("down_blocks.{i}.resnets"),
                    format!("down_blocks.{i}.downsamplers.0.conv"),
                ),
                VaeNames::Stability => (
                    format!("down.{i}.block"),
                    format!("down.{i}.downsample.conv"),
                ),
            };
            let resnets = (0..cfg.layers_per_block)
                .map(|j| Resnet::load(&e.pp(format!("{block}.{j}")), names, groups))
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < n {
                Some(Conv2d::load_padded(&e, &down_name, 2, downsample_pad)?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                downsample,
            });
        }
        Ok(Self {
            conv_in: Conv2d::load(&e, "conv_in", 1, 1)?,
            down,
            mid1: Resnet::load(&e.pp(mid1), names, groups)?,
            mid_attn: MidAttention::load(&e.pp(attn), names, groups)?,
            mid2: Resnet::load(&e.pp(mid2), names, groups)?,
            norm_out: norm(&e, norm_out, groups)?,
            conv_out: Conv2d::load(&e, "conv_out", 1, 1)?,
            cfg,
        })
    }

    /// The posterior's mean of images `[B, 3, H, W]` in `[-1, 1]`: raw latents
    /// `[B, 16, H/8, W/8]`, before the shift and scaling. Images are encoded one at a time.
    pub fn encode_mean(&self, images: &Tensor) -> Result<Tensor> {
        let batch = images.dim(0)?;
        let one = |x: &Tensor| -> Result<Tensor> {
            let mut x = self.conv_in.forward(x)?;
            for block in &self.down {
                for r in &block.resnets {
                    x = r.forward(x)?;
                }
                if let Some(conv) = &block.downsample {
                    x = conv.forward(&x)?;
                }
            }
            x = self.mid1.forward(x)?;
            x = self.mid_attn.forward(&x)?;
            x = self.mid2.forward(x)?;
            let moments = self.conv_out.forward_normed(&x, &self.norm_out, true)?;
            Ok(moments.narrow(1, 0, self.cfg.latent_channels)?)
        };
        if batch == 1 {
            return one(images);
        }
        let means = (0..batch)
            .map(|i| one(&images.narrow(0, i, 1)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&means, 0)?)
    }

    /// Sampler latents of images in `[-1, 1]`: `(mean - shift) · scaling`.
    pub fn encode_latents(&self, images: &Tensor) -> Result<Tensor> {
        let mean = self.encode_mean(images)?;
        Ok(((mean - self.cfg.shift_factor)? * self.cfg.scaling_factor)?)
    }
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<Resnet>,
    upsample: Option<Conv2d>,
}

/// The VAE decoder.
#[derive(Debug, Clone)]
pub struct VaeDecoder {
    cfg: VaeConfig,
    conv_in: Conv2d,
    mid1: Resnet,
    mid_attn: MidAttention,
    mid2: Resnet,
    /// In decoding order (deepest first).
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// Loads the decoder from `w` (the root of the autoencoder).
    pub fn load(w: &Weights, cfg: VaeConfig, names: VaeNames) -> Result<Self> {
        let d = w.pp("decoder");
        let n_up = cfg.block_out_channels.len();
        let groups = cfg.norm_num_groups;
        let (mid1, attn, mid2) = match names {
            VaeNames::Diffusers => (
                "mid_block.resnets.0",
                "mid_block.attentions.0",
                "mid_block.resnets.1",
            ),
            VaeNames::Stability => ("mid.block_1", "mid.attn_1", "mid.block_2"),
        };
        let mut up = Vec::with_capacity(n_up);
        for i in 0..n_up {
            let (block, up_name) = match names {
                VaeNames::Diffusers => (
                    format!("up_blocks.{i}.resnets"),
                    format!("up_blocks.{i}.upsamplers.0.conv"),
                ),
                VaeNames::Stability => {
                    let k = n_up - 1 - i;
                    (format!("up.{k}.block"), format!("up.{k}.upsample.conv"))
                }
            };
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| Resnet::load(&d.pp(format!("{block}.{j}")), names, groups))
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < n_up {
                Some(Conv2d::load(&d, &up_name, 1, 1)?)
            } else {
                None
            };
            up.push(UpBlock { resnets, upsample });
        }
        let norm_out = match names {
            VaeNames::Diffusers => "conv_norm_out",
            VaeNames::Stability => "norm_out",
        };
        Ok(Self {
            conv_in: Conv2d::load(&d, "conv_in", 1, 1)?,
            mid1: Resnet::load(&d.pp(mid1), names, groups)?,
            mid_attn: MidAttention::load(&d.pp(attn), names, groups)?,
            mid2: Resnet::load(&d.pp(mid2), names, groups)?,
            up,
            norm_out: norm(&d, norm_out, groups)?,
            conv_out: Conv2d::load(&d, "conv_out", 1, 1)?,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Decodes raw VAE latents `[B, 16, h, w]` (already unscaled) into images in `[-1, 1]`.
    /// Images are decoded one at a time: a full-resolution activation of one image stays
    /// under the 2³² elements candle's CUDA element-wise kernels can count (a batch of four
    /// 3072² images would not), and only one image's activations are alive at once.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let batch = z.dim(0)?;
        if batch == 1 {
            return self.decode_one(z);
        }
        let images = (0..batch)
            .map(|i| self.decode_one(&z.narrow(0, i, 1)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&images, 0)?)
    }

    fn decode_one(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(z)?;
        x = self.mid1.forward(x)?;
        x = self.mid_attn.forward(&x)?;
        x = self.mid2.forward(x)?;
        for block in &self.up {
            for r in &block.resnets {
                x = r.forward(x)?;
            }
            if let Some(conv) = &block.upsample {
                x = conv.forward_upsampled(&x)?;
            }
        }
        self.conv_out.forward_normed(&x, &self.norm_out, true)
    }

    /// Decodes sampler latents: `latents / scaling + shift`, then [`VaeDecoder::decode`].
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z = ((latents / self.cfg.scaling_factor)? + self.cfg.shift_factor)?;
        self.decode(&z)
    }
}
