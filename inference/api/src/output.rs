//! The format images are answered in: `output_format` (`png`, `jpeg` or `webp`) and
//! `output_compression` (0–100), as the OpenAI Images API names them, on every route that
//! answers images; `/v1/txt2img` and `/v1/img2img` also read the `Accept` header.
//!
//! PNG is what the pipeline writes (the bytes `sd35-server generate` writes for the same
//! request). JPEG is encoded at quality `output_compression` (default 100, OpenAI's default).
//! WebP is lossless: the encoder at hand (the `image` crate's, pure Rust) writes lossless WebP
//! only, so `output_compression` changes nothing for WebP, nor for PNG.

use crate::error::ApiError;

/// An image format of the answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// PNG (the default).
    #[default]
    Png,
    /// JPEG, at a quality.
    Jpeg,
    /// Lossless WebP.
    Webp,
}

/// The accepted `output_format` values.
pub const OUTPUT_FORMATS: [&str; 3] = ["png", "jpeg", "webp"];

/// `output_compression` when a request leaves it out (OpenAI's default).
pub const DEFAULT_COMPRESSION: u8 = 100;

impl OutputFormat {
    /// The name a request uses (`png`, `jpeg`, `webp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }

    /// The media type of the answer.
    pub fn media_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "png" => Some(Self::Png),
            "jpeg" | "jpg" => Some(Self::Jpeg),
            "webp" => Some(Self::Webp),
            _ => None,
        }
    }
}

/// How a request's images are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    /// The format.
    pub format: OutputFormat,
    /// JPEG quality, 0–100 (0 is encoded as 1, the lowest the encoder has).
    pub compression: u8,
}

impl Default for Output {
    fn default() -> Self {
        Self {
            format: OutputFormat::Png,
            compression: DEFAULT_COMPRESSION,
        }
    }
}

impl Output {
    /// The output a request's `output_format` and `output_compression` ask for; without
    /// `output_format`, the first image type `accept` (an `Accept` header) names, else PNG.
    pub fn resolve(
        format: Option<&str>,
        compression: Option<u32>,
        accept: Option<&str>,
    ) -> Result<Self, ApiError> {
        let format = match format {
            Some(f) => OutputFormat::parse(f).ok_or_else(|| {
                ApiError::invalid(
                    "output_format",
                    format!("`{f}` is not supported; use \"png\", \"jpeg\" or \"webp\""),
                )
            })?,
            None => accept.and_then(from_accept).unwrap_or_default(),
        };
        let compression = match compression {
            None => DEFAULT_COMPRESSION,
            Some(c) if c <= 100 => c as u8,
            Some(c) => {
                return Err(ApiError::invalid(
                    "output_compression",
                    format!("must be a whole number from 0 to 100; got {c}"),
                ));
            }
        };
        Ok(Self {
            format,
            compression,
        })
    }
}

/// The first image type of an `Accept` header this server writes (`image/png`, `image/jpeg`,
/// `image/webp`), skipping those with `q=0`.
fn from_accept(accept: &str) -> Option<OutputFormat> {
    accept.split(',').find_map(|item| {
        let mut params = item.split(';');
        let mime = params.next()?.trim().to_ascii_lowercase();
        let refused = params.any(|p| {
            p.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("q") && v.trim().parse::<f64>().ok() == Some(0.0)
            })
        });
        if refused {
            return None;
        }
        match mime.as_str() {
            "image/png" => Some(OutputFormat::Png),
            "image/jpeg" => Some(OutputFormat::Jpeg),
            "image/webp" => Some(OutputFormat::Webp),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_wins_over_the_accept_header() {
        let f = |format: Option<&str>, accept: Option<&str>| {
            Output::resolve(format, None, accept).map(|o| o.format).ok()
        };
        assert_eq!(f(None, None), Some(OutputFormat::Png));
        assert_eq!(
            f(None, Some("image/webp, image/png")),
            Some(OutputFormat::Webp)
        );
        assert_eq!(
            f(None, Some("image/webp;q=0, image/jpeg")),
            Some(OutputFormat::Jpeg)
        );
        assert_eq!(f(None, Some("*/*")), Some(OutputFormat::Png));
        assert_eq!(f(Some("PNG"), Some("image/jpeg")), Some(OutputFormat::Png));
        assert_eq!(f(Some("jpg"), None), Some(OutputFormat::Jpeg));
        let field = |format: Option<&str>, c: Option<u32>| {
            Output::resolve(format, c, None).err().and_then(|e| e.field)
        };
        assert_eq!(field(Some("gif"), None), Some("output_format".into()));
        assert_eq!(field(None, Some(101)), Some("output_compression".into()));
        assert_eq!(
            Output::resolve(Some("jpeg"), Some(0), None).map(|o| o.compression),
            Ok(0)
        );
    }
}
