//! Every write a reconcile makes goes through one [`Applier`], and its [`Strategy`] decides
//! whether writes are sent at all: `Apply` normally, `Observe` while an object is paused.
//!
//! Children are sent with server-side apply, but only when they differ from what is live, so
//! a steady state makes no write calls. Three cases must each lead to an apply:
//! - a field the operator owns was changed or removed by hand: some field of the desired
//!   object is not what the live one has;
//! - a field the spec no longer asks for must go: server-side apply removes the fields a
//!   manager stops sending, but only when the apply is sent. The desired object carries a
//!   hash of itself in an annotation ([`APPLIED_HASH`]); any change of the desired object,
//!   a removal included, changes the hash and so differs from the live object;
//! - the child does not exist.
//!
//! Fields the apiserver or other controllers add (defaults, status, other managers' fields)
//! do not count. Children the spec no longer wants are deleted by one [`Applier::sweep`] by
//! the operator's label and the owner's UID.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::index::Index;
use crate::keys::content_hash;
use crate::labels::MANAGER;

/// Annotation on each applied child: a hash of the object the operator last sent.
pub const APPLIED_HASH: &str = "sd35.io/applied-hash";

/// Whether a reconcile changes the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Send what differs: create, apply, patch and delete children.
    Apply,
    /// Change nothing (the object is paused): every write is skipped and reads go on, so the
    /// status still says what is there.
    Observe,
}

/// Whether every field set in `desired` has the same value in `live`.
///
/// Empty strings, lists and maps in `desired` match a missing field (the apiserver drops
/// them); lists must have the same length and match element by element.
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(k, dv)| match l.get(k) {
            Some(lv) => is_subset(dv, lv),
            None => is_empty(dv),
        }),
        (Value::Object(d), Value::Null) => d.values().all(is_empty),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(a, b)| is_subset(a, b))
        }
        (Value::Array(d), Value::Null) => d.is_empty(),
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b || (is_empty(a) && b.is_null()),
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_empty),
        _ => false,
    }
}

/// `desired` with its [`APPLIED_HASH`] annotation: what is sent.
pub fn with_applied_hash<K: Resource + Serialize>(mut desired: K) -> K {
    let hash = serde_json::to_vec(&desired)
        .map(|bytes| content_hash(&bytes))
        .unwrap_or_default();
    desired
        .meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(APPLIED_HASH.to_owned(), hash);
    desired
}

/// Whether `desired` (with its hash annotation) needs to be sent, given the live object.
pub fn needs_apply<K: Serialize>(desired: &K, live: Option<&K>) -> bool {
    let Some(live) = live else { return true };
    let (Ok(mut d), Ok(l)) = (serde_json::to_value(desired), serde_json::to_value(live)) else {
        return true;
    };
    if let Some(obj) = d.as_object_mut() {
        obj.remove("status");
    }
    !is_subset(&d, &l)
}

/// Whether the `live` owner references name the same owners (by UID, in any order) as
/// `desired`: when not, a shared child is re-owned.
pub fn same_owners(live: Option<&Vec<OwnerReference>>, desired: &[OwnerReference]) -> bool {
    let mut x: Vec<&str> = live
        .map(|v| v.iter().map(|o| o.uid.as_str()).collect())
        .unwrap_or_default();
    let mut y: Vec<&str> = desired.iter().map(|o| o.uid.as_str()).collect();
    x.sort_unstable();
    y.sort_unstable();
    x == y
}

/// The writes of one reconcile in one namespace, sent or skipped by its strategy.
#[derive(Clone)]
pub struct Applier {
    client: Client,
    namespace: String,
    strategy: Strategy,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("namespace", &self.namespace)
            .field("strategy", &self.strategy)
            .finish_non_exhaustive()
    }
}

impl Applier {
    /// An applier for `namespace`.
    pub fn new(client: Client, namespace: &str, strategy: Strategy) -> Self {
        Self {
            client,
            namespace: namespace.to_owned(),
            strategy,
        }
    }

