//! HTTP serving of the Stable Diffusion 3.5 pipeline (`sd35-server serve`).
//!
//! Three layers, each usable on its own:
//! - [`backend`]: the model behind a small trait, with the candle pipeline ([`candle`]) and a
//!   deterministic fake for scheduling tests;
//! - [`queue`]: one dedicated model thread behind a bounded queue — admission control (429),
//!   per-request deadlines, dropping requests whose client went away, batching of same-shape
//!   requests;
//! - [`edge`]: the HTTP/1.1 connection loop — header-read timeout, a cap on connections being
//!   read, graceful shutdown;
//! - [`routes`]: the axum edge — request types and validation ([`api`]), one error→status
//!   table, auth, request ids, metrics, OpenAPI and the playground page; the request and
//!   response types, their bounds and validation are the `sd35-api` crate ([`api`]);
//! - [`artifacts`]: where images go when a client asks for URLs — a local directory served
//!   back on signed, expiring URLs, or an S3-compatible bucket with presigned URLs;
//! - [`encode`]: the answers' images in the format asked for (PNG, JPEG, WebP).
//!
//! [`server::run`] wires them from one [`config::ServeConfig`].

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

pub use config::ServeConfig;
pub use sd35_api as api;
pub use server::run;
