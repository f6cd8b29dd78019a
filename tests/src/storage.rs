//! The cluster's default StorageClass, `standard`, whose volumes the static provisioner
//! (`sd35-localcluster provision`) creates as host directories in the state directory.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;

use crate::components::LOCAL_PROVISIONER;

/// The name of the default StorageClass.
pub const DEFAULT_STORAGE_CLASS: &str = "standard";

/// The default StorageClass: bound at once, deleted with its claim.
pub(crate) fn default_storage_class() -> StorageClass {
    StorageClass {
        metadata: ObjectMeta {
            name: Some(DEFAULT_STORAGE_CLASS.to_owned()),
            annotations: Some(BTreeMap::from([(
                "storageclass.kubernetes.io/is-default-class".to_owned(),
                "true".to_owned(),
            )])),
            ..Default::default()
        },
        provisioner: LOCAL_PROVISIONER.to_owned(),
        reclaim_policy: Some("Delete".to_owned()),
        volume_binding_mode: Some("Immediate".to_owned()),
        allow_volume_expansion: Some(false),
        ..Default::default()
    }
}

pub(crate) async fn create_default_storage_class(client: &kube::Client) -> Result<()> {
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &default_storage_class())
        .await
        .context("creating the default StorageClass")?;
    Ok(())
}