    /// Whether writes are sent.
    pub fn writes(&self) -> bool {
        self.strategy == Strategy::Apply
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Server-side applies `desired` if it differs from `live`. Returns the object as it is
    /// now (`live` when nothing was sent) and whether it was written.
    pub async fn apply<K>(&self, desired: K, live: Option<K>) -> kube::Result<(Option<K>, bool)>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let desired = with_applied_hash(desired);
        if !self.writes() || !needs_apply(&desired, live.as_ref()) {
            return Ok((live, false));
        }
        let params = PatchParams::apply(MANAGER).force();
        let applied = self
            .api::<K>()
            .patch(&desired.name_any(), &params, &Patch::Apply(&desired))
            .await?;
        Ok((Some(applied), true))
    }

    /// Creates `desired`; an object of the name that already exists is returned instead.
    pub async fn create<K>(&self, desired: &K) -> kube::Result<Option<(K, bool)>>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
    {
        if !self.writes() {
            return Ok(None);
        }
        let params = PostParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        let api = self.api::<K>();
        match api.create(&params, desired).await {
            Ok(created) => Ok(Some((created, true))),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Ok(api.get_opt(&desired.name_any()).await?.map(|o| (o, false)))
            }
            Err(e) => Err(e),
        }
    }

    /// Merge-patches the object `name`; returns it as it is now (None when skipped).
    pub async fn merge_patch<K>(&self, name: &str, patch: &Value) -> kube::Result<Option<K>>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        if !self.writes() {
            return Ok(None);
        }
        let patched = self
            .api::<K>()
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        Ok(Some(patched))
    }

    /// Deletes the object `name` (its dependents in the background); true when sent.
    pub async fn delete<K>(&self, name: &str) -> kube::Result<bool>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        if !self.writes() {
            return Ok(false);
        }
        match self
            .api::<K>()
            .delete(name, &DeleteParams::background())
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes the children of kind `K` that carry the operator's label (the caches hold
    /// nothing else), are controlled by the owner `owner_uid` and are not named in `wanted`.
    /// Returns the names deleted.
    pub async fn sweep<K>(
        &self,
        store: &Store<K>,
        by_owner: &Index<K>,
        owner_uid: &str,
        wanted: &[&str],
    ) -> kube::Result<Vec<String>>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + 'static,
    {
        let mut deleted = Vec::new();
        for r in by_owner.get(owner_uid) {
            let unwanted = r.namespace.as_deref() == Some(self.namespace.as_str())
                && !wanted.contains(&r.name.as_str());
            let ours = store.get(&r).is_some_and(|o| {
                o.labels()
                    .get(crate::labels::MANAGED_BY)
                    .map(String::as_str)
                    == Some(MANAGER)
                    && o.meta().deletion_timestamp.is_none()
                    && o.owner_references()
                        .iter()
                        .any(|x| x.uid == owner_uid && x.controller == Some(true))
            });
            if unwanted && ours && self.delete::<K>(&r.name).await? {
                deleted.push(r.name.clone());
            }
        }
        deleted.sort();
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodSpec, Toleration};
    use kube::api::ObjectMeta;
    use serde_json::json;

    use super::*;

    #[test]
    fn defaults_and_other_fields_on_the_live_object_do_not_count() {
        let desired = json!({"spec": {"replicas": 2, "template": {"containers": [{"name": "s", "image": "a"}]}}});
        let live = json!({
            "spec": {"replicas": 2, "progressDeadlineSeconds": 600,
                     "template": {"containers": [{"name": "s", "image": "a", "terminationMessagePath": "/dev/x"}]}},
            "status": {"replicas": 2}
        });
        assert!(is_subset(&desired, &live));
    }

    #[test]
    fn a_changed_owned_field_counts() {
        let desired = json!({"spec": {"template": {"containers": [{"name": "s", "image": "a"}]}}});
        let edited = json!({"spec": {"template": {"containers": [{"name": "s", "image": "b"}]}}});
        assert!(!is_subset(&desired, &edited));
        let removed = json!({"spec": {"template": {"containers": []}}});
        assert!(!is_subset(&desired, &removed));
        let missing_key = json!({"spec": {}});
        assert!(!is_subset(&desired, &missing_key));
    }

    #[test]
    fn empty_desired_values_match_missing_ones() {
        let desired = json!({"metadata": {"labels": {}, "ownerReferences": []}, "spec": {"x": ""}});
        assert!(is_subset(&desired, &json!({"metadata": {}, "spec": {}})));
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(is_subset(&json!({"a": 1}), &json!({"a": 1.0})));
        assert!(!is_subset(&json!({"a": 1}), &json!({"a": "1"})));
    }

    fn pod(tolerations: Option<Vec<Toleration>>) -> k8s_openapi::api::core::v1::Pod {
        k8s_openapi::api::core::v1::Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                tolerations,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A client whose every request is counted and answered 404.
    fn counting_client() -> (Client, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = sent.clone();
        let service = tower::service_fn(move |_: http::Request<kube::client::Body>| {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
            let response = http::Response::builder()
                .status(404)
                .header("content-type", "application/json")
                .body(kube::client::Body::from(body.as_bytes().to_vec()));
            async move { response }
        });
        (Client::new(service, "ns"), sent)
    }

    #[tokio::test]
    async fn an_observing_applier_sends_nothing_and_an_applying_one_does() {
        let toleration = Some(vec![Toleration::default()]);
        let index = Index::new(crate::index::controller_uid::<k8s_openapi::api::core::v1::Pod>);
        let (store, _writer) = kube::runtime::reflector::store();
        let (client, sent) = counting_client();
        let paused = Applier::new(client, "ns", Strategy::Observe);
        assert!(!paused.writes());
        let (now, written) = paused.apply(pod(toleration.clone()), None).await.unwrap();
        assert!(now.is_none() && !written);
        assert!(paused.create(&pod(None)).await.unwrap().is_none());
        let patched = paused
            .merge_patch::<k8s_openapi::api::core::v1::Pod>("p", &json!({}))
            .await
            .unwrap();
        assert!(patched.is_none());
        assert!(
            !paused
                .delete::<k8s_openapi::api::core::v1::Pod>("p")
                .await
                .unwrap()
        );
        assert!(
            paused
                .sweep(&store, &index, "u", &[])
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 0);

        let (client, sent) = counting_client();
        let applying = Applier::new(client, "ns", Strategy::Apply);
        // 404 on delete is "already gone"; the request was sent.
        assert!(
            !applying
                .delete::<k8s_openapi::api::core::v1::Pod>("p")
                .await
                .unwrap()
        );
        assert!(applying.apply(pod(toleration), None).await.is_err());
        assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn a_field_removed_from_the_desired_object_is_sent() {
        let toleration = Toleration {
            key: Some("gpu".into()),
            operator: Some("Exists".into()),
            ..Default::default()
        };
        // Live: what the last apply sent, plus a default the apiserver added.
        let mut live = with_applied_hash(pod(Some(vec![toleration])));
        if let Some(spec) = live.spec.as_mut() {
            spec.restart_policy = Some("Always".into());
        }
        let same = with_applied_hash(pod(Some(vec![Toleration {
            key: Some("gpu".into()),
            operator: Some("Exists".into()),
            ..Default::default()
        }])));
        assert!(
            !needs_apply(&same, Some(&live)),
            "a steady state sends nothing"
        );
        // The toleration is gone from the spec: every remaining field matches the live
        // object, but the hash does not, so the apply is sent and removes it.
        let without = with_applied_hash(pod(None));
        assert!(needs_apply(&without, Some(&live)));
        assert!(needs_apply(&without, None));
    }
}
