//! Serving add-ons, each built only when the spec asks for it: a Prometheus Operator
//! ServiceMonitor for the server's `/metrics`, and a NetworkPolicy admitting only the chosen
//! peers to the server port.

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

use super::serving::{server_metadata, server_selector};
use crate::resolve::Resolved;

/// The part of the Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1) the
/// operator sets. The CRD belongs to the Prometheus Operator; this type is only a client.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "monitoring.coreos.com",
    version = "v1",
    kind = "ServiceMonitor",
    namespaced,
    schema = "disabled",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    /// Services whose endpoints are scraped.
    pub selector: LabelSelector,
    /// Where to scrape them.
    pub endpoints: Vec<Endpoint>,
}

/// One scrape endpoint of a ServiceMonitor.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Name of the Service port.
    pub port: String,
    /// HTTP path of the metrics.
    pub path: String,
    /// Scrape interval; unset uses Prometheus' own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

/// The ServiceMonitor of the serving pods, when the spec asks for one.
pub fn service_monitor(resolved: &Resolved, owner: &OwnerReference) -> Option<ServiceMonitor> {
    let settings = &resolved.spec.monitoring.service_monitor;
    if !settings.enabled {
        return None;
    }
    let mut metadata = server_metadata(resolved, owner);
    if let Some(labels) = metadata.labels.as_mut() {
        // The operator's own labels win: the sweep and the watch select by them.
        for (k, v) in &settings.labels {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    Some(ServiceMonitor {
        metadata,
        spec: ServiceMonitorSpec {
            selector: server_selector(resolved),
            endpoints: vec![Endpoint {
                port: "http".into(),
                path: "/metrics".into(),
                interval: settings.interval.clone(),
            }],
        },
    })
}

/// A NetworkPolicy on the serving pods admitting only the spec's peers (by default, pods of
/// the same namespace) to the server port, when the spec asks for one.
pub fn network_policy(resolved: &Resolved, owner: &OwnerReference) -> Option<NetworkPolicy> {
    let spec = &resolved.spec.network_policy;
    if !spec.enabled {
        return None;
    }
    let from = if spec.from.is_empty() {
        vec![NetworkPolicyPeer {
            pod_selector: Some(LabelSelector::default()),
            ..Default::default()
        }]
    } else {
        spec.from.clone()
    };
    Some(NetworkPolicy {
        metadata: server_metadata(resolved, owner),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(server_selector(resolved)),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(from),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(resolved.spec.server.port)),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
            }]),
            ..Default::default()
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OperatorConfig;

    fn resolve_spec(spec: &str) -> (Resolved, OwnerReference) {
        let obj: sd35_crds::SD35Deployment = serde_yaml::from_str(&format!(
            "apiVersion: sd35.io/v1alpha1\nkind: SD35Deployment\nmetadata: {{name: a, namespace: ns, uid: u}}\nspec: {spec}"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let resolved = crate::resolve::resolve(&obj, &OperatorConfig::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let owner = kube::Resource::controller_owner_ref(&obj, &()).unwrap_or_default();
        (resolved, owner)
    }

    #[test]
    fn add_ons_are_built_only_when_asked_for() {
        let (resolved, owner) = resolve_spec("{variant: medium}");
        assert!(service_monitor(&resolved, &owner).is_none());
        assert!(network_policy(&resolved, &owner).is_none());
    }

    #[test]
    fn the_service_monitor_scrapes_the_servers_metrics_with_the_users_labels() {
        let (resolved, owner) = resolve_spec(
            "{variant: medium, monitoring: {serviceMonitor: {enabled: true, interval: 15s, labels: {release: prom, app.kubernetes.io/managed-by: someone}}}}",
        );
        let sm = service_monitor(&resolved, &owner).unwrap_or_default();
        let labels = sm.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels["release"], "prom");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "sd35-operator");
        let ep = &sm.spec.endpoints[0];
        assert_eq!((ep.port.as_str(), ep.path.as_str()), ("http", "/metrics"));
        assert_eq!(ep.interval.as_deref(), Some("15s"));
        assert_eq!(
            sm.spec.selector.match_labels,
            Some(crate::labels::server_selector("a"))
        );
    }

    #[test]
    fn the_network_policy_admits_the_chosen_peers_to_the_server_port_only() {
        let (resolved, owner) = resolve_spec(
            "{variant: medium, networkPolicy: {enabled: true, from: [{namespaceSelector: {matchLabels: {team: web}}}]}}",
        );
        let np = network_policy(&resolved, &owner).unwrap_or_default();
        let spec = np.spec.unwrap_or_default();
        let rule = &spec.ingress.unwrap_or_default()[0];
        let peers = rule.from.clone().unwrap_or_default();
        assert_eq!(peers.len(), 1);
        assert!(peers[0].namespace_selector.is_some());
        let ports = rule.ports.clone().unwrap_or_default();
        assert_eq!(ports[0].port, Some(IntOrString::Int(8080)));
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
        // Without peers: this namespace's pods only.
        let (resolved, owner) = resolve_spec("{variant: medium, networkPolicy: {enabled: true}}");
        let np = network_policy(&resolved, &owner).unwrap_or_default();
        let peers = np.spec.unwrap_or_default().ingress.unwrap_or_default()[0]
            .from
            .clone()
            .unwrap_or_default();
        assert_eq!(peers[0].pod_selector, Some(LabelSelector::default()));
        assert!(peers[0].namespace_selector.is_none());
    }
}
