//! What the pipeline's tests share: the test data, golden files, comparisons of tensors, and
//! PNG inputs.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd35_pipeline::{Pipeline, PipelineOptions, Precision, image};

/// `inference/testdata`.
pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

/// The tensors of `testdata/golden/<name>`.
pub fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(testdata().join("golden").join(name), &Device::Cpu)
        .unwrap_or_else(|e| panic!("golden {name}: {e}"))
}

/// The JSON file `testdata/golden/<name>`.
pub fn golden_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(testdata().join("golden").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The tiny model `testdata/<model>` in `precision`.
pub fn load(model: &str, precision: Precision) -> Pipeline {
    let opts = PipelineOptions {
        precision: Some(precision),
        ..PipelineOptions::default()
    };
    Pipeline::load(&testdata().join(model), &opts).unwrap_or_else(|e| panic!("load {model}: {e}"))
}

/// ‖a − b‖ / ‖b‖ in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let num = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap();
    (num.to_scalar::<f64>().unwrap() / den.to_scalar::<f64>().unwrap().max(1e-30)).sqrt()
}

/// PSNR in dB of images in [0, 1].
pub fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    let mse = d
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    10.0 * (1.0 / mse).log10()
}

/// The image `p` decodes `latents` to, in [0, 1], as the goldens store it.
pub fn image_of(p: &Pipeline, latents: &Tensor) -> Tensor {
    ((p.decode(latents).unwrap() / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap()
}

/// A PNG of `testdata/golden`: its width, height, channels and 8-bit samples.
pub fn read_png(name: &str) -> (usize, usize, usize, Vec<u8>) {
    let file = std::fs::File::open(testdata().join("golden").join(name)).unwrap();
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    let channels = info.color_type.samples();
    (info.width as usize, info.height as usize, channels, buf)
}

/// An RGB PNG of `testdata/golden`.
pub fn read_rgb(name: &str) -> image::RgbImage {
    let (width, height, channels, pixels) = read_png(name);
    assert_eq!(channels, 3, "{name} is RGB");
    image::RgbImage {
        width,
        height,
        pixels,
    }
}
