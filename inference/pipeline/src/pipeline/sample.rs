//! The one denoising loop: prompts encoded, initial latents made (seeded noise, or an edit's
//! image noised to its first step), then flow-matching Euler steps with classifier-free and
//! skip-layer guidance, LoRA adapters, ControlNet residuals and inpainting's blend, for a batch
//! of requests of one shape.

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use super::Pipeline;
use super::adapters::{CompiledLoras, LoraKey};
use super::request::{
    GenerateRequest, Progress, PromptParts, PromptTokens, StepControl, control_keeps, first_step,
};
use crate::mmdit::Extras;
use crate::scheduler::FlowMatchSchedule;
use crate::{Error, Result};

/// `extras` with a ControlNet pass's patch embeddings and residuals, when it ran.
fn with_control<'a>(extras: Extras<'a>, found: &'a Option<(Tensor, Vec<Tensor>)>) -> Extras<'a> {
    match found {
        Some((embedded, residuals)) => Extras {
            control: Some(residuals),
            embedded: Some(embedded),
            ..extras
        },
        None => extras,
    }
}

/// `sigma · noise + (1 − sigma) · sample`: the flow-matching forward process
/// (`FlowMatchEulerDiscreteScheduler.scale_noise`), in f32.
fn scale_noise(sample: &Tensor, sigma: f32, noise: &Tensor) -> Result<Tensor> {
    let keep = 1.0f32 - sigma;
    Ok(((noise * f64::from(sigma))? + (sample * f64::from(keep))?)?)
}

/// A `[1, 1, H, W]` 0/1 mask on the latent grid `[1, 1, H/8, W/8]`: the value at the top-left
/// pixel of each 8 × 8 block, as PyTorch's default (`nearest`) `interpolate` picks it.
fn mask_to_latents(mask: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = mask.dims4()?;
    Ok(mask
        .reshape((b, c, h / 8, 8, w / 8, 8))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((b, c, h / 8, w / 8))?)
}

impl Pipeline {
    /// Token ids of `prompt` for CLIP-L, CLIP-G and T5 (when loaded).
    pub fn tokenize(&self, prompt: &str) -> Result<PromptTokens> {
        Ok(PromptTokens {
            clip_l: self.tok_l.encode(prompt)?,
            clip_g: self.tok_g.encode(prompt)?,
            t5: self.tok_t5.as_ref().map(|t| t.encode(prompt)).transpose()?,
        })
    }

    /// Each encoder's output for `prompt`.
    pub fn encode_parts(&self, prompt: &str) -> Result<PromptParts> {
        self.encode_parts_with(prompt, true, None)
    }

    /// [`Pipeline::encode_parts`], with T5 left out (zeros) when `t5` is false.
    fn encode_parts_with(
        &self,
        prompt: &str,
        t5: bool,
        adapters: Option<&CompiledLoras>,
    ) -> Result<PromptParts> {
        let ids = self.tokenize(prompt)?;
        let (l, g) = match adapters {
            Some(a) => (
                CompiledLoras::active(&a.clip_l),
                CompiledLoras::active(&a.clip_g),
            ),
            None => (None, None),
        };
        let clip_l = self.clip_l.forward_with(&ids.clip_l, self.dtype, l)?;
        let clip_g = self.clip_g.forward_with(&ids.clip_g, self.dtype, g)?;
        let joint = self.mmdit.config().joint_attention_dim;
        let t5 = match (&self.t5, &ids.t5) {
            (Some(encoder), Some(ids)) if t5 => encoder.forward(ids, self.dtype)?,
            _ => Tensor::zeros((1, self.t5_length, joint), self.dtype, &self.device)?,
        };
        Ok(PromptParts { clip_l, clip_g, t5 })
    }

