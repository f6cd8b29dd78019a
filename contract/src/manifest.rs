//! The two manifests on the cache volume, parsed in one place: a model's completion marker
//! (`.sd35-complete.json`, written by `fetch`) and an engine's manifest (`engine.json`, written
//! by `build-engine`). Each is written last and atomically, so its presence means "complete";
//! each says what the directory holds, so a server never guesses it from a path.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::{COMPLETE_MARKER, ENGINE_FORMAT_VERSION, ENGINE_MANIFEST};
use crate::model::{DeviceKind, EnginePrecision, Variant};

/// Why a manifest could not be read or written.
#[derive(Debug)]
pub enum ManifestError {
    /// There is no manifest: the directory is incomplete.
    Missing(PathBuf),
    /// Reading or writing it failed.
    Io(PathBuf, std::io::Error),
    /// It is not a manifest this version understands.
    Invalid(PathBuf, String),
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestError::Missing(p) => write!(f, "{} does not exist", p.display()),
            ManifestError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            ManifestError::Invalid(p, e) => write!(f, "{}: {e}", p.display()),
        }
    }
}

impl std::error::Error for ManifestError {}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ManifestError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ManifestError::Missing(path.to_path_buf()));
        }
        Err(e) => return Err(ManifestError::Io(path.to_path_buf(), e)),
    };
    serde_json::from_str(&text)
        .map_err(|e| ManifestError::Invalid(path.to_path_buf(), e.to_string()))
}

/// Writes `bytes` to `path` through a synced temporary file beside it and a rename, then syncs
/// the directory: readers see the old content or the new, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.partial",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ManifestError> {
    let json = serde_json::to_vec_pretty(value)
        .map_err(|e| ManifestError::Invalid(path.to_path_buf(), e.to_string()))?;
    write_atomic(path, &json).map_err(|e| ManifestError::Io(path.to_path_buf(), e))
}

/// Where a cached model came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum SourceRecord {
    /// A Hugging Face repository.
    HuggingFace {
        /// The endpoint used.
        endpoint: String,
        /// `owner/name`.
        repo: String,
    },
    /// An HTTP mirror.
    Http {
        /// Base URL of the tree.
        url: String,
    },
    /// A mounted directory.
    Import {
        /// The directory.
        dir: String,
    },
}

/// One file of a cached model or an engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Path relative to the directory, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex sha256.
    pub sha256: String,
}

/// `.sd35-complete.json`: a complete cached model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheManifest {
    /// Where the files came from.
    pub source: SourceRecord,
    /// The revision asked for.
    pub revision: String,
    /// The commit it resolved to, when the source reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_revision: Option<String>,
    /// The variant the files were fetched as.
    pub variant: Variant,
    /// Every file of the model.
    pub files: Vec<FileRecord>,
    /// Seconds since the Unix epoch when the fetch completed.
    pub completed_at: u64,
}

impl CacheManifest {
    /// Reads the marker of a model directory; `Missing` when the cache is not complete.
    pub fn read(model_dir: &Path) -> Result<Self, ManifestError> {
        read_json(&model_dir.join(COMPLETE_MARKER))
    }

    /// Writes the marker atomically.
    pub fn write(&self, model_dir: &Path) -> Result<(), ManifestError> {
        write_json(&model_dir.join(COMPLETE_MARKER), self)
    }

    /// The Hugging Face repository id the model came from, if it came from one.
    pub fn repo(&self) -> Option<&str> {
        match &self.source {
            SourceRecord::HuggingFace { repo, .. } => Some(repo),
            _ => None,
        }
    }

    /// Whether every listed file is present with its recorded size (a fast check: a second
    /// run on a complete cache must not re-hash gigabytes).
    pub fn files_present(&self, model_dir: &Path) -> bool {
        self.files
            .iter()
            .all(|f| std::fs::metadata(model_dir.join(&f.path)).is_ok_and(|m| m.len() == f.size))
    }
}

/// How fp8 engines scale their F8E4M3 weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Fp8Scale {
    /// One absmax scale for the whole matrix.
    PerTensor,
    /// One absmax scale per output channel (row).
    #[default]
    PerChannel,
}

impl Fp8Scale {
    /// The name on the command line and in `engine.json`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Fp8Scale::PerTensor => "per-tensor",
            Fp8Scale::PerChannel => "per-channel",
        }
    }
}

impl std::str::FromStr for Fp8Scale {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "per-tensor" => Ok(Self::PerTensor),
            "per-channel" => Ok(Self::PerChannel),
            _ => Err(format!(
                "unknown fp8 scale `{s}`: expected per-tensor or per-channel"
            )),
        }
    }
}

/// `engine.json`: what an engine is and what it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineManifest {
    /// Engine layout version; a server reads only its own ([`ENGINE_FORMAT_VERSION`]).
    pub format_version: u32,
    /// The variant the engine serves; decides the sampling defaults.
    pub variant: Variant,
    /// `bf16` or `fp8`.
    pub precision: EnginePrecision,
    /// fp8 only: how weights are scaled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp8_scale: Option<Fp8Scale>,
    /// The engine key (the directory's name under `engines/`).
    pub engine_key: String,
    /// Cache key of the model it was built from.
    pub source_cache_key: String,
    /// Revision of that model, when the cache recorded one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_revision: Option<String>,
    /// The Hugging Face repository of that model, when it came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_repo: Option<String>,
    /// Name and version of the program that built it.
    pub tool_version: String,
    /// Every file but the manifest.
    pub files: Vec<FileRecord>,
    /// The fixed-seed image the engine made right after it was built; a server repeats it
    /// before it reports ready and refuses an engine whose image is outside the bound. An
    /// engine without one was not built to completion and is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoke: Option<SmokeRecord>,
}

