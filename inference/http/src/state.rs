//! What every handler shares: the server's state, and what the router puts in a request's
//! extensions for them (its id, its body limit).

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::api::Limits;
use crate::artifacts::{ArtifactStore, LocalStore};
use crate::auth::Tokens;
use crate::metrics::Metrics;
use crate::queue::Queue;

/// Shared state of the handlers.
#[derive(Debug)]
pub struct AppState {
    /// The model queue.
    pub queue: Queue,
    /// Set once the model is loaded and warmed up.
    pub limits: OnceLock<Limits>,
    /// Set when shutdown began: readiness fails and new work is refused.
    pub draining: AtomicBool,
    /// Turns `true` when the drain deadline passes: every request still waiting for the
    /// model is answered 503 at once.
    pub drain_expired: tokio::sync::watch::Sender<bool>,
    /// Requests answered 503 because the drain deadline passed.
    pub cut_at_drain: AtomicU64,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Accepted bearer tokens.
    pub tokens: Tokens,
    /// Per-request deadline.
    pub request_timeout: Duration,
    /// How long a client may take to send a request body.
    pub body_read_timeout: Duration,
    /// Images per batch at most.
    pub max_batch_size: usize,
    /// Log prompts.
    pub log_prompts: bool,
    /// Largest body of the text and JSON routes.
    pub max_body_bytes: usize,
    /// Largest body of the routes that take an image ([`crate::routes::Route::upload`]).
    pub max_upload_bytes: usize,
    /// Largest prompt in bytes (for the document served before the model is loaded).
    pub max_prompt_bytes: usize,
    /// When the server started, in Unix seconds (the models' `created`).
    pub started_unix: u64,
    /// Where images are stored when a client asks for URLs; `None`: nowhere.
    pub artifacts: Option<Arc<dyn ArtifactStore>>,
    /// The local store, whose files `GET /v1/artifacts/{name}` serves.
    pub local_artifacts: Option<Arc<LocalStore>>,
    /// Base URL of this server for locally stored artifacts (unset: from the Host header).
    pub public_url: Option<String>,
    /// The model name `POST /sdapi/v1/options` chose last (unset: the primary name).
    pub checkpoint: Mutex<Option<String>>,
    /// Uploads being decoded at once, at most ([`DECODING_AT_ONCE`]): decoding one may take
    /// hundreds of megabytes, so a burst of uploads waits here instead of adding up.
    pub decoding: tokio::sync::Semaphore,
    /// The OpenAPI document with the bounds known before the model is loaded.
    pub document_before_load: serde_json::Value,
    /// The OpenAPI document with the loaded model's bounds, set with [`AppState::limits`].
    pub document: OnceLock<serde_json::Value>,
}

impl AppState {
    /// The OpenAPI document as it stands: the loaded model's once it is loaded.
    pub fn openapi(&self) -> &serde_json::Value {
        self.document.get().unwrap_or(&self.document_before_load)
    }
}

/// Uploads decoded at once, at most.
pub const DECODING_AT_ONCE: usize = 2;

/// The body limit of a route and the flag that sets it, in the request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit {
    /// Largest body in bytes.
    pub bytes: usize,
    /// The flag that sets it.
    pub flag: &'static str,
}

/// The request id of the current request, put in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);
