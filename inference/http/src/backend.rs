//! The model behind the queue: a trait the scheduler drives one batch at a time, and a
//! deterministic fake backend for scheduling tests.
//!
//! A backend only sees validated parameters; it reports each step so the caller can count,
//! time, and cancel work at step boundaries, and hands back the previews the caller asks for.

use std::time::Duration;

use sd35_contract::ControlMode;

pub use sd35_api::{
    AdapterInfo, BatchKey, ControlParams, Defaults, EditParams, GenParams, ModelInfo, SkipLayerInfo,
};
pub use sd35_pipeline::StepControl;

/// Why a generation did not produce an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenFailure {
    /// The caller stopped wanting it (client gone, deadline passed).
    Cancelled,
    /// The model failed; the message says why.
    Failed(String),
}

/// What the caller of [`Backend::generate`] sees of a generation: the sampler's step hooks
/// ([`StepControl`]: cancellation, progress, which previews are wanted) and the previews, as
/// PNGs.
pub trait GenControl: StepControl {
    /// A preview (PNG) of batch item `index` after step `step`, one that
    /// [`StepControl::preview_wanted`] asked for.
    fn partial_image(&mut self, index: usize, step: usize, png: Vec<u8>);
}

/// A loaded text-to-image model (that edits images too).
pub trait Backend: Send {
    /// What the model is.
    fn info(&self) -> ModelInfo;
    /// Generates one PNG per item; every item has the same [`GenParams::batch_key`]. A step
    /// count reported to the control is [`GenParams::sampled_steps`].
    fn generate(
        &mut self,
        batch: &[GenParams],
        control: &mut dyn GenControl,
    ) -> Vec<Result<Vec<u8>, GenFailure>>;
}

/// A model that sleeps per step and paints a deterministic picture of its parameters; it makes
/// scheduling observable (steps, batches, cancellation) without the cost of a real model.
#[derive(Debug, Clone)]
pub struct FakeBackend {
    /// Time each step takes.
    pub step_time: Duration,
    /// Batch sizes seen, in order.
    pub batches: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    /// The memory gate it reports (none by default).
    pub memory: Option<sd35_contract::plan::MemoryGate>,
    /// The LoRA adapters it says it serves (none by default).
    pub adapters: Vec<AdapterInfo>,
    /// The ControlNet modes it says it serves (none by default).
    pub control_modes: Vec<ControlMode>,
}

impl FakeBackend {
    /// A fake whose steps take `step_time`.
    pub fn new(step_time: Duration) -> Self {
        Self {
            step_time,
            batches: Default::default(),
            memory: None,
            adapters: Vec::new(),
            control_modes: Vec::new(),
        }
    }
}

/// A PNG whose pixels are a hash of the parameters (same parameters, same bytes), an edit's
/// image and mask, the adapters and a ControlNet condition included.
pub fn fake_png(params: &GenParams) -> Vec<u8> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        &params.prompt,
        &params.negative_prompt,
        params.width,
        params.height,
        params.steps,
    )
        .hash(&mut h);
    (
        params.guidance_scale.to_bits(),
        params.seed,
        &params.slg_layers,
    )
        .hash(&mut h);
    if let Some(e) = &params.edit {
        (&e.image.rgb, e.mask.as_ref().map(|m| &m.grey)).hash(&mut h);
        e.strength.to_bits().hash(&mut h);
    }
    for (name, scale) in &params.loras {
        (name, scale.to_bits()).hash(&mut h);
    }
    if let Some(c) = &params.control {
        (c.mode, &c.image.rgb, format!("{:?}", c.preprocess)).hash(&mut h);
        (c.scale.to_bits(), c.start.to_bits(), c.end.to_bits()).hash(&mut h);
    }
    let mut state = h.finish() | 1;
    let n = (params.width * params.height * 3) as usize;
    let pixels: Vec<u8> = (0..n)
        .map(|_| {
            // xorshift64: cheap, deterministic noise.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8
        })
        .collect();
    encode_png(params.width, params.height, &pixels).unwrap_or_default()
}

/// Encodes 8-bit RGB pixels as PNG (the pipeline's encoder, which writes the served images).
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>, String> {
    sd35_pipeline::image::RgbImage {
        width: width as usize,
        height: height as usize,
        pixels: rgb.to_vec(),
    }
    .to_png()
    .map_err(|e| e.to_string())
}

/// Decodes a PNG into its 8-bit pixels (`None` when it is not a PNG).
pub fn decode_png(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .ok()?;
    let mut buf = vec![0; reader.output_buffer_size()?];
    let info = reader.next_frame(&mut buf).ok()?;
    buf.truncate(info.buffer_size());
    Some(buf)
}

/// Largest per-byte difference and number of differing bytes between two images' pixels.
pub fn pixel_difference(a: &[u8], b: &[u8]) -> (u8, usize) {
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0);
    let count = a.iter().zip(b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len());
    (max, count)
}

impl Backend for FakeBackend {
    fn info(&self) -> ModelInfo {
        let mut model = ModelInfo::small(&["fake", "large"]);
        model.served.adapters.clone_from(&self.adapters);
        model.served.control_modes.clone_from(&self.control_modes);
        model.memory.clone_from(&self.memory);
        model
    }

    fn generate(
        &mut self,
        batch: &[GenParams],
        control: &mut dyn GenControl,
    ) -> Vec<Result<Vec<u8>, GenFailure>> {
        if let Ok(mut seen) = self.batches.lock() {
            seen.push(batch.len());
        }
        let mut alive = vec![true; batch.len()];
        let steps = batch.first().map_or(0, |p| p.sampled_steps() as usize);
        for step in 1..=steps {
            for (i, a) in alive.iter_mut().enumerate() {
                *a = *a && control.wanted(i);
            }
            let live = alive.iter().filter(|a| **a).count();
            if live == 0 {
                break;
            }
            std::thread::sleep(self.step_time);
            control.step_done(step, steps, live, self.step_time.as_secs_f64());
            for (i, p) in batch.iter().enumerate() {
                if alive[i] && control.preview_wanted(i, step, steps) {
                    // A preview: another picture for each step (the seed moved by the step).
                    let mut preview = p.clone();
                    preview.seed = preview.seed.wrapping_add(step as u64);
                    control.partial_image(i, step, fake_png(&preview));
                }
            }
        }
        batch
            .iter()
            .zip(alive)
            .map(|(p, a)| {
                if a {
                    Ok(fake_png(p))
                } else {
                    Err(GenFailure::Cancelled)
                }
            })
            .collect()
    }
}
