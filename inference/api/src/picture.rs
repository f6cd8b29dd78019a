//! Images a client uploads to edit, and their masks.
//!
//! Guarantees: a file is recognised by its first bytes, never by its name or declared type
//! (PNG, JPEG and WebP are decoded; any other image format is a 415, anything else a 400);
//! its size is read from its header and checked against [`MAX_UPLOAD_SIDE`] and
//! [`MAX_UPLOAD_PIXELS`] before a pixel is decoded, so a small file that claims a huge image
//! costs nothing; decoding allocates at most [`MAX_DECODE_BYTES`]; the EXIF orientation is
//! applied (a phone photo comes out the way it was shot); a damaged or truncated file is a 400
//! naming the field. Every error names the field the file came in.
//!
//! Resizing is Lanczos with a = 3 (as diffusers' `VaeImageProcessor` resizes with PIL's
//! Lanczos; the 8-bit results can differ from PIL's by a level or so); an image already at the
//! size asked for is used as it is, bit for bit.
//!
//! A file sent inside a JSON body comes as base64 ([`base64_file`]).

use base64::Engine as _;
use http::StatusCode;
use image::imageops::FilterType;
use image::{DynamicImage, ImageBuffer, ImageDecoder, ImageFormat, ImageReader, Luma, Rgb};

use crate::error::ApiError;

/// Largest width or height of an uploaded image, read from its header before decoding.
pub const MAX_UPLOAD_SIDE: u32 = 8192;
/// Most pixels of an uploaded image (32 Mi, about a 6500 × 5000 photo).
pub const MAX_UPLOAD_PIXELS: u64 = 32 << 20;
/// Most bytes one image's decoding may allocate (RGBA at 16 bits of the largest accepted image
/// fits).
pub const MAX_DECODE_BYTES: u64 = 8 * MAX_UPLOAD_PIXELS + (16 << 20);

/// The formats an uploaded image may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadFormat {
    /// PNG.
    Png,
    /// JPEG.
    Jpeg,
    /// WebP (lossy or lossless).
    Webp,
}

impl UploadFormat {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }
}

/// What an uploaded image's header says, with the EXIF orientation applied to its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The format, from the file's first bytes.
    pub format: UploadFormat,
    /// Width as displayed (after the EXIF orientation).
    pub width: u32,
    /// Height as displayed.
    pub height: u32,
}

/// 8-bit RGB pixels, row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picture {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width × height × 3` bytes.
    pub rgb: Vec<u8>,
}

/// 8-bit grey levels, row by row: where an edit repaints. The pipeline repaints where a level
/// is at least 128 (half scale, as diffusers' mask processor binarises).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width × height` bytes.
    pub grey: Vec<u8>,
}

/// A decoded upload: its colour and, when the file has one, its alpha channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The colour, with the alpha channel dropped (as PIL's `convert("RGB")` drops it).
    pub picture: Picture,
    /// The alpha channel (`width × height` bytes) when the file has one (a PNG or WebP with
    /// alpha, or a PNG with a transparent palette entry).
    pub alpha: Option<Vec<u8>>,
}

/// An image sent as base64 in a JSON body (a `data:` URL's prefix, white space and missing
/// padding are accepted); a 400 naming the field when it is not base64.
pub fn base64_file(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let body = match text.trim_start().strip_prefix("data:") {
        Some(url) => url
            .split_once(',')
            .filter(|(meta, _)| meta.ends_with(";base64"))
            .map(|(_, data)| data)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "is a data: URL that is not base64 (`data:image/png;base64,...` expected)",
                )
                .with_field(field)
            })?,
        None => text,
    };
    let compact: Vec<u8> = body.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if compact.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "is empty").with_field(field));
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(&compact).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("is not base64 (standard alphabet): {e}"),
        )
        .with_field(field)
    })
}

fn not_an_image(field: &str, bytes: &[u8]) -> ApiError {
    let start: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    ApiError::new(
        StatusCode::BAD_REQUEST,
        format!(
            "is not an image: a PNG, JPEG or WebP file is expected (it starts with the bytes \
             [{}], {} bytes in all)",
            start.join(" "),
            bytes.len()
        ),
    )
    .with_field(field)
}

fn damaged(field: &str, format: UploadFormat, e: &image::ImageError) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        format!(
            "is a {} file that cannot be decoded (truncated or damaged): {e}",
            format.as_str().to_uppercase()
        ),
    )
    .with_field(field)
}

