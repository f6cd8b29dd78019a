//! [`TestNamespace`]: a namespace of its own for each test, so tests sharing a cluster
//! never see each other's objects.
//!
//! The name comes from the API server's `generateName`, so it is unique in the cluster.
//! Dropping the guard deletes the namespace in the background, on a thread of its own
//! (the test's runtime may already be shutting down); deletion is best effort and never
//! blocks or fails the test.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};

/// The label every test namespace carries.
pub const TEST_NAMESPACE_LABEL: &str = "sd35.io/e2e-test";

/// A namespace deleted when this guard is dropped.
#[derive(Debug)]
pub struct TestNamespace {
    name: String,
    client_config: kube::Config,
}

impl TestNamespace {
    pub(crate) async fn create(client_config: kube::Config, prefix: &str) -> Result<Self> {
        let client = kube::Client::try_from(client_config.clone())?;
        let namespace = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                labels: Some(BTreeMap::from([(
                    TEST_NAMESPACE_LABEL.to_owned(),
                    "true".to_owned(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        let created = Api::<Namespace>::all(client)
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating a namespace named {prefix}-*"))?;
        Ok(Self {
            name: created.name_any(),
            client_config,
        })
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new administrator client whose default namespace is this one. Must be called
    /// inside a tokio runtime.
    pub fn client(&self) -> kube::Client {
        let mut config = self.client_config.clone();
        config.default_namespace = self.name.clone();
        kube::Client::try_from(config)
            .expect("the client configuration was proven to work when the cluster started")
    }

    /// An [`Api`] for namespaced objects in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        let config = self.client_config.clone();
        let deletion = move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(client) = kube::Client::try_from(config) {
                    let namespaces = Api::<Namespace>::all(client);
                    let _ = namespaces.delete(&name, &DeleteParams::background()).await;
                }
            });
        };
        // Best effort: if no thread can be started, the namespace stays until the cluster
        // goes.
        let _ = std::thread::Builder::new()
            .name("sd35-namespace-cleanup".to_owned())
            .spawn(deletion);
    }
}
