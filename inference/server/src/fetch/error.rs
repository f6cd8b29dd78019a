//! Failures of `fetch` and `build-engine`, each tied to the exit code the operator maps to a
//! condition reason.

use std::path::Path;

use sd35_contract::ExitReason;

/// A failure with its documented exit reason and a message naming the cause.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    /// The exit reason (and code).
    pub reason: ExitReason,
    /// What went wrong, naming the file, URL or path.
    pub message: String,
}

impl JobError {
    /// A failure of the given reason.
    pub fn new(reason: ExitReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// Classifies a filesystem error on `path`: disk full and permission denied get their
    /// own reasons; anything else is reported as a permission problem of the volume.
    pub fn io(path: &Path, e: &std::io::Error) -> Self {
        let reason = match e.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                ExitReason::DiskFull
            }
            _ if e.raw_os_error() == Some(28) => ExitReason::DiskFull,
            _ => ExitReason::PermissionDenied,
        };
        let what = match reason {
            ExitReason::DiskFull => "no space left on the cache volume",
            _ => "cannot write or read",
        };
        Self::new(reason, format!("{what}: {}: {e}", path.display()))
    }

    /// Whether trying the same transfer again could help.
    pub fn retriable(&self) -> bool {
        self.reason.retriable()
    }
}

/// Runs a job's body and turns its failure into a log line and the documented exit code.
pub fn exit_on_error(what: &str, result: Result<(), JobError>) -> ! {
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            tracing::error!(
                reason = e.reason.as_str(),
                exit_code = e.reason.code(),
                hint = e.reason.hint(),
                "{what} failed: {}",
                e.message
            );
            std::process::exit(e.reason.code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filesystem_errors_map_to_their_reasons() {
        let p = Path::new("/cache/models/k/x");
        let full = std::io::Error::from_raw_os_error(28);
        assert_eq!(JobError::io(p, &full).reason, ExitReason::DiskFull);
        assert!(JobError::io(p, &full).message.contains("no space left"));
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(
            JobError::io(p, &denied).reason,
            ExitReason::PermissionDenied
        );
        assert!(!JobError::io(p, &denied).retriable());
    }
}
