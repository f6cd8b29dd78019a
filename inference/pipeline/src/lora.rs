//! LoRA adapters, applied beside the weights (never merged into them), per request.
//!
//! **Files.** Two layouts of safetensors file are read, both turned into one list of targets
//! named as diffusers names the modules (`transformer_blocks.3.attn.to_q`, and for the CLIP
//! encoders `text_model.encoder.layers.0.self_attn.q_proj`):
//! - diffusers' PEFT format, as `StableDiffusion3Pipeline.save_lora_weights` writes it:
//!   `transformer.<module>.lora_A.weight` / `lora_B.weight`, and `text_encoder.` /
//!   `text_encoder_2.` for CLIP-L / CLIP-G; the scale `lora_alpha / r` (or `/ sqrt(r)` with
//!   rsLoRA) comes from the file's `lora_adapter_metadata`, per component, with its
//!   `rank_pattern` / `alpha_pattern`; without metadata it is 1, as diffusers loads such files;
//! - sd-scripts (kohya) naming on the Stability modules: `lora_unet_joint_blocks_0_x_block_attn_
//!   qkv.lora_down.weight` / `lora_up.weight` / `alpha`, `lora_te1_…` and `lora_te2_…` for
//!   the CLIP encoders. Fused q/k/v modules are split into three targets sharing the down
//!   matrix, `alpha / rank` scales the up matrix, and the two modules Stability stores in
//!   (shift, scale) order (the last block's context adaLN, the final layer's adaLN) have the
//!   halves of their up matrix swapped into diffusers' order. diffusers has no SD3 converter
//!   for this layout; the conversion is exactly the one `inference/reference/
//!   make_lora_goldens.py` writes out for diffusers to run.
//!
//! DoRA, T5 adapters, convolution (patch embedding) adapters and unknown keys are refused with
//! the key named: nothing in a file is ignored silently.
//!
//! **Applying.** A model lists its linears under their diffusers names ([`Target`]); an adapter
//! set with scales is compiled against that list ([`Adapters::compile`]), checking every shape
//! (a Medium adapter on Large is refused, naming the file, the module and both shapes). Per
//! linear, every adapter's pieces are stacked into one `A` (`[Σr, in]`) and one `B`
//! (`[out, Σr]`, the scales folded in, zeros outside each piece's rows), so a forward pass adds
//! `(x Aᵀ) Bᵀ` to the layer's product: two small matmuls per adapted linear, whatever the
//! number of adapters. The weights themselves never change, so a request without adapters is
//! exactly the base model, whatever ran before it, and fp8 weights stay quantised.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// A unique number for each linear layer loaded, so compiled adapters find their layer.
pub(crate) fn next_linear_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Which model of the pipeline a target belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// The MMDiT (`transformer.` in PEFT files, `lora_unet_` in kohya files).
    Transformer,
    /// CLIP-L (`text_encoder.`, `lora_te1_`).
    ClipL,
    /// CLIP-G (`text_encoder_2.`, `lora_te2_`).
    ClipG,
}

impl Component {
    fn prefix(self) -> &'static str {
        match self {
            Self::Transformer => "transformer",
            Self::ClipL => "text_encoder",
            Self::ClipG => "text_encoder_2",
        }
    }
}

/// One low-rank update of one module: `ΔW = scale · up · down`.
#[derive(Debug, Clone)]
pub struct Piece {
    /// The module, as diffusers names it.
    pub module: String,
    /// `[r, in]`, f32 on the CPU.
    pub down: Tensor,
    /// `[out, r]`, f32 on the CPU, in diffusers' row order.
    pub up: Tensor,
    /// `alpha / r` (or the file's rule).
    pub scale: f64,
}

/// An adapter file, read and converted.
#[derive(Debug, Clone)]
pub struct LoraFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its pieces per component.
    pub pieces: BTreeMap<Component, Vec<Piece>>,
}

impl LoraFile {
    /// Whether it adapts the CLIP encoders too.
    pub fn has_text_encoders(&self) -> bool {
        self.pieces.contains_key(&Component::ClipL) || self.pieces.contains_key(&Component::ClipG)
    }

