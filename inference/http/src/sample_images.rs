//! Small image files that exercise the upload paths — ordinary, damaged and hostile — for the
//! tests of this crate and of `sd35-server` (and anyone checking a deployment by hand).

use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb, Rgba};

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    // Encoding a small in-memory image cannot fail; an empty file would fail the test using it.
    let _ = image.write_to(&mut std::io::Cursor::new(&mut out), format);
    out
}

/// A `width × height` RGB gradient (red across, green down) as PNG.
pub fn png(width: u32, height: u32) -> Vec<u8> {
    encode(&gradient(width, height), ImageFormat::Png)
}

/// The gradient of [`png`] as JPEG (quality 75).
pub fn jpeg(width: u32, height: u32) -> Vec<u8> {
    encode(&gradient(width, height), ImageFormat::Jpeg)
}

/// The gradient of [`png`] as (lossless) WebP.
pub fn webp(width: u32, height: u32) -> Vec<u8> {
    encode(&gradient(width, height), ImageFormat::WebP)
}

fn gradient(width: u32, height: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(width, height, |x, y| {
        Rgb([
            (x * 255 / width.max(1)) as u8,
            (y * 255 / height.max(1)) as u8,
            96,
        ])
    }))
}

/// An OpenAI mask: a `width × height` RGBA PNG, fully transparent (repainted) where `repaint`
/// says, opaque elsewhere.
pub fn transparent_mask(width: u32, height: u32, repaint: impl Fn(u32, u32) -> bool) -> Vec<u8> {
    let image = ImageBuffer::from_fn(width, height, |x, y| {
        if repaint(x, y) {
            Rgba([0, 0, 0, 0])
        } else {
            Rgba([0, 0, 0, 255])
        }
    });
    encode(&DynamicImage::ImageRgba8(image), ImageFormat::Png)
}

/// A diffusers / AUTOMATIC1111 mask: a `width × height` grey PNG, white (repainted) where
/// `repaint` says, black elsewhere.
pub fn white_mask(width: u32, height: u32, repaint: impl Fn(u32, u32) -> bool) -> Vec<u8> {
    let image = ImageBuffer::from_fn(width, height, |x, y| {
        image::Luma([if repaint(x, y) { 255u8 } else { 0 }])
    });
    encode(&DynamicImage::ImageLuma8(image), ImageFormat::Png)
}

/// A 1 × 1 GIF: an image, in a format uploads do not take.
pub fn gif() -> Vec<u8> {
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,\
\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
        .to_vec()
}

/// The first half of a PNG: its header intact, its pixels cut off.
pub fn truncated_png(width: u32, height: u32) -> Vec<u8> {
    let mut p = png(width, height);
    p.truncate(p.len() / 2);
    p
}

/// A decompression bomb: a PNG of a few dozen bytes whose header claims `side × side` pixels
/// (with a valid checksum), and one empty data chunk.
pub fn bomb_png(side: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    chunk(&mut out, b"IHDR", &ihdr);
    // A zlib stream that ends at once: nothing for the claimed rows.
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// The JPEG of [`jpeg`] with an EXIF block saying `orientation` (1–8; 6: shot turned a quarter
/// clockwise, displayed `height × width`).
pub fn jpeg_with_orientation(width: u32, height: u32, orientation: u16) -> Vec<u8> {
    let plain = jpeg(width, height);
    // APP1 "Exif": a big-endian TIFF header and one IFD entry, Orientation (0x0112, SHORT).
    let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    tiff.extend_from_slice(&1u16.to_be_bytes());
    tiff.extend_from_slice(&0x0112u16.to_be_bytes());
    tiff.extend_from_slice(&3u16.to_be_bytes());
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_be_bytes());
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = plain[..2].to_vec(); // SOI
    out.extend_from_slice(&[0xff, 0xe1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&plain[2..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_samples_are_what_they_say() {
        let header = |b: &[u8]| crate::api::picture::probe("image", b);
        assert_eq!(header(&png(5, 3)).map(|h| (h.width, h.height)), Ok((5, 3)));
        assert_eq!(header(&webp(5, 3)).map(|h| (h.width, h.height)), Ok((5, 3)));
        // The EXIF orientation turns the displayed size.
        assert_eq!(
            header(&jpeg_with_orientation(48, 32, 6)).map(|h| (h.width, h.height)),
            Ok((32, 48))
        );
        let bomb = header(&bomb_png(50_000))
            .err()
            .map(|e| (e.status.as_u16(), e.message));
        assert!(
            bomb.as_ref()
                .is_some_and(|(s, m)| *s == 422 && m.contains("50000x50000")),
            "{bomb:?}"
        );
        assert_eq!(header(&gif()).err().map(|e| e.status.as_u16()), Some(415));
        assert!(crate::api::picture::decode("image", &truncated_png(16, 16)).is_err());
        let mask = crate::api::picture::decode("mask", &transparent_mask(4, 4, |x, _| x < 2))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            mask.alpha.map(|a| a[..4].to_vec()),
            Some(vec![0, 0, 255, 255])
        );
    }
}
