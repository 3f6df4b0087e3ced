//! The client's deadline on Chat (its `grpc-timeout`), for the whole turn: it bounds the
//! preparation (vision Encode included) and the generation, and what is left of it travels to
//! the LLM tier with the Generate call ([`limit`]), which stops the sequence itself when it
//! passes. A turn past its deadline ends with DEADLINE_EXCEEDED and records nothing.
//!
//! The deadline is a task-local of the turn ([`scope`]), so the calls to other tiers read it
//! where they are made without every function in between passing it on.

use std::future::Future;

use tokio::time::Instant;

use crate::error::SessionError;

tokio::task_local! {
    static DEADLINE: Option<Instant>;
}

/// The deadline of `request`, counted from now.
pub(crate) fn of<T>(request: &tonic::Request<T>) -> Option<Instant> {
    blip2_common::deadline::deadline(request)
}

/// Runs `work` with `deadline` as the turn's deadline (for [`limit`] and [`within`]).
pub(crate) fn scope<F: Future>(
    deadline: Option<Instant>,
    work: F,
) -> impl Future<Output = F::Output> {
    DEADLINE.scope(deadline, work)
}

/// The deadline of the turn running on this task, if any.
pub(crate) fn current() -> Option<Instant> {
    DEADLINE.try_with(|deadline| *deadline).ok().flatten()
}

/// `work`, or DEADLINE_EXCEEDED once the turn's deadline passes (dropping `work`, which cancels
/// the calls it made).
pub(crate) async fn within<T>(
    work: impl Future<Output = Result<T, SessionError>>,
) -> Result<T, SessionError> {
    let deadline = current();
    let started = Instant::now();
    tokio::select! {
        result = work => result,
        () = blip2_common::deadline::expired(deadline) => Err(SessionError::DeadlineExceeded(
            format!(
                "the call's deadline passed after {} ms; the turn was stopped and not recorded",
                started.elapsed().as_millis()
            ),
        )),
    }
}

/// `request` with what is left of the turn's deadline as its timeout (`grpc-timeout`).
pub(crate) fn limit<T>(mut request: tonic::Request<T>) -> tonic::Request<T> {
    if let Some(deadline) = current() {
        request.set_timeout(blip2_common::deadline::remaining(deadline));
    }
    request
}
