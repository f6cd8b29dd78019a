//! HTTP serving of the Stable Diffusion 3.5 pipeline (`sd35-server serve`).
//!
//! The layers, each usable on its own:
//! - [`backend`]: the model behind a small trait, with the candle pipeline ([`candle`]; a
//!   request becomes the pipeline's through [`to_pipeline`], as `generate`'s does) and a
//!   deterministic fake for scheduling tests;
//! - [`queue`]: one dedicated model thread behind a bounded queue — admission control (429),
//!   per-request deadlines, dropping requests whose client went away, batching of requests of
//!   the same shape, adapters and ControlNet condition;
//! - [`edge`]: the HTTP/1.1 connection loop — header-read timeout, a cap on connections being
//!   read, graceful shutdown;
//! - [`routes`]: the axum router built from one route table, with auth, request ids, metrics,
//!   the OpenAPI document ([`openapi`]) and the playground page; the handlers read and validate
//!   bodies with the request and response types, bounds and validation of the `sd35-api`
//!   crate ([`api`]), and share the server's [`state`] (the OpenAPI document made once before
//!   the model loads and once after);
//! - [`artifacts`]: where images go when a client asks for URLs — a local directory served
//!   back on signed, expiring URLs, or an S3-compatible bucket with presigned URLs;
//! - [`encode`]: the answers' images in the format asked for (PNG, JPEG, WebP).
//!
//! [`server::run`] wires them from one [`config::ServeConfig`], the configuration from the
//! command line down to the pipeline's options.

pub mod artifacts;
pub mod auth;
pub mod backend;
pub mod candle;
pub mod client;
pub mod config;
pub mod edge;
pub mod encode;
mod handlers;
pub mod metrics;
pub mod openapi;
pub mod queue;
pub mod routes;
pub mod sample_images;
pub mod server;
pub mod state;
pub mod to_pipeline;

pub use config::ServeConfig;
pub use sd35_api as api;
pub use server::run;

/// Now, in Unix seconds (0 before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
