//! Errors of the command-line tool.

use thiserror::Error;

/// Why a command failed.
#[derive(Debug, Error)]
pub enum CliError {
    /// The op rejected its inputs.
    #[error(transparent)]
    Retention(#[from] retention::RetentionError),
    /// Training data, model, checkpoint or plot failed.
    #[error(transparent)]
    Model(#[from] retention_models::ModelError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A safetensors file is malformed.
    #[error("{path}: not a valid safetensors file: {message}")]
    Format {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A required tensor is absent.
    #[error("{path}: missing tensor `{name}` (found: {found})")]
    MissingTensor {
        /// The file.
        path: String,
        /// The missing name.
        name: String,
        /// Names present.
        found: String,
    },
    /// A tensor has an element type the tool cannot read.
    #[error("{path}: tensor `{name}` has dtype {dtype}; expected F32, F16 or BF16")]
    Dtype {
        /// The file.
        path: String,
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// The device failed while executing or reading back.
    #[error("device error: {0}")]
    Device(String),
    /// The kernel-vs-oracle suite found disagreements.
    #[error("selftest failed:\n{0}")]
    SelftestFailed(String),
    /// The backend does not compute in the requested input dtype.
    #[error("backend `{backend}` does not take {dtype:?} inputs; use one of {supported}")]
    UnsupportedDtype {
        /// The backend.
        backend: String,
        /// The dtype asked for.
        dtype: burn::tensor::DType,
        /// What it takes.
        supported: String,
    },
    /// A benchmark CSV is malformed or holds nothing to draw.
    #[error("{0}")]
    Input(String),
    /// Drawing a chart failed.
    #[error("plot: {0}")]
    Plot(String),
    /// The requested backend is not compiled into this binary.
    #[error(
        "backend `{0}` is not compiled in; rebuild with `--features {0}` (see docs/backends.md)"
    )]
    BackendMissing(String),
}
