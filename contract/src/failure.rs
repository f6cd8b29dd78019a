//! How `sd35-server fetch`, `build-engine` and `serve` fail: a documented [`ExitReason`] and a
//! message naming the cause, ended with the reason's exit code and written, on one line, as
//! the container's termination message, where Kubernetes shows it and the operator quotes it.

use std::path::Path;

use crate::ExitReason;

/// A failure with its documented exit reason and a message naming the cause (the file, URL,
/// flag or path) and what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitError {
    /// The exit reason (and code).
    pub reason: ExitReason,
    /// What went wrong, on one line.
    pub message: String,
}

impl ExitError {
    /// A failure of `reason`.
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

    /// Whether running the same command again could succeed.
    pub fn retriable(&self) -> bool {
        self.reason.retriable()
    }
}

impl std::fmt::Display for ExitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitError {}

/// `text` on one line: line breaks become spaces, the ends trimmed.
pub fn one_line(text: &str) -> String {
    text.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `line` (on one line, see [`one_line`]) as a container's termination message at
/// `path` (`--termination-message-path`; Kubernetes reads `/dev/termination-log`).
pub fn write_termination_message(path: &Path, line: &str) -> std::io::Result<()> {
    std::fs::write(path, format!("{}\n", one_line(line)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filesystem_errors_map_to_their_reasons() {
        let p = Path::new("/cache/models/k/x");
        let full = std::io::Error::from_raw_os_error(28);
        assert_eq!(ExitError::io(p, &full).reason, ExitReason::DiskFull);
        assert!(ExitError::io(p, &full).message.contains("no space left"));
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(
            ExitError::io(p, &denied).reason,
            ExitReason::PermissionDenied
        );
        assert!(!ExitError::io(p, &denied).retriable());
        assert_eq!(
            ExitError::new(ExitReason::Network, "reset").to_string(),
            "reset"
        );
    }

    #[test]
    fn a_termination_message_is_one_line() {
        let dir = std::env::temp_dir().join(format!("sd35-termination-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("termination-log");
        write_termination_message(&path, "fetch failed: a\n  b\r\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let written = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(written, "fetch failed: a b\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
