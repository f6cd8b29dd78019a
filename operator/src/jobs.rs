//! Read a fetch or build Job (pure): running, succeeded, or failed with a reason a person can
//! act on and the cause its last attempt wrote; and where the step that runs it stands.

use k8s_openapi::api::batch::v1::Job;
use sd35_contract::ExitReason;

use crate::labels;
use crate::pods::AttemptFailure;
use crate::status::StepState;

/// The Jobs a cache goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// The fetch Job (`sd35-server fetch`): fills the cache.
    Fetch,
    /// The engine build Job (`sd35-server build-engine`): builds an engine from the cache.
    Build,
    /// An adapter's fetch Job (`sd35-server fetch-adapter`): one LoRA or ControlNet into the
    /// cache beside the model.
    Adapter,
}

impl JobKind {
    /// The word of its condition reasons and events: `Fetch`, `Build`, `Adapter`.
    pub const fn word(self) -> &'static str {
        match self {
            JobKind::Fetch => "Fetch",
            JobKind::Build => "Build",
            JobKind::Adapter => "Adapter",
        }
    }

    /// The step's reason while the Job runs: `Fetching`, `Building`.
    pub const fn running_reason(self) -> &'static str {
        match self {
            JobKind::Fetch | JobKind::Adapter => "Fetching",
            JobKind::Build => "Building",
        }
    }

    /// The name of its container (and its pods' component): `fetch`, `build`, `adapter`.
    pub const fn container(self) -> &'static str {
        match self {
            JobKind::Fetch => "fetch",
            JobKind::Build => "build",
            JobKind::Adapter => "adapter",
        }
    }

    /// What a person should do about a failure of `reason` in a Job of this kind: the
    /// reason's own hint, but where that names the model the adapter's source instead.
    pub const fn hint(self, reason: ExitReason) -> &'static str {
        match (self, reason) {
            (JobKind::Adapter, ExitReason::NotFound) => {
                "check the repository, revision, file, URL or path of this adapter's source in \
                 spec.adapters or spec.controlNets"
            }
            (JobKind::Adapter, ExitReason::InvalidModel) => {
                "the file is not a LoRA or ControlNet the server can load (the message names it \
                 and why); fix the adapter's source"
            }
            (JobKind::Adapter, ExitReason::ChecksumMismatch) => {
                "the file does not match its sha256: check http.sha256 or the mirror"
            }
            _ => reason.hint(),
        }
    }
}

/// The outcome of a Job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// Running (or about to); `failed` attempts so far, the last of which wrote `last`.
    Running {
        active: i32,
        failed: i32,
        last: Option<String>,
    },
    Succeeded,
    /// Failed with its retries spent: a reason word and a message with what to do.
    Failed {
        reason: String,
        message: String,
    },
}

fn condition_true<'a>(
    job: &'a Job,
    type_: &str,
) -> Option<&'a k8s_openapi::api::batch::v1::JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
}

