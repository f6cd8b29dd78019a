//! Waiting on SD35Deployments: their conditions and phase, as a user with kubectl would.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Api;
use sd35_crds::SD35Deployment;

use crate::{Probe, poll_until};

/// The condition of `type_`, if the status has it.
pub fn condition<'a>(obj: &'a SD35Deployment, type_: &str) -> Option<&'a Condition> {
    obj.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Whether condition `type_` has `status` ("True"/"False").
pub fn has_condition(obj: &SD35Deployment, type_: &str, status: &str) -> bool {
    condition(obj, type_).is_some_and(|c| c.status == status)
}

/// One line describing the object's status, for wait errors.
pub fn summary(obj: &SD35Deployment) -> String {
    let Some(s) = &obj.status else {
        return "no status".into();
    };
    let conds: Vec<String> = s
        .conditions
        .iter()
        .map(|c| format!("{}={}({}: {})", c.type_, c.status, c.reason, c.message))
        .collect();
    format!(
        "phase={:?} ready={}/{} {}",
        s.phase,
        s.ready_replicas,
        obj.spec.replicas,
        conds.join(" ")
    )
}

/// Polls the object until `done` holds, failing after `timeout` with its last status.
pub async fn wait_for(
    api: &Api<SD35Deployment>,
    name: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&SD35Deployment) -> bool,
) -> Result<SD35Deployment> {
    poll_until(&format!("{name}: {what}"), timeout, || async {
        let obj = api.get(name).await?;
        Ok(if done(&obj) {
            Probe::Ready(obj)
        } else {
            Probe::Pending(summary(&obj))
        })
    })
    .await
}

/// Waits until the object is Ready at its current generation.
pub async fn wait_ready(
    api: &Api<SD35Deployment>,
    name: &str,
    timeout: Duration,
) -> Result<SD35Deployment> {
    wait_for(api, name, "Ready", timeout, |o| {
        has_condition(o, "Ready", "True")
            && o.status.as_ref().and_then(|s| s.observed_generation) == o.metadata.generation
    })
    .await
}
