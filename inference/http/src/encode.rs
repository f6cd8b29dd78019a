//! The images of an answer in the format the request asked for.
//!
//! The model thread hands back PNGs (the pipeline's encoder: the bytes `sd35-server generate`
//! writes); a PNG answer is those bytes untouched. JPEG (at the request's quality) and WebP
//! (lossless: the `image` crate encodes no lossy WebP) are re-encoded from the PNG's pixels,
//! off the async runtime's threads.

use image::ImageEncoder as _;

use crate::api::{ApiError, Output, OutputFormat};

/// `png` in the format `output` asks for (PNG: itself).
pub fn transcode(png: Vec<u8>, output: Output) -> Result<Vec<u8>, String> {
    if output.format == OutputFormat::Png {
        return Ok(png);
    }
    let rgb = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
        .map_err(|e| format!("the generated PNG could not be read back: {e}"))?
        .into_rgb8();
    let (width, height) = rgb.dimensions();
    let mut out = Vec::new();
    match output.format {
        OutputFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, output.compression.max(1))
                .write_image(rgb.as_raw(), width, height, image::ExtendedColorType::Rgb8)
                .map_err(|e| format!("JPEG encoding failed: {e}"))?;
        }
        OutputFormat::Webp => {
            image::codecs::webp::WebPEncoder::new_lossless(&mut out)
                .write_image(rgb.as_raw(), width, height, image::ExtendedColorType::Rgb8)
                .map_err(|e| format!("WebP encoding failed: {e}"))?;
        }
        OutputFormat::Png => unreachable!("answered above"),
    }
    Ok(out)
}

/// [`transcode`] for every image of an answer, on a blocking thread when there is work.
pub async fn transcode_all(pngs: Vec<Vec<u8>>, output: Output) -> Result<Vec<Vec<u8>>, ApiError> {
    if output.format == OutputFormat::Png {
        return Ok(pngs);
    }
    let failed = |e: String| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e);
    tokio::task::spawn_blocking(move || {
        pngs.into_iter()
            .map(|png| transcode(png, output))
            .collect::<Result<Vec<_>, String>>()
    })
    .await
    .map_err(|e| failed(format!("the encoder stopped: {e}")))?
    .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_stays_as_it_is_and_the_others_decode_to_the_same_size() {
        let params = crate::backend::GenParams {
            prompt: "x".into(),
            width: 32,
            height: 16,
            steps: 1,
            ..Default::default()
        };
        let png = crate::backend::fake_png(&params);
        let same = transcode(png.clone(), Output::default()).unwrap_or_default();
        assert_eq!(same, png);
        for (format, magic) in [
            (OutputFormat::Jpeg, b"\xff\xd8\xff".as_slice()),
            (OutputFormat::Webp, b"RIFF".as_slice()),
        ] {
            let out = transcode(
                png.clone(),
                Output {
                    format,
                    compression: 50,
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert!(out.starts_with(magic), "{format:?}");
            let back = image::load_from_memory(&out).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!((back.width(), back.height()), (32, 16));
        }
        // WebP is lossless: the pixels come back exactly.
        let webp = transcode(
            png.clone(),
            Output {
                format: OutputFormat::Webp,
                compression: 0,
            },
        )
        .unwrap_or_default();
        let a = image::load_from_memory(&webp).map(|i| i.into_rgb8().into_raw());
        let b = image::load_from_memory(&png).map(|i| i.into_rgb8().into_raw());
        assert_eq!(a.ok(), b.ok());
    }
}
