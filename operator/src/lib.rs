//! The sd35-operator: reconciles `SD35Deployment`s into a cache claim filled by a fetch Job,
//! an engine built by a Job, and a serving Deployment with its Service, and reports status
//! that kubectl, Helm, Argo CD and Flux understand.
//!
//! Layout follows the reconcile pipeline: [`resolve`] (validate and default, pure) →
//! [`children`] (typed children, pure) → [`apply`] (every write, only what differs, one sweep
//! of what is no longer wanted) → [`status`] (pure). The pure decisions of the steps sit
//! beside them: [`jobs`] (where a fetch or build Job stands), [`claims`] (what the cache claim
//! says and records), [`pods`] (how a container ended, in its own words). The [`controller`]
//! holds the client side: its watches, caches and [`index`]es, and the reconciler's steps.
//! Around it: [`events`] for people, [`leader`] election and the [`admin`] port.

pub mod admin;
pub mod apply;
pub mod children;
pub mod claims;
pub mod compact;
pub mod config;
pub mod controller;
pub mod events;
pub mod gpu;
pub mod index;
pub mod jobs;
pub mod keys;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod pods;
pub mod resolve;
pub mod status;