/// The format of an upload from its first bytes.
pub fn sniff(field: &str, bytes: &[u8]) -> Result<UploadFormat, ApiError> {
    match image::guess_format(bytes) {
        Ok(ImageFormat::Png) => Ok(UploadFormat::Png),
        Ok(ImageFormat::Jpeg) => Ok(UploadFormat::Jpeg),
        Ok(ImageFormat::WebP) => Ok(UploadFormat::Webp),
        Ok(other) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "is a {} image; send PNG, JPEG or WebP",
                other
                    .extensions_str()
                    .first()
                    .map_or_else(|| format!("{other:?}"), |e| e.to_ascii_uppercase())
            ),
        )
        .with_field(field)),
        Err(_) => Err(not_an_image(field, bytes)),
    }
}

fn reader(bytes: &[u8], format: UploadFormat) -> ImageReader<std::io::Cursor<&[u8]>> {
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes));
    reader.set_format(match format {
        UploadFormat::Png => ImageFormat::Png,
        UploadFormat::Jpeg => ImageFormat::Jpeg,
        UploadFormat::Webp => ImageFormat::WebP,
    });
    // The header is read with no limit on the size it claims (checked here, with a message
    // that says what was claimed), but with one on what reading it may allocate.
    let mut limits = image::Limits::default();
    limits.max_image_width = None;
    limits.max_image_height = None;
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    reader
}

/// Whether an orientation turns the image by a quarter (width and height swap).
fn quarter_turn(o: image::metadata::Orientation) -> bool {
    use image::metadata::Orientation as O;
    matches!(
        o,
        O::Rotate90 | O::Rotate270 | O::Rotate90FlipH | O::Rotate270FlipH
    )
}

/// Checks a claimed size against the upload bounds.
fn check_size(field: &str, width: u32, height: u32) -> Result<(), ApiError> {
    let pixels = u64::from(width) * u64::from(height);
    if width == 0 || height == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("claims a {width}x{height} image, which has no pixels"),
        )
        .with_field(field));
    }
    if width > MAX_UPLOAD_SIDE || height > MAX_UPLOAD_SIDE || pixels > MAX_UPLOAD_PIXELS {
        return Err(ApiError::invalid(
            field,
            format!(
                "claims {width}x{height} pixels; images of at most {MAX_UPLOAD_SIDE} pixels a \
                 side and {} megapixels in all are decoded (nothing was decoded)",
                MAX_UPLOAD_PIXELS >> 20
            ),
        ));
    }
    Ok(())
}

/// An opened decoder, its size checked, and its orientation.
fn open<'a>(
    field: &str,
    bytes: &'a [u8],
) -> Result<(Header, impl ImageDecoder + 'a, image::metadata::Orientation), ApiError> {
    let format = sniff(field, bytes)?;
    let mut decoder = reader(bytes, format)
        .into_decoder()
        .map_err(|e| damaged(field, format, &e))?;
    let (width, height) = decoder.dimensions();
    check_size(field, width, height)?;
    // A file whose EXIF cannot be read is displayed unrotated by every viewer: so here too.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let (width, height) = if quarter_turn(orientation) {
        (height, width)
    } else {
        (width, height)
    };
    Ok((
        Header {
            format,
            width,
            height,
        },
        decoder,
        orientation,
    ))
}

/// The format and displayed size of an upload, from its header alone (nothing is decoded).
pub fn probe(field: &str, bytes: &[u8]) -> Result<Header, ApiError> {
    open(field, bytes).map(|(header, _, _)| header)
}

/// Decodes an upload, its EXIF orientation applied.
pub fn decode(field: &str, bytes: &[u8]) -> Result<Decoded, ApiError> {
    let (header, decoder, orientation) = open(field, bytes)?;
    let mut image =
        DynamicImage::from_decoder(decoder).map_err(|e| damaged(field, header.format, &e))?;
    image.apply_orientation(orientation);
    let (width, height) = (image.width(), image.height());
    if image.color().has_alpha() {
        let rgba = image.into_rgba8().into_raw();
        let mut rgb = Vec::with_capacity(rgba.len() / 4 * 3);
        let mut alpha = Vec::with_capacity(rgba.len() / 4);
        for px in rgba.chunks_exact(4) {
            rgb.extend_from_slice(&px[..3]);
            alpha.push(px[3]);
        }
        Ok(Decoded {
            picture: Picture { width, height, rgb },
            alpha: Some(alpha),
        })
    } else {
        Ok(Decoded {
            picture: Picture {
                width,
                height,
                rgb: image.into_rgb8().into_raw(),
            },
            alpha: None,
        })
    }
}

/// PIL's grey level of an RGB pixel (`Image.convert("L")`): ITU-R 601-2 luma in fixed point,
/// `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`.
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((19595 * u32::from(r) + 38470 * u32::from(g) + 7471 * u32::from(b) + 0x8000) >> 16) as u8
}

