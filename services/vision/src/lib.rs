//! The BLIP-2 vision tier (work in progress).
