//! The serving and add-ons steps: every child the SD35Deployment controls
//! ([`Controlled`]) applied where it differs from what is live, then one sweep of what the
//! spec no longer wants; the serving Deployment's rollout as observed after.
//!
//! Guarantee: [`Reconciliation::apply_controlled`] and [`Reconciliation::sweep_controlled`]
//! both destructure [`Controlled`] without `..`, so a kind that is applied is swept too.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Resource;
use kube::runtime::reflector::ObjectRef;
use serde::de::DeserializeOwned;
use tracing::{debug, info};

use super::{Error, Reconciliation, Step};
use crate::children::{Controlled, ServedAdapter, ServingTarget};
use crate::controller::context::{Owned, cached};
use crate::index::namespaced;
use crate::status::{Addons, Rollout};

/// Why a ServiceMonitor the spec asks for is skipped.
const SERVICE_MONITOR_CRD_MISSING: &str = "ServiceMonitor skipped: the Prometheus Operator's \
     ServiceMonitor CRD (servicemonitors.monitoring.coreos.com) is not installed; the operator \
     creates it once the CRD is there";

/// The names of the children of one kind that are wanted: the one `desired` names, if any.
fn wanted<K: Resource>(desired: Option<&K>) -> Vec<&str> {
    desired
        .and_then(|d| d.meta().name.as_deref())
        .into_iter()
        .collect()
}

impl Reconciliation<'_> {
    /// The serving and add-ons steps. `ready_for_desired` says whether the cache and the
    /// engine of the spec are ready, so the serving pods may be pointed at them (loading the
    /// `served` adapters, the cached ones); until then they keep running what they run.
    pub(super) async fn controlled_step(
        &self,
        ready_for_desired: bool,
        served: Vec<ServedAdapter>,
    ) -> Result<(Option<Rollout>, Addons), Error> {
        let resolved = self.resolved;
        let (ns, name) = (&resolved.namespace, resolved.name.as_str());
        let children = &self.ctx.children;
        let live = children
            .controlled
            .deployments
            .store
            .get(&ObjectRef::new(name).within(ns))
            .map(|d| d.to_deployment());
        let desired_target = ServingTarget::desired(resolved, served);
        let target = if ready_for_desired {
            Some(desired_target.clone())
        } else {
            live.as_ref().and_then(ServingTarget::of)
        };
        let desired = Controlled::new(resolved, &self.ctx.config, &self.owner, target.as_ref());
        let (deployment, addons) = self.apply_controlled(&desired, live).await?;
        self.sweep_controlled(&desired).await?;

        let pods: Vec<Arc<Pod>> = children
            .pods_by_instance
            .get(&namespaced(ns, name))
            .iter()
            .filter_map(|p| children.pods.get(p))
            .collect();
        let rollout =
            deployment.map(|d| Rollout::of(&d, &desired_target, pods.iter().map(AsRef::as_ref)));
        Ok((rollout, addons))
    }

    /// Applies each child of `desired` that differs from the live one. Returns the serving
    /// Deployment as it is now (`live` when it has no target yet) and what became of the
    /// add-ons.
    async fn apply_controlled(
        &self,
        desired: &Controlled,
        live: Option<Deployment>,
    ) -> Result<(Option<Deployment>, Addons), Error> {
        let Controlled {
            deployment,
            service,
            pdb,
            network_policy,
            service_monitor,
        } = desired;
        let (ns, name) = (&self.resolved.namespace, self.resolved.name.as_str());
        let stores = &self.ctx.children.controlled;
        let serving = self.failed(Step::Serving);
        let deployment = match deployment {
            Some(desired) => {
                let had = live.is_some();
                let (now, written) = self
                    .apply
                    .apply(desired.clone(), live)
                    .await
                    .map_err(serving)?;
                if written && !had {
                    self.note(
                        "DeploymentCreated",
                        &format!("created serving Deployment {name}"),
                    );
                } else if written {
                    debug!("serving Deployment updated");
                }
                now
            }
            None => live,
        };
        let live = cached(&stores.services.store, ns, name);
        self.apply
            .apply(service.clone(), live)
            .await
            .map_err(self.failed(Step::Serving))?;
        if let Some(desired) = pdb {
            let live = cached(&stores.pdbs.store, ns, name);
            self.apply
                .apply(desired.clone(), live)
                .await
                .map_err(self.failed(Step::Serving))?;
        }

        let mut addons = Addons::default();
        if let Some(desired) = network_policy {
            let live = cached(&stores.network_policies.store, ns, name);
            let (now, _) = self
                .apply
                .apply(desired.clone(), live)
                .await
                .map_err(self.failed(Step::Addons))?;
            if now.is_some() {
                addons.applied.push("NetworkPolicy");
            }
        }
        if let Some(desired) = service_monitor {
            if !self
                .ctx
                .children
                .service_monitor_crd
                .load(Ordering::Relaxed)
            {
                addons.skipped.push(SERVICE_MONITOR_CRD_MISSING.to_owned());
            } else {
                let live = cached(&stores.service_monitors.store, ns, name);
                match self.apply.apply(desired.clone(), live).await {
                    Ok((Some(_), _)) => addons.applied.push("ServiceMonitor"),
                    Ok((None, _)) => {}
                    // The CRD went away since it was seen.
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        addons.skipped.push(SERVICE_MONITOR_CRD_MISSING.to_owned());
                    }
                    Err(e) => return Err(self.failed(Step::Addons)(e)),
                }
            }
        }
        Ok((deployment, addons))
    }

    /// Deletes, by the operator's label and this object's UID, each controlled child the
    /// spec does not want now.
    async fn sweep_controlled(&self, desired: &Controlled) -> Result<(), Error> {
        let Controlled {
            deployment: _,
            service,
            pdb,
            network_policy,
            service_monitor,
        } = desired;
        let stores = &self.ctx.children.controlled;
        // The serving Deployment is always wanted, under the object's name: without a target
        // the live one is left as it is.
        let deployment_name = [self.resolved.name.as_str()];
        let mut swept = Vec::new();
        swept.extend(
            self.sweep(&stores.deployments, &deployment_name, Step::Serving)
                .await?,
        );
        swept.extend(
            self.sweep(&stores.services, &wanted(Some(service)), Step::Serving)
                .await?,
        );
        swept.extend(
            self.sweep(&stores.pdbs, &wanted(pdb.as_ref()), Step::Serving)
                .await?,
        );
        swept.extend(
            self.sweep(
                &stores.network_policies,
                &wanted(network_policy.as_ref()),
                Step::Addons,
            )
            .await?,
        );
        // Without their CRD there are no ServiceMonitors to sweep.
        if self
            .ctx
            .children
            .service_monitor_crd
            .load(Ordering::Relaxed)
        {
            swept.extend(
                self.sweep(
                    &stores.service_monitors,
                    &wanted(service_monitor.as_ref()),
                    Step::Addons,
                )
                .await?,
            );
        }
        if !swept.is_empty() {
            info!(?swept, "deleted children the spec no longer wants");
        }
        Ok(())
    }

    /// Sweeps one kind: deletes its children controlled by this object but not in `wanted`.
    async fn sweep<K>(
        &self,
        owned: &Owned<K>,
        wanted: &[&str],
        step: Step,
    ) -> Result<Vec<String>, Error>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + 'static,
    {
        self.apply
            .sweep(&owned.store, &owned.by_owner, &self.owner.uid, wanted)
            .await
            .map_err(self.failed(step))
    }
}
