//! The tier's error type and its one mapping to `tonic::Status`.

use blip2_common::soft_prompt::SoftPromptError;
use tonic::Status;

/// Why a Generate or Info call fails.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request breaks the protocol or a limit (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// A soft prompt from another checkpoint (FAILED_PRECONDITION).
    #[error("soft prompt was made by checkpoint {got}, this LLM tier serves {serves}")]
    CheckpointMismatch { got: String, serves: String },
    /// Running generations and the queue are full (RESOURCE_EXHAUSTED).
    #[error("the LLM tier is at capacity ({running} running, {queued} waiting); retry later")]
    Overloaded { running: usize, queued: usize },
    /// Setup and soft prompts did not all arrive in time (DEADLINE_EXCEEDED).
    #[error("`setup` and one soft prompt per image placeholder must arrive within {seconds:.1} s")]
    SetupTimeout { seconds: f64 },
    /// The client's deadline (`grpc-timeout`) passed before the generation ended
    /// (DEADLINE_EXCEEDED); the sequence is cancelled.
    #[error("the call's deadline passed after {elapsed_ms} ms; the generation was stopped")]
    DeadlineExceeded { elapsed_ms: u128 },
    /// The tier's model was loaded without its language model (FAILED_PRECONDITION).
    #[error("this LLM tier was started without a language model")]
    NoLanguageModel,
    /// A soft prompt that does not decode to the expected tensor (INVALID_ARGUMENT).
    #[error("soft prompt {index}: {source}")]
    SoftPrompt {
        index: usize,
        #[source]
        source: SoftPromptError,
    },
    /// The model refused the request or failed.
    #[error(transparent)]
    Model(#[from] blip2_model::Error),
    /// The generation worker died (a panic in the model code).
    #[error("the generation worker failed: {0}")]
    Worker(String),
    /// The client went away or the transport failed while it sent its input.
    #[error(transparent)]
    Transport(Status),
}

impl Error {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }

    /// A short label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "invalid_argument",
            Error::CheckpointMismatch { .. } => "checkpoint_mismatch",
            Error::Overloaded { .. } => "overloaded",
            Error::SetupTimeout { .. } => "setup_timeout",
            Error::DeadlineExceeded { .. } => "deadline_exceeded",
            Error::NoLanguageModel => "no_language_model",
            Error::SoftPrompt { .. } => "soft_prompt",
            Error::Model(e) => e.error_type(),
            Error::Worker(_) => "worker",
            Error::Transport(_) => "transport",
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidArgument(_) | Error::SoftPrompt { .. } => {
                Status::invalid_argument(error.to_string())
            }
            Error::CheckpointMismatch { .. } | Error::NoLanguageModel => {
                Status::failed_precondition(error.to_string())
            }
            Error::Overloaded { .. } => Status::resource_exhausted(error.to_string()),
            Error::SetupTimeout { .. } | Error::DeadlineExceeded { .. } => {
                Status::deadline_exceeded(error.to_string())
            }
            Error::Model(e) => blip2_common::status::model_error(&e),
            Error::Worker(_) => Status::internal(error.to_string()),
            Error::Transport(status) => status,
        }
    }
}