/// A small image generated with fixed parameters and seed (T5 left out, so servers running
/// without T5 can repeat it), and where it was generated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SmokeRecord {
    /// What was drawn.
    pub prompt: String,
    /// The negative prompt (used with guidance > 1).
    pub negative_prompt: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Sampling steps.
    pub steps: u32,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// Seed of the initial noise.
    pub seed: u64,
    /// The device it was generated on (`cpu` or `cuda`).
    pub device: DeviceKind,
    /// Lower-case hex sha256 of [`SmokeRecord::pixels`]' bytes.
    pub sha256: String,
    /// The 8-bit RGB pixels, row by row, base64 (standard alphabet, padded).
    pub pixels: String,
}

// `guidance` is a finite number written by the builder; equality of records compares bits.
impl Eq for SmokeRecord {}

impl EngineManifest {
    /// Reads an engine's manifest and checks its format version and precision; the error says
    /// what to do (rebuild, or run `build-engine` first).
    pub fn read(engine_dir: &Path) -> Result<Self, ManifestError> {
        let path = engine_dir.join(ENGINE_MANIFEST);
        // The version is read first so that an older or newer layout is named as such rather
        // than as a parse error of a field it lacks.
        let raw: serde_json::Value = read_json(&path)?;
        let version = raw
            .get("format_version")
            .and_then(serde_json::Value::as_u64);
        if version != Some(u64::from(ENGINE_FORMAT_VERSION)) {
            return Err(ManifestError::Invalid(
                path,
                format!(
                    "engine format version {} but this server reads version {ENGINE_FORMAT_VERSION}; \
                     rebuild the engine with this server's build-engine",
                    version.map_or_else(|| "(none)".to_owned(), |v| v.to_string())
                ),
            ));
        }
        let manifest: Self = serde_json::from_value(raw).map_err(|e| {
            ManifestError::Invalid(
                path.clone(),
                format!("not a valid engine manifest ({e}); rebuild the engine"),
            )
        })?;
        Ok(manifest)
    }

    /// Writes the manifest atomically (last, after every file it lists).
    pub fn write(&self, engine_dir: &Path) -> Result<(), ManifestError> {
        write_json(&engine_dir.join(ENGINE_MANIFEST), self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> EngineManifest {
        EngineManifest {
            format_version: ENGINE_FORMAT_VERSION,
            variant: Variant::LargeTurbo,
            precision: EnginePrecision::Fp8,
            fp8_scale: Some(Fp8Scale::PerChannel),
            engine_key: "e".into(),
            source_cache_key: "c".into(),
            source_revision: Some("abc".into()),
            source_repo: None,
            tool_version: "sd35-server test".into(),
            files: vec![FileRecord {
                path: "a/b.safetensors".into(),
                size: 3,
                sha256: "00".into(),
            }],
            smoke: Some(SmokeRecord {
                prompt: "p".into(),
                negative_prompt: String::new(),
                width: 32,
                height: 32,
                steps: 2,
                guidance: 3.5,
                seed: 0,
                device: DeviceKind::Cpu,
                sha256: "11".into(),
                pixels: "AAAA".into(),
            }),
        }
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sd35-contract-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        d
    }

    #[test]
    fn engine_manifests_round_trip_and_say_what_they_are() {
        let dir = tempdir("engine");
        assert!(matches!(
            EngineManifest::read(&dir),
            Err(ManifestError::Missing(_))
        ));
        let m = engine();
        m.write(&dir).unwrap_or_else(|e| panic!("{e}"));
        let text = std::fs::read_to_string(dir.join(ENGINE_MANIFEST)).unwrap_or_default();
        assert!(text.contains("\"variant\": \"large-turbo\""), "{text}");
        assert!(text.contains("\"precision\": \"fp8\""), "{text}");
        assert_eq!(EngineManifest::read(&dir).ok(), Some(m));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn other_engine_versions_and_precisions_are_refused_with_what_to_do() {
        let dir = tempdir("old-engine");
        let mut v = serde_json::to_value(engine()).unwrap_or_default();
        v["format_version"] = 1.into();
        std::fs::write(dir.join(ENGINE_MANIFEST), v.to_string()).unwrap_or_default();
        let err = EngineManifest::read(&dir).unwrap_err().to_string();
        assert!(
            err.contains("version 1") && err.contains("rebuild"),
            "{err}"
        );
        v["format_version"] = ENGINE_FORMAT_VERSION.into();
        v["precision"] = "f32".into();
        std::fs::write(dir.join(ENGINE_MANIFEST), v.to_string()).unwrap_or_default();
        let err = EngineManifest::read(&dir).unwrap_err().to_string();
        assert!(
            err.contains("`f32`") && err.contains("bf16") && err.contains("rebuild"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
