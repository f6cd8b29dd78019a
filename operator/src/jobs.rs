//! Read the outcome of a fetch or build Job (pure): running, succeeded, or failed with a
//! reason a person can act on.

use k8s_openapi::api::batch::v1::Job;
use sd35_contract::ExitReason;

/// The outcome of a Job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Running {
        active: i32,
        failed: i32,
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

/// What a Job's status says.
pub fn outcome(job: &Job, what: &str) -> JobOutcome {
    let name = job.metadata.name.as_deref().unwrap_or("?");
    if condition_true(job, "Complete").is_some() {
        return JobOutcome::Succeeded;
    }
    if let Some(c) = condition_true(job, "Failed") {
        let job_reason = c.reason.clone().unwrap_or_else(|| "Failed".into());
        let job_message = c.message.clone().unwrap_or_default();
        let (reason, hint) = match exit_code_in(&job_message).and_then(ExitReason::from_code) {
            Some(r) => (r.as_str().to_owned(), r.hint().to_owned()),
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
        let message = format!(
            "Job {name} failed ({job_reason}: {job_message}); {hint}. Change the spec or delete the Job to retry."
        );
        return JobOutcome::Failed { reason, message };
    }
    let status = job.status.clone().unwrap_or_default();
    JobOutcome::Running {
        active: status.active.unwrap_or(0),
        failed: status.failed.unwrap_or(0),
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
        match outcome(&j, "Fetch") {
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
            matches!(outcome(&j, "Fetch"), JobOutcome::Failed { reason, .. } if reason == "FetchFailed")
        );
        let j = job(
            json!([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}]),
        );
        assert!(
            matches!(outcome(&j, "Build"), JobOutcome::Failed { reason, .. } if reason == "DeadlineExceeded")
        );
    }

    #[test]
    fn complete_and_running() {
        assert_eq!(
            outcome(
                &job(json!([{"type": "Complete", "status": "True"}])),
                "Fetch"
            ),
            JobOutcome::Succeeded
        );
        assert_eq!(
            outcome(&job(json!([])), "Fetch"),
            JobOutcome::Running {
                active: 0,
                failed: 1
            }
        );
        // A FailureTarget alone is not yet Failed: pods are still terminating.
        let j = job(json!([{"type": "FailureTarget", "status": "True"}]));
        assert!(matches!(outcome(&j, "Fetch"), JobOutcome::Running { .. }));
    }
}
