//! The model thread and its bounded queue.
//!
//! Guarantees: at most `queue_size` images wait at any time (admission beyond that fails
//! at once, so memory stays bounded); a request whose client went away or whose deadline
//! passed is dropped before compute is spent on it and stops at the next step when already
//! running; waiting requests with the same shape run together, up to `max_batch_size` and
//! never more than the memory plan lets fit, in arrival order of the oldest; a request that asks for previews gets them on its channel
//! while it is sampled.
//!
//! The gauges `sd35_queue_depth` (images admitted and not finished), `sd35_images_in_flight`
//! (images being sampled now) and `sd35_steps_outstanding` (sampling steps still to run for
//! every admitted image) are kept here, at admission, at each step and at each answer.

use std::collections::VecDeque;
use std::sync::{Arc, mpsc};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::backend::{Backend, GenControl, GenFailure, GenParams, ModelInfo, StepControl};
use crate::metrics::Metrics;

/// Why a job could not be admitted or finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// The queue is full.
    Full,
    /// The model thread is gone (shutting down or crashed).
    Closed,
    /// The deadline passed.
    Timeout,
    /// The model failed.
    Failed(String),
}

/// The result of one image.
pub type ImageResult = Result<Vec<u8>, QueueError>;

/// A preview of one image of a request, made while it is sampled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partial {
    /// Which image of the request (0-based).
    pub image: usize,
    /// 0, 1, … in the order the previews of that image are made.
    pub index: u32,
    /// The sampling step it shows.
    pub step: usize,
    /// The PNG.
    pub png: Vec<u8>,
}

/// Previews a request wants: up to `count` per image, sent on `tx` as they are made.
#[derive(Debug, Clone)]
pub struct PreviewRequest {
    /// Previews per image (fewer when the image has too few steps).
    pub count: u32,
    /// Where they go.
    pub tx: tokio::sync::mpsc::UnboundedSender<Partial>,
}

/// The steps after which `count` previews of a `steps`-step image are made: spread evenly,
/// never the last step (that is the image itself), each at most once.
pub fn preview_steps(steps: u32, count: u32) -> Vec<usize> {
    let (steps, count) = (u64::from(steps), u64::from(count));
    let mut out: Vec<usize> = (1..=count)
        .map(|k| (2 * k * steps + count + 1) / (2 * (count + 1)))
        .filter(|&s| s >= 1 && s < steps)
        .map(|s| s as usize)
        .collect();
    out.dedup();
    out
}

struct JobPreviews {
    steps: Vec<usize>,
    image: usize,
    tx: tokio::sync::mpsc::UnboundedSender<Partial>,
}

struct Job {
    params: GenParams,
    enqueued: Instant,
    deadline: Instant,
    request_id: String,
    reply: oneshot::Sender<ImageResult>,
    previews: Option<JobPreviews>,
    _permit: OwnedSemaphorePermit,
}

impl Job {
    fn abandoned(&self) -> bool {
        self.reply.is_closed() || Instant::now() >= self.deadline
    }
}

/// Sends jobs to the model thread.
#[derive(Debug, Clone)]
pub struct Queue {
    tx: mpsc::Sender<Job>,
    permits: Arc<Semaphore>,
    capacity: usize,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

/// Queue limits.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Images that may wait.
    pub queue_size: usize,
    /// Images sampled together at most.
    pub max_batch_size: usize,
}

/// How the model thread starts: load (slow), then optionally warm up.
pub type LoadFn = Box<dyn FnOnce() -> anyhow::Result<Box<dyn Backend>> + Send>;

impl Queue {
    /// Starts the model thread, which first runs `load`; `loaded` receives the model's info
    /// (or the load error) once it is ready to take work.
    pub fn start(
        load: LoadFn,
        limits: QueueLimits,
        metrics: Arc<Metrics>,
        loaded: oneshot::Sender<anyhow::Result<ModelInfo>>,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Job>();
        let capacity = limits.queue_size.max(1);
        let permits = Arc::new(Semaphore::new(capacity));
        let worker_metrics = metrics.clone();
        let depth = Depth {
            permits: permits.clone(),
            capacity,
        };
        let max_batch = limits.max_batch_size.max(1);
        let handle = std::thread::Builder::new()
            .name("sd35-model".into())
            .spawn(move || match load() {
                Ok(backend) => {
                    let info = backend.info();
                    if loaded.send(Ok(info)).is_ok() {
                        worker(backend, rx, max_batch, &worker_metrics, &depth);
                    }
                }
                Err(e) => {
                    let _ = loaded.send(Err(e));
                }
            })
            .unwrap_or_else(|e| panic!("cannot start the model thread: {e}"));
        (
            Self {
                tx,
                permits,
                capacity,
                metrics,
            },
            handle,
        )
    }

