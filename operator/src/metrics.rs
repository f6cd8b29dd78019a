//! Prometheus metrics of the operator: reconciliations, errors by kind, reconcile duration,
//! and SD35Deployments by phase.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

/// The operator's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciliations: Counter,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
    resolutions: Counter,
    leader: Gauge,
    by_phase: Family<PhaseLabels, Gauge>,
    phases: Mutex<HashMap<String, String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sd35_operator");
        let reconciliations = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let by_phase = Family::<PhaseLabels, Gauge>::default();
        let resolutions = Counter::default();
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica leads (or runs without leader election), else 0",
            leader.clone(),
        );
        registry.register(
            "spec_resolutions",
            "SD35Deployment specs validated and defaulted: the operator's work per event",
            resolutions.clone(),
        );
        registry.register(
            "reconciliations",
            "Reconciliations started",
            reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by error kind",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation",
            duration.clone(),
        );
        registry.register("objects", "SD35Deployments by phase", by_phase.clone());
        Self {
            registry,
            reconciliations,
            failures,
            duration,
            resolutions,
            leader,
            by_phase,
            phases: Mutex::new(HashMap::new()),
        }
    }
}

/// Records a reconciliation's duration when dropped.
#[derive(Debug)]
pub struct ReconcileTimer<'a> {
    start: Instant,
    duration: &'a Histogram,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.duration.observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Counts a reconciliation and times it until the returned guard drops.
    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconciliations.inc();
        ReconcileTimer {
            start: Instant::now(),
            duration: &self.duration,
        }
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leads: bool) {
        self.leader.set(i64::from(leads));
    }

    /// Counts one spec validated and defaulted.
    pub fn spec_resolved(&self) {
        self.resolutions.inc();
    }

    /// Counts a failed reconciliation.
    pub fn reconcile_failed(&self, kind: &str) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: kind.to_owned(),
            })
            .inc();
    }

    /// Records an object's phase (None when the object is gone).
    pub fn set_phase(&self, object: &str, phase: Option<&str>) {
        let Ok(mut phases) = self.phases.lock() else {
            return;
        };
        match phase {
            Some(p) => phases.insert(object.to_owned(), p.to_owned()),
            None => phases.remove(object),
        };
        let mut counts: HashMap<&str, i64> = HashMap::new();
        for p in phases.values() {
            *counts.entry(p.as_str()).or_default() += 1;
        }
        self.by_phase.clear();
        for (p, n) in counts {
            self.by_phase
                .get_or_create(&PhaseLabels {
                    phase: p.to_owned(),
                })
                .set(n);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_errors_and_phases() {
        let m = Metrics::default();
        drop(m.reconcile_started());
        m.reconcile_failed("Kube");
        m.set_phase("ns/a", Some("Ready"));
        m.set_phase("ns/b", Some("Ready"));
        m.set_phase("ns/c", Some("Caching"));
        m.set_phase("ns/c", None);
        let text = m.render();
        assert!(
            text.contains("sd35_operator_reconciliations_total 1"),
            "{text}"
        );
        assert!(
            text.contains("sd35_operator_reconcile_errors_total{error=\"Kube\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sd35_operator_objects{phase=\"Ready\"} 2"),
            "{text}"
        );
        assert!(!text.contains("phase=\"Caching\""), "{text}");
        assert!(
            text.contains("sd35_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
    }
}
