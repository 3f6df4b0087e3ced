//! # blip2-common
//!
//! What every tier shares: the soft prompt wire format, the mapping of model errors to gRPC
//! statuses, and server plumbing (health, reflection, graceful shutdown).
//!
//! # Layout
//! - [`soft_prompt`]: tensors to and from `blip2.v1.SoftPrompt`, content hashes.
//! - [`status`]: `blip2_model::Error` -> `tonic::Status`.
//! - [`server`]: health + reflection services, shutdown signal, listener helpers.
//! - [`tls`]: TLS and mutual TLS from PEM files, keepalive, for servers and tier clients.

pub mod server;
pub mod soft_prompt;
pub mod status;
pub mod tls;
