//! LoRA adapters and ControlNets a pipeline serves: loading and checking them against the
//! model, and compiling a request's adapter set (the last one is cached while batches repeat
//! it).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::Pipeline;
use crate::controlnet::ControlNet;
use crate::lora::{Adapters, Component, LoraFile};
use crate::{Error, Result};

/// An adapter set as requests name it: names with their scales' bits.
pub(super) type LoraKey = Vec<(String, u64)>;

/// An adapter set compiled for each model it adapts.
#[derive(Debug, Default)]
pub(super) struct CompiledLoras {
    pub(super) transformer: Adapters,
    pub(super) clip_l: Adapters,
    pub(super) clip_g: Adapters,
}

impl CompiledLoras {
    pub(super) fn active(a: &Adapters) -> crate::lora::Active<'_> {
        (!a.is_empty()).then_some(a)
    }
}

impl Pipeline {
    /// Reads the LoRA file `path` and offers it to requests as `name`. The file is checked
    /// against this model now: a module it does not have, or a shape that does not fit (an
    /// adapter made for another variant), is refused here, naming the file and the module.
    pub fn add_lora(&mut self, name: &str, path: &Path) -> Result<()> {
        if self.loras.contains_key(name) {
            return Err(Error::invalid(
                "lora",
                format!("two adapters are named `{name}`"),
            ));
        }
        let file = Arc::new(LoraFile::read(path)?);
        self.compile_loras(&[(file.as_ref(), 1.0)])?;
        self.loras.insert(name.to_owned(), file);
        Ok(())
    }

    /// Loads the ControlNet at `path` (a diffusers folder or a single file) and serves it for
    /// `mode`. One made for another variant is refused here, naming the file and both shapes.
    pub fn add_controlnet(&mut self, mode: sd35_contract::ControlMode, path: &Path) -> Result<()> {
        if self.controlnets.contains_key(&mode) {
            return Err(Error::invalid(
                "controlnet",
                format!("two ControlNets are given for {mode}"),
            ));
        }
        if self.vae_encoder.is_none() {
            return Err(Error::invalid(
                "controlnet",
                "this model's VAE has no encoder, so it cannot encode control images",
            ));
        }
        let net = ControlNet::load(path, self.mmdit.config(), &self.device, self.precision)?;
        self.controlnets.insert(mode, net);
        Ok(())
    }

    /// The ControlNets served, by mode.
    pub fn controlnets(&self) -> impl Iterator<Item = (sd35_contract::ControlMode, &ControlNet)> {
        self.controlnets.iter().map(|(m, n)| (*m, n))
    }

    /// The adapters requests may name, with their files.
    pub fn loras(&self) -> impl Iterator<Item = (&str, &LoraFile)> {
        self.loras.iter().map(|(n, f)| (n.as_str(), f.as_ref()))
    }

    /// Bytes the compiled adapters of a request naming every served LoRA take on the device:
    /// the most any request's set takes (a set's updates are its adapters' stacked, and one
    /// set is kept compiled at a time).
    pub fn lora_bytes(&self) -> Result<u64> {
        let every: Vec<(&LoraFile, f64)> = self.loras.values().map(|f| (f.as_ref(), 1.0)).collect();
        if every.is_empty() {
            return Ok(0);
        }
        let c = self.compile_loras(&every)?;
        Ok(c.transformer.bytes() + c.clip_l.bytes() + c.clip_g.bytes())
    }

    fn compile_loras(&self, set: &[(&LoraFile, f64)]) -> Result<CompiledLoras> {
        let (dev, dtype) = (&self.device, self.dtype);
        let transformer = Adapters::compile(
            set,
            Component::Transformer,
            "transformer",
            &self.mmdit.lora_targets()?,
            dtype,
            dev,
        )?;
        let clip_l = Adapters::compile(
            set,
            Component::ClipL,
            "CLIP-L encoder",
            &self.clip_l.lora_targets()?,
            dtype,
            dev,
        )?;
        let clip_g = Adapters::compile(
            set,
            Component::ClipG,
            "CLIP-G encoder",
            &self.clip_g.lora_targets()?,
            dtype,
            dev,
        )?;
        Ok(CompiledLoras {
            transformer,
            clip_l,
            clip_g,
        })
    }

    /// The compiled adapters of a request's set (cached while batches repeat it).
    pub(super) fn adapters_for(
        &self,
        loras: &[(String, f64)],
    ) -> Result<Option<Arc<CompiledLoras>>> {
        if loras.is_empty() {
            return Ok(None);
        }
        let key: LoraKey = loras
            .iter()
            .map(|(n, s)| (n.clone(), s.to_bits()))
            .collect();
        let mut cache = self
            .compiled
            .lock()
            .map_err(|_| Error::Layout("the adapter cache is poisoned".into()))?;
        if let Some((k, compiled)) = cache.as_ref()
            && *k == key
        {
            return Ok(Some(compiled.clone()));
        }
        let set = loras
            .iter()
            .map(|(name, scale)| {
                self.loras
                    .get(name)
                    .map(|f| (f.as_ref(), *scale))
                    .ok_or_else(|| self.unknown_lora(name))
            })
            .collect::<Result<Vec<_>>>()?;
        // The set compiled before goes first, so two sets never take memory side by side.
        *cache = None;
        let compiled = Arc::new(self.compile_loras(&set)?);
        *cache = Some((key, compiled.clone()));
        Ok(Some(compiled))
    }

    pub(super) fn unknown_lora(&self, name: &str) -> Error {
        let served: Vec<String> = self.loras.keys().map(|n| format!("`{n}`")).collect();
        Error::invalid(
            "loras",
            if served.is_empty() {
                format!("unknown adapter `{name}`: this server serves no LoRA adapter")
            } else {
                format!(
                    "unknown adapter `{name}`: this server serves {}",
                    served.join(", ")
                )
            },
        )
    }

    /// The control image's latents `[1, 16, H/8, W/8]` (f32) for `net`: the VAE encoder's
    /// posterior mean, shifted as the ControlNet's config says and scaled.
    pub(super) fn control_latents(&self, net: &ControlNet, image: &Tensor) -> Result<Tensor> {
        let encoder = self
            .vae_encoder
            .as_ref()
            .ok_or_else(|| Error::invalid("control", "this model's VAE has no encoder"))?;
        let cfg = self.vae.config();
        let x = image.to_device(&self.device)?.to_dtype(self.dtype)?;
        let mean = encoder.encode_mean(&x)?.to_dtype(DType::F32)?;
        Ok(((mean - net.control_latent_shift(cfg.shift_factor))? * cfg.scaling_factor)?)
    }
}
