//! How the containers of the operator's pods ended (pure): the termination message a process
//! wrote, the failure of a serving pod that could not start, and the last failed attempt of a
//! fetch or build Job.
//!
//! `sd35-server` writes a one-line cause to its container's termination message when it
//! fails (`serve`, `fetch` and `build-engine` alike); Kubernetes shows it in the pod's
//! terminated state, and the operator quotes it in conditions, so `kubectl describe`, Flux and
//! Argo CD show the real cause.

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use sd35_contract::ExitReason;

/// Longest termination message quoted in a condition. Kubernetes keeps up to 4096 bytes;
/// with `FallbackToLogsOnError` it may be a log's tail, whose end is where the cause is.
pub const QUOTE_MAX: usize = 1024;

/// What a container's termination message says, on one line: trimmed, its non-empty lines
/// joined with `; `, and only the end kept when it is longer than [`QUOTE_MAX`]. `None` when
/// it says nothing.
pub fn termination_message(ended: &ContainerStateTerminated) -> Option<String> {
    let message = ended.message.as_deref()?;
    let line = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if line.is_empty() {
        return None;
    }
    if line.len() <= QUOTE_MAX {
        return Some(line);
    }
    let mut cut = line.len() - QUOTE_MAX;
    while !line.is_char_boundary(cut) {
        cut += 1;
    }
    Some(format!("...{}", &line[cut..]))
}

/// The first serving container of these pods that ended with one of the server's documented
/// exit codes: its reason word and a message quoting its termination message.
pub fn server_failure<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Option<(String, String)> {
    pods.into_iter().find_map(|pod| {
        let status = pod.status.as_ref()?;
        status.container_statuses.iter().flatten().find_map(|c| {
            // A container running now has recovered; what ended it before is history.
            if c.state.as_ref().is_some_and(|s| s.running.is_some()) {
                return None;
            }
            let ended = c
                .state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .or_else(|| c.last_state.as_ref().and_then(|s| s.terminated.as_ref()))?;
            let reason = ExitReason::from_code(ended.exit_code)?;
            let said =
                termination_message(ended).unwrap_or_else(|| "(no termination message)".to_owned());
            Some((
                reason.as_str().to_owned(),
                format!(
                    "pod {} exited with code {} ({}): {said}; {}",
                    pod.metadata.name.as_deref().unwrap_or("?"),
                    ended.exit_code,
                    reason.as_str(),
                    reason.hint()
                ),
            ))
        })
    })
}

/// A failed attempt of a Job: how its container ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptFailure {
    /// The container's exit code.
    pub exit_code: i32,
    /// Its termination message on one line, if it wrote one.
    pub message: Option<String>,
}

/// The last failed attempt among a Job's `pods`: of the containers named `container` that
/// ended with a non-zero code, the one that ended last.
pub fn last_attempt_failure<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    container: &str,
) -> Option<AttemptFailure> {
    pods.into_iter()
        .filter_map(|pod| pod.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .filter(|c| c.name == container)
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .filter(|ended| ended.exit_code != 0)
        .max_by_key(|ended| ended.finished_at.as_ref().map(|t| t.0))
        .map(|ended| AttemptFailure {
            exit_code: ended.exit_code,
            message: termination_message(ended),
        })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, state: serde_json::Value, last: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"containerStatuses": [{
                "name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 3,
                "state": state, "lastState": last,
            }]},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_documented_exit_code_of_a_server_becomes_the_reason_with_its_message() {
        let crashing = pod(
            "tiny-1",
            json!({"waiting": {"reason": "CrashLoopBackOff"}}),
            json!({"terminated": {"exitCode": 17, "message": "GPUUnavailable: --device cuda: no usable GPU: no CUDA driver\n"}}),
        );
        let (reason, message) = server_failure([&crashing]).unwrap_or_default();
        assert_eq!(reason, "GPUUnavailable");
        assert!(
            message.contains("pod tiny-1 exited with code 17")
                && message.contains("no CUDA driver")
                && message.contains("device plugin"),
            "{message}"
        );
        // Running again: what ended it before is history. Unknown codes are not ours to name.
        let recovered = pod(
            "tiny-2",
            json!({"running": {}}),
            json!({"terminated": {"exitCode": 17}}),
        );
        let oom = pod(
            "tiny-3",
            json!({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}),
            json!({}),
        );
        assert_eq!(server_failure([&recovered, &oom]), None);
        let mismatch = pod("tiny-4", json!({"terminated": {"exitCode": 18}}), json!({}));
        let (reason, message) = server_failure([&recovered, &mismatch]).unwrap_or_default();
        assert_eq!(reason, "EngineMismatch");
        assert!(message.contains("(no termination message)"), "{message}");
    }

    fn ended(message: &str) -> ContainerStateTerminated {
        ContainerStateTerminated {
            exit_code: 11,
            message: Some(message.to_owned()),
            ..Default::default()
        }
    }

    #[test]
    fn a_termination_message_is_quoted_on_one_line_and_its_end_kept() {
        let said = "fetch failed: http://m/x/sha256sums.txt: HTTP 404: no such repository, revision or file\n";
        assert_eq!(
            termination_message(&ended(said)).as_deref(),
            Some(said.trim_end())
        );
        assert_eq!(termination_message(&ended(" \n\n")), None);
        assert_eq!(
            termination_message(&ContainerStateTerminated::default()),
            None
        );
        // A log's tail (FallbackToLogsOnError): one line, the end kept.
        let tail = format!(
            "{}\nstarting\n\nfetch failed: the cause\n",
            "x".repeat(3000)
        );
        let quoted = termination_message(&ended(&tail)).unwrap_or_default();
        assert!(quoted.len() <= QUOTE_MAX + 3, "{}", quoted.len());
        assert!(
            quoted.starts_with("...") && quoted.ends_with("starting; fetch failed: the cause"),
            "{quoted}"
        );
    }

    fn job_pod(finished: &str, exit_code: i32, message: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("sd35-fetch-k-{finished}")},
            "status": {"containerStatuses": [{
                "name": "fetch", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": exit_code, "finishedAt": finished, "message": message}},
            }]},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_last_failed_attempt_of_a_job_is_the_one_that_ended_last() {
        let first = job_pod("2025-01-01T00:00:00Z", 15, Some("fetch failed: first"));
        let second = job_pod("2025-01-01T00:05:00Z", 15, Some("fetch failed: second\n"));
        let succeeded = job_pod("2025-01-01T00:09:00Z", 0, None);
        assert_eq!(
            last_attempt_failure([&second, &first, &succeeded], "fetch"),
            Some(AttemptFailure {
                exit_code: 15,
                message: Some("fetch failed: second".into())
            })
        );
        assert_eq!(last_attempt_failure([&succeeded], "fetch"), None);
        assert_eq!(last_attempt_failure([&first], "build"), None);
    }
}
