//! How `fetch` and `build-engine` end: a failure ([`ExitError`], the contract's, tied to the
//! exit code the operator maps to a condition reason) is logged, its one-line cause written as
//! the container's termination message, and the process exits with the reason's code.

use std::path::Path;

pub use sd35_contract::ExitError;
use sd35_contract::write_termination_message;

/// The termination message of a failed `what` (`fetch`, `build-engine`): the cause on one
/// line, as the log says it (`fetch failed: <url>: HTTP 404: ...`).
pub fn termination_message(what: &str, e: &ExitError) -> String {
    format!("{what} failed: {}", e.message)
}

/// Runs a job's body and turns its failure into a log line, a termination message at
/// `termination_message_path` (when given) and the documented exit code.
pub fn exit_on_error(
    what: &str,
    result: Result<(), ExitError>,
    termination_message_path: Option<&Path>,
) -> ! {
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
            if let Some(path) = termination_message_path
                && let Err(err) = write_termination_message(path, &termination_message(what, &e))
            {
                tracing::warn!(
                    path = %path.display(),
                    "cannot write the termination message: {err}"
                );
            }
            std::process::exit(e.reason.code())
        }
    }
}

#[cfg(test)]
mod tests {
    use sd35_contract::ExitReason;

    use super::*;

    #[test]
    fn the_termination_message_is_the_log_lines_cause() {
        let e = ExitError::new(
            ExitReason::NotFound,
            "http://m/no-such-model/sha256sums.txt: HTTP 404: no such repository, revision or file",
        );
        assert_eq!(
            termination_message("fetch", &e),
            "fetch failed: http://m/no-such-model/sha256sums.txt: HTTP 404: no such repository, revision or file"
        );
    }
}