    /// Images admitted and not finished (waiting or being generated).
    pub fn depth(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    /// Enqueues the images of one request, all or none; fails at once with
    /// [`QueueError::Full`] when they do not fit. Each receiver yields one image.
    pub fn submit(
        &self,
        images: Vec<GenParams>,
        deadline: Instant,
        request_id: &str,
    ) -> Result<Vec<oneshot::Receiver<ImageResult>>, QueueError> {
        self.submit_with_previews(images, deadline, request_id, None)
    }

    /// [`Queue::submit`], with previews of every image sent as they are made.
    pub fn submit_with_previews(
        &self,
        images: Vec<GenParams>,
        deadline: Instant,
        request_id: &str,
        previews: Option<PreviewRequest>,
    ) -> Result<Vec<oneshot::Receiver<ImageResult>>, QueueError> {
        let n = u32::try_from(images.len()).map_err(|_| QueueError::Full)?;
        let mut permit = self
            .permits
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| QueueError::Full)?;
        let mut permits = Vec::with_capacity(images.len());
        for _ in 1..n {
            permits.push(permit.split(1).ok_or(QueueError::Full)?);
        }
        permits.push(permit);
        let mut out = Vec::with_capacity(images.len());
        for (image, (params, one)) in images.into_iter().zip(permits).enumerate() {
            let (reply, rx) = oneshot::channel();
            // An edit runs the tail of its schedule: these are the steps it costs and reports.
            let steps = params.sampled_steps();
            let job = Job {
                previews: previews.as_ref().map(|p| JobPreviews {
                    steps: preview_steps(steps, p.count),
                    image,
                    tx: p.tx.clone(),
                }),
                params,
                enqueued: Instant::now(),
                deadline,
                request_id: request_id.to_owned(),
                reply,
                _permit: one,
            };
            self.tx.send(job).map_err(|_| QueueError::Closed)?;
            self.metrics.steps_outstanding.inc_by(i64::from(steps));
            out.push(rx);
        }
        self.metrics.queue_depth.set(self.depth() as i64);
        Ok(out)
    }
}

/// Images admitted and not finished.
struct Depth {
    permits: Arc<Semaphore>,
    capacity: usize,
}

impl Depth {
    fn now(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }
}

struct Control<'a> {
    jobs: &'a [Job],
    metrics: &'a Metrics,
    /// Whether each item was wanted when last asked (before each step).
    live: Vec<bool>,
    /// Steps run for each item.
    done: Vec<u32>,
}

impl StepControl for Control<'_> {
    fn wanted(&mut self, index: usize) -> bool {
        let wanted = self.jobs.get(index).is_some_and(|j| !j.abandoned());
        if let Some(l) = self.live.get_mut(index) {
            *l = wanted;
        }
        wanted
    }

    fn step_done(&mut self, _step: usize, _steps: usize, batch: usize, seconds: f64) {
        self.metrics.step_done(batch, seconds);
        let mut ran = 0;
        for (live, done) in self.live.iter().zip(&mut self.done) {
            if *live {
                *done += 1;
                ran += 1;
            }
        }
        self.metrics.steps_outstanding.dec_by(ran);
    }

    fn preview_wanted(&mut self, index: usize, step: usize, _steps: usize) -> bool {
        self.jobs
            .get(index)
            .and_then(|j| j.previews.as_ref())
            .is_some_and(|p| p.steps.contains(&step))
    }
}

