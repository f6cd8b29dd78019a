//! Building an engine: every file of a model tree copied or rewritten into the engine
//! directory, hashed on the way, and the manifest written last.

use std::io::BufWriter;
use std::path::Path;

use sd35_contract::{ENGINE_FORMAT_VERSION, EngineManifest, EnginePrecision, FileRecord, Fp8Scale};

use super::rewrite::{HashingWriter, convert_safetensors};
use super::write_manifest;
use crate::variant::Variant;
use crate::{Error, Result};

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The variant the engine serves, recorded in the manifest.
    pub variant: Variant,
    /// The engine's precision.
    pub precision: EnginePrecision,
    /// The engine key, recorded in the manifest.
    pub engine_key: String,
    /// Scaling of fp8 weights.
    pub fp8_scale: Fp8Scale,
    /// Cache key of the source model, recorded in the manifest.
    pub source_cache_key: String,
    /// Revision of the source model, recorded in the manifest.
    pub source_revision: Option<String>,
    /// Hugging Face repository of the source model, recorded in the manifest.
    pub source_repo: Option<String>,
    /// Recorded in the manifest.
    pub tool_version: String,
}

/// Progress of a build, reported after every chunk.
#[derive(Clone, Debug)]
pub struct BuildProgress<'a> {
    /// The file being written, relative to the engine directory.
    pub file: &'a str,
    /// Source bytes processed so far, over all files.
    pub done_bytes: u64,
    /// Source bytes in all.
    pub total_bytes: u64,
}

/// Files of a model tree, relative and sorted; hidden files (markers, partials) are skipped.
fn model_files(root: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let e = e.map_err(|e| Error::io(dir, e))?;
            let name = e.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out)?;
            } else if p.is_file() {
                let rel = p.strip_prefix(root).unwrap_or(&p);
                let rel: Vec<_> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(rel.join("/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, root, &mut out)?;
    out.sort();
    Ok(out)
}

/// Builds the engine of `model` into `out` (created; stale content from an interrupted build
/// is replaced). Returns the manifest, which is written last.
pub fn build(
    model: &Path,
    out: &Path,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(&BuildProgress<'_>),
) -> Result<EngineManifest> {
    // Refuse what the server could not load before spending time on it.
    crate::model_dir::ModelDir::open(model)?;
    let files = model_files(model)?;
    let total_bytes = files
        .iter()
        .map(|f| {
            std::fs::metadata(model.join(f))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum();
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut done_bytes = 0u64;
    let mut entries = Vec::with_capacity(files.len());
    for rel in &files {
        let src = model.join(rel);
        let dst = out.join(rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let tmp = dst.with_file_name(format!(
            ".{}.partial",
            dst.file_name().unwrap_or_default().to_string_lossy()
        ));
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        if rel.ends_with(".safetensors") {
            convert_safetensors(
                &src,
                rel,
                &dst,
                &mut w,
                opts.precision,
                opts.fp8_scale,
                &mut |n| {
                    done_bytes += n;
                    progress(&BuildProgress {
                        file: rel,
                        done_bytes,
                        total_bytes,
                    });
                },
            )?;
        } else {
            let mut r = std::fs::File::open(&src).map_err(|e| Error::io(&src, e))?;
            let n = std::io::copy(&mut r, &mut w).map_err(|e| Error::io(&dst, e))?;
            done_bytes += n;
            progress(&BuildProgress {
                file: rel,
                done_bytes,
                total_bytes,
            });
        }
        let (size, sha256) = w.finish(&tmp)?;
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        entries.push(FileRecord {
            path: rel.clone(),
            size,
            sha256,
        });
    }
    let manifest = EngineManifest {
        format_version: ENGINE_FORMAT_VERSION,
        variant: opts.variant,
        precision: opts.precision,
        fp8_scale: (opts.precision == EnginePrecision::Fp8).then_some(opts.fp8_scale),
        engine_key: opts.engine_key.clone(),
        source_cache_key: opts.source_cache_key.clone(),
        source_revision: opts.source_revision.clone(),
        source_repo: opts.source_repo.clone(),
        tool_version: opts.tool_version.clone(),
        files: entries,
        smoke: None,
    };
    write_manifest(&manifest, out)?;
    Ok(manifest)
}