impl Picture {
    /// The picture at `width × height`: itself when it already is that size, else resized
    /// with Lanczos (a = 3), the aspect ratio not kept (as diffusers resizes).
    pub fn resized(self, width: u32, height: u32) -> Picture {
        if (self.width, self.height) == (width, height) {
            return self;
        }
        let Some(buffer) =
            ImageBuffer::<Rgb<u8>, Vec<u8>>::from_raw(self.width, self.height, self.rgb)
        else {
            // Only a Picture whose bytes do not match its size gets here.
            return Picture {
                width,
                height,
                rgb: vec![0; (width * height * 3) as usize],
            };
        };
        let out = image::imageops::resize(&buffer, width, height, FilterType::Lanczos3);
        Picture {
            width,
            height,
            rgb: out.into_raw(),
        }
    }

    /// The grey levels (PIL's `convert("L")`).
    pub fn grey(&self) -> Vec<u8> {
        self.rgb
            .chunks_exact(3)
            .map(|p| luma(p[0], p[1], p[2]))
            .collect()
    }
}

impl Mask {
    /// The mask at `width × height` (Lanczos, a = 3, like the image; the pipeline binarises
    /// it after).
    pub fn resized(self, width: u32, height: u32) -> Mask {
        if (self.width, self.height) == (width, height) {
            return self;
        }
        let Some(buffer) =
            ImageBuffer::<Luma<u8>, Vec<u8>>::from_raw(self.width, self.height, self.grey)
        else {
            return Mask {
                width,
                height,
                grey: vec![0; (width * height) as usize],
            };
        };
        let out = image::imageops::resize(&buffer, width, height, FilterType::Lanczos3);
        Mask {
            width,
            height,
            grey: out.into_raw(),
        }
    }

    /// Repaints what was kept and keeps what was repainted: each level `l` becomes `255 − l`
    /// (PIL's `ImageOps.invert`).
    pub fn inverted(mut self) -> Mask {
        for g in &mut self.grey {
            *g = 255 - *g;
        }
        self
    }

    /// The mask blurred as AUTOMATIC1111 blurs it (OpenCV's `GaussianBlur`): horizontally with
    /// a Gaussian of standard deviation `sigma_x` pixels over `2·⌊2.5·σ + 0.5⌋ + 1` taps, then
    /// vertically with `sigma_y`; 0 skips that direction; borders mirrored without repeating
    /// the edge (OpenCV's default `BORDER_REFLECT_101`); each pass rounded to 8 bits.
    pub fn blurred(mut self, sigma_x: u32, sigma_y: u32) -> Mask {
        let (w, h) = (self.width as usize, self.height as usize);
        if sigma_x > 0 {
            let kernel = gaussian(sigma_x);
            let mut out = vec![0u8; self.grey.len()];
            for y in 0..h {
                let row = &self.grey[y * w..(y + 1) * w];
                for x in 0..w {
                    out[y * w + x] = convolve(&kernel, |d| row[reflect_101(x, d, w)]);
                }
            }
            self.grey = out;
        }
        if sigma_y > 0 {
            let kernel = gaussian(sigma_y);
            let mut out = vec![0u8; self.grey.len()];
            for y in 0..h {
                for x in 0..w {
                    out[y * w + x] = convolve(&kernel, |d| self.grey[reflect_101(y, d, h) * w + x]);
                }
            }
            self.grey = out;
        }
        self
    }

    /// Whether any pixel is repainted.
    pub fn repaints_anything(&self) -> bool {
        self.grey.iter().any(|&g| g >= 128)
    }
}