    /// Reads a PEFT or kohya safetensors LoRA file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |why: String| Error::Layout(format!("LoRA file {}: {why}", path.display()));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| bad(format!("unreadable ({e})")))?;
        if tensors.is_empty() {
            return Err(bad("it holds no tensors".into()));
        }
        if let Some(key) = tensors.keys().find(|k| k.contains("dora_scale")) {
            return Err(bad(format!(
                "`{key}`: DoRA adapters are not supported, only LoRA"
            )));
        }
        let pieces = if tensors
            .keys()
            .any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te"))
        {
            read_kohya(&tensors).map_err(bad)?
        } else {
            read_peft(&tensors, &metadata).map_err(bad)?
        };
        Ok(Self {
            path: path.to_owned(),
            pieces,
        })
    }
}

fn f32_cpu(t: &Tensor) -> std::result::Result<Tensor, String> {
    t.to_dtype(DType::F32).map_err(|e| e.to_string())
}

/// PEFT's scale for `module` of `component`: `lora_alpha / r` (rsLoRA: `/ sqrt(r)`), with the
/// patterns' per-module values; 1 without metadata.
fn peft_scale(
    metadata: &Option<serde_json::Value>,
    component: Component,
    module: &str,
    rank: usize,
) -> std::result::Result<f64, String> {
    let Some(meta) = metadata else {
        return Ok(1.0);
    };
    let field = |name: &str| meta.get(format!("{}.{name}", component.prefix()));
    if field("use_dora").and_then(serde_json::Value::as_bool) == Some(true) {
        return Err("DoRA adapters are not supported, only LoRA".into());
    }
    // Patterns match the module name or a suffix of it at a dot, as PEFT does.
    let pattern = |name: &str| -> Option<f64> {
        let map = field(name)?.as_object()?;
        map.iter()
            .find(|(key, _)| {
                let key = key.trim_start_matches('^');
                module == key || module.ends_with(&format!(".{key}"))
            })
            .and_then(|(_, v)| v.as_f64())
    };
    let r = pattern("rank_pattern")
        .or_else(|| field("r").and_then(serde_json::Value::as_f64))
        .unwrap_or(rank as f64);
    let alpha = pattern("alpha_pattern")
        .or_else(|| field("lora_alpha").and_then(serde_json::Value::as_f64))
        .unwrap_or(r);
    let rs = field("use_rslora").and_then(serde_json::Value::as_bool) == Some(true);
    Ok(if rs { alpha / r.sqrt() } else { alpha / r })
}

fn read_peft(
    tensors: &HashMap<String, Tensor>,
    metadata: &HashMap<String, String>,
) -> std::result::Result<BTreeMap<Component, Vec<Piece>>, String> {
    let meta = match metadata.get("lora_adapter_metadata") {
        Some(text) => Some(
            serde_json::from_str::<serde_json::Value>(text)
                .map_err(|e| format!("its lora_adapter_metadata is not JSON ({e})"))?,
        ),
        None => None,
    };
    let mut out: BTreeMap<Component, Vec<Piece>> = BTreeMap::new();
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    for key in keys {
        let Some(module_key) = key
            .strip_suffix(".lora_A.weight")
            .or_else(|| key.strip_suffix(".lora.down.weight"))
        else {
            if key.ends_with(".lora_B.weight") || key.ends_with(".lora.up.weight") {
                continue;
            }
            return Err(format!(
                "`{key}` is neither a LoRA down (lora_A) nor up (lora_B) matrix"
            ));
        };
        let (component, module) = if let Some(m) = module_key.strip_prefix("transformer.") {
            (Component::Transformer, m)
        } else if let Some(m) = module_key.strip_prefix("text_encoder_2.") {
            (Component::ClipG, m)
        } else if let Some(m) = module_key.strip_prefix("text_encoder.") {
            (Component::ClipL, m)
        } else if module_key.starts_with("text_encoder_3.") {
            return Err(format!(
                "`{key}` adapts T5, which diffusers' SD3 LoRA loader does not either"
            ));
        } else {
            return Err(format!(
                "`{key}` belongs to no model of the pipeline (expected a transformer., \
                 text_encoder. or text_encoder_2. prefix)"
            ));
        };
        let up_key = if key.ends_with(".lora_A.weight") {
            format!("{module_key}.lora_B.weight")
        } else {
            format!("{module_key}.lora.up.weight")
        };
        let up = tensors
            .get(&up_key)
            .ok_or_else(|| format!("`{key}` has no matching `{up_key}`"))?;
        let down = f32_cpu(&tensors[key])?;
        let rank = down.dims().first().copied().unwrap_or(0);
        out.entry(component).or_default().push(Piece {
            module: module.to_owned(),
            down,
            up: f32_cpu(up)?,
            scale: peft_scale(&meta, component, module, rank)?,
        });
    }
    Ok(out)
}

