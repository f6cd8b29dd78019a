//! The one event a reconcile publishes (pure): the condition transitions worth a person's
//! attention, then what the reconcile did.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use sd35_crds::{SD35DeploymentStatus, condition};

/// (type, status, reason) of each condition that differs between two statuses: the
/// transitions to report as events.
pub fn transitions(
    old: Option<&SD35DeploymentStatus>,
    new: &SD35DeploymentStatus,
) -> Vec<Condition> {
    new.conditions
        .iter()
        .filter(|c| {
            let before = old.and_then(|o| o.conditions.iter().find(|p| p.type_ == c.type_));
            before.is_none_or(|p| p.status != c.status || p.reason != c.reason)
        })
        .cloned()
        .collect()
}

/// Whether the transition to `c` is reported as a Warning event: Stalled turning True, or
/// another condition (but Reconciling) turning False after the object had a status.
pub fn is_warning(c: &Condition, had_status: bool) -> bool {
    (c.type_ == condition::STALLED && c.status == "True")
        || (c.type_ != condition::STALLED
            && c.type_ != condition::RECONCILING
            && c.status == "False"
            && had_status)
}

/// Something a reconcile did or saw, for its event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Whether it is reported as a Warning.
    pub warning: bool,
    /// A CamelCase reason.
    pub reason: String,
    /// What happened, for a person.
    pub text: String,
}

/// Longest event note the API server takes (events.k8s.io/v1: 1 kB).
const EVENT_NOTE_MAX: usize = 1024;

/// The one event a reconcile publishes, if any: the condition transitions between `previous`
/// and `new` worth a person's attention (a condition's status turning, Stalled turning True
/// or changing its reason; for a first status, only a Stalled one), warnings first, then the
/// `actions` the reconcile took. Its reason is the first note's; its note lists them all.
/// One event per reconcile that changed something keeps the writes per object low.
pub fn event(
    actions: &[Note],
    previous: Option<&SD35DeploymentStatus>,
    new: &SD35DeploymentStatus,
) -> Option<Note> {
    let mut notes: Vec<Note> = transitions(previous, new)
        .into_iter()
        .filter(|c| c.type_ != condition::RECONCILING)
        .filter(|c| {
            let before = previous.and_then(|p| p.conditions.iter().find(|b| b.type_ == c.type_));
            let stalled = c.type_ == condition::STALLED && c.status == "True";
            match before {
                None => stalled,
                Some(b) => b.status != c.status || stalled,
            }
        })
        .map(|c| Note {
            warning: is_warning(&c, previous.is_some()),
            text: if c.message.is_empty() {
                format!("{} is {}", c.type_, c.status)
            } else {
                format!("{} is {}: {}", c.type_, c.status, c.message)
            },
            reason: c.reason,
        })
        .collect();
    notes.sort_by_key(|n| !n.warning);
    notes.extend(actions.iter().cloned());
    let first = notes.first()?;
    let mut text: String = notes
        .iter()
        .map(|n| n.text.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    if text.len() > EVENT_NOTE_MAX {
        let mut cut = EVENT_NOTE_MAX - 3;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    Some(Note {
        warning: notes.iter().any(|n| n.warning),
        reason: first.reason.clone(),
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::StepState;
    use crate::status::compute;
    use crate::status::tests::{observed, t};

    fn action(reason: &str, text: &str) -> Note {
        Note {
            warning: false,
            reason: reason.into(),
            text: text.into(),
        }
    }

    #[test]
    fn a_reconcile_publishes_one_event_naming_its_transitions_and_actions() {
        let mut o = observed();
        o.cache = StepState::Pending("Fetching".into(), "Job f is running".into());
        o.engine = StepState::Pending("WaitingForCache".into(), String::new());
        o.rollout = None;
        let first = compute(&o, None, t(1));
        // A first status: nothing has turned yet, so only what was done is told.
        let created = [
            action("CacheClaimCreated", "created cache claim c"),
            action("FetchStarted", "started Job f"),
        ];
        let e = event(&created, None, &first).unwrap();
        assert_eq!(e.reason, "CacheClaimCreated");
        assert_eq!(e.text, "created cache claim c; started Job f");
        assert!(!e.warning);
        // Nothing done and nothing turned (a message changed): no event at all.
        o.cache = StepState::Pending("Fetching".into(), "Job f is running (1 failed)".into());
        let second = compute(&o, Some(&first), t(2));
        assert_eq!(event(&[], Some(&first), &second), None);
        // The cache turns ready and the build starts: one event for both.
        o.cache = StepState::Done("Cached", String::new());
        o.engine = StepState::Pending("Building".into(), "Job b is running".into());
        let third = compute(&o, Some(&second), t(3));
        let e = event(
            &[action("BuildStarted", "started Job b")],
            Some(&second),
            &third,
        )
        .unwrap();
        assert_eq!(e.reason, "Cached");
        assert_eq!(e.text, "CacheReady is True; started Job b");
    }

    #[test]
    fn warnings_come_first_and_set_the_type() {
        let before = compute(&observed(), None, t(1));
        let mut o = observed();
        o.engine = StepState::Failed("BuildFailed".into(), "see the logs".into());
        let after = compute(&o, Some(&before), t(2));
        let e = event(&[], Some(&before), &after).unwrap();
        assert!(e.warning);
        assert_eq!(e.reason, "BuildFailed");
        assert!(e.text.starts_with("Ready is False"), "{}", e.text);
        assert!(
            e.text.contains("Stalled is True: see the logs"),
            "{}",
            e.text
        );
        let long = action("X", &"y".repeat(5000));
        assert!(event(&[long], Some(&after), &after).unwrap().text.len() <= 1024);
    }
}
