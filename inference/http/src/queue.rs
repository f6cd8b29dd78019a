//! The model thread and its bounded queue.
//!
//! Guarantees: at most `queue_size` images wait at any time (admission beyond that fails
//! at once, so memory stays bounded); a request whose client went away or whose deadline
//! passed is dropped before compute is spent on it and stops at the next step when already
//! running; waiting requests with the same shape run together, up to `max_batch_size`, in
//! arrival order of the oldest.

use std::collections::VecDeque;
use std::sync::{Arc, mpsc};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::backend::{Backend, GenFailure, GenParams, ModelInfo, StepControl};
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

struct Job {
    params: GenParams,
    enqueued: Instant,
    deadline: Instant,
    request_id: String,
    reply: oneshot::Sender<ImageResult>,
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
        let m = metrics.clone();
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
                        worker(backend, rx, max_batch, &m, &depth);
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
        for (params, one) in images.into_iter().zip(permits) {
            let (reply, rx) = oneshot::channel();
            let job = Job {
                params,
                enqueued: Instant::now(),
                deadline,
                request_id: request_id.to_owned(),
                reply,
                _permit: one,
            };
            self.tx.send(job).map_err(|_| QueueError::Closed)?;
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
}

impl StepControl for Control<'_> {
    fn wanted(&mut self, index: usize) -> bool {
        self.jobs.get(index).is_some_and(|j| !j.abandoned())
    }

    fn step_done(&mut self, _step: usize, _steps: usize, batch: usize, seconds: f64) {
        self.metrics.step_done(batch, seconds);
    }
}

fn worker(
    mut backend: Box<dyn Backend>,
    rx: mpsc::Receiver<Job>,
    max_batch: usize,
    m: &Metrics,
    depth: &Depth,
) {
    let mut pending: VecDeque<Job> = VecDeque::new();
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
                m.cancelled.inc();
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
        let mut batch = vec![head];
        let mut i = 0;
        while batch.len() < max_batch && i < pending.len() {
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
            m.queue_seconds
                .observe(now.duration_since(j.enqueued).as_secs_f64());
        }
        m.batch_size.observe(batch.len() as f64);
        let params: Vec<GenParams> = batch.iter().map(|j| j.params.clone()).collect();
        let results = {
            let mut control = Control {
                jobs: &batch,
                metrics: m,
            };
            backend.generate(&params, &mut control)
        };
        for (job, result) in batch.into_iter().zip(results) {
            let reply = match result {
                Ok(png) => {
                    m.images.inc();
                    Ok(png)
                }
                Err(GenFailure::Cancelled) => {
                    m.cancelled.inc();
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
        m.queue_depth.set(depth.now() as i64);
    }
}

/// Seconds a client should wait before retrying a full queue, from the queue's size and
/// the recent step time.
pub fn retry_after(depth: usize, max_batch: usize, step_seconds: f64, steps: u32) -> u64 {
    let batches = depth.div_ceil(max_batch.max(1)) as f64;
    let per_batch = step_seconds.max(0.01) * f64::from(steps.max(1));
    (batches * per_batch).ceil().clamp(1.0, 120.0) as u64
}
