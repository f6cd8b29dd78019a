//! Tests of the parent module.

use super::*;

pub(crate) fn t(secs: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
}

pub(crate) fn observed() -> Observed {
    Observed {
        generation: 2,
        desired_replicas: 2,
        paused: false,
        invalid: None,
        cache: StepState::Done("Cached", String::new()),
        engine: StepState::Done("Built", String::new()),
        rollout: Some(Rollout {
            runs_desired_target: true,
            observed: true,
            replicas: 2,
            ready: 2,
            updated: 2,
            available: 2,
            progress_deadline_exceeded: false,
            server_failure: None,
        }),
        addons: Addons::default(),
        adapters: Vec::new(),
        gpu: None,
        cache_claim: "sd35-cache-c".into(),
        cache_key: "c".into(),
        engine_key: Some("e".into()),
        selector: "a=b".into(),
        endpoint: Some("http://x.ns.svc:8080".into()),
    }
}

fn get<'a>(s: &'a SD35DeploymentStatus, type_: &str) -> &'a Condition {
    s.conditions.iter().find(|c| c.type_ == type_).unwrap()
}

#[test]
fn all_done_and_rolled_out_is_ready_and_not_reconciling() {
    let s = compute(&observed(), None, t(10));
    assert_eq!(get(&s, "Ready").status, "True");
    assert_eq!(get(&s, "Reconciling").status, "False");
    assert_eq!(get(&s, "Stalled").status, "False");
    assert_eq!(s.phase, Some(Phase::Ready));
    assert_eq!(s.observed_generation, Some(2));
    assert!(
        s.conditions
            .iter()
            .all(|c| c.observed_generation == Some(2))
    );
}

#[test]
fn old_pods_still_running_is_not_ready() {
    let mut o = observed();
    o.rollout.as_mut().unwrap().replicas = 3; // a surge pod of the old template remains
    let s = compute(&o, None, t(10));
    assert_eq!(get(&s, "Ready").status, "False");
    assert_eq!(get(&s, "Ready").reason, "RollingOut");
    assert_eq!(get(&s, "Reconciling").status, "True");
    assert_eq!(s.phase, Some(Phase::Deploying));
}

#[test]
fn serving_an_older_engine_while_the_new_one_builds_is_building() {
    let mut o = observed();
    o.engine = StepState::Pending("Building".into(), "Job sd35-build-x is running".into());
    o.rollout.as_mut().unwrap().runs_desired_target = false;
    let s = compute(&o, None, t(10));
    assert_eq!(get(&s, "Ready").reason, "Building");
    assert_eq!(get(&s, "EngineReady").status, "False");
    assert_eq!(get(&s, "Available").status, "True", "old pods keep serving");
    assert_eq!(s.phase, Some(Phase::Building));
}

#[test]
fn a_failed_fetch_stalls_with_its_reason() {
    let mut o = observed();
    o.cache = StepState::Failed("Unauthorized".into(), "401 from the Hub".into());
    o.rollout = None;
    let s = compute(&o, None, t(10));
    for c in ["Ready", "CacheReady"] {
        assert_eq!(get(&s, c).status, "False");
        assert_eq!(get(&s, c).reason, "Unauthorized");
    }
    assert_eq!(get(&s, "Stalled").status, "True");
    assert_eq!(get(&s, "Reconciling").status, "False");
    assert_eq!(s.phase, Some(Phase::Failed));
}

#[test]
fn unchanged_conditions_keep_their_transition_time() {
    let first = compute(&observed(), None, t(10));
    let second = compute(&observed(), Some(&first), t(99));
    assert_eq!(first, second, "a steady state computes the same status");
    assert!(transitions(Some(&first), &second).is_empty());
    let mut o = observed();
    o.rollout.as_mut().unwrap().available = 1;
    let third = compute(&o, Some(&second), t(200));
    assert_eq!(get(&third, "Ready").last_transition_time, t(200));
    assert_eq!(get(&third, "CacheReady").last_transition_time, t(10));
    assert_eq!(third.phase, Some(Phase::Degraded));
    let changed: Vec<_> = transitions(Some(&second), &third)
        .into_iter()
        .map(|c| c.type_)
        .collect();
    assert_eq!(changed, ["Ready", "Reconciling"]);
}

#[test]
fn paused_is_reported_and_nothing_is_reconciling() {
    let mut o = observed();
    o.paused = true;
    let s = compute(&o, None, t(1));
    assert_eq!(s.phase, Some(Phase::Paused));
    assert_eq!(get(&s, "Ready").reason, "Paused");
    assert_eq!(get(&s, "Reconciling").status, "False");
}

