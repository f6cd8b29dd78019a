//! Exit codes of `sd35-server fetch`, `build-engine` and `serve`.
//!
//! Each failure a person must act on has its own code, so the operator can name the cause in
//! a condition reason without reading logs, and can fail a Job at once (no retries) when a
//! retry cannot help.

/// A distinct, documented way for `fetch` or `build-engine` to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// Bad command line (clap's own code).
    Usage,
    /// 401/403 from the source: missing or wrong token, or a gated model whose licence was not
    /// accepted.
    Unauthorized,
    /// 404 from the source: wrong repository, revision, URL or path.
    NotFound,
    /// The volume is full.
    DiskFull,
    /// The volume or a file cannot be written or read.
    PermissionDenied,
    /// A file's sha256 does not match its manifest, after retries.
    ChecksumMismatch,
    /// Network errors or stalled transfers, after retries.
    Network,
    /// The model files are not a layout the server understands, or an engine is corrupt.
    InvalidModel,
    /// `serve --device cuda` found no usable GPU (no driver, no device, or a build without
    /// CUDA).
    GpuUnavailable,
    /// The engine is not what the command line asks for (variant, precision or format).
    EngineMismatch,
}

impl ExitReason {
    /// Every reason, for tables and tests.
    pub const ALL: [ExitReason; 10] = [
        ExitReason::Usage,
        ExitReason::Unauthorized,
        ExitReason::NotFound,
        ExitReason::DiskFull,
        ExitReason::PermissionDenied,
        ExitReason::ChecksumMismatch,
        ExitReason::Network,
        ExitReason::InvalidModel,
        ExitReason::GpuUnavailable,
        ExitReason::EngineMismatch,
    ];

    /// The process exit code.
    pub const fn code(self) -> i32 {
        match self {
            ExitReason::Usage => 2,
            ExitReason::Unauthorized => 10,
            ExitReason::NotFound => 11,
            ExitReason::DiskFull => 12,
            ExitReason::PermissionDenied => 13,
            ExitReason::ChecksumMismatch => 14,
            ExitReason::Network => 15,
            ExitReason::InvalidModel => 16,
            ExitReason::GpuUnavailable => 17,
            ExitReason::EngineMismatch => 18,
        }
    }

    /// The reason for an exit code, if it is one of ours.
    pub fn from_code(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// A CamelCase word for condition reasons and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            ExitReason::Usage => "InvalidArguments",
            ExitReason::Unauthorized => "Unauthorized",
            ExitReason::NotFound => "NotFound",
            ExitReason::DiskFull => "DiskFull",
            ExitReason::PermissionDenied => "PermissionDenied",
            ExitReason::ChecksumMismatch => "ChecksumMismatch",
            ExitReason::Network => "NetworkError",
            ExitReason::InvalidModel => "InvalidModel",
            ExitReason::GpuUnavailable => "GPUUnavailable",
            ExitReason::EngineMismatch => "EngineMismatch",
        }
    }

    /// Whether running the same command again could succeed.
    pub const fn retriable(self) -> bool {
        matches!(self, ExitReason::ChecksumMismatch | ExitReason::Network)
    }

    /// What a person should do about it.
    pub const fn hint(self) -> &'static str {
        match self {
            ExitReason::Usage => {
                "this is a bug in the operator or a version mismatch between operator and server image"
            }
            ExitReason::Unauthorized => {
                "check the token Secret and, for gated models, accept the licence on the model page with that account"
            }
            ExitReason::NotFound => {
                "check the repository, revision, URL or path in spec.model.source"
            }
            ExitReason::DiskFull => "raise spec.cache.size (or use a larger existing claim)",
            ExitReason::PermissionDenied => {
                "the cache volume is not writable by the Job's user; check the StorageClass and fsGroup"
            }
            ExitReason::ChecksumMismatch => {
                "the source serves files that do not match their manifest; check the mirror"
            }
            ExitReason::Network => {
                "the source was unreachable or stalled; check network policies, proxies and the endpoint"
            }
            ExitReason::InvalidModel => {
                "the files are not an SD3.5 model in the diffusers or single-file layout"
            }
            ExitReason::GpuUnavailable => {
                "the pod got no usable GPU: check the node's NVIDIA driver and device plugin, the \
                 pod's runtimeClassName, and that the image is the CUDA flavour"
            }
            ExitReason::EngineMismatch => {
                "the engine was built for another variant, precision or format; delete it to \
                 have it rebuilt, or fix spec.variant / spec.precision"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_round_trip() {
        let mut seen = std::collections::BTreeSet::new();
        for reason in ExitReason::ALL {
            assert!(
                seen.insert(reason.code()),
                "{reason:?} reuses code {}",
                reason.code()
            );
            assert_eq!(ExitReason::from_code(reason.code()), Some(reason));
        }
        assert_eq!(ExitReason::from_code(0), None);
        assert_eq!(ExitReason::from_code(1), None);
    }
}