/// diffusers' name of one sd-scripts module of the transformer, the parts its up matrix splits
/// into (q, k, v), and whether its halves are stored in Stability's (shift, scale) order.
fn kohya_transformer_module(name: &str, last_block: usize) -> Option<(Vec<String>, bool)> {
    let one = |m: &str| Some((vec![m.to_owned()], false));
    match name {
        "context_embedder" => return one("context_embedder"),
        "t_embedder_mlp_0" => return one("time_text_embed.timestep_embedder.linear_1"),
        "t_embedder_mlp_2" => return one("time_text_embed.timestep_embedder.linear_2"),
        "y_embedder_mlp_0" => return one("time_text_embed.text_embedder.linear_1"),
        "y_embedder_mlp_2" => return one("time_text_embed.text_embedder.linear_2"),
        "final_layer_linear" => return one("proj_out"),
        "final_layer_adaLN_modulation_1" => return Some((vec!["norm_out.linear".into()], true)),
        _ => {}
    }
    let rest = name.strip_prefix("joint_blocks_")?;
    let (index, kind) = rest.split_once('_')?;
    let i: usize = index.parse().ok()?;
    let b = format!("transformer_blocks.{i}");
    let split =
        |names: [&str; 3]| Some((names.iter().map(|n| format!("{b}.{n}")).collect(), false));
    let single = |n: &str| Some((vec![format!("{b}.{n}")], false));
    match kind {
        "x_block_attn_qkv" => split(["attn.to_q", "attn.to_k", "attn.to_v"]),
        "x_block_attn_proj" => single("attn.to_out.0"),
        "x_block_attn2_qkv" => split(["attn2.to_q", "attn2.to_k", "attn2.to_v"]),
        "x_block_attn2_proj" => single("attn2.to_out.0"),
        "x_block_mlp_fc1" => single("ff.net.0.proj"),
        "x_block_mlp_fc2" => single("ff.net.2"),
        "x_block_adaLN_modulation_1" => single("norm1.linear"),
        "context_block_attn_qkv" => {
            split(["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"])
        }
        "context_block_attn_proj" => single("attn.to_add_out"),
        "context_block_mlp_fc1" => single("ff_context.net.0.proj"),
        "context_block_mlp_fc2" => single("ff_context.net.2"),
        "context_block_adaLN_modulation_1" => {
            Some((vec![format!("{b}.norm1_context.linear")], i == last_block))
        }
        _ => None,
    }
}

/// diffusers' name of one sd-scripts module of a CLIP encoder
/// (`text_model_encoder_layers_3_self_attn_q_proj` → `text_model.encoder.layers.3.self_attn.q_proj`).
fn kohya_clip_module(name: &str) -> Option<String> {
    let rest = name.strip_prefix("text_model_encoder_layers_")?;
    let (index, kind) = rest.split_once('_')?;
    let i: usize = index.parse().ok()?;
    let kind = match kind {
        "self_attn_q_proj" => "self_attn.q_proj",
        "self_attn_k_proj" => "self_attn.k_proj",
        "self_attn_v_proj" => "self_attn.v_proj",
        "self_attn_out_proj" => "self_attn.out_proj",
        "mlp_fc1" => "mlp.fc1",
        "mlp_fc2" => "mlp.fc2",
        _ => return None,
    };
    Some(format!("text_model.encoder.layers.{i}.{kind}"))
}