/// OpenCV's Gaussian kernel for `sigma`: `2·⌊2.5·σ + 0.5⌋ + 1` taps (AUTOMATIC1111's kernel
/// size), weights `exp(−x² / 2σ²)` normalised to sum 1.
fn gaussian(sigma: u32) -> Vec<f32> {
    let sigma = f64::from(sigma);
    let radius = (2.5 * sigma + 0.5) as i64;
    let weights: Vec<f64> = (-radius..=radius)
        .map(|x| (-((x * x) as f64) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f64 = weights.iter().sum();
    weights.iter().map(|w| (w / sum) as f32).collect()
}

/// The index `offset` away from `at` in `0..len`, mirrored at the ends without repeating the
/// edge pixel (`dcb|abcd|cba`), as often as a kernel wider than the image needs.
fn reflect_101(at: usize, offset: isize, len: usize) -> usize {
    if len <= 1 {
        return 0;
    }
    let period = 2 * (len as isize - 1);
    let i = (at as isize + offset).rem_euclid(period);
    (if i >= len as isize { period - i } else { i }) as usize
}

/// One output level: the kernel's weighted sum of the levels `source(offset)` gives for the
/// offsets `−radius..=radius`, rounded to 8 bits.
fn convolve(kernel: &[f32], source: impl Fn(isize) -> u8) -> u8 {
    let radius = (kernel.len() / 2) as isize;
    let sum: f32 = kernel
        .iter()
        .zip(-radius..=radius)
        .map(|(w, offset)| w * f32::from(source(offset)))
        .sum();
    sum.round().clamp(0.0, 255.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32, rgba: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let img: DynamicImage = if rgba {
            DynamicImage::ImageRgba8(ImageBuffer::from_fn(width, height, |x, y| {
                image::Rgba([x as u8, y as u8, 7, if x < 2 { 0 } else { 255 }])
            }))
        } else {
            DynamicImage::ImageRgb8(ImageBuffer::from_fn(width, height, |x, y| {
                Rgb([x as u8, y as u8, 7])
            }))
        };
        img.write_to(&mut std::io::Cursor::new(&mut out), ImageFormat::Png)
            .unwrap_or_else(|e| panic!("{e}"));
        out
    }

    #[test]
    fn uploads_are_recognised_by_their_bytes() {
        let p = png(5, 3, false);
        assert_eq!(
            probe("image", &p),
            Ok(Header {
                format: UploadFormat::Png,
                width: 5,
                height: 3
            })
        );
        let d = decode("image", &png(5, 3, true)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.picture.rgb.len(), 45);
        assert_eq!(d.alpha.as_deref().map(|a| (a[0], a[2])), Some((0, 255)));
        let err = |bytes: &[u8]| {
            decode("image", bytes)
                .map(drop)
                .map_err(|e| (e.status.as_u16(), e.field))
        };
        assert_eq!(err(b"hello"), Err((400, Some("image".into()))));
        assert_eq!(
            err(b"GIF89a\x01\x00\x01\x00"),
            Err((415, Some("image".into())))
        );
        assert_eq!(err(&p[..p.len() / 2]), Err((400, Some("image".into()))));
    }

    #[test]
    fn a_huge_claimed_size_is_refused_before_decoding() {
        // A PNG header claiming 50 000 × 50 000 with no pixel data.
        let mut p = png(1, 1, false);
        p[16..20].copy_from_slice(&50_000u32.to_be_bytes());
        p[20..24].copy_from_slice(&50_000u32.to_be_bytes());
        // The header's checksum covers the size: fix it so only the size is wrong.
        let crc = crc32fast::hash(&p[12..29]);
        p[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = probe("image", &p)
            .err()
            .unwrap_or_else(|| panic!("accepted"));
        assert_eq!(
            (e.status.as_u16(), e.field.as_deref()),
            (422, Some("image"))
        );
        assert!(e.message.contains("50000x50000"), "{}", e.message);
    }

    #[test]
    fn resizing_keeps_an_image_of_the_right_size_as_it_is() {
        let d = decode("image", &png(32, 16, false)).unwrap_or_else(|e| panic!("{e}"));
        let same = d.picture.clone().resized(32, 16);
        assert_eq!(same, d.picture);
        let half = d.picture.resized(16, 16);
        assert_eq!((half.width, half.height, half.rgb.len()), (16, 16, 768));
    }

    #[test]
    fn the_mask_blur_is_opencvs_gaussian() {
        // OpenCV: getGaussianKernel(11, 2) (2·⌊5.5⌋ + 1 taps for σ = 2), sums to 1.
        let k = gaussian(2);
        assert_eq!(k.len(), 11);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((k[5] - 0.200_565).abs() < 1e-5, "{}", k[5]);
        // reflect-101: dcb|abcd|cba.
        let idx: Vec<usize> = (-4..=4).map(|d| reflect_101(0, d, 4)).collect();
        assert_eq!(idx, [2, 3, 2, 1, 0, 1, 2, 3, 2]);
        assert_eq!(reflect_101(3, 2, 4), 1);
        // A hard edge becomes a ramp, symmetric about it; a flat mask stays flat.
        let mask = Mask {
            width: 8,
            height: 1,
            grey: vec![0, 0, 0, 0, 255, 255, 255, 255],
        };
        let b = mask.blurred(1, 0).grey;
        assert!(b[3] > 0 && b[3] < 128 && b[4] > 128 && b[4] < 255, "{b:?}");
        assert_eq!(u16::from(b[3]) + u16::from(b[4]), 255);
        let flat = Mask {
            width: 3,
            height: 3,
            grey: vec![200; 9],
        };
        assert_eq!(flat.clone().blurred(4, 4), flat);
    }
}
