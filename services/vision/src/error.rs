//! The vision tier's error type and its one mapping to `tonic::Status`.

use std::sync::Arc;

use blip2_common::soft_prompt::SoftPromptError;
use blip2_common::status::model_error;
use tonic::Status;

/// Why an Encode call (or one image of it) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request breaks a rule that needs no decoding (counts, sizes, fields).
    #[error("{0}")]
    InvalidArgument(String),
    /// A hash-only image that this replica does not hold.
    #[error("image sha256 {sha256} is not cached on this replica; send the bytes")]
    NotCached { sha256: String },
    /// Every Encode slot is taken.
    #[error(
        "this vision replica is running {running} Encode calls already; retry later or elsewhere"
    )]
    Overloaded { running: usize },
    /// Decoding, preprocessing or the forward pass failed.
    #[error(transparent)]
    Model(#[from] blip2_model::Error),
    /// The soft prompt could not be put into wire form (the server's fault, not the client's).
    #[error("cannot encode the soft prompt: {0}")]
    SoftPrompt(#[from] SoftPromptError),
    #[error("the vision model thread has stopped")]
    ModelThreadStopped,
    /// The client's deadline (`grpc-timeout`) passed before every image was sent.
    #[error("the call's deadline passed; the remaining images were not encoded")]
    DeadlineExceeded,
    #[error("the vision model panicked while encoding this image")]
    ModelPanicked,
    #[error("a blocking task failed: {0}")]
    Blocking(#[from] tokio::task::JoinError),
    #[error("a repeated image lost its soft prompt")]
    RepeatLost,
    /// An error of one image, naming its position in the request.
    #[error("`images[{index}]`: {source}")]
    AtImage {
        index: usize,
        #[source]
        source: Box<Error>,
    },
    /// One failure answered to every image of a batch.
    #[error(transparent)]
    Batch(Arc<Error>),
}

impl Error {
    /// Wraps `self` as the error of image `index`.
    pub fn at_image(self, index: usize) -> Self {
        Error::AtImage {
            index,
            source: Box::new(self),
        }
    }

    /// A short label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "invalid_argument",
            Error::NotCached { .. } => "not_cached",
            Error::Overloaded { .. } => "overloaded",
            Error::Model(error) => error.error_type(),
            Error::SoftPrompt(_) => "soft_prompt",
            Error::ModelThreadStopped => "model_thread_stopped",
            Error::DeadlineExceeded => "deadline_exceeded",
            Error::ModelPanicked => "model_panicked",
            Error::Blocking(_) => "blocking_task",
            Error::RepeatLost => "repeat_lost",
            Error::AtImage { source, .. } => source.error_type(),
            Error::Batch(error) => error.error_type(),
        }
    }

    fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotCached { .. } => Code::NotFound,
            Error::Overloaded { .. } => Code::ResourceExhausted,
            Error::Model(error) => model_error(error).code(),
            Error::ModelThreadStopped => Code::Unavailable,
            Error::DeadlineExceeded => Code::DeadlineExceeded,
            Error::SoftPrompt(_)
            | Error::ModelPanicked
            | Error::Blocking(_)
            | Error::RepeatLost => Code::Internal,
            Error::AtImage { source, .. } => source.code(),
            Error::Batch(error) => error.code(),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = match &error {
            Error::Model(model) => model_error(model).message().to_string(),
            other => other.to_string(),
        };
        Status::new(error.code(), message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn maps_to_the_status_a_client_acts_on() {
        let cases = [
            (
                Error::InvalidArgument("`images` is empty".into()),
                Code::InvalidArgument,
            ),
            (
                Error::NotCached {
                    sha256: "ab".into(),
                },
                Code::NotFound,
            ),
            (Error::Overloaded { running: 4 }, Code::ResourceExhausted),
            (
                Error::Model(blip2_model::Error::Image("bad header".into())),
                Code::InvalidArgument,
            ),
            (Error::ModelThreadStopped, Code::Unavailable),
            (Error::ModelPanicked, Code::Internal),
        ];
        for (error, code) in cases {
            assert_eq!(Status::from(error).code(), code);
        }
    }

    #[test]
    fn names_the_image_and_keeps_the_cause() {
        let model = blip2_model::Error::Image("bad header".into());
        let error = Error::Batch(Arc::new(Error::Model(model))).at_image(2);
        assert_eq!(error.error_type(), "image");
        let status = Status::from(error);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "`images[2]`: image: bad header");
    }
}
