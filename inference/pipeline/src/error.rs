//! One error type for loading and running the pipeline; messages say what to change.

use std::path::PathBuf;

/// Errors of the SD3.5 pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, unsupported dtype on this device, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file (config, index, tokenizer) is malformed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The model directory does not look like any supported layout.
    #[error("{0}")]
    Layout(String),
    /// A weight the architecture needs is missing from the checkpoint.
    #[error("missing weight `{0}` in the checkpoint")]
    MissingWeight(String),
    /// A tokenizer file is missing or invalid.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request parameter is out of range.
    #[error("invalid {field}: {message}")]
    InvalidRequest {
        /// The offending parameter.
        field: &'static str,
        /// Why it was rejected and what is accepted.
        message: String,
    },
    /// A prebuilt engine is incomplete, corrupt or of another format version.
    #[error("engine {path}: {message}")]
    Engine {
        /// The engine directory.
        path: PathBuf,
        /// What is wrong and what to do about it.
        message: String,
    },
    /// Writing the PNG failed.
    #[error("png: {0}")]
    Png(String),
    /// What was asked for contradicts what the engine or model is (variant, precision).
    #[error("{0}")]
    Mismatch(String),
    /// The device asked for is not usable.
    #[error("{0}")]
    Device(String),
}

impl Error {
    /// The documented exit code a command that fails with this error ends with.
    pub fn exit_reason(&self) -> sd35_contract::ExitReason {
        use sd35_contract::ExitReason;
        match self {
            Error::Mismatch(_) => ExitReason::EngineMismatch,
            Error::Device(_) => ExitReason::GpuUnavailable,
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => ExitReason::NotFound,
                std::io::ErrorKind::PermissionDenied => ExitReason::PermissionDenied,
                _ => ExitReason::InvalidModel,
            },
            Error::InvalidRequest { .. } => ExitReason::Usage,
            _ => ExitReason::InvalidModel,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            field,
            message: message.into(),
        }
    }
}

/// Reads and parses a JSON file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}
