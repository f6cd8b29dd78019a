//! Leader election through a `coordination.k8s.io` Lease, so that several operator replicas
//! can run and at most one reconciles, whatever their clocks say.
//!
//! The observed-time rule (as in client-go): a candidate never compares the holder's
//! `renewTime` with its own clock. It notes, on its own monotonic clock, when it first saw
//! the current Lease record; the holder's claim has lapsed only once the record has not
//! changed for a whole lease duration since then. A holder that renews changes the record,
//! so skewed wall clocks cannot make a candidate take a Lease that is being renewed.
//!
//! The leader measures from the start of its last successful renewal, on its own monotonic
//! clock, and steps down once it has not renewed for the renew deadline (two thirds of the
//! lease duration): before any candidate, counting from when it saw that renewal (later
//! than its start), could take the Lease. Updates carry the Lease's resourceVersion, so two
//! candidates never both win one round. A leader that shuts down cleanly releases the Lease
//! so another replica takes over at once.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{debug, info};

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity, written as the holder.
    pub identity: String,
    /// How long a leader's claim lasts without renewal.
    pub lease_duration: Duration,
    /// How often candidates try and the leader renews.
    pub retry_period: Duration,
    /// Added to the wall clock this replica writes into the Lease (to test skewed clocks;
    /// the election itself reads no wall clock).
    pub clock_offset: SignedDuration,
}

impl LeaseConfig {
    /// How long a leader may go without renewing before it steps down: two thirds of the
    /// lease duration, so it stops well before a candidate may take over.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }
}

/// What a candidate does with the Lease it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// It holds the Lease: renew it.
    Renew,
    /// Nobody holds it, or the holder's claim has lapsed: take it.
    Take,
    /// Another replica holds it: wait.
    Wait,
}

/// The Lease record as this candidate last saw it, and when (on its monotonic clock) it first
/// saw it so.
#[derive(Clone, Debug)]
pub struct Observation {
    record: Option<LeaseSpec>,
    since: Instant,
}

impl Observation {
    /// Notes the record read at `now`: its observed time moves only when it changed.
    pub fn update(previous: Option<Self>, record: Option<&LeaseSpec>, now: Instant) -> Self {
        match previous {
            Some(p) if p.record.as_ref() == record => p,
            _ => Self {
                record: record.cloned(),
                since: now,
            },
        }
    }

    /// What `identity` should do at `now` (its monotonic clock).
    pub fn decide(&self, identity: &str, now: Instant) -> Decision {
        let Some(spec) = &self.record else {
            return Decision::Take;
        };
        match spec.holder_identity.as_deref() {
            None | Some("") => Decision::Take,
            Some(holder) if holder == identity => Decision::Renew,
            Some(_) => {
                let seconds = spec.lease_duration_seconds.unwrap_or(15).max(1);
                let duration = Duration::from_secs(u64::try_from(seconds).unwrap_or(15));
                if now.saturating_duration_since(self.since) > duration {
                    Decision::Take
                } else {
                    Decision::Wait
                }
            }
        }
    }
}

/// A candidate for the Lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observation>,
    /// Start of this replica's last successful acquisition or renewal.
    renewed_at: Option<Instant>,
}

