//! The completion marker of a cached model: what was fetched, from where, and the size and
//! sha256 of every file. It is written last, atomically, so its presence means "complete".

use std::path::Path;

use sd35_contract::{COMPLETE_MARKER, ExitReason};
use serde::{Deserialize, Serialize};

use super::error::JobError;

/// Where a model came from.
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

/// One cached file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedFile {
    /// Path relative to the model directory, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex sha256.
    pub sha256: String,
}

/// Contents of `.sd35-complete.json`.
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
    /// The variant.
    pub variant: String,
    /// Every file of the model.
    pub files: Vec<CachedFile>,
    /// Seconds since the Unix epoch when the fetch completed.
    pub completed_at: u64,
}

impl CacheManifest {
    /// Reads the marker of `model_dir`; `None` when the cache is not complete.
    pub fn read(model_dir: &Path) -> Result<Option<Self>, JobError> {
        let path = model_dir.join(COMPLETE_MARKER);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(JobError::io(&path, &e)),
        };
        Ok(serde_json::from_str(&text).ok())
    }

    /// Whether every listed file is present with its recorded size (a fast check: a second
    /// run on a complete cache must not re-hash gigabytes).
    pub fn files_present(&self, model_dir: &Path) -> bool {
        self.files
            .iter()
            .all(|f| std::fs::metadata(model_dir.join(&f.path)).is_ok_and(|m| m.len() == f.size))
    }

    /// Writes the marker atomically.
    pub fn write(&self, model_dir: &Path) -> Result<(), JobError> {
        let path = model_dir.join(COMPLETE_MARKER);
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| JobError::new(ExitReason::InvalidModel, e.to_string()))?;
        sd35_pipeline::engine::write_atomic(&path, &json).map_err(|e| match e {
            sd35_pipeline::Error::Io { path, source } => JobError::io(&path, &source),
            other => JobError::new(ExitReason::PermissionDenied, other.to_string()),
        })
    }
}
