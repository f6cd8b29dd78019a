//! Leader election through a `coordination.k8s.io` Lease, so that several operator replicas
//! can run and exactly one reconciles.
//!
//! A candidate takes the Lease when it is free or its holder has not renewed it within the
//! lease duration, and renews it well within that duration. Updates use the Lease's
//! resourceVersion, so two candidates never both win. A leader that cannot renew in time
//! steps down (the process exits and restarts as a candidate); one that shuts down cleanly
//! releases the Lease so another replica takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{debug, info};

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a leader's claim lasts without renewal.
    pub lease_duration: Duration,
    /// How often candidates try and the leader renews.
    pub retry_period: Duration,
    /// Added to the wall clock (to test skewed clocks).
    pub clock_offset: SignedDuration,
}

/// A candidate for the Lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    last_renew: Option<std::time::Instant>,
}

/// Whether `lease` may be taken by `identity` at `now`.
fn may_take(lease: &Lease, identity: &str, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == identity => true,
        Some(_) => {
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
            match &spec.renew_time {
                None => true,
                Some(MicroTime(renewed)) => renewed
                    .saturating_add(SignedDuration::from_secs(duration))
                    .is_ok_and(|expiry| expiry < now),
            }
        }
    }
}

impl Elector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            last_renew: None,
        }
    }

    fn spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let same_holder = previous.and_then(|p| p.holder_identity.as_deref())
            == Some(self.config.identity.as_str());
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(15),
            ),
            acquire_time: if same_holder {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if same_holder || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..Default::default()
        }
    }

    /// One attempt to acquire or renew; true while this candidate leads.
    pub async fn try_acquire_or_renew(&mut self) -> kube::Result<bool> {
        let now = Timestamp::now()
            .checked_add(self.config.clock_offset)
            .unwrap_or_else(|_| Timestamp::now());
        let won = match self.api.get_opt(&self.config.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(None, now)),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => true,
                    Err(kube::Error::Api(e)) if e.code == 409 => false,
                    Err(e) => return Err(e),
                }
            }
            Some(lease) if may_take(&lease, &self.config.identity, now) => {
                let mut updated = lease.clone();
                updated.spec = Some(self.spec(lease.spec.as_ref(), now));
                match self
                    .api
                    .replace(&self.config.name, &PostParams::default(), &updated)
                    .await
                {
                    Ok(_) => true,
                    Err(kube::Error::Api(e)) if e.code == 409 => false,
                    Err(e) => return Err(e),
                }
            }
            Some(_) => false,
        };
        if won {
            self.last_renew = Some(std::time::Instant::now());
        }
        Ok(won)
    }

    /// Waits until this candidate holds the Lease.
    pub async fn acquire(&mut self) {
        info!(lease = %self.config.name, identity = %self.config.identity, "waiting for leadership");
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.config.name, "became leader");
                    return;
                }
                Ok(false) => debug!("another replica leads"),
                Err(e) => debug!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Renews the Lease until renewal fails for longer than the lease duration; returns then,
    /// when this replica must stop reconciling.
    pub async fn keep(&mut self) {
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => {}
                Ok(false) => {
                    info!("leadership taken by another replica");
                    return;
                }
                Err(e) => debug!(error = %e, "could not renew the lease"),
            }
            if self
                .last_renew
                .is_none_or(|t| t.elapsed() > self.config.lease_duration)
            {
                info!("could not renew the lease in time");
                return;
            }
        }
    }

    /// Gives the Lease up so another replica can take it at once.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let ours = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.config.identity.as_str());
        if !ours {
            return;
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = None;
            spec.acquire_time = None;
        }
        if self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
            .is_ok()
        {
            info!("released the lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> (Lease, Timestamp) {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let renewed = Timestamp::from_second(1_000_000 - renewed_secs_ago).unwrap();
        let l = Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(renewed)),
                ..Default::default()
            }),
        };
        (l, now)
    }

    #[test]
    fn a_fresh_lease_of_another_holder_is_not_taken() {
        let (l, now) = lease(Some("a"), 5, 15);
        assert!(!may_take(&l, "b", now));
        assert!(may_take(&l, "a", now), "the holder renews");
    }

    #[test]
    fn an_expired_or_released_lease_is_taken() {
        let (l, now) = lease(Some("a"), 16, 15);
        assert!(may_take(&l, "b", now));
        let (l, now) = lease(None, 1, 15);
        assert!(may_take(&l, "b", now));
    }
}
