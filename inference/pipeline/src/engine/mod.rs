//! Prebuilt engines: a cached model rewritten for one serving precision, plus a manifest.
//!
//! An engine directory mirrors the model's file tree, so the ordinary loader reads it with no
//! conversion at start-up. Every safetensors file is rewritten ([`rewrite`]):
//! - bf16 engines store every float tensor in bf16 (F8 tensors of `fp8_scaled` sources are
//!   dequantised with their scales);
//! - fp8 engines store the linear weights of the MMDiT and T5 as F8E4M3 with an f32
//!   `<name>.scale_weight` (absmax per tensor or per output channel, the arithmetic of
//!   [`crate::linear::quantize_per_channel`]) and every other float tensor in bf16; each such
//!   file carries the `scaled_fp8` marker of ComfyUI's `fp8_scaled` checkpoints, so nothing is
//!   quantised again at load. CLIP stays bf16, as the pipeline keeps it in fp8 mode.
//!
//! Conversion streams chunks of rows from the source file to the engine file, so memory stays
//! near one chunk, not one tensor and never the model. `engine.json` is written last,
//! atomically, and lists the size and sha256 of every file; an engine without it is
//! incomplete and is refused.
//!
//! Three parts, none of which loads a model: opening and checking an engine (here), building
//! one ([`build`]), rewriting one safetensors file ([`rewrite`]). The smoke image an engine
//! carries is made by [`crate::smoke::record_engine`], which does load it.

mod build;
mod rewrite;

use std::io::Read;
use std::path::Path;

use sd35_contract::{ENGINE_MANIFEST, ManifestError};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

pub use build::{BuildOptions, BuildProgress, build};
pub use sd35_contract::{EngineManifest, FileRecord, Fp8Scale};

/// Whether `dir` holds an engine manifest (complete or not, it is an engine directory).
pub fn is_engine(dir: &Path) -> bool {
    dir.join(ENGINE_MANIFEST).is_file()
}

pub(crate) fn engine_err(dir: &Path, message: impl Into<String>) -> Error {
    Error::Engine {
        path: dir.to_path_buf(),
        message: message.into(),
    }
}

/// Reads and checks an engine: manifest present and of this format version, every file
/// present with its recorded size and, when `checksums`, its recorded sha256.
pub fn open(dir: &Path, checksums: bool) -> Result<EngineManifest> {
    let manifest = EngineManifest::read(dir).map_err(|e| match e {
        ManifestError::Missing(_) => engine_err(
            dir,
            format!(
                "no {ENGINE_MANIFEST}: the engine is missing or incomplete (an interrupted \
                 build); run build-engine for it"
            ),
        ),
        ManifestError::Io(path, source) => Error::io(path, source),
        ManifestError::Invalid(_, message) => engine_err(dir, message),
    })?;
    for f in &manifest.files {
        let path = dir.join(&f.path);
        let meta = std::fs::metadata(&path).map_err(|e| {
            engine_err(
                dir,
                format!("file {} is unreadable ({e}); rebuild the engine", f.path),
            )
        })?;
        if meta.len() != f.size {
            return Err(engine_err(
                dir,
                format!(
                    "file {} has {} bytes, the manifest says {}: the engine is corrupt; \
                     rebuild it",
                    f.path,
                    meta.len(),
                    f.size
                ),
            ));
        }
        if checksums {
            let sum = sha256_file(&path)?;
            if sum != f.sha256 {
                return Err(engine_err(
                    dir,
                    format!(
                        "file {} has sha256 {sum}, the manifest says {}: the engine is \
                         corrupt; rebuild it",
                        f.path, f.sha256
                    ),
                ));
            }
        }
    }
    Ok(manifest)
}

/// Lower-case hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(sd35_contract::hex(&h.finalize()))
}

pub(crate) fn write_manifest(manifest: &EngineManifest, dir: &Path) -> Result<()> {
    manifest.write(dir).map_err(|e| match e {
        ManifestError::Io(path, source) => Error::io(path, source),
        other => engine_err(dir, other.to_string()),
    })
}
