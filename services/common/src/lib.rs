//! # blip2-common
//!
//! What every tier shares: the soft prompt wire format, the mapping of model errors to gRPC
//! statuses, and server plumbing (health, reflection, graceful shutdown).
//!
//! # Layout
//! - [`soft_prompt`]: tensors to and from `blip2.v1.SoftPrompt`, content hashes.
//! - [`status`]: `blip2_model::Error` -> `tonic::Status`.
//! - [`server`]: health + reflection services, shutdown signal, graceful shutdown (drain).
//! - [`deadline`]: a call's `grpc-timeout` deadline, for streams and calls to other tiers.
//! - [`tls`]: TLS and mutual TLS from PEM files, keepalive, for servers and tier clients.
//! - [`telemetry`]: the tracing subscriber (text or JSON logs), OTLP span export, W3C trace
//!   context in gRPC metadata.
//! - [`rpc`]: the tower layer that makes every RPC a span and counts it.
//! - [`metrics`]: the process's metrics registry and its Prometheus endpoint.
//! - [`otlp_metrics`]: the same registry pushed to an OTLP collector (OTEL_* environment).

pub mod deadline;
pub mod metrics;
pub mod otlp_metrics;
pub mod rpc;
pub mod server;
pub mod soft_prompt;
pub mod status;
pub mod telemetry;
pub mod tls;
