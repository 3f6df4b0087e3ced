//! Prompt assembly: tokenisation with the checkpoint's tokenizer and image placeholder expansion.
//!
//! As transformers' `Blip2Processor`: the prompt is tokenised as the checkpoint's tokenizer does
//! (its special tokens added, `<image>` recognised as the image token), each image token becomes
//! `num_query_tokens` placeholders that the images' soft prompts fill in order, and a prompt
//! without any `<image>` marker gets one image's placeholders before the tokenised prompt (so
//! before OPT's BOS). Checkpoints whose config has no `image_token_index` (older conversions)
//! take the soft prompt prepended, as the reference's legacy path concatenates embeddings.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::config::Blip2Config;
use crate::error::{Error, Result};

/// The image marker in prompt text.
pub const IMAGE_MARKER: &str = "<image>";

/// One run of a prompt: text tokens, or the placeholders of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptPiece {
    Tokens(Vec<u32>),
    /// The `index`-th image (in the order images are given).
    Image(usize),
}

/// A tokenised prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// The ids as the reference feeds them to the language model: each image as
    /// `num_query_tokens` copies of the image token (none for legacy checkpoints).
    pub input_ids: Vec<u32>,
    pub pieces: Vec<PromptPiece>,
    pub num_images: usize,
    /// Positions of the prompt, soft prompts included.
    pub num_positions: usize,
}

/// The checkpoint's tokenizer with the facts prompt assembly needs.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    image_token_id: Option<u32>,
    /// BOS to prepend when tokenizer_config.json asks for it and tokenizer.json does not add it.
    bos_to_add: Option<u32>,
    num_query_tokens: usize,
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// A special token entry in tokenizer_config.json: a string or `{"content": ...}`.
fn token_content(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl PromptTokenizer {
    /// Loads `tokenizer.json` (+ `tokenizer_config.json`) from a checkpoint directory.
    pub fn from_dir(dir: &Path, config: &Blip2Config) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?;
        let add_bos = tokenizer_config
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let bos_to_add = if add_bos {
            let bos = token_content(tokenizer_config.as_ref().and_then(|c| c.get("bos_token")));
            match bos.and_then(|b| tokenizer.token_to_id(&b)) {
                Some(id) => Some(id),
                None => {
                    return Err(Error::Tokenizer {
                        path: dir.join("tokenizer_config.json"),
                        message: "add_bos_token is set but bos_token is not in the vocabulary"
                            .into(),
                    })
                }
            }
        } else {
            None
        };
        let image_token_id = match config.image_token_index {
            None => None,
            Some(expected) => match tokenizer.token_to_id(IMAGE_MARKER) {
                Some(id) if id == expected => Some(id),
                Some(id) => {
                    return Err(Error::Tokenizer {
                        path,
                        message: format!(
                            "`{IMAGE_MARKER}` has id {id} but config.json's image_token_index is {expected}"
                        ),
                    })
                }
                None => {
                    return Err(Error::Tokenizer {
                        path,
                        message: format!(
                            "no `{IMAGE_MARKER}` token, but config.json sets image_token_index {expected}"
                        ),
                    })
                }
            },
        };
        Ok(Self {
            tokenizer,
            image_token_id,
            bos_to_add,
            num_query_tokens: config.num_query_tokens,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn image_token_id(&self) -> Option<u32> {
        self.image_token_id
    }

    /// Tokenises text as the checkpoint's tokenizer does, special tokens added, BOS exactly once.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::InvalidInput(format!("cannot tokenise the prompt: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if let Some(bos) = self.bos_to_add {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Tokenises `text` and places `num_images` images: at its `<image>` markers, in order, or
    /// (without markers) all before the tokenised text.
    pub fn build(&self, text: &str, num_images: usize) -> Result<Prompt> {
        let ids = self.encode(text)?;
        let markers = match self.image_token_id {
            Some(image) => ids.iter().filter(|&&id| id == image).count(),
            None => 0,
        };
        if markers > 0 && markers != num_images {
            return Err(Error::InvalidInput(format!(
                "the prompt has {markers} `{IMAGE_MARKER}` marker(s) but {num_images} image(s) were given"
            )));
        }
        let mut pieces = Vec::new();
        if markers == 0 {
            pieces.extend((0..num_images).map(PromptPiece::Image));
            pieces.push(PromptPiece::Tokens(ids));
        } else {
            let mut run = Vec::new();
            let mut image = 0;
            for id in ids {
                if Some(id) == self.image_token_id {
                    if !run.is_empty() {
                        pieces.push(PromptPiece::Tokens(std::mem::take(&mut run)));
                    }
                    pieces.push(PromptPiece::Image(image));
                    image += 1;
                } else {
                    run.push(id);
                }
            }
            if !run.is_empty() {
                pieces.push(PromptPiece::Tokens(run));
            }
        }
        pieces.retain(|p| !matches!(p, PromptPiece::Tokens(t) if t.is_empty()));
        Ok(self.assemble(pieces, num_images))
    }

    fn assemble(&self, pieces: Vec<PromptPiece>, num_images: usize) -> Prompt {
        let mut input_ids = Vec::new();
        let mut num_positions = 0;
        for piece in &pieces {
            match piece {
                PromptPiece::Tokens(ids) => {
                    input_ids.extend_from_slice(ids);
                    num_positions += ids.len();
                }
                PromptPiece::Image(_) => {
                    if let Some(image) = self.image_token_id {
                        input_ids.extend(std::iter::repeat_n(image, self.num_query_tokens));
                    }
                    num_positions += self.num_query_tokens;
                }
            }
        }
        Prompt {
            input_ids,
            pieces,
            num_images,
            num_positions,
        }
    }
}