impl GenControl for Control<'_> {
    fn partial_image(&mut self, index: usize, step: usize, png: Vec<u8>) {
        let Some(p) = self.jobs.get(index).and_then(|j| j.previews.as_ref()) else {
            return;
        };
        if let Some(n) = p.steps.iter().position(|&s| s == step) {
            // A client that went away is noticed at the next step; nothing to do here.
            let _ = p.tx.send(Partial {
                image: p.image,
                index: n as u32,
                step,
                png,
            });
        }
    }
}

fn worker(
    mut backend: Box<dyn Backend>,
    rx: mpsc::Receiver<Job>,
    max_batch: usize,
    metrics: &Metrics,
    depth: &Depth,
) {
    let mut pending: VecDeque<Job> = VecDeque::new();
    // Batches never group more images than the memory plan lets fit beside the model.
    let gate = backend.info().memory;
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(job) => pending.push_back(job),
                Err(_) => return, // every sender is gone: the server is done
            }
        }
        while let Ok(job) = rx.try_recv() {
            pending.push_back(job);
        }
        // Drop what nobody waits for before spending compute on it.
        pending.retain(|j| {
            if j.abandoned() {
                metrics.cancelled.inc();
                metrics.steps_outstanding.dec_by(i64::from(j.params.sampled_steps()));
                tracing::info!(request_id = %j.request_id, "dropped from the queue: client gone or deadline passed");
                false
            } else {
                true
            }
        });
        let Some(head) = pending.pop_front() else {
            continue;
        };
        let key = head.params.batch_key();
        let (width, height) = (head.params.width, head.params.height);
        let guidance = head.params.guidance_scale > 1.0;
        let fits = |n: usize| {
            gate.as_ref()
                .is_none_or(|g| g.fits(width, height, n, guidance))
        };
        let mut batch = vec![head];
        let mut i = 0;
        while batch.len() < max_batch && fits(batch.len() + 1) && i < pending.len() {
            if pending[i].params.batch_key() == key {
                if let Some(j) = pending.remove(i) {
                    batch.push(j);
                }
            } else {
                i += 1;
            }
        }
        let now = Instant::now();
        for j in &batch {
            metrics
                .queue_seconds
                .observe(now.duration_since(j.enqueued).as_secs_f64());
        }
        metrics.batch_size.observe(batch.len() as f64);
        metrics.images_in_flight.set(batch.len() as i64);
        let params: Vec<GenParams> = batch.iter().map(|j| j.params.clone()).collect();
        let (results, done) = {
            let mut control = Control {
                jobs: &batch,
                metrics,
                live: vec![false; batch.len()],
                done: vec![0; batch.len()],
            };
            let results = backend.generate(&params, &mut control);
            (results, control.done)
        };
        for ((job, result), done) in batch.into_iter().zip(results).zip(done) {
            // Steps it will never run (cancelled early, or a backend that ran fewer).
            metrics
                .steps_outstanding
                .dec_by(i64::from(job.params.sampled_steps().saturating_sub(done)));
            metrics.images_in_flight.dec();
            let reply = match result {
                Ok(png) => {
                    metrics.images.inc();
                    Ok(png)
                }
                Err(GenFailure::Cancelled) => {
                    metrics.cancelled.inc();
                    tracing::info!(request_id = %job.request_id, "generation stopped: client gone or deadline passed");
                    Err(if Instant::now() >= job.deadline {
                        QueueError::Timeout
                    } else {
                        QueueError::Closed
                    })
                }
                Err(GenFailure::Failed(msg)) => {
                    tracing::error!(request_id = %job.request_id, error = %msg, "generation failed");
                    Err(QueueError::Failed(msg))
                }
            };
            // Free the queue slot before answering, so the client may reuse it at once.
            let Job {
                reply: tx, _permit, ..
            } = job;
            drop(_permit);
            let _ = tx.send(reply);
        }
        metrics.queue_depth.set(depth.now() as i64);
    }
}

/// Seconds a client should wait before retrying a full queue, from the queue's size and
/// the recent step time.
pub fn retry_after(depth: usize, max_batch: usize, step_seconds: f64, steps: u32) -> u64 {
    let batches = depth.div_ceil(max_batch.max(1)) as f64;
    let per_batch = step_seconds.max(0.01) * f64::from(steps.max(1));
    (batches * per_batch).ceil().clamp(1.0, 120.0) as u64
}
