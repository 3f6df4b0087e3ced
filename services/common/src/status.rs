//! One mapping from the model library's errors to gRPC statuses.

use blip2_model::Error;
use tonic::Status;

/// The status a client sees for a model error: bad input is INVALID_ARGUMENT, everything else
/// is the server's problem (INTERNAL) and keeps its message.
pub fn model_error(error: &Error) -> Status {
    match error {
        Error::Image(_) | Error::InvalidInput(_) => Status::invalid_argument(error.to_string()),
        Error::Candle(_) => Status::internal(format!("model computation failed: {error}")),
        Error::Io { .. }
        | Error::Config { .. }
        | Error::Weight { .. }
        | Error::Tokenizer { .. }
        | Error::Hub { .. } => Status::failed_precondition(error.to_string()),
    }
}

impl From<crate::soft_prompt::SoftPromptError> for Status {
    fn from(error: crate::soft_prompt::SoftPromptError) -> Self {
        Status::invalid_argument(error.to_string())
    }
}
