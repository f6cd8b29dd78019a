//! Events about SD35Deployments (`events.k8s.io/v1`), a repeat of the same event within a few
//! minutes counted as a series of the first instead of a new Event.
//!
//! kube's own `Recorder` does the same, but keeps a whole Event per key for its six-minute
//! window (its table held 8.85 MB for the 2000 events of 500 objects, heaptrack measured: about
//! 4 KiB an event) and leaves the note out of its key, so a second event of the same reason with
//! other words is counted as a repeat of the first and its words are lost. This one keys on the
//! note too and keeps only what a repeat needs: the Event's name, its count and when it was
//! last seen.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::status::Note;

/// How long a repeat is counted as part of the first event's series (as kube's recorder and
/// client-go's do).
pub const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// How often the entries older than the window are dropped.
const PRUNE_EVERY: SignedDuration = SignedDuration::from_secs(30);

/// What makes two events the same event.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    /// The object's UID (its name when it has none).
    regarding: String,
    warning: bool,
    reason: String,
    /// A hash of the note.
    note: u64,
}

/// What a repeat needs of the Event it repeats.
#[derive(Clone, Debug)]
struct Seen {
    name: String,
    count: i32,
    last: Timestamp,
}

#[derive(Debug, Default)]
struct Recent {
    seen: HashMap<Key, Seen>,
    pruned: Option<Timestamp>,
}

impl Recent {
    /// Drop what is older than the window, at most every [`PRUNE_EVERY`].
    fn prune(&mut self, now: Timestamp) {
        if self.pruned.is_some_and(|at| at + PRUNE_EVERY > now) {
            return;
        }
        self.seen.retain(|_, s| s.last + SERIES_WINDOW > now);
        self.seen.shrink_to_fit();
        self.pruned = Some(now);
    }
}

/// Publishes events as one controller instance.
pub struct Recorder {
    client: Client,
    controller: String,
    instance: String,
    recent: Mutex<Recent>,
}

