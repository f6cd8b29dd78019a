//! Which operations the pipeline runs, and how large any one of them may be.
//!
//! Two op graphs compute the same model:
//! - **fused**: on the CPU in f32, attention, norms with their modulation, bias + GELU and gated
//!   residuals take the fused kernels of [`crate::attention`] and [`crate::fused`], and f32
//!   weights are kept transposed;
//! - **generic**: only candle's own operations, which every device has — the graph CUDA runs.
//!
//! CUDA always runs the generic graph. The CPU runs the fused one unless `SD35_GENERIC_OPS=1`,
//! so the tests and the goldens can run, on the CPU, exactly the operations a GPU executes.
//! The choice is made once per process: `generate` and `serve` read the environment at
//! start-up ([`OpGraph::from_env`], [`install`]); a library user that never installs one gets
//! the environment's choice on first use.
//!
//! **Chunking.** Some of candle's CUDA kernels index with 32-bit integers: the last-dimension
//! softmax (`int i = row * ncols + col`, wrong from 2³¹ elements), im2col (a `u32` launch size,
//! wrong from 2³² elements) and the element-wise kernels (an `unsigned int` loop index). Every
//! operation whose size grows with the request — the attention scores, the convolutions'
//! im2col buffer — is therefore split so that no single call exceeds
//! [`OpGraph::chunk_elements`], [`DEFAULT_CHUNK_ELEMENTS`] (2²⁶) unless overridden: far below
//! every kernel limit, and a bound on the largest temporary buffer (the memory plan counts on
//! it). Chunks are exact: attention is split by query rows and convolutions by output rows, so
//! every output value is computed by the same arithmetic as unchunked. The tests shrink the
//! chunk size (`SD35_OP_CHUNK_ELEMENTS`) so that even the tiny models take the chunked route.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Tensor;

use crate::{Error, Result};

/// The environment variable that selects the generic op graph on the CPU (`1`), or not (`0`,
/// empty or unset).
pub const GENERIC_OPS_ENV: &str = "SD35_GENERIC_OPS";
/// The environment variable that overrides [`DEFAULT_CHUNK_ELEMENTS`] (tests shrink it so the
/// tiny models are chunked too).
pub const CHUNK_ELEMENTS_ENV: &str = "SD35_OP_CHUNK_ELEMENTS";

pub use sd35_contract::plan::{CUDA_ELEMENTWISE_LIMIT, CUDA_SOFTMAX_LIMIT, DEFAULT_CHUNK_ELEMENTS};

/// The process's op graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpGraph {
    /// Only candle's generic operations, on every device (always so on CUDA).
    pub generic: bool,
    /// The most elements one chunked operation may create (attention scores, im2col).
    pub chunk_elements: usize,
}

impl Default for OpGraph {
    fn default() -> Self {
        Self {
            generic: false,
            chunk_elements: DEFAULT_CHUNK_ELEMENTS,
        }
    }
}

impl OpGraph {
    /// The graph `SD35_GENERIC_OPS` and `SD35_OP_CHUNK_ELEMENTS` ask for; a value that is not
    /// understood is an error naming the variable and what it accepts.
    pub fn from_env() -> Result<Self> {
        Self::parse(
            std::env::var(GENERIC_OPS_ENV).ok().as_deref(),
            std::env::var(CHUNK_ELEMENTS_ENV).ok().as_deref(),
        )
    }

    fn parse(generic: Option<&str>, chunk: Option<&str>) -> Result<Self> {
        let generic = match generic.map(str::trim) {
            None | Some("" | "0" | "false") => false,
            Some("1" | "true") => true,
            Some(other) => {
                return Err(Error::Layout(format!(
                    "{GENERIC_OPS_ENV}={other:?}: set it to 1 (generic ops) or 0 (fused CPU \
                     kernels)"
                )));
            }
        };
        let chunk_elements = match chunk.map(str::trim) {
            None | Some("") => DEFAULT_CHUNK_ELEMENTS,
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=DEFAULT_CHUNK_ELEMENTS).contains(&n) => n,
                _ => {
                    return Err(Error::Layout(format!(
                        "{CHUNK_ELEMENTS_ENV}={text:?}: set it to a whole number from 1 to \
                         {DEFAULT_CHUNK_ELEMENTS}"
                    )));
                }
            },
        };
        Ok(Self {
            generic,
            chunk_elements,
        })
    }

    /// A word for logs and `/v1/models`: `fused-cpu` or `generic`.
    pub fn name(&self) -> &'static str {
        if self.generic { "generic" } else { "fused-cpu" }
    }
}

