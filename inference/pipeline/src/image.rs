//! Images and the model's tensors: decoded images to 8-bit pixels and PNG files, and 8-bit
//! pixels (an image to edit, a mask) to the tensors the pipeline takes, as diffusers'
//! `VaeImageProcessor` makes them.

use std::path::Path;

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// An RGB image, 8 bits per channel, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes.
    pub pixels: Vec<u8>,
}

/// Converts a decoded `[1, 3, H, W]` image in `[-1, 1]` to pixels like diffusers:
/// `round(clamp(x / 2 + 0.5, 0, 1) * 255)`, rounding halves to even as NumPy does.
pub fn to_rgb(decoded: &Tensor) -> Result<RgbImage> {
    let (_, c, h, w) = decoded.dims4()?;
    if c != 3 {
        return Err(Error::Layout(format!(
            "the VAE produced {c} channels, expected 3"
        )));
    }
    let img = ((decoded.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let img = img.squeeze(0)?.permute((1, 2, 0))?.contiguous()?; // HWC
    let values = img.flatten_all()?.to_vec1::<f32>()?;
    let pixels = values
        .iter()
        .map(|v| (v * 255.0).round_ties_even() as u8)
        .collect();
    Ok(RgbImage {
        width: w,
        height: h,
        pixels,
    })
}

/// An image to edit as the VAE encoder takes it: `[1, 3, H, W]` f32 in `[-1, 1]`, each value
/// `2 · (p / 255) − 1` in f32 like diffusers' `pil_to_numpy` then `normalize`.
pub fn to_tensor(img: &RgbImage, device: &candle_core::Device) -> Result<Tensor> {
    let expected = img.width * img.height * 3;
    if img.pixels.len() != expected {
        return Err(Error::invalid(
            "image",
            format!(
                "{} bytes for a {}x{} RGB image, expected {expected}",
                img.pixels.len(),
                img.width,
                img.height
            ),
        ));
    }
    let values: Vec<f32> = img
        .pixels
        .iter()
        .map(|&p| 2.0 * (f32::from(p) / 255.0) - 1.0)
        .collect();
    Ok(
        Tensor::from_vec(values, (img.height, img.width, 3), device)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?,
    )
}

/// A mask as the pipeline takes it: `[1, 1, H, W]` f32, 1 where the image is repainted and 0
/// where it is kept, from 8-bit grey levels binarised at half scale (diffusers' mask processor:
/// `p / 255 ≥ 0.5`).
pub fn mask_tensor(
    grey: &[u8],
    width: usize,
    height: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    if grey.len() != width * height {
        return Err(Error::invalid(
            "mask",
            format!(
                "{} bytes for a {width}x{height} grey mask, expected {}",
                grey.len(),
                width * height
            ),
        ));
    }
    let values: Vec<f32> = grey
        .iter()
        .map(|&p| {
            if f32::from(p) / 255.0 >= 0.5 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(values, (1, 1, height, width), device)?)
}

/// PIL's grey level of an RGB pixel (`Image.convert("L")`): ITU-R 601-2 luma in fixed point,
/// `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`.
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((19595 * u32::from(r) + 38470 * u32::from(g) + 7471 * u32::from(b) + 0x8000) >> 16) as u8
}

impl RgbImage {
    /// Encodes the image as PNG.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header().map_err(|e| Error::Png(e.to_string()))?;
            writer
                .write_image_data(&self.pixels)
                .map_err(|e| Error::Png(e.to_string()))?;
        }
        Ok(out)
    }

    /// Writes the image as a PNG file.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_png()?).map_err(|e| Error::io(path, e))
    }
}
