//! The smoke image: one small, fixed-seed generation that `build-engine` makes with the engine
//! it just built and records in `engine.json`, and that a server repeats before it reports
//! ready. A server whose image is outside the bound for its device and precision refuses the
//! engine (exit code 18), so a damaged or wrongly converted engine never takes traffic — even
//! one whose files match their recorded sizes and checksums.
//!
//! The image is 32×32 pixels after 2 steps with the variant's guidance, seed 0, and T5 left
//! out (zeros), so servers with and without T5 repeat it alike. It exercises both CLIP
//! encoders, the transformer (both guidance passes where the variant guides) and the VAE.
//!
//! Bounds (PSNR of the 8-bit pixels against the recorded ones; see [`min_psnr_db`]):
//!
//! | reference made on | served on | precision | at least |
//! |-------------------|-----------|-----------|----------|
//! | CPU               | CPU       | any       | 40 dB    |
//! | CPU               | CUDA      | bf16      | 24 dB    |
//! | CPU               | CUDA      | fp8       | 20 dB    |
//! | CUDA              | CUDA      | any       | 40 dB    |
//!
//! On the CPU every step is computed in f32 whatever the stored precision, so a server on the
//! machine that built the engine repeats the image bit for bit (PSNR ∞); the 40 dB floor
//! leaves room for another CPU's vector kernels (a difference of one level in a few pixels is
//! above 50 dB). On CUDA the transformer computes in bf16, which moves pixels by more; the
//! floors above are chosen, not measured on a GPU here, and `--engine-check-min-psnr-db`
//! replaces them. A changed weight tensor falls far below every floor: on the tiny model, the
//! final projection's weights negated give 7.6 dB (`cargo test -p sd35-server --test engine
//! a_server_repeats -- --nocapture`).

use base64::Engine as _;
use std::path::Path;

use sd35_contract::{DeviceKind, EngineManifest, SmokeRecord};
use sha2::{Digest, Sha256};

use crate::image::{self, RgbImage};
use crate::pipeline::{GenerateRequest, Pipeline};
use crate::variant::Precision;
use crate::{Error, Result};

/// What the smoke image shows.
pub const PROMPT: &str = "a red cube on a blue table, studio light";
/// Its negative prompt (used by variants that guide).
pub const NEGATIVE_PROMPT: &str = "blurry";
/// Its width and height in pixels.
pub const SIZE: usize = 32;
/// Its sampling steps.
pub const STEPS: usize = 2;
/// Its seed.
pub const SEED: u64 = 0;

/// The smoke request for `pipeline`: the variant's guidance (and skip-layer guidance), the
/// fixed prompt, size, steps and seed, without T5.
pub fn request(pipeline: &Pipeline) -> GenerateRequest {
    let mut req = pipeline.default_request(PROMPT);
    req.negative_prompt = NEGATIVE_PROMPT.to_owned();
    req.width = SIZE;
    req.height = SIZE;
    req.steps = STEPS;
    req.seed = SEED;
    req.without_t5 = true;
    req
}

/// The request a record was made with.
pub fn request_of(pipeline: &Pipeline, record: &SmokeRecord) -> GenerateRequest {
    let mut req = pipeline.default_request(&record.prompt);
    req.negative_prompt.clone_from(&record.negative_prompt);
    req.width = record.width as usize;
    req.height = record.height as usize;
    req.steps = record.steps as usize;
    req.guidance = record.guidance;
    req.seed = record.seed;
    req.without_t5 = true;
    req
}

/// Generates `req` with the one sampler and decodes it.
pub fn generate(pipeline: &Pipeline, req: &GenerateRequest) -> Result<RgbImage> {
    let latents = pipeline.sample(req, &mut |_, _| {})?;
    image::to_rgb(&pipeline.decode(&latents)?)
}

fn sha256_hex(bytes: &[u8]) -> String {
    sd35_contract::hex(&Sha256::digest(bytes))
}

/// Makes the smoke image with `pipeline` (running on `device`) and its record.
pub fn record(pipeline: &Pipeline, device: DeviceKind) -> Result<SmokeRecord> {
    let req = request(pipeline);
    let img = generate(pipeline, &req)?;
    Ok(SmokeRecord {
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        width: req.width as u32,
        height: req.height as u32,
        steps: req.steps as u32,
        guidance: req.guidance,
        seed: req.seed,
        device,
        sha256: sha256_hex(&img.pixels),
        pixels: base64::engine::general_purpose::STANDARD.encode(&img.pixels),
    })
}

