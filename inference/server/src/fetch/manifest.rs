//! The completion marker of a cached model (`.sd35-complete.json`, defined in the contract):
//! what was fetched, from where, and the size and sha256 of every file. It is written last,
//! atomically, so its presence means "complete". This module maps its errors to exit codes.

use std::path::Path;

pub use sd35_contract::{CacheManifest, FileRecord, SourceRecord};
use sd35_contract::{ExitReason, ManifestError};

use super::error::ExitError;

fn job_error(e: ManifestError) -> ExitError {
    match e {
        ManifestError::Io(path, source) => ExitError::io(&path, &source),
        other => ExitError::new(ExitReason::InvalidModel, other.to_string()),
    }
}

/// Reads the marker of `model_dir`; `None` when the cache is not complete (no marker, or one
/// this version cannot read, which is fetched again).
pub fn read_marker(model_dir: &Path) -> Result<Option<CacheManifest>, ExitError> {
    match CacheManifest::read(model_dir) {
        Ok(m) => Ok(Some(m)),
        Err(ManifestError::Missing(_) | ManifestError::Invalid(..)) => Ok(None),
        Err(e) => Err(job_error(e)),
    }
}

/// Writes the marker atomically.
pub fn write_marker(manifest: &CacheManifest, model_dir: &Path) -> Result<(), ExitError> {
    manifest.write(model_dir).map_err(job_error)
}
