//! # blip2-proto
//!
//! The gRPC API of the three BLIP-2 tiers, package `blip2.v1`: `VisionService` (image bytes in,
//! soft prompts out), `LlmService` (prompt + soft prompts in, tokens out) and `SessionService`
//! (multi-turn dialogue, what a chatbot calls).
//!
//! # Layout
//! - [`v1`]: the generated messages, clients and servers.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for server reflection.

/// Generated code of package `blip2.v1`.
pub mod v1 {
    tonic::include_proto!("blip2.v1");
}

/// File descriptor set of all blip2.v1 protos (for tonic-reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("blip2_descriptor");
