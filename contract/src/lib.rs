//! The contract between the operator and `sd35-server`, kept in one place.
//!
//! The operator builds the command lines of its Jobs and serving pods from these types with
//! `to_args`; `sd35-server` parses the same types with clap. A round-trip test proves that
//! every command line the operator can build parses back to the same value, so the two sides
//! cannot drift. The cache layout (where weights, markers and engines live on the volume) and
//! the exit codes of `fetch`, `build-engine` and `serve`, the manifests written on the cache
//! volume, and the enums both sides share (variant, precision, device) are fixed here too, with
//! the failure both sides read ([`ExitError`]: an exit reason and the one-line cause written as
//! the container's termination message) and the small helpers both use ([`hex`], the checked
//! safetensors header reader [`read_safetensors_header`]).

mod args;
mod encode;
mod exit;
mod failure;
mod gpu;
mod layout;
mod manifest;
mod model;
pub mod plan;
mod safetensors;

pub use args::*;
pub use encode::*;
pub use exit::*;
pub use failure::*;
pub use gpu::*;
pub use layout::*;
pub use manifest::*;
pub use model::*;
pub use safetensors::*;