/// The action every event reports: the controller reconciled the object.
const ACTION: &str = "Reconcile";

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("controller", &self.controller)
            .field("instance", &self.instance)
            .field("remembered", &self.remembered())
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recorder for `controller`, instance `instance` (the controller's name when none).
    pub fn new(client: Client, controller: &str, instance: Option<&str>) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.unwrap_or(controller).to_owned(),
            recent: Mutex::default(),
        }
    }

    /// Publish `note` about `regarding`: a new Event, or the next count of the same Event's
    /// series when it was said within the window.
    pub async fn publish(
        &self,
        note: &Note,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        self.publish_at(note, regarding, Timestamp::now()).await
    }

    /// Events currently remembered for their series.
    pub fn remembered(&self) -> usize {
        self.recent.lock().map(|r| r.seen.len()).unwrap_or(0)
    }

    async fn publish_at(
        &self,
        note: &Note,
        regarding: &ObjectReference,
        now: Timestamp,
    ) -> Result<(), kube::Error> {
        let mut hasher = DefaultHasher::new();
        note.text.hash(&mut hasher);
        let key = Key {
            regarding: regarding
                .uid
                .clone()
                .or_else(|| regarding.name.clone())
                .unwrap_or_default(),
            warning: note.warning,
            reason: note.reason.clone(),
            note: hasher.finish(),
        };
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let repeat = {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            recent.prune(now);
            recent
                .seen
                .get(&key)
                .filter(|s| s.last + SERIES_WINDOW > now)
                .cloned()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let time = MicroTime(now);
        let seen = match repeat {
            Some(seen) => {
                let count = seen.count + 1;
                let series = json!({"series": EventSeries {
                    count,
                    last_observed_time: time,
                }});
                match api
                    .patch(&seen.name, &PatchParams::default(), &Patch::Merge(&series))
                    .await
                {
                    Ok(_) => Seen {
                        count,
                        last: now,
                        ..seen
                    },
                    // Gone already (Events live an hour): say it anew.
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        self.create(&api, note, regarding, &namespace, now).await?
                    }
                    Err(e) => return Err(e),
                }
            }
            None => self.create(&api, note, regarding, &namespace, now).await?,
        };
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.seen.insert(key, seen);
        Ok(())
    }

    async fn create(
        &self,
        api: &Api<Event>,
        note: &Note,
        regarding: &ObjectReference,
        namespace: &str,
        now: Timestamp,
    ) -> Result<Seen, kube::Error> {
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or(&self.controller),
            now.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(if note.warning { "Warning" } else { "Normal" }.to_owned()),
            reason: Some(note.reason.clone()),
            note: Some(note.text.clone()),
            action: Some(ACTION.to_owned()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        api.create(&PostParams::default(), &event).await?;
        Ok(Seen {
            name,
            count: 1,
            last: now,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// (method, path, body) of each request a stand-in API server received.
    type Sent = Arc<Mutex<Vec<(String, String, serde_json::Value)>>>;

    /// A client that records each request and answers with an Event.
    fn recording_client() -> (Client, Sent) {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let log = sent.clone();
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = http_body_util::BodyExt::collect(body)
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let body: serde_json::Value =
                    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                log.lock().unwrap().push((
                    parts.method.to_string(),
                    parts.uri.path().to_owned(),
                    body,
                ));
                let answer = r#"{"apiVersion":"events.k8s.io/v1","kind":"Event","metadata":{"name":"e"},"eventTime":null}"#;
                http::Response::builder()
                    .status(201)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(answer.as_bytes().to_vec()))
            }
        });
        (Client::new(service, "ns"), sent)
    }

    fn object() -> ObjectReference {
        ObjectReference {
            api_version: Some("sd35.io/v1alpha1".into()),
            kind: Some("SD35Deployment".into()),
            name: Some("demo".into()),
            namespace: Some("ns".into()),
            uid: Some("u-1".into()),
            ..ObjectReference::default()
        }
    }

    fn said(reason: &str, text: &str) -> Note {
        Note {
            warning: false,
            reason: reason.to_owned(),
            text: text.to_owned(),
        }
    }

    #[tokio::test]
    async fn a_repeat_counts_in_the_series_other_words_are_a_new_event_and_the_window_ends() {
        let (client, sent) = recording_client();
        let recorder = Recorder::new(client, "sd35-operator", Some("pod-a"));
        let t0 = Timestamp::now();
        let at = |secs: i64| t0 + SignedDuration::from_secs(secs);
        recorder
            .publish_at(&said("Ready", "Ready is True"), &object(), at(0))
            .await
            .unwrap();
        recorder
            .publish_at(&said("Ready", "Ready is True"), &object(), at(10))
            .await
            .unwrap();
        // Same reason, other words: kube's recorder would count this as the first again.
        recorder
            .publish_at(&said("Ready", "Ready is True: 2 of 2"), &object(), at(20))
            .await
            .unwrap();
        // Past the window: a new Event.
        recorder
            .publish_at(&said("Ready", "Ready is True"), &object(), at(10 + 6 * 60))
            .await
            .unwrap();
        let sent = sent.lock().unwrap().clone();
        let verbs: Vec<&str> = sent.iter().map(|(m, _, _)| m.as_str()).collect();
        assert_eq!(verbs, ["POST", "PATCH", "POST", "POST"]);
        let (_, path, first) = &sent[0];
        assert_eq!(path, "/apis/events.k8s.io/v1/namespaces/ns/events");
        assert_eq!(first["note"], "Ready is True");
        assert_eq!(first["reportingController"], "sd35-operator");
        assert_eq!(first["reportingInstance"], "pod-a");
        assert_eq!(first["regarding"]["uid"], "u-1");
        let name = first["metadata"]["name"].as_str().unwrap();
        assert!(name.starts_with("demo."));
        let (_, path, series) = &sent[1];
        assert_eq!(
            path,
            &format!("/apis/events.k8s.io/v1/namespaces/ns/events/{name}")
        );
        assert_eq!(series["series"]["count"], 2);
        assert_eq!(sent[2].2["note"], "Ready is True: 2 of 2");
    }

    #[tokio::test]
    async fn what_is_older_than_the_window_is_forgotten() {
        let (client, _) = recording_client();
        let recorder = Recorder::new(client, "sd35-operator", None);
        let t0 = Timestamp::now();
        for i in 0..50 {
            let note = format!("note {i}");
            recorder
                .publish_at(&said("Reason", &note), &object(), t0)
                .await
                .unwrap();
        }
        assert_eq!(recorder.remembered(), 50);
        let later = t0 + SERIES_WINDOW + SignedDuration::from_secs(1);
        recorder
            .publish_at(&said("Reason", "one more"), &object(), later)
            .await
            .unwrap();
        assert_eq!(recorder.remembered(), 1);
    }
}
