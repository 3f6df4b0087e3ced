//! The `blip2.v1.SessionService` handlers. Errors are logged here, once, and become statuses.

use blip2_proto::v1::session_service_server::SessionService;
use blip2_proto::v1::{
    ChatEvent, ChatRequest, CreateSessionRequest, DeleteSessionRequest, DeleteSessionResponse,
    GetSessionRequest, ListSessionsRequest, ListSessionsResponse, Session as SessionMessage,
    UploadImageChunk, UploadImageResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::SessionError;
use crate::prompt::validate_template;
use crate::SessionTier;

/// Events a turn may have queued for a slow client before the LLM stream waits for it.
const CHAT_EVENT_BUFFER: usize = 32;

fn status(error: SessionError) -> Status {
    crate::error::report(error, "")
}

fn not_found(session_id: &str) -> Status {
    status(SessionError::NotFound(format!("no session `{session_id}`")))
}

#[tonic::async_trait]
impl SessionService for SessionTier {
    async fn create_session(
        &self,
        request: Request<CreateSessionRequest>,
    ) -> Result<Response<SessionMessage>, Status> {
        let request = request.into_inner();
        let template = validate_template(request.template).map_err(status)?;
        let max_sessions = self.inner.config.max_sessions;
        if self.inner.sessions.len() >= max_sessions {
            return Err(status(SessionError::ResourceExhausted(format!(
                "the tier holds its limit of {max_sessions} sessions; delete one first"
            ))));
        }
        let session = self
            .session_with_history(
                template,
                request.default_params.unwrap_or_default(),
                request.history,
            )
            .await
            .map_err(status)?;
        let message = session.to_message();
        self.inner
            .sessions
            .insert(session.session_id.clone(), session);
        Ok(Response::new(message))
    }

    type ChatStream = ReceiverStream<Result<ChatEvent, Status>>;

    async fn chat(
        &self,
        request: Request<ChatRequest>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let request = request.into_inner();
        let session_id = request.session_id.clone();
        let turn = self
            .prepare_turn(request)
            .await
            .map_err(|error| crate::error::report(error, &session_id))?;
        let (events, receiver) = mpsc::channel(CHAT_EVENT_BUFFER);
        tokio::spawn(self.clone().run_turn(turn, events));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn upload_image(
        &self,
        request: Request<Streaming<UploadImageChunk>>,
    ) -> Result<Response<UploadImageResponse>, Status> {
        let max_bytes = self.inner.config.max_image_bytes;
        let mut chunks = request.into_inner();
        let mut data = Vec::new();
        let mut session_id = None;
        let mut first = true;
        while let Some(chunk) = chunks.message().await? {
            if std::mem::take(&mut first) && !chunk.session_id.is_empty() {
                if !self.inner.sessions.contains_key(&chunk.session_id) {
                    return Err(not_found(&chunk.session_id));
                }
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
            .insert(data, sha256.clone(), session_id)
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
        let session_id = request.into_inner().session_id;
        let session = self
            .inner
            .sessions
            .get(&session_id)
            .map(|session| session.to_message())
            .ok_or_else(|| not_found(&session_id))?;
        Ok(Response::new(session))
    }

    async fn list_sessions(
        &self,
        _request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        let mut sessions: Vec<_> = self
            .inner
            .sessions
            .iter()
            .map(|entry| entry.value().summary())
            .collect();
        sessions.sort_by(|a, b| (a.created_at, &a.session_id).cmp(&(b.created_at, &b.session_id)));
        Ok(Response::new(ListSessionsResponse { sessions }))
    }

    async fn delete_session(
        &self,
        request: Request<DeleteSessionRequest>,
    ) -> Result<Response<DeleteSessionResponse>, Status> {
        let session_id = request.into_inner().session_id;
        if self.inner.sessions.remove(&session_id).is_none() {
            return Err(not_found(&session_id));
        }
        self.inner.uploads.remove_session(&session_id);
        Ok(Response::new(DeleteSessionResponse {}))
    }
}