static CHOSEN: OnceLock<OpGraph> = OnceLock::new();

/// Makes `graph` the process's op graph. The first choice stands: installing a different one
/// later is an error (the models may already have been loaded for the first).
pub fn install(graph: OpGraph) -> Result<OpGraph> {
    let chosen = *CHOSEN.get_or_init(|| graph);
    if chosen != graph {
        return Err(Error::Layout(format!(
            "the op graph is already {chosen:?}; it is chosen once per process"
        )));
    }
    Ok(chosen)
}

/// The process's op graph: the installed one, else the environment's (an unreadable
/// environment falls back to the default, the fused CPU kernels).
pub fn current() -> OpGraph {
    *CHOSEN.get_or_init(|| OpGraph::from_env().unwrap_or_default())
}

/// Whether `t` may take a fused CPU kernel: it lives on the CPU and the generic graph was not
/// asked for. (Each kernel also checks its dtypes.)
pub fn fused_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && !current().generic
}

static CHUNKED_CALLS: AtomicUsize = AtomicUsize::new(0);

/// How many operations were split into more than one chunk in this process (tests check that
/// the chunked routes really ran).
pub fn chunked_calls() -> usize {
    CHUNKED_CALLS.load(Ordering::Relaxed)
}

pub(crate) fn note_chunked() {
    CHUNKED_CALLS.fetch_add(1, Ordering::Relaxed);
}

/// The most rows of a split dimension one chunk may hold when each row costs `row_elements`
/// and a chunk may create `limit` elements: at least 1 (a single row over the limit is the
/// caller's to refuse), at most `rows`.
pub fn rows_per_chunk(rows: usize, row_elements: usize, limit: usize) -> usize {
    (limit / row_elements.max(1)).clamp(1, rows.max(1))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_environment_is_read_strictly() {
        assert_eq!(OpGraph::parse(None, None).unwrap(), OpGraph::default());
        let generic = OpGraph::parse(Some("1"), Some("4096")).unwrap();
        assert!(generic.generic);
        assert_eq!(generic.chunk_elements, 4096);
        assert!(!OpGraph::parse(Some("0"), None).unwrap().generic);
        for bad in [Some("yes"), Some("2")] {
            let err = OpGraph::parse(bad, None).err().map(|e| e.to_string());
            assert!(err.is_some_and(|e| e.contains(GENERIC_OPS_ENV)));
        }
        for bad in ["0", "-3", "x", "67108865"] {
            let err = OpGraph::parse(None, Some(bad)).err().map(|e| e.to_string());
            assert!(err.is_some_and(|e| e.contains(CHUNK_ELEMENTS_ENV)), "{bad}");
        }
    }

    #[test]
    fn chunks_hold_at_least_one_row_and_at_most_all() {
        assert_eq!(rows_per_chunk(100, 10, 1000), 100);
        assert_eq!(rows_per_chunk(100, 10, 95), 9);
        assert_eq!(rows_per_chunk(100, 10, 5), 1);
        assert_eq!(rows_per_chunk(0, 10, 5), 1);
    }

    #[test]
    fn the_default_chunk_is_far_below_every_kernel_limit() {
        const { assert!(DEFAULT_CHUNK_ELEMENTS * 32 <= CUDA_SOFTMAX_LIMIT) };
        const { assert!(CUDA_SOFTMAX_LIMIT < CUDA_ELEMENTWISE_LIMIT) };
    }
}
