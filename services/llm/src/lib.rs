//! The BLIP-2 llm tier (work in progress).