#[test]
fn a_server_that_cannot_start_is_stalled_with_its_own_words() {
    let mut o = observed();
    let quoted = "pod tiny-abc: GPUUnavailable: --device cuda: no usable GPU: no CUDA driver";
    let r = o.rollout.as_mut().unwrap();
    (r.ready, r.available) = (0, 0);
    r.server_failure = Some(("GPUUnavailable".into(), quoted.into()));
    let s = compute(&o, None, t(1));
    for c in ["Ready", "Available", "Stalled"] {
        assert_eq!(get(&s, c).reason, "GPUUnavailable", "{c}");
        assert_eq!(get(&s, c).message, quoted, "{c}");
    }
    assert_eq!(get(&s, "Available").status, "False");
    assert_eq!(get(&s, "Stalled").status, "True");
    assert_eq!(s.phase, Some(Phase::Failed));
    // Once every replica is available again, the failure of an earlier pod is history.
    let r = o.rollout.as_mut().unwrap();
    (r.ready, r.available) = (2, 2);
    let s = compute(&o, None, t(2));
    assert_eq!(get(&s, "Ready").status, "True");
}

#[test]
fn a_skipped_add_on_is_reported_without_holding_up_ready() {
    let mut o = observed();
    o.addons = Addons {
        applied: vec!["NetworkPolicy"],
        skipped: vec!["ServiceMonitor: its CRD is not installed".into()],
    };
    let s = compute(&o, None, t(1));
    let addons = get(&s, "AddonsReady");
    assert_eq!(
        (addons.status.as_str(), addons.reason.as_str()),
        ("False", "Skipped")
    );
    assert!(
        addons.message.contains("CRD is not installed"),
        "{}",
        addons.message
    );
    assert_eq!(get(&s, "Ready").status, "True");
    assert_eq!(get(&s, "Stalled").status, "False");
    o.addons.skipped.clear();
    let s = compute(&o, None, t(1));
    assert_eq!(get(&s, "AddonsReady").message, "NetworkPolicy in place");
}

fn adapter(kind: AdapterKind, name: &str, state: StepState) -> AdapterState {
    AdapterState {
        kind,
        name: name.into(),
        key: format!("k-{name}"),
        state,
    }
}

fn cached(name: &str) -> AdapterState {
    adapter(
        AdapterKind::Lora,
        name,
        StepState::Done("Cached", String::new()),
    )
}

#[test]
fn no_adapters_is_none_requested_and_cached_ones_are_listed() {
    let s = compute(&observed(), None, t(1));
    let c = get(&s, "AdaptersReady");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "NoneRequested")
    );
    assert!(s.adapters.is_empty());
    let mut o = observed();
    o.adapters = vec![
        cached("detail"),
        adapter(
            AdapterKind::Controlnet,
            "canny",
            StepState::Done("Cached", String::new()),
        ),
    ];
    let s = compute(&o, None, t(1));
    let c = get(&s, "AdaptersReady");
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Cached"));
    assert_eq!(c.message, "cached: lora detail, controlnet canny");
    assert_eq!(get(&s, "Ready").status, "True");
    assert_eq!(s.adapters.len(), 2);
    assert!(s.adapters.iter().all(|a| a.ready && a.reason == "Cached"));
    assert_eq!(s.adapters[1].kind, AdapterKind::Controlnet);
}

#[test]
fn an_adapter_being_fetched_holds_up_ready_while_the_model_serves() {
    let mut o = observed();
    o.adapters = vec![
        cached("detail"),
        adapter(
            AdapterKind::Lora,
            "style",
            StepState::Pending("Fetching".into(), "Job sd35-adapter-k is running".into()),
        ),
    ];
    let s = compute(&o, None, t(1));
    assert_eq!(get(&s, "Ready").status, "False");
    assert_eq!(get(&s, "Ready").reason, "FetchingAdapters");
    assert_eq!(
        get(&s, "Ready").message,
        "lora style: Job sd35-adapter-k is running"
    );
    assert_eq!(get(&s, "Reconciling").status, "True");
    assert_eq!(get(&s, "Available").status, "True");
    assert_eq!(get(&s, "AdaptersReady").reason, "Fetching");
    assert_eq!(s.phase, Some(Phase::Caching));
    let style = &s.adapters[1];
    assert!(!style.ready && style.reason == "Fetching");
}

