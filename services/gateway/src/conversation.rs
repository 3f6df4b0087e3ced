//! OpenAI messages as the session tier sees a conversation: an optional system text, finished
//! turns (question, images, answer), and the final user message that asks for a new answer.
//!
//! # Mapping
//! - `system` / `developer` messages before the first user or assistant message become the
//!   session template's `system` text (joined by newlines); later ones are refused: the session
//!   tier's prompt has one system text, at the start.
//! - Consecutive `user` messages form one question: texts joined by newlines, images in order.
//!   Images enter the prompt before their turn's text (the session tier's rule), wherever the
//!   parts place them.
//! - An `assistant` message answers the question before it (an assistant message with no
//!   question before it is a turn with an empty question). Its content is text only: images
//!   and tool calls are refused.
//! - `tool` / `function` messages are refused; the last message must be a `user` message.
//!
//! # Keys
//! A conversation is found again by [`key`]: a sha256 over the API key, the system text and
//! the turns (texts and images' content hashes), each field length-prefixed so no two
//! different conversations share a key.

use sha2::{Digest, Sha256};

use crate::error::GatewayError;
use crate::images::{self, Image, ImageLimits};
use crate::openai::{Content, Message};

/// What the user asks, in one turn.
#[derive(Debug, Clone, Default)]
pub struct Question {
    pub text: String,
    pub images: Vec<Image>,
}

/// A finished turn of the conversation the client sent.
#[derive(Debug, Clone)]
pub struct PastTurn {
    pub question: Question,
    pub answer: String,
}

#[derive(Debug, Clone)]
pub struct Conversation {
    pub system: String,
    pub history: Vec<PastTurn>,
    pub current: Question,
}

/// 32 bytes of sha256.
pub type Key = [u8; 32];

/// The key of a conversation's turns (see the module documentation).
pub fn key<'a>(
    authorization: Option<&str>,
    system: &str,
    turns: impl IntoIterator<Item = (&'a Question, &'a str)>,
) -> Key {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(authorization.unwrap_or("").as_bytes());
    field(system.as_bytes());
    for (question, answer) in turns {
        field(question.text.as_bytes());
        field(&(question.images.len() as u64).to_le_bytes());
        for image in &question.images {
            field(image.sha256.as_bytes());
        }
        field(answer.as_bytes());
    }
    hasher.finalize().into()
}

impl Conversation {
    /// The key of the finished turns: the session to continue has exactly these.
    pub fn prefix_key(&self, authorization: Option<&str>) -> Key {
        key(authorization, &self.system, self.turns())
    }

    /// The key of the conversation once `answer` answered the current question: what the
    /// client sends as history next time.
    pub fn answered_key(&self, authorization: Option<&str>, answer: &str) -> Key {
        let current = std::iter::once((&self.current, answer));
        key(authorization, &self.system, self.turns().chain(current))
    }

    fn turns(&self) -> impl Iterator<Item = (&Question, &str)> {
        self.history
            .iter()
            .map(|turn| (&turn.question, turn.answer.as_str()))
    }
}

/// Parses `messages` (see the module documentation), loading their images.
pub async fn parse(
    messages: &[Message],
    limits: &ImageLimits,
) -> Result<Conversation, GatewayError> {
    let mut system: Vec<String> = Vec::new();
    let mut history: Vec<PastTurn> = Vec::new();
    // The user messages since the last assistant message.
    let mut pending: Option<Question> = None;
    let mut started = false;
    for (index, message) in messages.iter().enumerate() {
        let param = format!("messages[{index}]");
        if message.tool_calls.is_some() || message.function_call.is_some() {
            return Err(GatewayError::invalid(
                format!("{param}.tool_calls"),
                format!("`{param}`: tool calls are not supported"),
            ));
        }
        match message.role.as_str() {
            "system" | "developer" => {
                if started {
                    return Err(GatewayError::invalid(
                        format!("{param}.role"),
                        format!(
                            "`{param}`: a `{}` message must come before the conversation's \
                             first user or assistant message",
                            message.role
                        ),
                    ));
                }
                system.push(text_only(message.content.as_ref(), &param)?);
            }
            "user" => {
                started = true;
                let question = pending.get_or_insert_with(Question::default);
                append_user(question, message.content.as_ref(), &param, limits).await?;
            }
            "assistant" => {
                started = true;
                let answer = text_only(message.content.as_ref(), &param)?;
                history.push(PastTurn {
                    question: pending.take().unwrap_or_default(),
                    answer,
                });
            }
            other => {
                return Err(GatewayError::invalid(
                    format!("{param}.role"),
                    format!(
                        "`{param}.role` `{other}` is not supported (system, developer, user, \
                         assistant are)"
                    ),
                ))
            }
        }
    }
    let Some(current) = pending else {
        return Err(GatewayError::invalid(
            "messages",
            "the last message of `messages` must be a `user` message",
        ));
    };
    if current.text.trim().is_empty() && current.images.is_empty() {
        return Err(GatewayError::invalid(
            "messages",
            "the last user message has neither text nor images",
        ));
    }
    Ok(Conversation {
        system: system.join("\n"),
        history,
        current,
    })
}

/// Joins `more` to `text` on a new line.
fn join(text: &mut String, more: &str) {
    if more.is_empty() {
        return;
    }
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(more);
}