    /// The transformer's context `[1, 77 + L, joint]` and pooled vector `[1, P]` for `prompt`.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor, Tensor)> {
        self.encode_prompt_with(prompt, true, None)
    }

    fn encode_prompt_with(
        &self,
        prompt: &str,
        t5: bool,
        adapters: Option<&CompiledLoras>,
    ) -> Result<(Tensor, Tensor)> {
        let p = self.encode_parts_with(prompt, t5, adapters)?;
        let clip = Tensor::cat(&[&p.clip_l.penultimate, &p.clip_g.penultimate], 2)?;
        let joint = self.mmdit.config().joint_attention_dim;
        let width = clip.dim(2)?;
        if width > joint {
            return Err(Error::Layout(format!(
                "CLIP widths ({width}) exceed the transformer's context width {joint}"
            )));
        }
        let clip = if width < joint {
            let pad = Tensor::zeros(
                (1, clip.dim(1)?, joint - width),
                clip.dtype(),
                clip.device(),
            )?;
            Tensor::cat(&[&clip, &pad], 2)?
        } else {
            clip
        };
        let context = Tensor::cat(&[&clip, &p.t5], 1)?;
        let pooled = Tensor::cat(&[&p.clip_l.pooled, &p.clip_g.pooled], 1)?;
        Ok((context, pooled))
    }

    /// Sampler latents of images `[B, 3, H, W]` in `[-1, 1]`: the VAE encoder's posterior
    /// mean, shifted and scaled, in f32.
    pub fn encode_image(&self, images: &Tensor) -> Result<Tensor> {
        let encoder = self.vae_encoder.as_ref().ok_or_else(|| {
            Error::invalid(
                "image",
                "this model's VAE has no encoder, so it cannot edit images",
            )
        })?;
        let x = images.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(encoder.encode_latents(&x)?.to_dtype(DType::F32)?)
    }

    /// The initial latents: the request's own, or seeded standard normal noise.
    pub fn initial_latents(&self, req: &GenerateRequest) -> Result<Tensor> {
        let c = self.mmdit.config().in_channels;
        let shape = (1, c, req.height / 8, req.width / 8);
        match &req.init_latents {
            Some(t) => {
                if t.dims() != [shape.0, shape.1, shape.2, shape.3] {
                    return Err(Error::invalid(
                        "init_latents",
                        format!(
                            "shape {:?}, expected {:?} for {}x{}",
                            t.dims(),
                            shape,
                            req.width,
                            req.height
                        ),
                    ));
                }
                Ok(t.to_dtype(DType::F32)?.to_device(&self.device)?)
            }
            None => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(req.seed);
                let n = shape.0 * shape.1 * shape.2 * shape.3;
                let v: Vec<f32> = (0..n)
                    .map(|_| rand_distr::StandardNormal.sample(&mut rng))
                    .collect();
                Ok(Tensor::from_vec(v, shape, &self.device)?)
            }
        }
    }

    /// Runs the sampler and returns the final latents `[1, 16, H/8, W/8]` (f32).
    /// `progress(step, steps)` is called after each step.
    pub fn sample(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let mut out = self.sample_batch(std::slice::from_ref(req), &mut Progress(progress))?;
        out.pop()
            .flatten()
            .ok_or_else(|| Error::invalid("request", "the sampler returned no latents"))
    }

    /// Runs the sampler for requests of one shape side by side — the one denoising loop, used
    /// by `generate` (a batch of one) and by the server. Returns the final latents of each item
    /// (f32), `None` for items `control` stopped wanting. An item sampled in a batch of one is
    /// bit-identical to [`Pipeline::sample`]'s.
    ///
    /// Every request is validated; they must share size, steps, guidance and skip-layer
    /// guidance (prompts, negative prompts, seeds and initial latents may differ).
    pub fn sample_batch(
        &self,
        reqs: &[GenerateRequest],
        control: &mut dyn StepControl,
    ) -> Result<Vec<Option<Tensor>>> {
        let Some(first) = reqs.first() else {
            return Ok(Vec::new());
        };
        for req in reqs {
            self.validate(req)?;
            let edit_key = |r: &GenerateRequest| {
                r.edit
                    .as_ref()
                    .map(|e| (e.strength.to_bits(), e.mask.is_some()))
            };
            let lora_key = |r: &GenerateRequest| -> LoraKey {
                r.loras
                    .iter()
                    .map(|(n, s)| (n.clone(), s.to_bits()))
                    .collect()
            };
            let condition_key = |r: &GenerateRequest| {
                r.control.as_ref().map(|c| {
                    (
                        c.mode,
                        c.scale.to_bits(),
                        c.start.to_bits(),
                        c.end.to_bits(),
                    )
                })
            };
            let same = (
                req.width,
                req.height,
                req.steps,
                req.guidance.to_bits(),
                &req.slg,
                edit_key(req),
                lora_key(req),
                condition_key(req),
            ) == (
                first.width,
                first.height,
                first.steps,
                first.guidance.to_bits(),
                &first.slg,
                edit_key(first),
                lora_key(first),
                condition_key(first),
            );
            if !same {
                return Err(Error::invalid(
                    "batch",
                    "requests of one batch must share size, steps, guidance, skip-layer \
                     guidance, LoRA adapters, the ControlNet condition's mode and scales and, \
                     for edits, strength and whether a mask is given",
                ));
            }
        }
        let dev = &self.device;
        let cfg = first.guidance > 1.0;
        // Skip-layer guidance refines classifier-free guidance; without CFG there is none.
        let slg = if cfg { first.slg.as_ref() } else { None };
        let compiled = self.adapters_for(&first.loras)?;
        let adapters = compiled.as_deref();
        let extras = Extras {
            adapters: adapters.and_then(|a| CompiledLoras::active(&a.transformer)),
            ..Extras::default()
        };
        let schedule = FlowMatchSchedule::new(first.steps, self.shift);
        // An edit runs the end of the schedule, from its first step on (diffusers'
        // get_timesteps), starting from the image's latents noised to that step.
        let start = first
            .edit
            .as_ref()
            .map_or(0, |e| first_step(first.steps, e.strength));
        let (mut lat, mut ctx, mut pooled, mut nctx, mut npooled) =
            (vec![], vec![], vec![], vec![], vec![]);
        // Inpainting: each row's noise, image latents and latent mask, to put the kept region
        // back after every step.
        let (mut noises, mut images, mut masks) = (vec![], vec![], vec![]);
        // A ControlNet condition: the net, its scales and each row's control latents.
        let condition = match &first.control {
            Some(c) => Some((
                self.controlnets
                    .get(&c.mode)
                    .ok_or_else(|| Error::invalid("control", "the ControlNet is not served"))?,
                c,
            )),
            None => None,
        };
        let mut control_latents = Vec::new();
        for req in reqs {
            if let (Some((net, _)), Some(c)) = (condition, &req.control) {
                control_latents.push(self.control_latents(net, &c.image)?);
            }
            let noise = self.initial_latents(req)?;
            match &req.edit {
                None => lat.push(noise),
                Some(edit) => {
                    let image = self.encode_image(&edit.image)?;
                    lat.push(if edit.strength == 1.0 {
                        noise.clone()
                    } else {
                        scale_noise(&image, schedule.sigmas[start], &noise)?
                    });
                    if let Some(mask) = &edit.mask {
                        let mask = mask.to_device(dev)?.to_dtype(DType::F32)?;
                        masks.push(mask_to_latents(&mask)?);
                        noises.push(noise);
                        images.push(image);
                    }
                }
            }
            let (c, p) = self.encode_prompt_with(&req.prompt, !req.without_t5, adapters)?;
            ctx.push(c);
            pooled.push(p);
            if cfg {
                let (c, p) =
                    self.encode_prompt_with(&req.negative_prompt, !req.without_t5, adapters)?;
                nctx.push(c);
                npooled.push(p);
            }
        }
        let cat = |v: &[Tensor]| Tensor::cat(v, 0);
        let mut latents = cat(&lat)?;
        let (mut ctx, mut pooled) = (cat(&ctx)?, cat(&pooled)?);
        let (mut nctx, mut npooled) = if cfg {
            (Some(cat(&nctx)?), Some(cat(&npooled)?))
        } else {
            (None, None)
        };
        let mut control_latents = if condition.is_some() {
            Some(cat(&control_latents)?)
        } else {
            None
        };
        let mut inpaint = if masks.is_empty() {
            None
        } else {
            Some((cat(&noises)?, cat(&images)?, cat(&masks)?))
        };
        // Original index of each row still sampled.
        let mut rows: Vec<usize> = (0..reqs.len()).collect();
        let last = schedule.len();
        // Steps this request runs (all of them, or an edit's tail), counted from 0 for
        // progress, previews and skip-layer guidance.
        let steps = last - start;
        for (k, &t) in schedule.timesteps[start..].iter().enumerate() {
            let i = start + k;
            let keep: Vec<usize> = (0..rows.len())
                .filter(|&r| control.wanted(rows[r]))
                .collect();
            if keep.is_empty() {
                return Ok(vec![None; reqs.len()]);
            }
            if keep.len() < rows.len() {
                let ids = Tensor::new(keep.iter().map(|&r| r as u32).collect::<Vec<_>>(), dev)?;
                latents = latents.index_select(&ids, 0)?;
                ctx = ctx.index_select(&ids, 0)?;
                pooled = pooled.index_select(&ids, 0)?;
                nctx = nctx.map(|t| t.index_select(&ids, 0)).transpose()?;
                npooled = npooled.map(|t| t.index_select(&ids, 0)).transpose()?;
                control_latents = control_latents
                    .map(|t| t.index_select(&ids, 0))
                    .transpose()?;
                inpaint = inpaint
                    .map(|(n, im, m)| -> Result<_> {
                        Ok((
                            n.index_select(&ids, 0)?,
                            im.index_select(&ids, 0)?,
                            m.index_select(&ids, 0)?,
                        ))
                    })
                    .transpose()?;
                rows = keep.iter().map(|&r| rows[r]).collect();
            }
            let started = std::time::Instant::now();
            let b = rows.len();
            let x = latents.to_dtype(self.dtype)?;
            // The ControlNet's residuals for a pass over `x_in` with `p_in` and `tt`: none
            // while diffusers' controlnet_keep is off at this step (adding its zeros would
            // change nothing). The skip-layer pass runs without them.
            let controlled = |x_in: &Tensor, p_in: &Tensor, tt: &Tensor, copies: usize| {
                let (Some((net, c)), Some(latents)) = (condition, &control_latents) else {
                    return Ok(None);
                };
                if !control_keeps(i, last, c.start, c.end) {
                    return Ok(None);
                }
                let embedded = self.mmdit.embed_patches(x_in)?;
                let latents = latents.to_dtype(self.dtype)?;
                let latents = Tensor::cat(&vec![&latents; copies], 0)?;
                let residuals = net.forward(&embedded, &latents, p_in, tt, c.scale)?;
                Ok::<_, Error>(Some((embedded, residuals)))
            };
            let noise = match (&nctx, &npooled) {
                (Some(nc), Some(np)) => {
                    // Unconditional rows first, then conditional: one transformer pass.
                    let x_in = Tensor::cat(&[&x, &x], 0)?;
                    let c_in = Tensor::cat(&[nc, &ctx], 0)?;
                    let p_in = Tensor::cat(&[np, &pooled], 0)?;
                    let tt = Tensor::full(t, 2 * b, dev)?;
                    let found = controlled(&x_in, &p_in, &tt, 2)?;
                    let pred = self
                        .mmdit
                        .forward_with(&x_in, &tt, &c_in, &p_in, &[], &with_control(extras, &found))?
                        .to_dtype(DType::F32)?;
                    let uncond = pred.narrow(0, 0, b)?;
                    let text = pred.narrow(0, b, b)?;
                    let mut noise = (&uncond + ((&text - &uncond)? * first.guidance)?)?;
                    if let Some(slg) = slg {
                        let (fi, n) = (k as f64, steps as f64);
                        if fi > n * slg.start && fi < n * slg.stop {
                            let tb = Tensor::full(t, b, dev)?;
                            let skip = self
                                .mmdit
                                .forward_with(&x, &tb, &ctx, &pooled, &slg.layers, &extras)?
                                .to_dtype(DType::F32)?;
                            noise = (noise + ((&text - &skip)? * slg.scale)?)?;
                        }
                    }
                    noise
                }
                _ => {
                    let tt = Tensor::full(t, b, dev)?;
                    let found = controlled(&x, &pooled, &tt, 1)?;
                    self.mmdit
                        .forward_with(&x, &tt, &ctx, &pooled, &[], &with_control(extras, &found))?
                        .to_dtype(DType::F32)?
                }
            };
            latents = (latents + (&noise * f64::from(schedule.dt(i)))?)?;
            if let Some((start_noise, image, mask)) = &inpaint {
                // The kept region is the image noised to the next step (the image itself after
                // the last): (1 − m) · kept + m · latents, as diffusers' inpaint loop.
                let kept = if i + 1 < last {
                    scale_noise(image, schedule.sigmas[i + 1], start_noise)?
                } else {
                    image.clone()
                };
                latents = (mask.affine(-1.0, 1.0)?.broadcast_mul(&kept)?
                    + mask.broadcast_mul(&latents)?)?;
            }
            control.step_done(k + 1, steps, b, started.elapsed().as_secs_f64());
            for (r, &orig) in rows.iter().enumerate() {
                if control.preview_wanted(orig, k + 1, steps) {
                    // x0 = x_t - sigma_t * v, written with the latents after the step.
                    let sigma = f64::from(schedule.sigmas[i + 1]);
                    let predicted = (latents.narrow(0, r, 1)? - (noise.narrow(0, r, 1)? * sigma)?)?;
                    control.preview(orig, k + 1, &predicted);
                }
            }
        }
        let mut out = vec![None; reqs.len()];
        for (r, &orig) in rows.iter().enumerate() {
            out[orig] = Some(latents.narrow(0, r, 1)?);
        }
        Ok(out)
    }
}
