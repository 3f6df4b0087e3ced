//! Incremental detokenisation that never splits a UTF-8 character.
//!
//! The prefix-offset / read-offset technique of TGI and vLLM: each new token is decoded together
//! with the tokens since the last emission point (`prefix_offset..`), and the text beyond what
//! the window `prefix_offset..read_offset` decodes to is the new piece. While the decoded text
//! ends with U+FFFD (an incomplete UTF-8 sequence from byte-level tokens) nothing is emitted.
//! Decoding a window rather than single tokens keeps context-dependent decoders right (Metaspace
//! strips the leading space of the first token only; byte-level joins bytes across tokens).

use std::borrow::Borrow;
use std::path::PathBuf;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

const REPLACEMENT: char = '\u{FFFD}';

/// Streams the text of a growing sequence of token ids.
///
/// Generic over how the tokenizer is held: `&Tokenizer` for one call, `Arc<Tokenizer>` for a
/// scheduler that keeps detokenisers across steps.
pub struct Detokenizer<T: Borrow<Tokenizer>> {
    tokenizer: T,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<T: Borrow<Tokenizer>> Detokenizer<T> {
    pub fn new(tokenizer: T, skip_special_tokens: bool) -> Self {
        Detokenizer {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        if ids.is_empty() {
            return Ok(String::new());
        }
        self.tokenizer
            .borrow()
            .decode(ids, self.skip_special_tokens)
            .map_err(|e| Error::Tokenizer {
                path: PathBuf::from("tokenizer.json"),
                message: format!("cannot decode token ids: {e}"),
            })
    }

    /// The text after the window's prefix, if the window decodes to more than its prefix.
    fn new_piece(&self, allow_incomplete: bool) -> Result<Option<String>> {
        let prefix_text = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let new_text = self.decode(&self.ids[self.prefix_offset..])?;
        if new_text.len() <= prefix_text.len()
            || (!allow_incomplete && new_text.ends_with(REPLACEMENT))
        {
            return Ok(None);
        }
        let piece = match new_text.strip_prefix(prefix_text.as_str()) {
            Some(rest) => rest.to_owned(),
            // The prefix decoded differently in context (not expected with byte-level or
            // Metaspace decoders): fall back to the byte length, on a character boundary.
            None => {
                let mut cut = prefix_text.len();
                while !new_text.is_char_boundary(cut) {
                    cut += 1;
                }
                new_text[cut..].to_owned()
            }
        };
        Ok(Some(piece))
    }

    /// Adds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        match self.new_piece(false)? {
            Some(piece) => {
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                Ok(piece)
            }
            None => Ok(String::new()),
        }
    }

    /// Returns the text still held back (an incomplete character decodes to U+FFFD, as the full
    /// decode does), so that all pieces joined equal `tokenizer.decode(ids)`.
    pub fn finish(&mut self) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let piece = self.new_piece(true)?.unwrap_or_default();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(piece)
    }
}
