//! The sd35-operator: reconciles `SD35Deployment`s into a cache claim filled by a fetch Job,
//! an engine built by a Job, and a serving Deployment with its Service, and reports status
//! that kubectl, Helm, Argo CD and Flux understand.
//!
//! Layout follows the reconcile pipeline: [`resolve`] (validate and default, pure) →
//! [`build`] (typed children, pure) → [`apply`] (every write, only what differs, one sweep of
//! what is no longer wanted) → [`status`] (pure) → [`reconcile`] (the client-side glue),
//! with [`index`]es over the watch caches, [`events`] for people, plus [`leader`] election and
//! the [`admin`] port.

pub mod admin;
pub mod apply;
pub mod build;
pub mod compact;
pub mod config;
pub mod events;
pub mod gpu;
pub mod index;
pub mod jobs;
pub mod keys;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod resolve;
pub mod status;
