//! Control images made from ordinary pictures, for the SD3.5 ControlNets: Canny edges (for the
//! canny model) and a Gaussian blur (for the blur model). Depth maps come from the client.
//!
//! Both take and return 8-bit RGB ([`RgbImage`], ready for [`crate::image::to_tensor`]) and
//! are deterministic: the same picture and parameters give the same bytes, so a request stays
//! reproducible. The image operations are imageproc's (image-rs).
//!
//! - **Canny** ([`canny`]): the picture's grey levels (PIL's luma, [`crate::image::luma`]),
//!   imageproc's Canny detector, edges white (255) on black in all three channels, as the
//!   canny ControlNet was trained on. imageproc smooths with a Gaussian of σ = 1.4 first, takes
//!   the L2 norm of the 3×3 Sobel gradients (at most about 1140 on 8-bit input), thins by
//!   non-maximum suppression and keeps pixels by hysteresis: above `high` always, above `low`
//!   when connected to such a pixel. The thresholds are in the same units as OpenCV's
//!   `cv2.Canny(img, low, high)`; the defaults are the 100 / 200 usual with it. OpenCV does not
//!   smooth first and sums |Gx| + |Gy| by default, so its edges are not identical, only alike.
//! - **Blur** ([`gaussian_blur`]): a Gaussian blur of standard deviation `sigma` pixels, each
//!   channel separately, computed in f32 and rounded to the nearest 8-bit value once at the
//!   end (so the mean level is kept). The kernel is imageproc's: radius ⌈2σ⌉, normalised;
//!   pixels past the border repeat the edge pixel. Stability's model card blurs with
//!   torchvision's `GaussianBlur` given a large kernel and torchvision's default σ, which is
//!   drawn at random from [0.1, 2.0] on every call. A request has to be reproducible, so σ is
//!   a parameter here; the default, 2.0, is the strongest blur that preprocessing produces.
//!   (torchvision pads by reflection, so the two differ within 2σ of the border.)

use imageproc::image::{GrayImage, ImageBuffer, Rgb};
use sd35_contract::ControlMode;

use crate::image::{RgbImage, luma};
use crate::{Error, Result};

/// Default low hysteresis threshold of [`canny`].
pub const DEFAULT_CANNY_LOW: f32 = 100.0;
/// Default high hysteresis threshold of [`canny`].
pub const DEFAULT_CANNY_HIGH: f32 = 200.0;
/// Largest gradient magnitude imageproc's Canny can see on 8-bit input (`2·√5·255`): higher
/// thresholds keep nothing.
pub const CANNY_MAX_THRESHOLD: f32 = 1140.39;
/// Default standard deviation, in pixels, of [`gaussian_blur`].
pub const DEFAULT_BLUR_SIGMA: f32 = 2.0;
/// Largest accepted blur σ: beyond it the kernel (radius ⌈2σ⌉) outgrows any image served.
pub const MAX_BLUR_SIGMA: f32 = 256.0;

/// How a picture becomes a control image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Preprocess {
    /// Canny edges with hysteresis thresholds `low` ≤ `high` (OpenCV's units).
    Canny {
        /// Weakest gradient kept when connected to a strong edge.
        low: f32,
        /// Weakest gradient that starts an edge.
        high: f32,
    },
    /// Gaussian blur of standard deviation `sigma` pixels.
    Blur {
        /// Standard deviation in pixels.
        sigma: f32,
    },
}

impl Preprocess {
    /// The default preprocessing of a control mode; none for depth (the client sends a depth
    /// map).
    pub fn default_for(mode: ControlMode) -> Option<Self> {
        match mode {
            ControlMode::Canny => Some(Self::Canny {
                low: DEFAULT_CANNY_LOW,
                high: DEFAULT_CANNY_HIGH,
            }),
            ControlMode::Blur => Some(Self::Blur {
                sigma: DEFAULT_BLUR_SIGMA,
            }),
            ControlMode::Depth => None,
        }
    }