/// The exit code named in a Job failure message (`... failed with exit code 10 ...`).
fn exit_code_in(message: &str) -> Option<i32> {
    let rest = &message[message.find("exit code ")? + "exit code ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What a Job's status says, with how its last failed attempt ended (from its pods).
pub fn outcome(job: &Job, kind: JobKind, last_failure: Option<&AttemptFailure>) -> JobOutcome {
    let name = job.metadata.name.as_deref().unwrap_or("?");
    let what = kind.word();
    let said = last_failure.and_then(|f| f.message.as_deref());
    if condition_true(job, "Complete").is_some() {
        return JobOutcome::Succeeded;
    }
    if let Some(c) = condition_true(job, "Failed") {
        let job_reason = c.reason.clone().unwrap_or_else(|| "Failed".into());
        let job_message = c.message.clone().unwrap_or_default();
        let (reason, hint) = match exit_code_in(&job_message).and_then(ExitReason::from_code) {
            Some(r) => (r.as_str().to_owned(), kind.hint(r).to_owned()),
            None => match job_reason.as_str() {
                "DeadlineExceeded" => (
                    "DeadlineExceeded".to_owned(),
                    "raise the Job's activeDeadlineSeconds or check why it is slow".to_owned(),
                ),
                "BackoffLimitExceeded" => (
                    format!("{what}Failed"),
                    "see kubectl logs job/".to_owned() + name,
                ),
                other => (format!("{what}Failed"), format!("Job reason {other}")),
            },
        };
        // The cause in the process's own words when it wrote them; else what the Job says.
        let cause = match (said, last_failure) {
            (Some(said), Some(f)) => format!("({job_reason}, exit code {}): {said}", f.exit_code),
            _ => format!("({job_reason}: {job_message})"),
        };
        let message = format!(
            "Job {name} failed {cause}; {hint}. Change the spec or delete the Job to retry."
        );
        return JobOutcome::Failed { reason, message };
    }
    let status = job.status.clone().unwrap_or_default();
    JobOutcome::Running {
        active: status.active.unwrap_or(0),
        failed: status.failed.unwrap_or(0),
        last: said.map(str::to_owned),
    }
}

/// Whether `job` works on the claim `claim_uid`: a Job being deleted, or left from an earlier
/// claim of the same name, says nothing about this one.
pub fn is_for_claim(job: &Job, claim_uid: &str) -> bool {
    job.metadata.deletion_timestamp.is_none()
        && job
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(labels::CLAIM_UID))
            .is_none_or(|uid| uid == claim_uid)
}

/// The step's state while its Job `name` has just been started.
pub fn started(kind: JobKind, name: &str) -> StepState {
    StepState::Pending(
        kind.running_reason().to_owned(),
        format!("Job {name} is running"),
    )
}

/// The step's state while a Job `name` of an earlier claim goes.
pub fn stale(name: &str) -> StepState {
    StepState::Pending(
        "Waiting".into(),
        format!("Job {name} of an earlier cache claim is being deleted"),
    )
}

/// The step's state once its failed Job `name` was deleted to be run again.
pub fn retrying(name: &str) -> StepState {
    StepState::Pending("Retrying".into(), format!("retrying Job {name}"))
}

/// The step's state for its Job `name`'s outcome; `None` once it succeeded (the step says
/// what is done).
pub fn step_state(kind: JobKind, name: &str, outcome: &JobOutcome) -> Option<StepState> {
    match outcome {
        JobOutcome::Succeeded => None,
        JobOutcome::Running {
            active,
            failed,
            last,
        } => {
            let message = match (failed, last) {
                (0, _) => format!("Job {name} is running"),
                (failed, None) => format!(
                    "Job {name} is running ({active} active, {failed} failed attempts so far)"
                ),
                (failed, Some(last)) => format!(
                    "Job {name} is running ({active} active, {failed} failed attempts so far; the last: {last})"
                ),
            };
            Some(StepState::Pending(
                kind.running_reason().to_owned(),
                message,
            ))
        }
        JobOutcome::Failed { reason, message } => {
            Some(StepState::Failed(reason.clone(), message.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn job(conditions: serde_json::Value) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": "sd35-fetch-k"},
            "status": {"conditions": conditions, "active": 0, "failed": 1}
        }))
        .unwrap()
    }

    #[test]
    fn a_pod_failure_policy_exit_code_becomes_its_reason() {
        let j = job(
            json!([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
            "message": "Container fetch for pod ns/sd35-fetch-k-abc failed with exit code 10 matching FailJob rule at index 0"}]),
        );
        match outcome(&j, JobKind::Fetch, None) {
            JobOutcome::Failed { reason, message } => {
                assert_eq!(reason, "Unauthorized");
                assert!(message.contains("token Secret"), "{message}");
                assert!(message.contains("sd35-fetch-k"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retries_spent_and_deadlines_are_named() {
        let j = job(
            json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]),
        );
        assert!(
            matches!(outcome(&j, JobKind::Fetch, None), JobOutcome::Failed { reason, .. } if reason == "FetchFailed")
        );
        let j = job(
            json!([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}]),
        );
        assert!(
            matches!(outcome(&j, JobKind::Build, None), JobOutcome::Failed { reason, .. } if reason == "DeadlineExceeded")
        );
    }

    #[test]
    fn complete_and_running() {
        assert_eq!(
            outcome(
                &job(json!([{"type": "Complete", "status": "True"}])),
                JobKind::Fetch,
                None
            ),
            JobOutcome::Succeeded
        );
        assert_eq!(
            outcome(&job(json!([])), JobKind::Fetch, None),
            JobOutcome::Running {
                active: 0,
                failed: 1,
                last: None
            }
        );
        // A FailureTarget alone is not yet Failed: pods are still terminating.
        let j = job(json!([{"type": "FailureTarget", "status": "True"}]));
        assert!(matches!(
            outcome(&j, JobKind::Fetch, None),
            JobOutcome::Running { .. }
        ));
    }

    fn attempt(message: &str) -> AttemptFailure {
        AttemptFailure {
            exit_code: 11,
            message: Some(message.to_owned()),
        }
    }

    #[test]
    fn a_failed_job_is_reported_in_the_words_its_last_attempt_wrote() {
        let j = job(
            json!([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
            "message": "Container fetch for pod ns/sd35-fetch-k-abc failed with exit code 11 matching FailJob rule at index 0"}]),
        );
        let said = "fetch failed: http://m/no-such-model/sha256sums.txt: HTTP 404: no such repository, revision or file";
        let JobOutcome::Failed { reason, message } =
            outcome(&j, JobKind::Fetch, Some(&attempt(said)))
        else {
            panic!("not failed");
        };
        assert_eq!(reason, "NotFound");
        assert_eq!(
            message,
            format!(
                "Job sd35-fetch-k failed (PodFailurePolicy, exit code 11): {said}; check the \
                 repository, revision, URL or path in spec.model.source. Change the spec or \
                 delete the Job to retry."
            )
        );
        let state = step_state(
            JobKind::Fetch,
            "sd35-fetch-k",
            &outcome(&j, JobKind::Fetch, Some(&attempt(said))),
        );
        assert_eq!(state, Some(StepState::Failed(reason, message)));
        // No termination message: what the Job says, as before.
        let silent = AttemptFailure {
            exit_code: 11,
            message: None,
        };
        let JobOutcome::Failed { message, .. } = outcome(&j, JobKind::Fetch, Some(&silent)) else {
            panic!("not failed");
        };
        assert!(
            message.starts_with("Job sd35-fetch-k failed (PodFailurePolicy: Container fetch"),
            "{message}"
        );
    }

    #[test]
    fn a_failed_adapter_job_points_at_the_adapters_source() {
        let j = job(
            json!([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
            "message": "Container adapter for pod ns/sd35-adapter-k-abc failed with exit code 16 matching FailJob rule at index 0"}]),
        );
        let said = "fetch-adapter failed: lora bad: bad.safetensors is not a valid safetensors file: its header is not a JSON object";
        let failure = AttemptFailure {
            exit_code: 16,
            message: Some(said.to_owned()),
        };
        let JobOutcome::Failed { reason, message } = outcome(&j, JobKind::Adapter, Some(&failure))
        else {
            panic!("not failed");
        };
        assert_eq!(reason, "InvalidModel");
        assert!(message.contains(said), "{message}");
        assert!(message.contains("fix the adapter's source"), "{message}");
        assert!(!message.contains("SD3.5 model"), "{message}");
        assert!(
            JobKind::Adapter
                .hint(ExitReason::NotFound)
                .contains("spec.adapters")
        );
        assert_eq!(
            JobKind::Adapter.hint(ExitReason::Unauthorized),
            ExitReason::Unauthorized.hint()
        );
    }

    #[test]
    fn a_running_job_says_its_failed_attempts_and_the_last_cause() {
        let running = |failed, last: Option<&str>| JobOutcome::Running {
            active: 1,
            failed,
            last: last.map(str::to_owned),
        };
        let state = |o: &JobOutcome| step_state(JobKind::Build, "sd35-build-e", o);
        assert_eq!(
            state(&running(0, None)),
            Some(StepState::Pending(
                "Building".into(),
                "Job sd35-build-e is running".into()
            ))
        );
        assert_eq!(
            state(&running(2, None)),
            Some(StepState::Pending(
                "Building".into(),
                "Job sd35-build-e is running (1 active, 2 failed attempts so far)".into()
            ))
        );
        assert_eq!(
            state(&running(
                2,
                Some("build-engine failed: no space left on the cache volume")
            )),
            Some(StepState::Pending(
                "Building".into(),
                "Job sd35-build-e is running (1 active, 2 failed attempts so far; the last: \
                 build-engine failed: no space left on the cache volume)"
                    .into()
            ))
        );
        assert_eq!(state(&JobOutcome::Succeeded), None);
        // The last attempt's words reach the running outcome from the pods.
        let j = job(json!([]));
        assert_eq!(
            outcome(&j, JobKind::Fetch, Some(&attempt("fetch failed: reset"))),
            JobOutcome::Running {
                active: 0,
                failed: 1,
                last: Some("fetch failed: reset".into())
            }
        );
    }

    #[test]
    fn a_job_of_another_claim_or_being_deleted_is_stale() {
        let mut j = job(json!([]));
        assert!(
            is_for_claim(&j, "c1"),
            "a Job without the annotation is taken"
        );
        j.metadata.annotations = Some([(labels::CLAIM_UID.to_owned(), "c1".to_owned())].into());
        assert!(is_for_claim(&j, "c1"));
        assert!(!is_for_claim(&j, "c2"));
        j.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(!is_for_claim(&j, "c1"));
        assert_eq!(
            stale("sd35-fetch-k"),
            StepState::Pending(
                "Waiting".into(),
                "Job sd35-fetch-k of an earlier cache claim is being deleted".into()
            )
        );
        assert_eq!(
            started(JobKind::Fetch, "j"),
            StepState::Pending("Fetching".into(), "Job j is running".into())
        );
        assert_eq!(
            retrying("j"),
            StepState::Pending("Retrying".into(), "retrying Job j".into())
        );
    }
}
