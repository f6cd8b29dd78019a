//! How an uploaded image to edit and its mask become the [`EditParams`] of a request —
//! img2img, and inpainting with a mask — for the three editing bodies: the OpenAI form
//! ([`crate::edit_form`]), `POST /v1/img2img` ([`crate::request::Img2ImgRequest`]) and
//! AUTOMATIC1111's `img2img` ([`crate::sdapi`]).
//!
//! The order of the checks keeps a bad request cheap: the form's fields, then the image's and
//! the mask's headers (format, claimed size, the mask's size against the image's), then the
//! sampling fields against the bounds and the memory plan (the size defaults to the image's),
//! then `strength` against the steps, and only then are the files decoded and resized.
//!
//! Sizes: a side a request leaves out is the image's, rounded down to a multiple of 16; an
//! image of another size than the request's is resized to it with Lanczos (a = 3), the aspect
//! ratio not kept, as diffusers' `VaeImageProcessor` does; the mask likewise, then binarised
//! at half scale by the pipeline.

use std::sync::Arc;

use crate::bounds::{Limits, SIZE_MULTIPLE};
use crate::error::ApiError;
use crate::params::{EditParams, GenParams, first_step};
use crate::picture::{self, Header, Mask};
use crate::sampling::Sampling;

/// `strength` of `/v1/img2img`, and of `/v1/images/edits` without a mask, when left out
/// (diffusers' default).
pub const DEFAULT_STRENGTH: f64 = 0.6;
/// `strength` of `/v1/images/edits` with a mask when left out: the masked region is drawn
/// anew, as OpenAI's edits do.
pub const DEFAULT_MASKED_STRENGTH: f64 = 1.0;
/// Largest `mask_blur` (pixels).
pub const MAX_MASK_BLUR: u32 = 64;

/// How an uploaded mask says where to repaint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskRule {
    /// OpenAI's: fully transparent pixels (alpha 0) are repainted; a mask without an alpha
    /// channel is refused.
    Transparent,
    /// diffusers': white is repainted (the grey level, PIL's `convert("L")`, at least 128);
    /// any alpha channel is ignored.
    White,
    /// AUTOMATIC1111's: a mask with transparency repaints where it is opaque (alpha above 128),
    /// any other where it is white; inverted when asked (`255 − level`), then blurred
    /// ([`Mask::blurred`]) before it is resized and binarised.
    A1111 {
        /// `inpainting_mask_invert`.
        invert: bool,
        /// `mask_blur_x`, pixels.
        blur_x: u32,
        /// `mask_blur_y`, pixels.
        blur_y: u32,
    },
}

/// An uploaded mask and how to read it.
#[derive(Debug, Clone, Copy)]
pub struct MaskUpload<'a> {
    /// The field it came in.
    pub field: &'a str,
    /// The file.
    pub bytes: &'a [u8],
    /// How it says where to repaint.
    pub rule: MaskRule,
}

/// An image to edit as a request sent it, its headers read.
#[derive(Debug, Clone, Copy)]
pub struct EditUpload<'a> {
    /// The field the image came in.
    pub field: &'a str,
    /// The image file.
    pub bytes: &'a [u8],
    /// Its header.
    pub header: Header,
    /// The mask, when inpainting.
    pub mask: Option<MaskUpload<'a>>,
}

impl<'a> EditUpload<'a> {
    /// Reads the image's and the mask's headers (nothing is decoded): their formats and
    /// sizes are checked, and the mask must be the image's size.
    pub fn probe(
        field: &'a str,
        bytes: &'a [u8],
        mask: Option<MaskUpload<'a>>,
    ) -> Result<Self, ApiError> {
        let header = picture::probe(field, bytes)?;
        if let Some(m) = &mask {
            let mh = picture::probe(m.field, m.bytes)?;
            if (mh.width, mh.height) != (header.width, header.height) {
                return Err(ApiError::invalid(
                    m.field,
                    format!(
                        "is {}x{} but the image is {}x{}: send a mask of the image's size",
                        mh.width, mh.height, header.width, header.height
                    ),
                ));
            }
        }
        Ok(Self {
            field,
            bytes,
            header,
            mask,
        })
    }

    /// The size a request that leaves it out gets: the image's, each side rounded down to a
    /// multiple of 16.
    pub fn default_size(&self) -> Result<(u32, u32), ApiError> {
        let round = |v: u32| v - v % SIZE_MULTIPLE;
        let (w, h) = (round(self.header.width), round(self.header.height));
        if w == 0 || h == 0 {
            return Err(ApiError::invalid(
                self.field,
                format!(
                    "is {}x{}; an image to edit needs at least {SIZE_MULTIPLE} pixels a side",
                    self.header.width, self.header.height
                ),
            ));
        }
        Ok((w, h))
    }