    /// Checks the parameters, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Canny { low, high } => {
                let ok = |t: f32| t.is_finite() && t >= 0.0;
                if !ok(low) || !ok(high) || low > high {
                    return Err(Error::invalid(
                        "control.canny",
                        format!(
                            "thresholds low {low} and high {high}: both finite, 0 ≤ low ≤ high \
                             (gradients reach at most {CANNY_MAX_THRESHOLD})"
                        ),
                    ));
                }
            }
            Self::Blur { sigma } => {
                if !(sigma.is_finite() && sigma > 0.0 && sigma <= MAX_BLUR_SIGMA) {
                    return Err(Error::invalid(
                        "control.blur",
                        format!("sigma {sigma}: a number of pixels in (0, {MAX_BLUR_SIGMA}]"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Makes the control image of `img`.
    pub fn apply(&self, img: &RgbImage) -> Result<RgbImage> {
        match *self {
            Self::Canny { low, high } => canny(img, low, high),
            Self::Blur { sigma } => gaussian_blur(img, sigma),
        }
    }
}

fn check_pixels(img: &RgbImage) -> Result<()> {
    if img.pixels.len() != img.width * img.height * 3 || img.width == 0 || img.height == 0 {
        return Err(Error::invalid(
            "control.image",
            format!(
                "{} bytes for a {}x{} RGB image",
                img.pixels.len(),
                img.width,
                img.height
            ),
        ));
    }
    Ok(())
}

fn dims(img: &RgbImage) -> Result<(u32, u32)> {
    let side = |v: usize| {
        u32::try_from(v).map_err(|_| Error::invalid("control.image", format!("side {v} too large")))
    };
    Ok((side(img.width)?, side(img.height)?))
}

/// Canny edges of `img`: white (255) edge pixels on black, in all three channels. Thresholds
/// as in [`Preprocess::Canny`]. Images narrower or lower than 3 pixels have no interior and
/// give no edges.
pub fn canny(img: &RgbImage, low: f32, high: f32) -> Result<RgbImage> {
    Preprocess::Canny { low, high }.validate()?;
    check_pixels(img)?;
    let (w, h) = dims(img)?;
    if w < 3 || h < 3 {
        return Ok(RgbImage {
            width: img.width,
            height: img.height,
            pixels: vec![0; img.pixels.len()],
        });
    }
    let grey: Vec<u8> = img
        .pixels
        .chunks_exact(3)
        .map(|p| luma(p[0], p[1], p[2]))
        .collect();
    let grey = GrayImage::from_raw(w, h, grey)
        .ok_or_else(|| Error::invalid("control.image", "grey image of the wrong size"))?;
    let edges = imageproc::edges::canny(&grey, low, high);
    Ok(RgbImage {
        width: img.width,
        height: img.height,
        pixels: edges.as_raw().iter().flat_map(|&v| [v, v, v]).collect(),
    })
}

/// `img` blurred by a Gaussian of standard deviation `sigma` pixels (see the module's
/// documentation for the kernel and the border).
pub fn gaussian_blur(img: &RgbImage, sigma: f32) -> Result<RgbImage> {
    Preprocess::Blur { sigma }.validate()?;
    check_pixels(img)?;
    let (w, h) = dims(img)?;
    let values: Vec<f32> = img.pixels.iter().map(|&p| f32::from(p)).collect();
    let image: ImageBuffer<Rgb<f32>, Vec<f32>> = ImageBuffer::from_raw(w, h, values)
        .ok_or_else(|| Error::invalid("control.image", "RGB image of the wrong size"))?;
    let blurred = imageproc::filter::gaussian_blur_f32(&image, sigma);
    Ok(RgbImage {
        width: img.width,
        height: img.height,
        pixels: blurred
            .as_raw()
            .iter()
            .map(|&v| v.round().clamp(0.0, 255.0) as u8)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A `w`×`h` picture of `background` with a filled square of `fill` over `x0..x1`, `y0..y1`.
    fn square(w: usize, h: usize, (x0, x1, y0, y1): (usize, usize, usize, usize)) -> RgbImage {
        let mut pixels = vec![30u8; w * h * 3];
        for y in y0..y1 {
            for x in x0..x1 {
                let i = (y * w + x) * 3;
                pixels[i..i + 3].copy_from_slice(&[220, 200, 180]);
            }
        }
        RgbImage {
            width: w,
            height: h,
            pixels,
        }
    }

    /// Number of edge pixels.
    fn count_white(img: &RgbImage) -> usize {
        img.pixels.chunks_exact(3).filter(|p| p[0] == 255).count()
    }

    fn white(img: &RgbImage, x: usize, y: usize) -> bool {
        img.pixels[(y * img.width + x) * 3] == 255
    }

    /// Pixels reachable from (0, 0) through non-edge pixels (4-connected).
    fn flood_from_corner(edges: &RgbImage) -> Vec<bool> {
        let (w, h) = (edges.width, edges.height);
        let mut seen = vec![false; w * h];
        let mut stack = vec![(0usize, 0usize)];
        while let Some((x, y)) = stack.pop() {
            if seen[y * w + x] || white(edges, x, y) {
                continue;
            }
            seen[y * w + x] = true;
            if x > 0 {
                stack.push((x - 1, y));
            }
            if x + 1 < w {
                stack.push((x + 1, y));
            }
            if y > 0 {
                stack.push((x, y - 1));
            }
            if y + 1 < h {
                stack.push((x, y + 1));
            }
        }
        seen
    }

    #[test]
    fn canny_outlines_a_filled_square_with_a_closed_curve() {
        let (w, h) = (48, 40);
        let img = square(w, h, (14, 34, 10, 30));
        let edges = canny(&img, DEFAULT_CANNY_LOW, DEFAULT_CANNY_HIGH).unwrap();
        assert_eq!((edges.width, edges.height), (w, h));
        // Black and white only, grey in all three channels.
        for p in edges.pixels.chunks_exact(3) {
            assert!(p[0] == 0 || p[0] == 255);
            assert!(p[0] == p[1] && p[1] == p[2]);
        }
        // Edges lie on the square's border (within two pixels), nowhere else.
        let near_border = |x: usize, y: usize| {
            let inside = |a: usize, lo: usize, hi: usize| a + 2 >= lo && a < hi + 2;
            let on_x = (x + 2 >= 14 && x <= 15) || (x + 2 >= 33 && x <= 35);
            let on_y = (y + 2 >= 10 && y <= 11) || (y + 2 >= 29 && y <= 31);
            (on_x && inside(y, 10, 30)) || (on_y && inside(x, 14, 34))
        };
        for y in 0..h {
            for x in 0..w {
                if white(&edges, x, y) {
                    assert!(
                        near_border(x, y),
                        "edge pixel at ({x}, {y}) off the outline"
                    );
                }
            }
        }
        // The outline is closed: the square's centre cannot be reached from the corner
        // without crossing an edge.
        let outside = flood_from_corner(&edges);
        assert!(outside[0]);
        assert!(!outside[20 * w + 24], "the outline has a gap");
        assert!(count_white(&edges) >= 4 * 18, "{}", count_white(&edges));
    }

    #[test]
    fn thresholds_change_how_many_edges_are_kept() {
        // Squares of decreasing contrast on grey: each higher pair of thresholds loses the
        // outline of the next faintest square.
        let (w, h) = (96, 32);
        let mut pixels = vec![100u8; w * h * 3];
        for (k, level) in [255u8, 180, 140, 120].iter().enumerate() {
            for y in 8..24 {
                for x in (4 + 24 * k)..(20 + 24 * k) {
                    let i = (y * w + x) * 3;
                    pixels[i..i + 3].copy_from_slice(&[*level; 3]);
                }
            }
        }
        let img = RgbImage {
            width: w,
            height: h,
            pixels,
        };
        let counts: Vec<usize> = [
            (10.0, 20.0),
            (30.0, 60.0),
            (100.0, 150.0),
            (200.0, 250.0),
            (400.0, 400.0),
            (1200.0, 1200.0),
        ]
        .iter()
        .map(|&(lo, hi)| count_white(&canny(&img, lo, hi).unwrap()))
        .collect();
        assert!(
            counts[..4].windows(2).all(|c| c[0] > c[1]) && counts[3] > 0,
            "edge counts should fall as the thresholds rise: {counts:?}"
        );
        assert_eq!(
            counts[5], 0,
            "above the largest gradient nothing is an edge"
        );
        // A flat picture has no edges at any threshold.
        let flat = RgbImage {
            width: 16,
            height: 16,
            pixels: vec![77; 16 * 16 * 3],
        };
        assert_eq!(count_white(&canny(&flat, 1.0, 2.0).unwrap()), 0);
    }

    #[test]
    fn canny_refuses_bad_thresholds_and_bad_buffers() {
        let img = square(8, 8, (2, 6, 2, 6));
        assert!(canny(&img, 200.0, 100.0).is_err(), "low above high");
        assert!(canny(&img, -1.0, 100.0).is_err());
        assert!(canny(&img, 1.0, f32::NAN).is_err());
        let short = RgbImage {
            width: 8,
            height: 8,
            pixels: vec![0; 10],
        };
        assert!(canny(&short, 1.0, 2.0).is_err());
        // Too small for an interior: no edges, no panic.
        let tiny = square(2, 5, (0, 1, 0, 5));
        assert_eq!(count_white(&canny(&tiny, 1.0, 2.0).unwrap()), 0);
    }

    fn mean(img: &RgbImage) -> f64 {
        img.pixels.iter().map(|&p| f64::from(p)).sum::<f64>() / img.pixels.len() as f64
    }

    /// Sum of squared differences between horizontally and vertically adjacent values.
    fn roughness(img: &RgbImage) -> f64 {
        let (w, h) = (img.width, img.height);
        let at = |x: usize, y: usize, c: usize| f64::from(img.pixels[(y * w + x) * 3 + c]);
        let mut total = 0.0;
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    if x + 1 < w {
                        total += (at(x + 1, y, c) - at(x, y, c)).powi(2);
                    }
                    if y + 1 < h {
                        total += (at(x, y + 1, c) - at(x, y, c)).powi(2);
                    }
                }
            }
        }
        total
    }

    #[test]
    fn blur_keeps_the_mean_and_smooths() {
        // A checkerboard of 4-pixel cells in each channel, with a different phase per channel,
        // over a size the cells tile exactly (so the clamped border keeps the mean too).
        let (w, h) = (64, 48);
        let mut pixels = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let on = ((x + c) / 4 + y / 4) % 2 == 0;
                    pixels.push(if on { 230 } else { 20 });
                }
            }
        }
        let img = RgbImage {
            width: w,
            height: h,
            pixels,
        };
        let mut previous = roughness(&img);
        for sigma in [0.8, DEFAULT_BLUR_SIGMA, 6.0] {
            let blurred = gaussian_blur(&img, sigma).unwrap();
            assert_eq!((blurred.width, blurred.height), (w, h));
            let (m0, m1) = (mean(&img), mean(&blurred));
            assert!(
                (m0 - m1).abs() < 1.0,
                "sigma {sigma}: mean {m0} became {m1}"
            );
            let r = roughness(&blurred);
            assert!(
                r < previous,
                "sigma {sigma}: roughness {r} not below {previous}"
            );
            previous = r;
        }
        // A flat picture stays exactly as it is.
        let flat = RgbImage {
            width: 10,
            height: 7,
            pixels: vec![123; 10 * 7 * 3],
        };
        assert_eq!(gaussian_blur(&flat, 3.0).unwrap(), flat);
    }

    #[test]
    fn blur_refuses_bad_sigmas() {
        let img = square(8, 8, (2, 6, 2, 6));
        for sigma in [0.0, -1.0, f32::NAN, f32::INFINITY, MAX_BLUR_SIGMA * 2.0] {
            assert!(gaussian_blur(&img, sigma).is_err(), "sigma {sigma}");
        }
    }

    #[test]
    fn modes_have_their_default_preprocessing() {
        assert_eq!(
            Preprocess::default_for(ControlMode::Canny),
            Some(Preprocess::Canny {
                low: 100.0,
                high: 200.0
            })
        );
        assert_eq!(
            Preprocess::default_for(ControlMode::Blur),
            Some(Preprocess::Blur { sigma: 2.0 })
        );
        assert_eq!(Preprocess::default_for(ControlMode::Depth), None);
        let img = square(16, 16, (4, 12, 4, 12));
        let via_apply = Preprocess::Blur { sigma: 1.5 }.apply(&img).unwrap();
        assert_eq!(via_apply, gaussian_blur(&img, 1.5).unwrap());
    }
}
