//! The errors of model building, data preparation and training.

use retention::RetentionError;

/// What can go wrong while preparing data, building, training or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A mixer rejected its configuration or input (see [`RetentionError`]).
    #[error(transparent)]
    Retention(#[from] RetentionError),
    /// A configuration value is out of range: which, and why.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Token ids given to the model lie outside its vocabulary.
    #[error("tokens: {count} of the ids lie outside 0..{vocab_size}")]
    TokenIds {
        /// The model's vocabulary size.
        vocab_size: usize,
        /// How many ids lie outside it.
        count: usize,
    },
    /// The corpus could not be read or produced.
    #[error("corpus: {0}")]
    Corpus(String),
    /// The tokenizer failed to train, load, save or encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Saving or loading a checkpoint failed.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint's file.
        path: String,
        /// The cause.
        message: String,
    },
    /// Drawing the loss plot failed.
    #[error("plot: {0}")]
    Plot(String),
    /// A GGUF file is not valid or lacks what was asked of it: what, and where.
    #[error("GGUF: {0}")]
    Gguf(String),
}

impl ModelError {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}