/// The text of a message that may hold no images (system, developer, assistant).
fn text_only(content: Option<&Content>, param: &str) -> Result<String, GatewayError> {
    let parts = match content {
        None => return Ok(String::new()),
        Some(Content::Text(text)) => return Ok(text.clone()),
        Some(Content::Parts(parts)) => parts,
    };
    let mut text = String::new();
    for (index, part) in parts.iter().enumerate() {
        match (part.kind.as_str(), &part.text, &part.refusal) {
            ("text", Some(piece), _) | ("refusal", _, Some(piece)) => join(&mut text, piece),
            ("image_url", _, _) => {
                return Err(GatewayError::invalid(
                    format!("{param}.content[{index}]"),
                    format!("`{param}.content[{index}]`: only user messages may hold images"),
                ))
            }
            (kind, _, _) => return Err(unsupported_part(param, index, kind)),
        }
    }
    Ok(text)
}

fn unsupported_part(param: &str, index: usize, kind: &str) -> GatewayError {
    GatewayError::invalid(
        format!("{param}.content[{index}].type"),
        format!(
            "`{param}.content[{index}].type` `{kind}` is not supported here (text and \
             image_url parts are)"
        ),
    )
}

async fn append_user(
    question: &mut Question,
    content: Option<&Content>,
    param: &str,
    limits: &ImageLimits,
) -> Result<(), GatewayError> {
    let parts = match content {
        None => return Ok(()),
        Some(Content::Text(text)) => {
            join(&mut question.text, text);
            return Ok(());
        }
        Some(Content::Parts(parts)) => parts,
    };
    for (index, part) in parts.iter().enumerate() {
        match (part.kind.as_str(), &part.text, &part.image_url) {
            ("text", Some(text), _) => join(&mut question.text, text),
            ("image_url", _, Some(image_url)) => {
                let part_param = format!("{param}.content[{index}].image_url.url");
                let image = images::load(image_url.url(), &part_param, limits).await?;
                question.images.push(image);
            }
            ("text", None, _) | ("image_url", _, None) => {
                return Err(GatewayError::invalid(
                    format!("{param}.content[{index}]"),
                    format!(
                        "`{param}.content[{index}]` of type `{}` lacks its `{}` field",
                        part.kind, part.kind
                    ),
                ))
            }
            (kind, _, _) => return Err(unsupported_part(param, index, kind)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> ImageLimits {
        ImageLimits {
            allow_hosts: Vec::new(),
            max_image_bytes: 1 << 20,
            fetch_timeout: Duration::from_secs(1),
        }
    }

    fn messages(json: serde_json::Value) -> Vec<Message> {
        serde_json::from_value(json).unwrap_or_default()
    }

    const PIXEL: &str = "data:image/png;base64,aGVsbG8=";

    #[tokio::test]
    async fn turns_system_and_images_are_mapped() {
        let m = messages(serde_json::json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": PIXEL}}
            ]},
            {"role": "assistant", "content": "a dog"},
            {"role": "user", "content": "Is it big?"},
            {"role": "user", "content": "Answer yes or no."}
        ]));
        let c = parse(&m, &limits()).await.unwrap();
        assert_eq!(c.system, "Be brief.");
        assert_eq!(c.history.len(), 1);
        assert_eq!(c.history[0].question.text, "What is this?");
        assert_eq!(c.history[0].question.images.len(), 1);
        assert_eq!(c.history[0].answer, "a dog");
        assert_eq!(c.current.text, "Is it big?\nAnswer yes or no.");
    }

    #[tokio::test]
    async fn the_answered_key_is_the_next_prefix_key() {
        let first = messages(serde_json::json!([
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PIXEL}},
                                          {"type": "text", "text": "What is this?"}]}
        ]));
        let second = messages(serde_json::json!([
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PIXEL}},
                                          {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "a dog"},
            {"role": "user", "content": "Is it big?"}
        ]));
        let first = parse(&first, &limits()).await.ok();
        let second = parse(&second, &limits()).await.ok();
        let (Some(first), Some(second)) = (first, second) else {
            panic!("parse failed")
        };
        let auth = Some("Bearer k");
        assert_eq!(first.answered_key(auth, "a dog"), second.prefix_key(auth));
        assert_ne!(first.answered_key(auth, "a cat"), second.prefix_key(auth));
        assert_ne!(
            first.answered_key(Some("Bearer other"), "a dog"),
            second.prefix_key(auth)
        );
    }

    #[tokio::test]
    async fn unsupported_messages_are_refused() {
        for json in [
            serde_json::json!([{"role": "assistant", "content": "hi"}]),
            serde_json::json!([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]),
            serde_json::json!([{"role": "tool", "content": "x", "tool_call_id": "1"}]),
            serde_json::json!([{"role": "assistant", "content": [
                {"type": "image_url", "image_url": {"url": PIXEL}}]},
                {"role": "user", "content": "hi"}]),
            serde_json::json!([{"role": "user", "content": [{"type": "input_audio"}]}]),
            serde_json::json!([{"role": "user", "content": "  "}]),
            serde_json::json!([]),
        ] {
            let m = messages(json.clone());
            let result = parse(&m, &limits()).await;
            assert!(
                matches!(result, Err(GatewayError::InvalidRequest { .. })),
                "{json}"
            );
        }
    }
}
