//! The static volume provisioner behind the default StorageClass.
//!
//! It plays the part of a CSI external-provisioner: for every claim the PV controller has
//! handed to [`LOCAL_PROVISIONER`] (annotation `volume.kubernetes.io/storage-provisioner`)
//! it creates a hostPath PersistentVolume, pre-bound to the claim, whose directory lives
//! under its root; the PV controller then binds the two. When a claim is gone and its
//! volume is Released with reclaim policy Delete, it removes the directory and the volume.
//! Kubernetes does the binding, so claims go Pending → Bound just as on a real cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeSpec,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};

use crate::components::LOCAL_PROVISIONER;
use crate::kubeconfig;

const PROVISIONER_ANNOTATION: &str = "volume.kubernetes.io/storage-provisioner";
const PROVISIONED_BY_ANNOTATION: &str = "pv.kubernetes.io/provisioned-by";

/// Serves claims until the process is stopped; only a failure to connect ends it early.
pub async fn run(kubeconfig_path: &Path, root: &Path) -> Result<()> {
    let config = kubeconfig::client_config(kubeconfig_path).await?;
    let client = kube::Client::try_from(config).context("building the API client")?;
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let provisioner = Provisioner {
        client,
        root: root.to_path_buf(),
    };
    tracing::info!(root = %root.display(), "provisioning for {LOCAL_PROVISIONER}");
    tokio::join!(
        provisioner.provision_claims(),
        provisioner.reclaim_volumes()
    );
    Ok(())
}

struct Provisioner {
    client: kube::Client,
    root: PathBuf,
}

impl Provisioner {
    async fn provision_claims(&self) {
        let claims = Api::<PersistentVolumeClaim>::all(self.client.clone());
        let mut events = watcher(claims, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            let result = match event {
                Ok(claim) if needs_volume(&claim) => self.provision(&claim).await,
                Ok(_) => Ok(()),
                Err(error) => Err(error.into()),
            };
            if let Err(error) = result {
                tracing::warn!("provisioning: {error:#}");
            }
        }
    }

