//! The `blip2.v1.SessionService` handlers. Errors are logged here, once, and become statuses.
//!
//! Every handler first authenticates the request (its API key's hash is the owner it acts as);
//! a session or upload of another owner is answered exactly as an id that does not exist.

use std::sync::Arc;

use blip2_proto::v1::session_service_server::SessionService;
use blip2_proto::v1::{
    chat_event, ChatDone, ChatEvent, ChatRequest, CreateSessionRequest, DeleteSessionRequest,
    DeleteSessionResponse, GetSessionRequest, ListSessionsRequest, ListSessionsResponse,
    Session as SessionMessage, UploadImageChunk, UploadImageResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::chat::Prepared;
use crate::error::SessionError;
use crate::prompt::validate_template;
use crate::store::{Limits, Session};
use crate::SessionTier;

/// Events a turn may have queued for a slow client before the LLM stream waits for it.
const CHAT_EVENT_BUFFER: usize = 32;

fn status(error: SessionError) -> Status {
    crate::error::report(error, "")
}

fn not_found(session_id: &str) -> SessionError {
    SessionError::NotFound(format!("no session `{session_id}`"))
}

impl SessionTier {
    /// The owner `request` acts as (the hash of its API key; "" on an open tier).
    fn owner<T>(&self, request: &Request<T>) -> Result<String, Status> {
        self.inner
            .keys
            .authenticate(request.metadata())
            .map_err(status)
    }

    /// Session `session_id` if `owner` owns it; NOT_FOUND otherwise, whether it belongs to
    /// another key or does not exist.
    pub(crate) async fn owned_session(
        &self,
        session_id: &str,
        owner: &str,
    ) -> Result<Session, SessionError> {
        match self.inner.store.load(session_id).await? {
            Some(session) if session.owner == owner => Ok(session),
            _ => Err(not_found(session_id)),
        }
    }

    /// NOT_FOUND unless `owner` owns session `session_id` (reads no turns).
    pub(crate) async fn check_owner(
        &self,
        session_id: &str,
        owner: &str,
    ) -> Result<(), SessionError> {
        match self.inner.store.owner(session_id).await? {
            Some(found) if found == owner => Ok(()),
            _ => Err(not_found(session_id)),
        }
    }

    /// The lock that keeps turns of `session_id` on this replica in order.
    pub(crate) fn turn_lock(&self, session_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .turn_locks
            .entry(session_id.to_string())
            .or_default()
            .clone()
    }

    fn limits(&self) -> Limits {
        let config = &self.inner.config;
        Limits {
            max_sessions: config.max_sessions,
            max_per_owner: config.max_sessions_per_key,
        }
    }

    /// Marks a session used; a failure only delays its expiry, so it is logged, not returned.
    async fn touch(&self, session_id: &str) {
        if let Err(error) = self.inner.store.touch(session_id).await {
            tracing::warn!(session = session_id, %error, "marking a session used failed");
        }
    }
}

/// A Chat stream that replays a committed turn: its text, then `done`.
fn replay(done: ChatDone) -> ReceiverStream<Result<ChatEvent, Status>> {
    let (events, receiver) = mpsc::channel(2);
    if !done.text.is_empty() {
        let _ = events.try_send(Ok(ChatEvent {
            kind: Some(chat_event::Kind::Text(done.text.clone())),
        }));
    }
    let _ = events.try_send(Ok(ChatEvent {
        kind: Some(chat_event::Kind::Done(done)),
    }));
    ReceiverStream::new(receiver)
}

#[tonic::async_trait]
impl SessionService for SessionTier {
    async fn create_session(
        &self,
        request: Request<CreateSessionRequest>,
    ) -> Result<Response<SessionMessage>, Status> {
        let owner = self.owner(&request)?;
        let request = request.into_inner();
        let template = validate_template(request.template).map_err(status)?;
        let (session, used_uploads) = self
            .session_with_history(
                owner,
                template,
                request.default_params.unwrap_or_default(),
                request.history,
            )
            .await
            .map_err(status)?;
        self.inner
            .store
            .create(&session, self.limits())
            .await
            .map_err(|error| status(error.into()))?;
        for upload_id in used_uploads {
            self.inner.uploads.remove(&upload_id);
        }
        Ok(Response::new(session.to_message()))
    }

    type ChatStream = ReceiverStream<Result<ChatEvent, Status>>;

    async fn chat(
        &self,
        request: Request<ChatRequest>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let owner = self.owner(&request)?;
        let deadline = crate::deadline::of(&request);
        let request = request.into_inner();
        let session_id = request.session_id.clone();
        let prepare = crate::deadline::within(self.prepare_turn(request, owner));
        let prepared = crate::deadline::scope(deadline, prepare)
            .await
            .map_err(|error| crate::error::report(error, &session_id))?;
        let turn = match prepared {
            Prepared::Turn(turn) => turn,
            Prepared::Replay(done) => {
                tracing::debug!(session = %session_id, "idempotency key seen: replaying the turn");
                return Ok(Response::new(replay(done)));
            }
        };
        let (events, receiver) = mpsc::channel(CHAT_EVENT_BUFFER);
        // In the call's span: the turn's calls to the LLM tier carry its trace context.
        let turn = self.clone().run_turn(*turn, events);
        let turn = crate::deadline::scope(deadline, turn);
        tokio::spawn(tracing::Instrument::in_current_span(turn));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn upload_image(
        &self,
        request: Request<Streaming<UploadImageChunk>>,
    ) -> Result<Response<UploadImageResponse>, Status> {
        let owner = self.owner(&request)?;
        let max_bytes = self.inner.config.max_image_bytes;
        let mut chunks = request.into_inner();
        let mut data = Vec::new();
        let mut session_id = None;
        let mut first = true;
        while let Some(chunk) = chunks.message().await? {
            if std::mem::take(&mut first) && !chunk.session_id.is_empty() {
                self.check_owner(&chunk.session_id, &owner)
                    .await
                    .map_err(status)?;
                self.touch(&chunk.session_id).await;
                session_id = Some(chunk.session_id);
            }
            if data.len().saturating_add(chunk.data.len()) > max_bytes {
                return Err(status(SessionError::InvalidArgument(format!(
                    "the image has more than {max_bytes} bytes (`max_image_bytes`)"
                ))));
            }
            data.extend_from_slice(&chunk.data);
        }
        if data.is_empty() {
            return Err(status(SessionError::InvalidArgument(
                "the upload is empty: send the image's bytes in `data`".into(),
            )));
        }
        let (data, sha256) = tokio::task::spawn_blocking(move || {
            let sha256 = blip2_common::soft_prompt::sha256_hex(&data);
            (data, sha256)
        })
        .await
        .map_err(|e| status(SessionError::Internal(format!("hashing the upload: {e}"))))?;
        let size_bytes = data.len() as u64;
        let image_id = self
            .inner
            .uploads
            .insert(data, sha256.clone(), session_id, owner)
            .map_err(status)?;
        Ok(Response::new(UploadImageResponse {
            image_id,
            sha256,
            size_bytes,
        }))
    }

    async fn get_session(
        &self,
        request: Request<GetSessionRequest>,
    ) -> Result<Response<SessionMessage>, Status> {
        let owner = self.owner(&request)?;
        let session_id = request.into_inner().session_id;
        let session = self
            .owned_session(&session_id, &owner)
            .await
            .map_err(status)?;
        self.touch(&session_id).await;
        Ok(Response::new(session.to_message()))
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        let owner = self.owner(&request)?;
        let sessions = self
            .inner
            .store
            .list(&owner)
            .await
            .map_err(|error| status(error.into()))?;
        Ok(Response::new(ListSessionsResponse { sessions }))
    }

    async fn delete_session(
        &self,
        request: Request<DeleteSessionRequest>,
    ) -> Result<Response<DeleteSessionResponse>, Status> {
        let owner = self.owner(&request)?;
        let session_id = request.into_inner().session_id;
        self.check_owner(&session_id, &owner)
            .await
            .map_err(status)?;
        let deleted = self
            .inner
            .store
            .delete(&session_id)
            .await
            .map_err(|error| status(error.into()))?;
        if !deleted {
            return Err(status(not_found(&session_id)));
        }
        self.inner.turn_locks.remove(&session_id);
        self.inner.uploads.remove_session(&session_id);
        Ok(Response::new(DeleteSessionResponse {}))
    }
}
