//! The autoscaling gauges step by step: a backend that runs one sampling step each time the
//! test lets it shows `sd35_queue_depth`, `sd35_images_in_flight` and
//! `sd35_steps_outstanding` at every boundary, through completion and cancellation.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use sd35_http::backend::{Backend, FakeBackend, GenControl, GenFailure, GenParams, ModelInfo};
use sd35_http::metrics::Metrics;
use sd35_http::queue::{Queue, QueueLimits};

/// Runs a step when the test sends on `gate`, and says which step it finished on `reached`.
struct Gated {
    gate: Receiver<()>,
    reached: Sender<usize>,
}

impl Backend for Gated {
    fn info(&self) -> ModelInfo {
        FakeBackend::new(Duration::ZERO).info()
    }

    fn generate(
        &mut self,
        batch: &[GenParams],
        control: &mut dyn GenControl,
    ) -> Vec<Result<Vec<u8>, GenFailure>> {
        let steps = batch.first().map_or(0, |p| p.steps as usize);
        for step in 1..=steps {
            if !(0..batch.len()).any(|i| control.wanted(i)) {
                return batch.iter().map(|_| Err(GenFailure::Cancelled)).collect();
            }
            if self.gate.recv().is_err() {
                return Vec::new();
            }
            control.step_done(step, steps, batch.len(), 0.0);
            let _ = self.reached.send(step);
        }
        batch
            .iter()
            .map(|p| Ok(sd35_http::backend::fake_png(p)))
            .collect()
    }
}

fn image(steps: u32) -> GenParams {
    GenParams {
        prompt: "p".into(),
        negative_prompt: String::new(),
        width: 16,
        height: 16,
        steps,
        guidance_scale: 3.5,
        seed: 0,
        ..Default::default()
    }
}

fn until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn gauges_follow_every_admitted_image_to_its_end() {
    let (gate, gate_rx) = channel();
    let (reached_tx, reached) = channel();
    let metrics = Arc::new(Metrics::new());
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    let backend = Gated {
        gate: gate_rx,
        reached: reached_tx,
    };
    let (queue, _worker) = Queue::start(
        Box::new(move || Ok(Box::new(backend) as Box<dyn Backend>)),
        QueueLimits {
            queue_size: 8,
            max_batch_size: 1,
        },
        metrics.clone(),
        loaded_tx,
    );
    assert!(loaded_rx.blocking_recv().is_ok_and(|r| r.is_ok()));
    let deadline = Instant::now() + Duration::from_secs(300);
    let gauges = || {
        (
            metrics.queue_depth.get(),
            metrics.images_in_flight.get(),
            metrics.steps_outstanding.get(),
        )
    };
    let mut first = queue
        .submit(vec![image(3)], deadline, "a")
        .expect("admitted");
    let second = queue
        .submit(vec![image(2)], deadline, "b")
        .expect("admitted");
    // Both admitted: 3 + 2 steps ahead; the first is on the model, waiting for its step 1.
    until("the first image on the model", || {
        metrics.images_in_flight.get() == 1
    });
    assert_eq!(gauges(), (2, 1, 5));
    for (step, outstanding) in [(1, 4), (2, 3)] {
        gate.send(()).expect("step");
        assert_eq!(reached.recv().expect("reached"), step);
        assert_eq!(gauges().2, outstanding, "after step {step}");
    }
    gate.send(()).expect("step");
    assert_eq!(reached.recv().expect("reached"), 3);
    let png = first.pop().expect("one").blocking_recv().expect("answered");
    assert!(png.is_ok());
    // The second image is on the model now; it alone is ahead.
    until("the second image on the model", || {
        metrics.queue_depth.get() == 1
    });
    until("the second image's steps", || gauges() == (1, 1, 2));
    // Its client goes away while it waits for step 1: the step runs, the rest never will.
    drop(second);
    gate.send(()).expect("step");
    assert_eq!(reached.recv().expect("reached"), 1);
    until("the cancelled image's end", || gauges() == (0, 0, 0));
    assert_eq!(metrics.images.get(), 1);
    assert_eq!(metrics.cancelled.get(), 1);
}
