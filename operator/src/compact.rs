//! Serving Deployments as the watch cache keeps them: metadata and status typed, the spec as
//! the compact JSON text the API server sent.
//!
//! A typed `Deployment` holds its pod template in k8s-openapi structs of mostly empty options:
//! about 15 KiB per serving Deployment in memory (heaptrack, 2000 objects: 29 MB of a 104 MB
//! heap) against about 3 KiB of JSON (the spec the operator sends is 2.8 KiB; the server adds
//! its defaults). The spec is read once per reconcile of its SD35Deployment, to compare it
//! with the desired one, so it is kept as text and parsed when asked for.

use std::borrow::Cow;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{NamespaceResourceScope, Resource as _};
use serde::{Deserialize, Deserializer};

/// A JSON value kept as its compact text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonText(Box<str>);

impl JsonText {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        serde_json::to_string(&value)
            .map(|text| JsonText(text.into_boxed_str()))
            .map_err(serde::de::Error::custom)
    }
}

/// A Deployment whose spec is kept as JSON text (see the module documentation).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CachedDeployment {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<JsonText>,
    #[serde(default)]
    pub status: Option<DeploymentStatus>,
}

impl CachedDeployment {
    /// The Deployment, its spec parsed. A spec that does not parse as a `DeploymentSpec`
    /// (which the API server never sends) is left out.
    pub fn to_deployment(&self) -> Deployment {
        Deployment {
            metadata: self.metadata.clone(),
            spec: self
                .spec
                .as_ref()
                .and_then(|text| serde_json::from_str(text.as_str()).ok()),
            status: self.status.clone(),
        }
    }
}

impl kube::Resource for CachedDeployment {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(Deployment::KIND)
    }
    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(Deployment::GROUP)
    }
    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(Deployment::VERSION)
    }
    fn api_version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(Deployment::API_VERSION)
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(Deployment::URL_PATH_SEGMENT)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn deployment() -> serde_json::Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "demo", "namespace": "ns", "generation": 3,
                         "annotations": {"sd35.io/applied-hash": "abc"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "demo"}},
                "template": {
                    "metadata": {"annotations": {"sd35.io/serving-target": "{}"}},
                    "spec": {"containers": [{"name": "server", "image": "sd35-server:1",
                                             "args": ["serve", "--device=cuda"],
                                             "terminationMessagePath": "/dev/termination-log"}]}
                }
            },
            "status": {"replicas": 2, "readyReplicas": 1, "observedGeneration": 3}
        })
    }

    #[test]
    fn the_cached_form_gives_back_the_same_deployment() {
        let typed: Deployment = serde_json::from_value(deployment()).unwrap();
        let cached: CachedDeployment = serde_json::from_value(deployment()).unwrap();
        assert_eq!(cached.to_deployment(), typed);
        assert_eq!(
            <CachedDeployment as kube::Resource>::url_path(&(), Some("ns")),
            <Deployment as kube::Resource>::url_path(&(), Some("ns"))
        );
    }

    #[test]
    fn the_spec_is_kept_as_compact_text() {
        let cached: CachedDeployment = serde_json::from_value(deployment()).unwrap();
        let text = cached.spec.as_ref().unwrap().as_str();
        assert!(text.starts_with(r#"{"replicas":2,"#), "{text}");
        assert!(!text.contains(": ") && !text.contains('\n'), "{text}");
    }

    #[test]
    fn a_watch_event_deserialises_into_the_cached_form() {
        // As kube's watcher reads it: the object inside a tagged event.
        let event = json!({"type": "MODIFIED", "object": deployment()});
        let parsed: kube::api::WatchEvent<CachedDeployment> =
            serde_json::from_value(event).unwrap();
        let kube::api::WatchEvent::Modified(d) = parsed else {
            panic!("not a MODIFIED event");
        };
        assert_eq!(d.metadata.generation, Some(3));
        assert_eq!(
            d.to_deployment()
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .containers[0]
                .image,
            Some("sd35-server:1".to_owned())
        );
    }
}
