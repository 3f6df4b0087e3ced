//! The model crate's error type. Every variant names what a person needs to fix the problem:
//! the file, the tensor, the field.

use std::path::PathBuf;

/// Errors of the BLIP-2 model library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of the checkpoint could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// config.json (or another JSON file) is not what the reference accepts.
    #[error("invalid {path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A weight is missing or has the wrong shape.
    #[error("checkpoint {path}: tensor `{name}`: {message}")]
    Weight {
        path: PathBuf,
        name: String,
        message: String,
    },
    /// The tokenizer files are missing or inconsistent with the model.
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// The image could not be decoded, or breaks a limit.
    #[error("image: {0}")]
    Image(String),
    /// A request is not valid for this model (prompt, placeholders, parameters).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A checkpoint could not be fetched from the Hugging Face hub by repo id (feature `hub`).
    #[error("cannot download {repo}: {message}")]
    Hub { repo: String, message: String },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// A broken invariant of this library (never the caller's input): a tensor error, which
    /// the tiers report as INTERNAL.
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Error::Candle(candle_core::Error::Msg(message.into()))
    }

    /// A short label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Config { .. } => "config",
            Error::Weight { .. } => "weight",
            Error::Tokenizer { .. } => "tokenizer",
            Error::Image(_) => "image",
            Error::InvalidInput(_) => "invalid_input",
            Error::Hub { .. } => "hub",
            Error::Candle(_) => "tensor",
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