#[test]
fn a_failed_adapter_stalls_only_itself_once_nothing_else_moves() {
    let failed = adapter(
        AdapterKind::Lora,
        "bad",
        StepState::Failed(
            "NotFound".into(),
            "Job sd35-adapter-k-bad failed (PodFailurePolicy, exit code 11): HTTP 404".into(),
        ),
    );
    let mut o = observed();
    o.adapters = vec![cached("detail"), failed.clone()];
    let s = compute(&o, None, t(1));
    for c in ["Ready", "Stalled"] {
        assert_eq!(get(&s, c).reason, "AdapterFailed", "{c}");
        assert!(
            get(&s, c).message.starts_with(
                "lora bad: NotFound: Job sd35-adapter-k-bad failed (PodFailurePolicy, exit code 11): HTTP 404; the model and 1 other adapter(s) are served"
            ),
            "{}",
            get(&s, c).message
        );
    }
    assert_eq!(get(&s, "Stalled").status, "True");
    assert_eq!(get(&s, "Reconciling").status, "False");
    // The model is unaffected: cached, built, available.
    for c in ["CacheReady", "EngineReady", "Available"] {
        assert_eq!(get(&s, c).status, "True", "{c}");
    }
    assert_eq!(get(&s, "AdaptersReady").reason, "AdapterFailed");
    assert_eq!(s.phase, Some(Phase::Degraded));
    let bad = &s.adapters[1];
    assert_eq!((bad.ready, bad.reason.as_str()), (false, "NotFound"));
    assert!(bad.message.contains("HTTP 404"));

    // While the model still builds, its progress is what Ready says; the failure waits in
    // AdaptersReady.
    o.engine = StepState::Pending("Building".into(), "Job sd35-build-e is running".into());
    let s = compute(&o, None, t(2));
    assert_eq!(get(&s, "Ready").reason, "Building");
    assert_eq!(get(&s, "Stalled").status, "False");
    assert_eq!(get(&s, "AdaptersReady").reason, "AdapterFailed");
    assert_eq!(s.phase, Some(Phase::Building));
    // So does another adapter still being fetched.
    o.engine = StepState::Done("Built", String::new());
    o.adapters.push(adapter(
        AdapterKind::Controlnet,
        "canny",
        StepState::Pending("Fetching".into(), "Job j is running".into()),
    ));
    let s = compute(&o, None, t(3));
    assert_eq!(get(&s, "Ready").reason, "FetchingAdapters");
    assert_eq!(get(&s, "Stalled").status, "False");
}

#[test]
fn scaled_to_zero_is_ready() {
    let mut o = observed();
    o.desired_replicas = 0;
    o.rollout = Some(Rollout {
        runs_desired_target: true,
        observed: true,
        ..Default::default()
    });
    let s = compute(&o, None, t(1));
    assert_eq!(get(&s, "Ready").status, "True");
    assert_eq!(get(&s, "Ready").reason, "ScaledToZero");
    assert_eq!(get(&s, "Reconciling").status, "False");
    assert_eq!(get(&s, "Stalled").status, "False");
    assert_eq!(get(&s, "Available").reason, "ScaledToZero");
    assert_eq!(get(&s, "CacheReady").status, "True");
    assert_eq!(get(&s, "EngineReady").status, "True");
    assert_eq!(s.phase, Some(Phase::ScaledToZero));
    // Scaling to zero while the new engine is still being built is not "scaled to zero"
    // yet: the build is reported.
    o.engine = StepState::Pending("Building".into(), "Job sd35-build-1 is running".into());
    let s = compute(&o, None, t(2));
    assert_eq!(s.phase, Some(Phase::Building));
    assert_eq!(get(&s, "Ready").status, "False");
}

#[test]
fn a_gpu_the_server_cannot_run_on_is_reported_without_holding_up_ready() {
    let mut o = observed();
    assert!(
        compute(&o, None, t(1))
            .conditions
            .iter()
            .all(|c| c.type_ != "GPUCompatible"),
        "no GPU requested, no condition"
    );
    o.gpu = Some(crate::gpu::GpuReport {
        status: "False",
        reason: "ComputeCapabilityTooLow",
        message: "Tesla-T4 (compute capability 7.5) is older than 8.0".into(),
    });
    let s = compute(&o, None, t(1));
    let gpu = get(&s, "GPUCompatible");
    assert_eq!(
        (gpu.status.as_str(), gpu.reason.as_str()),
        ("False", "ComputeCapabilityTooLow")
    );
    assert_eq!(get(&s, "Ready").status, "True");
    // Its transition time is kept while its status holds.
    let again = compute(&o, Some(&s), t(9));
    assert_eq!(get(&again, "GPUCompatible").last_transition_time, t(1));
}