fn swap_halves(t: &Tensor) -> std::result::Result<Tensor, String> {
    let rows = t.dim(0).map_err(|e| e.to_string())?;
    let half = rows / 2;
    let (a, b) = (
        t.narrow(0, 0, half).map_err(|e| e.to_string())?,
        t.narrow(0, half, rows - half).map_err(|e| e.to_string())?,
    );
    Tensor::cat(&[b, a], 0).map_err(|e| e.to_string())
}

fn read_kohya(
    tensors: &HashMap<String, Tensor>,
) -> std::result::Result<BTreeMap<Component, Vec<Piece>>, String> {
    // The last transformer block: the one whose context adaLN is stored (shift, scale).
    let last_block = tensors
        .keys()
        .filter_map(|k| k.strip_prefix("lora_unet_joint_blocks_"))
        .filter_map(|k| k.split('_').next()?.parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    let mut out: BTreeMap<Component, Vec<Piece>> = BTreeMap::new();
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    for key in keys {
        let Some(name) = key.strip_suffix(".lora_down.weight") else {
            if key.ends_with(".lora_up.weight") || key.ends_with(".alpha") {
                continue;
            }
            return Err(format!(
                "`{key}` is neither a LoRA down nor up matrix nor an alpha"
            ));
        };
        let up = tensors
            .get(&format!("{name}.lora_up.weight"))
            .ok_or_else(|| format!("`{key}` has no matching `{name}.lora_up.weight`"))?;
        let down = f32_cpu(&tensors[key])?;
        let rank = down.dims().first().copied().unwrap_or(0).max(1);
        let alpha = match tensors.get(&format!("{name}.alpha")) {
            Some(a) => a
                .to_dtype(DType::F64)
                .and_then(|a| a.flatten_all()?.to_vec1::<f64>())
                .map_err(|e| e.to_string())?
                .first()
                .copied()
                .unwrap_or(rank as f64),
            None => rank as f64,
        };
        let scale = alpha / rank as f64;
        let up = f32_cpu(up)?;
        let (component, targets, swapped) = if let Some(m) = name.strip_prefix("lora_unet_") {
            let (targets, swapped) = kohya_transformer_module(m, last_block)
                .ok_or_else(|| format!("`{key}`: no such transformer module (or an adapter of a convolution, which is not supported)"))?;
            (Component::Transformer, targets, swapped)
        } else if let Some((component, m)) = name
            .strip_prefix("lora_te1_")
            .map(|m| (Component::ClipL, m))
            .or_else(|| {
                name.strip_prefix("lora_te2_")
                    .map(|m| (Component::ClipG, m))
            })
        {
            let target =
                kohya_clip_module(m).ok_or_else(|| format!("`{key}`: no such CLIP module"))?;
            (component, vec![target], false)
        } else {
            return Err(format!(
                "`{key}`: only lora_unet_, lora_te1_ and lora_te2_ modules are known (lora_te3_ \
                 would adapt T5, which is not supported)"
            ));
        };
        let up = if swapped { swap_halves(&up)? } else { up };
        let rows = up.dim(0).map_err(|e| e.to_string())?;
        let part = rows / targets.len();
        if part * targets.len() != rows {
            return Err(format!(
                "`{name}.lora_up.weight` has {rows} rows, not a multiple of its {} parts",
                targets.len()
            ));
        }
        for (i, module) in targets.into_iter().enumerate() {
            out.entry(component).or_default().push(Piece {
                module,
                down: down.clone(),
                up: up.narrow(0, i * part, part).map_err(|e| e.to_string())?,
                scale,
            });
        }
    }
    Ok(out)
}

/// A linear a model offers to adapters: its diffusers name, which layer, which of its output
/// rows the module is, and whether the layer stores those rows' two halves swapped.
#[derive(Debug, Clone)]
pub struct Target {
    /// The module, as diffusers names it.
    pub module: String,
    /// The layer's id ([`crate::linear::Linear::id`]).
    pub linear: u64,
    /// Input features.
    pub in_features: usize,
    /// The layer's output features.
    pub out_features: usize,
    /// First output row of the module in the layer (q, k and v share one layer).
    pub row_offset: usize,
    /// The module's output rows.
    pub rows: usize,
    /// The layer stores (shift, scale) where diffusers has (scale, shift).
    pub swapped: bool,
}

/// The combined update of one linear: `y += (x Aᵀ) Bᵀ`.
#[derive(Debug, Clone)]
pub struct Delta {
    /// `[Σr, in]`.
    pub a: Tensor,
    /// `[out, Σr]`, the scales folded in.
    pub b: Tensor,
}

/// An adapter set compiled for one model: the update of each adapted linear, by layer id.
#[derive(Debug, Clone, Default)]
pub struct Adapters {
    deltas: HashMap<u64, Delta>,
}

/// Adapters for a model's forward pass: `None` runs the base model.
pub type Active<'a> = Option<&'a Adapters>;

impl Adapters {
    /// The update of the linear `id`, if an adapter touches it.
    pub fn get(&self, id: u64) -> Option<&Delta> {
        self.deltas.get(&id)
    }

    /// Whether no linear is adapted.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// Bytes the compiled updates take where they live.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.deltas.values().map(|d| size(&d.a) + size(&d.b)).sum()
    }

    /// Compiles `adapters` (each file with the request's scale) for the component `component`
    /// of a model whose linears are `targets`, in `dtype` on `device`. Every piece must name a
    /// target and fit its shape.
    pub fn compile(
        adapters: &[(&LoraFile, f64)],
        component: Component,
        model: &str,
        targets: &[Target],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let by_name: HashMap<&str, &Target> =
            targets.iter().map(|t| (t.module.as_str(), t)).collect();
        // Per linear: its pieces, in order.
        let mut grouped: BTreeMap<u64, Vec<(&Target, &Piece, f64)>> = BTreeMap::new();
        for (file, user_scale) in adapters {
            for piece in file.pieces.get(&component).into_iter().flatten() {
                let target = by_name.get(piece.module.as_str()).ok_or_else(|| {
                    Error::Layout(format!(
                        "LoRA file {}: `{}` is not a module of this {model}",
                        file.path.display(),
                        piece.module
                    ))
                })?;
                let (down_rows, down_cols) = piece.down.dims2()?;
                let (up_rows, up_cols) = piece.up.dims2()?;
                if down_cols != target.in_features || up_rows != target.rows || up_cols != down_rows
                {
                    return Err(Error::Layout(format!(
                        "LoRA file {}: `{}` is [{up_rows}, {up_cols}] x [{down_rows}, \
                         {down_cols}] but this {model}'s module is [{}, {}]: the adapter was \
                         made for another model",
                        file.path.display(),
                        piece.module,
                        target.rows,
                        target.in_features
                    )));
                }
                grouped.entry(target.linear).or_default().push((
                    target,
                    piece,
                    user_scale * piece.scale,
                ));
            }
        }
        let mut deltas = HashMap::with_capacity(grouped.len());
        for (id, pieces) in grouped {
            let (first, _, _) = pieces[0];
            let (out, input) = (first.out_features, first.in_features);
            let total: usize = pieces
                .iter()
                .map(|(_, p, _)| p.down.dim(0))
                .sum::<candle_core::Result<usize>>()?;
            let mut b = vec![0f32; out * total];
            let mut downs = Vec::with_capacity(pieces.len());
            let mut col = 0;
            for (target, piece, scale) in &pieces {
                let r = piece.down.dim(0)?;
                let up = (&piece.up * *scale)?;
                let up = if target.swapped {
                    swap_halves(&up).map_err(Error::Layout)?
                } else {
                    up
                };
                let values = up.flatten_all()?.to_vec1::<f32>()?;
                for row in 0..target.rows {
                    let dst = (target.row_offset + row) * total + col;
                    b[dst..dst + r].copy_from_slice(&values[row * r..(row + 1) * r]);
                }
                downs.push(piece.down.clone());
                col += r;
            }
            let a = Tensor::cat(&downs, 0)?;
            debug_assert_eq!(a.dims(), [total, input]);
            deltas.insert(
                id,
                Delta {
                    a: a.to_dtype(dtype)?.to_device(device)?,
                    b: Tensor::from_vec(b, (out, total), &Device::Cpu)?
                        .to_dtype(dtype)?
                        .to_device(device)?,
                },
            );
        }
        Ok(Self { deltas })
    }
}