    /// Validates `sampling` with the sides it leaves out taken from the image; an error about
    /// the size says where the size came from.
    pub fn resolve_sampling(
        &self,
        mut sampling: Sampling<'_>,
        limits: &Limits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<GenParams, ApiError> {
        if !limits.model.served.image_editing {
            return Err(ApiError::invalid(
                self.field,
                "this model's VAE has no encoder, so it cannot edit images (only generate them)",
            ));
        }
        let (w, h) = self.default_size()?;
        let defaulted = sampling.width.is_none() || sampling.height.is_none();
        sampling.width = sampling.width.or(Some(w));
        sampling.height = sampling.height.or(Some(h));
        sampling.resolve(limits, random_seed).map_err(|e| {
            if defaulted && matches!(e.field.as_deref(), Some("width" | "height")) {
                ApiError {
                    message: format!(
                        "{} (the size defaults to the image's, {}x{} rounded down to a multiple \
                         of {SIZE_MULTIPLE}; ask for a size and the image is resized to it)",
                        e.message, self.header.width, self.header.height
                    ),
                    ..e
                }
            } else {
                e
            }
        })
    }

    /// Checks `strength` against the request's steps, then decodes the image and the mask and
    /// brings them to the request's size.
    pub fn prepare(
        &self,
        params: &GenParams,
        strength_field: &str,
        strength: f64,
    ) -> Result<EditParams, ApiError> {
        check_strength(strength_field, strength, params.steps)?;
        let (width, height) = (params.width, params.height);
        let image = picture::decode(self.field, self.bytes)?
            .picture
            .resized(width, height);
        let mask = match &self.mask {
            Some(m) => Some(Arc::new(read_mask(m)?.resized(width, height))),
            None => None,
        };
        Ok(EditParams {
            image: Arc::new(image),
            mask,
            strength,
        })
    }
}

/// `strength` in (0, 1], and enough of it that at least one of `steps` runs.
pub fn check_strength(field: &str, strength: f64, steps: u32) -> Result<(), ApiError> {
    if !(strength.is_finite() && strength > 0.0 && strength <= 1.0) {
        return Err(ApiError::invalid(
            field,
            format!("must be above 0 and at most 1; got {strength}"),
        ));
    }
    if first_step(steps, strength) >= steps {
        return Err(ApiError::invalid(
            field,
            format!(
                "{strength} of {steps} steps runs none of them: raise {field} or steps \
                 (steps × {field} must reach 1)"
            ),
        ));
    }
    Ok(())
}

/// The mask an upload describes, at the upload's size.
fn read_mask(m: &MaskUpload<'_>) -> Result<Mask, ApiError> {
    let decoded = picture::decode(m.field, m.bytes)?;
    let (width, height) = (decoded.picture.width, decoded.picture.height);
    let grey = match m.rule {
        MaskRule::Transparent => {
            let Some(alpha) = decoded.alpha else {
                return Err(ApiError::invalid(
                    m.field,
                    "has no alpha channel: the mask is a PNG whose fully transparent pixels \
                     (alpha 0) mark where to repaint",
                ));
            };
            alpha
                .iter()
                .map(|&a| if a == 0 { 255 } else { 0 })
                .collect()
        }
        MaskRule::White => decoded.picture.grey(),
        MaskRule::A1111 { .. } => match decoded.alpha {
            Some(alpha) if alpha.iter().any(|&a| a != 255) => alpha
                .iter()
                .map(|&a| if a > 128 { 255 } else { 0 })
                .collect(),
            _ => decoded.picture.grey(),
        },
    };
    let mut mask = Mask {
        width,
        height,
        grey,
    };
    if let MaskRule::A1111 {
        invert,
        blur_x,
        blur_y,
    } = m.rule
    {
        if invert {
            mask = mask.inverted();
        }
        mask = mask.blurred(blur_x, blur_y);
    }
    Ok(mask)
}

#[cfg(test)]
pub(crate) mod tests {
    /// A PNG of `width` × `height` with a gradient, and an alpha channel when `alpha` says.
    pub(crate) fn png(width: u32, height: u32, alpha: Option<&dyn Fn(u32, u32) -> u8>) -> Vec<u8> {
        let mut out = Vec::new();
        let img = match alpha {
            Some(a) => image::DynamicImage::ImageRgba8(image::ImageBuffer::from_fn(
                width,
                height,
                |x, y| image::Rgba([(x * 8) as u8, (y * 8) as u8, 200, a(x, y)]),
            )),
            None => image::DynamicImage::ImageRgb8(image::ImageBuffer::from_fn(
                width,
                height,
                |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, 200]),
            )),
        };
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap_or_else(|e| panic!("{e}"));
        out
    }
}
