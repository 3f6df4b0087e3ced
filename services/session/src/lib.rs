//! The BLIP-2 session tier (work in progress).