impl Elector {
    /// A candidate that has not seen the Lease yet.
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            renewed_at: None,
        }
    }

    fn wall_clock(&self) -> Timestamp {
        let now = Timestamp::now();
        now.checked_add(self.config.clock_offset).unwrap_or(now)
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
        let started = Instant::now();
        let wall = self.wall_clock();
        let live = self.api.get_opt(&self.config.name).await?;
        let observation = Observation::update(
            self.observed.take(),
            live.as_ref().and_then(|l| l.spec.as_ref()),
            Instant::now(),
        );
        let decision = observation.decide(&self.config.identity, Instant::now());
        self.observed = Some(observation);
        let written = match (live, decision) {
            (_, Decision::Wait) => None,
            (None, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(None, wall)),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(l) => Some(l),
                    Err(kube::Error::Api(e)) if e.code == 409 => None,
                    Err(e) => return Err(e),
                }
            }
            (Some(lease), _) => {
                let mut updated = lease.clone();
                updated.spec = Some(self.spec(lease.spec.as_ref(), wall));
                // The resourceVersion makes this a compare-and-swap: of two candidates
                // taking the same record, one gets 409.
                match self
                    .api
                    .replace(&self.config.name, &PostParams::default(), &updated)
                    .await
                {
                    Ok(l) => Some(l),
                    Err(kube::Error::Api(e)) if e.code == 409 => None,
                    Err(e) => return Err(e),
                }
            }
        };
        let Some(lease) = written else {
            return Ok(false);
        };
        self.observed = Some(Observation::update(None, lease.spec.as_ref(), started));
        self.renewed_at = Some(started);
        Ok(true)
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

    /// Renews the Lease; returns when this replica must stop reconciling: another replica
    /// took the Lease, or no renewal succeeded within the renew deadline (a renewal still in
    /// flight then is abandoned).
    pub async fn keep(&mut self) {
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            let Some(renewed) = self.renewed_at else {
                return;
            };
            let deadline = renewed + self.config.renew_deadline();
            match tokio::time::timeout_at(deadline.into(), self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    info!("leadership taken by another replica");
                    return;
                }
                Ok(Err(e)) => debug!(error = %e, "could not renew the lease"),
                Err(_) => {}
            }
            if self
                .renewed_at
                .is_none_or(|t| t.elapsed() >= self.config.renew_deadline())
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

    fn record(holder: Option<&str>, renewed_at_second: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: Some(6),
            renew_time: Some(MicroTime(
                Timestamp::from_second(renewed_at_second).unwrap_or(Timestamp::UNIX_EPOCH),
            )),
            ..Default::default()
        }
    }

    #[test]
    fn a_renewed_lease_is_never_taken_whatever_its_timestamps_say() {
        let start = Instant::now();
        // The holder's clock is far behind: every renewTime it writes looks a day old.
        let mut seen = None;
        for tick in 0..20u32 {
            let now = start + Duration::from_secs(u64::from(tick) * 2);
            let r = record(Some("a"), 1_000 + i64::from(tick) * 2);
            let o = Observation::update(seen.take(), Some(&r), now);
            assert_eq!(o.decide("b", now), Decision::Wait, "tick {tick}");
            seen = Some(o);
        }
    }

    #[test]
    fn a_lease_that_stops_changing_is_taken_one_duration_after_it_was_first_seen() {
        let start = Instant::now();
        // Renewed "in the future" by a holder whose clock runs ahead: irrelevant.
        let r = record(Some("a"), i64::from(i32::MAX));
        let o = Observation::update(None, Some(&r), start);
        let o = Observation::update(Some(o), Some(&r), start + Duration::from_secs(5));
        assert_eq!(
            o.decide("b", start + Duration::from_secs(5)),
            Decision::Wait
        );
        assert_eq!(
            o.decide("b", start + Duration::from_secs(7)),
            Decision::Take
        );
        // The holder renews it itself.
        assert_eq!(o.decide("a", start), Decision::Renew);
    }

    #[test]
    fn a_released_or_missing_lease_is_taken() {
        let now = Instant::now();
        let o = Observation::update(None, Some(&record(None, 1)), now);
        assert_eq!(o.decide("b", now), Decision::Take);
        let o = Observation::update(None, None, now);
        assert_eq!(o.decide("b", now), Decision::Take);
    }

    #[test]
    fn the_leader_steps_down_before_a_candidate_may_take_over() {
        let config = LeaseConfig {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(3),
            clock_offset: SignedDuration::ZERO,
        };
        assert!(config.renew_deadline() < config.lease_duration);
        assert!(config.renew_deadline() > config.retry_period * 2);
    }
}
