//! Decoded images to 8-bit pixels and PNG files.

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