/// Makes an engine's smoke image on the CPU with the engine as a server loads it, and writes
/// it into `engine.json` (atomically, last again): only an engine with its smoke image is
/// served.
pub fn record_engine(dir: &Path) -> Result<EngineManifest> {
    let mut manifest = crate::engine::open(dir, false)?;
    let opts = crate::PipelineOptions {
        precision: Some(manifest.precision.into()),
        device: candle_core::Device::Cpu,
        // The smoke image leaves T5 out; not loading it saves the builder its memory.
        load_t5: false,
        variant: Some(manifest.variant),
        ..crate::PipelineOptions::default()
    };
    let pipeline = crate::Pipeline::load(dir, &opts)?;
    manifest.smoke = Some(record(&pipeline, sd35_contract::DeviceKind::Cpu)?);
    crate::engine::write_manifest(&manifest, dir)?;
    Ok(manifest)
}

/// The least PSNR in dB an image served on `serving` in `precision` must reach against a
/// reference made on `reference`.
pub fn min_psnr_db(reference: DeviceKind, serving: DeviceKind, precision: Precision) -> f64 {
    match (reference, serving, precision) {
        (DeviceKind::Cpu, DeviceKind::Cuda, Precision::Fp8) => 20.0,
        (DeviceKind::Cpu, DeviceKind::Cuda, _) => 24.0,
        _ => 40.0,
    }
}

/// PSNR in dB of two 8-bit images of one size (∞ when equal; 0 when the sizes differ).
pub fn psnr_db(a: &[u8], b: &[u8]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let sum: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(*x) - f64::from(*y);
            d * d
        })
        .sum();
    let mse = sum / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    }
}

/// How a repeated smoke image compared with its record.
#[derive(Debug, Clone, PartialEq)]
pub struct SmokeCheck {
    /// PSNR of the repeated image against the recorded one, in dB.
    pub psnr_db: f64,
    /// The least PSNR accepted.
    pub min_psnr_db: f64,
    /// Whether the pixels are the recorded ones exactly.
    pub identical: bool,
}

impl SmokeCheck {
    /// Whether the image is within the bound.
    pub fn passed(&self) -> bool {
        self.psnr_db >= self.min_psnr_db
    }
}

/// Repeats the record's image with `pipeline` and compares it with the record; `min_psnr_db`
/// replaces the bound of [`min_psnr_db`] for `serving` and the pipeline's precision. An
/// unreadable record is an [`Error::Mismatch`].
pub fn check(
    pipeline: &Pipeline,
    record: &SmokeRecord,
    serving: DeviceKind,
    min_psnr: Option<f64>,
) -> Result<SmokeCheck> {
    let want = base64::engine::general_purpose::STANDARD
        .decode(&record.pixels)
        .map_err(|e| Error::Mismatch(format!("the smoke record's pixels are not base64: {e}")))?;
    if want.len() != record.width as usize * record.height as usize * 3
        || sha256_hex(&want) != record.sha256
    {
        return Err(Error::Mismatch(
            "the smoke record's pixels do not match its size and sha256; rebuild the engine"
                .to_owned(),
        ));
    }
    let img = generate(pipeline, &request_of(pipeline, record))?;
    let psnr = psnr_db(&img.pixels, &want);
    Ok(SmokeCheck {
        psnr_db: psnr,
        min_psnr_db: min_psnr
            .unwrap_or_else(|| min_psnr_db(record.device, serving, pipeline.precision())),
        identical: img.pixels == want,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psnr_is_infinite_when_equal_and_falls_with_the_difference() {
        let a = vec![100u8; 3072];
        assert_eq!(psnr_db(&a, &a), f64::INFINITY);
        let mut b = a.clone();
        b[0] = 101;
        let one_level = psnr_db(&a, &b);
        assert!(one_level > 50.0, "{one_level}");
        let c: Vec<u8> = a.iter().map(|v| v + 30).collect();
        let far = psnr_db(&a, &c);
        assert!((far - 18.59).abs() < 0.01, "{far}");
        assert_eq!(psnr_db(&a, &a[1..]), 0.0);
    }

    #[test]
    fn bounds_are_tight_on_one_device_and_looser_across_devices() {
        for p in [Precision::Bf16, Precision::Fp8] {
            assert_eq!(min_psnr_db(DeviceKind::Cpu, DeviceKind::Cpu, p), 40.0);
            assert!(min_psnr_db(DeviceKind::Cpu, DeviceKind::Cuda, p) < 40.0);
        }
        assert!(
            min_psnr_db(DeviceKind::Cpu, DeviceKind::Cuda, Precision::Fp8)
                < min_psnr_db(DeviceKind::Cpu, DeviceKind::Cuda, Precision::Bf16)
        );
    }
}