    async fn provision(&self, claim: &PersistentVolumeClaim) -> Result<()> {
        let reclaim_policy = match claim_storage_class(claim) {
            Some(class) => Api::<StorageClass>::all(self.client.clone())
                .get(class)
                .await
                .with_context(|| format!("reading StorageClass {class}"))?
                .reclaim_policy
                .unwrap_or_else(|| "Delete".to_owned()),
            None => "Delete".to_owned(),
        };
        let volume = volume_for(claim, &self.root, &reclaim_policy)?;
        let path = host_path(&volume).context("built a volume without a host path")?;
        std::fs::create_dir_all(&path).with_context(|| format!("creating {path}"))?;
        // Kubelets give hostPath volumes no fsGroup, so pods running as any user must be
        // able to write (what local-path provisioners do too).
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .with_context(|| format!("making {path} writable"))?;
        let volumes = Api::<PersistentVolume>::all(self.client.clone());
        match volumes.create(&PostParams::default(), &volume).await {
            Ok(created) => {
                tracing::info!(
                    volume = created.name_any(),
                    claim = format!(
                        "{}/{}",
                        claim.namespace().unwrap_or_default(),
                        claim.name_any()
                    ),
                    "provisioned"
                );
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    async fn reclaim_volumes(&self) {
        let volumes = Api::<PersistentVolume>::all(self.client.clone());
        let mut events = watcher(volumes.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            let result = match event {
                Ok(volume) if is_reclaimable(&volume) => self.delete(&volumes, &volume).await,
                Ok(_) => Ok(()),
                Err(error) => Err(error.into()),
            };
            if let Err(error) = result {
                tracing::warn!("reclaiming: {error:#}");
            }
        }
    }

    async fn delete(
        &self,
        volumes: &Api<PersistentVolume>,
        volume: &PersistentVolume,
    ) -> Result<()> {
        if let Some(path) = host_path(volume).map(PathBuf::from)
            && path.starts_with(&self.root)
            && path.exists()
        {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
        }
        match volumes
            .delete(&volume.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {
                tracing::info!(volume = volume.name_any(), "deleted");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

fn claim_storage_class(claim: &PersistentVolumeClaim) -> Option<&str> {
    claim
        .spec
        .as_ref()
        .and_then(|spec| spec.storage_class_name.as_deref())
}

/// Whether the claim waits for this provisioner to create its volume.
fn needs_volume(claim: &PersistentVolumeClaim) -> bool {
    let handed_to_us = claim
        .annotations()
        .get(PROVISIONER_ANNOTATION)
        .is_some_and(|name| name == LOCAL_PROVISIONER);
    let unbound = claim
        .spec
        .as_ref()
        .is_none_or(|spec| spec.volume_name.as_deref().unwrap_or_default().is_empty());
    handed_to_us && unbound && claim.metadata.deletion_timestamp.is_none()
}

/// Whether the volume is ours, its claim is gone, and its policy says delete it.
fn is_reclaimable(volume: &PersistentVolume) -> bool {
    let ours = volume
        .annotations()
        .get(PROVISIONED_BY_ANNOTATION)
        .is_some_and(|name| name == LOCAL_PROVISIONER);
    let delete = volume
        .spec
        .as_ref()
        .and_then(|spec| spec.persistent_volume_reclaim_policy.as_deref())
        == Some("Delete");
    let released = volume
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .is_some_and(|phase| phase == "Released" || phase == "Failed");
    let deleting = volume.metadata.deletion_timestamp.is_some();
    ours && delete && released && !deleting
}

fn host_path(volume: &PersistentVolume) -> Option<String> {
    volume
        .spec
        .as_ref()?
        .host_path
        .as_ref()
        .map(|source| source.path.clone())
}

/// The volume that satisfies `claim`: its requested size and access modes, a directory of
/// its own under `root`, and a claim reference so the PV controller binds exactly this pair.
fn volume_for(
    claim: &PersistentVolumeClaim,
    root: &Path,
    reclaim_policy: &str,
) -> Result<PersistentVolume> {
    let uid = claim.uid().context("the claim has no uid")?;
    let spec = claim.spec.clone().unwrap_or_default();
    let request = spec
        .resources
        .as_ref()
        .and_then(|resources| resources.requests.as_ref())
        .and_then(|requests| requests.get("storage"))
        .cloned()
        .context("the claim requests no storage")?;
    let name = format!("pvc-{uid}");
    let path = root.join(&name);
    Ok(PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name),
            annotations: Some(BTreeMap::from([(
                PROVISIONED_BY_ANNOTATION.to_owned(),
                LOCAL_PROVISIONER.to_owned(),
            )])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([("storage".to_owned(), request)])),
            access_modes: spec
                .access_modes
                .filter(|modes| !modes.is_empty())
                .or_else(|| Some(vec!["ReadWriteOnce".to_owned()])),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("PersistentVolumeClaim".to_owned()),
                namespace: claim.namespace(),
                name: Some(claim.name_any()),
                uid: Some(uid),
                ..Default::default()
            }),
            persistent_volume_reclaim_policy: Some(reclaim_policy.to_owned()),
            storage_class_name: spec.storage_class_name,
            volume_mode: spec.volume_mode,
            host_path: Some(HostPathVolumeSource {
                path: path
                    .to_str()
                    .context("the volume root is not valid UTF-8")?
                    .to_owned(),
                type_: Some("DirectoryOrCreate".to_owned()),
            }),
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        PersistentVolumeClaimSpec, PersistentVolumeStatus, VolumeResourceRequirements,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    use super::*;

    fn pending_claim() -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("cache".into()),
                namespace: Some("team".into()),
                uid: Some("1234".into()),
                annotations: Some(BTreeMap::from([(
                    PROVISIONER_ANNOTATION.to_owned(),
                    LOCAL_PROVISIONER.to_owned(),
                )])),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteMany".into()]),
                storage_class_name: Some("standard".into()),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([("storage".into(), Quantity("1Gi".into()))])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn volume_matches_the_claim() {
        let volume = volume_for(&pending_claim(), Path::new("/state/volumes"), "Delete").unwrap();
        assert_eq!(volume.metadata.name.as_deref(), Some("pvc-1234"));
        let spec = volume.spec.unwrap();
        assert_eq!(spec.capacity.unwrap()["storage"].0, "1Gi");
        assert_eq!(spec.access_modes.unwrap(), vec!["ReadWriteMany".to_owned()]);
        let claim_ref = spec.claim_ref.unwrap();
        assert_eq!(claim_ref.namespace.as_deref(), Some("team"));
        assert_eq!(claim_ref.uid.as_deref(), Some("1234"));
        assert_eq!(spec.host_path.unwrap().path, "/state/volumes/pvc-1234");
        assert_eq!(spec.storage_class_name.as_deref(), Some("standard"));
    }

    #[test]
    fn only_unbound_claims_handed_to_us_need_volumes() {
        assert!(needs_volume(&pending_claim()));
        let mut bound = pending_claim();
        bound.spec.as_mut().unwrap().volume_name = Some("pvc-1234".into());
        assert!(!needs_volume(&bound));
        let mut foreign = pending_claim();
        foreign.metadata.annotations = None;
        assert!(!needs_volume(&foreign));
    }

    #[test]
    fn released_volumes_are_reclaimed() {
        let mut volume =
            volume_for(&pending_claim(), Path::new("/state/volumes"), "Delete").unwrap();
        assert!(!is_reclaimable(&volume));
        volume.status = Some(PersistentVolumeStatus {
            phase: Some("Released".into()),
            ..Default::default()
        });
        assert!(is_reclaimable(&volume));
        volume
            .spec
            .as_mut()
            .unwrap()
            .persistent_volume_reclaim_policy = Some("Retain".into());
        assert!(!is_reclaimable(&volume));
    }
}
