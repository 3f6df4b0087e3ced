//! Tokenizers for a closed vocabulary (the shapes world's), built deterministically, without
//! training, in the layouts of the checkpoints this project serves:
//!
//! - [`write_opt_tokenizer`]: an OPT-style byte-level BPE (`tokenizer.json` as
//!   `GPT2Tokenizer`'s backend writes it, as in `tests/fixtures/models/opt-a`): `<s>` = 0,
//!   `<pad>` = 1, `</s>` = 2 (BOS and EOS, prepended to every text as OPT does), `<unk>` = 3,
//!   the 256 byte-level characters (so any text still encodes), then the merges that make
//!   every given word one token, both alone (`red`) and after a space (`Ġred`), and last the
//!   added special token `<image>`.
//! - [`write_qformer_tokenizer`]: a BERT WordPiece for the Q-Former's text side (as
//!   `tests/fixtures/models/retrieval-a`): lower-casing, `[PAD]` = 0, `[UNK]` = 1, `[CLS]` = 2,
//!   `[SEP]` = 3, `[MASK]` = 4, ASCII punctuation, letters and digits with their `##` forms,
//!   the given words, then `[DEC]` (LAVIS's decoder BOS) and `<image>` as added tokens.
//!
//! The BPE merges come from a constructive rule rather than from counting: the words are
//! taken shortest first; each is encoded with the merges made so far, and merges joining the
//! resulting pieces left to right are appended. A word's own merges rank after every merge
//! that existed when it was added, so encoding it replays the pieces it was built from and
//! then joins them; merges added for later words rank after its own and never fire first.
//! Every given word therefore encodes to exactly one token (the tests check each one).

use std::collections::HashMap;
use std::path::Path;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::error::{Error, Result};

/// The image marker of prompts, an added special token of both tokenizers.
pub const IMAGE_TOKEN: &str = "<image>";

/// What [`write_opt_tokenizer`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OptTokenizerInfo {
    /// Every id, added tokens included (`<image>` is the last): the LLM's embedding needs at
    /// least this many rows.
    pub vocab_size: usize,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    pub unk_token_id: u32,
    /// `<image>`: config.json's `image_token_index`.
    pub image_token_id: u32,
}

/// What [`write_qformer_tokenizer`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QFormerTokenizerInfo {
    /// The WordPiece vocabulary plus `[DEC]` (the Q-Former's word embedding needs at least
    /// this many rows); `<image>` (one more id) is not meant to be embedded.
    pub vocab_size: usize,
    pub pad_token_id: u32,
    pub unk_token_id: u32,
    pub cls_token_id: u32,
    pub sep_token_id: u32,
    pub mask_token_id: u32,
    /// `[DEC]`, the bos_token that replaces `[CLS]` for image-grounded text generation.
    pub dec_token_id: u32,
    pub image_token_id: u32,
}

/// GPT-2's byte-to-character table: printable bytes map to themselves, the rest to 256 + n.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        let code = if printable {
            b as u32
        } else {
            extra += 1;
            255 + extra
        };
        *slot = char::from_u32(code).unwrap_or('\0');
    }
    table
}

/// The byte-level form of a text (`" red"` -> `"Ġred"`), as symbols of one character each.
fn byte_level(text: &str, table: &[char; 256]) -> Vec<String> {
    text.bytes()
        .map(|b| table[b as usize].to_string())
        .collect()
}

/// Byte-pair encoding as the `tokenizers` crate applies it: repeatedly merge the adjacent pair
/// of lowest rank (the leftmost on a tie) until no pair has a merge.
fn bpe(mut symbols: Vec<String>, ranks: &HashMap<(String, String), usize>) -> Vec<String> {
    loop {
        let best = symbols
            .windows(2)
            .enumerate()
            .filter_map(|(i, w)| {
                ranks
                    .get(&(w[0].clone(), w[1].clone()))
                    .map(|&rank| (rank, i))
            })
            .min();
        let Some((_, i)) = best else {
            return symbols;
        };
        let right = symbols.remove(i + 1);
        symbols[i].push_str(&right);
    }
}

/// A JSON object written in the given order (tokenizer vocabularies in id order, as the
/// fixtures are).
struct Ordered<'a>(&'a [(String, u32)]);

impl Serialize for Ordered<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (token, id) in self.0 {
            map.serialize_entry(token, id)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct AddedToken<'a> {
    id: u32,
    content: &'a str,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

fn added(id: u32, content: &str) -> AddedToken<'_> {
    AddedToken {
        id,
        content,
        single_word: false,
        lstrip: false,
        rstrip: false,
        normalized: false,
        special: true,
    }
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Loads a written tokenizer.json back with the `tokenizers` crate, so that a file it cannot
/// read is never left as if it were usable.
fn check_loads(path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(path)
        .map_err(|e| Error::Invalid(format!("{}: written but not loadable: {e}", path.display())))
}

fn clean_words(words: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for word in words {
        if word.is_empty() || word.chars().any(|c| c.is_whitespace()) {
            return Err(Error::Invalid(format!(
                "`{word}` is not a word (empty or with whitespace)"
            )));
        }
        if !out.contains(word) {
            out.push(word.clone());
        }
    }
    Ok(out)
}

/// Writes an OPT-style byte-level BPE `tokenizer.json` and `tokenizer_config.json` into `dir`
/// (see the module docs) in which every one of `words` is one token, with and without a
/// leading space. Words are kept as written (case included) and must not contain whitespace.
/// A word the GPT-2 pre-tokenizer splits (letters next to digits or punctuation) is built
/// anyway but then not one token in running text.
pub fn write_opt_tokenizer(dir: &Path, words: &[String]) -> Result<OptTokenizerInfo> {
    let words = clean_words(words)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let table = byte_chars();
    let mut vocab: Vec<(String, u32)> = ["<s>", "<pad>", "</s>", "<unk>"]
        .iter()
        .map(|t| t.to_string())
        .zip(0..)
        .collect();
    let mut alphabet: Vec<char> = table.to_vec();
    alphabet.sort_unstable();
    for c in alphabet {
        let id = vocab.len() as u32;
        vocab.push((c.to_string(), id));
    }
    let mut known: HashMap<String, u32> = vocab.iter().cloned().collect();

    // Both forms of every word, shortest first (then by text): shorter words are often the
    // pieces of longer ones ("circle" of "circles").
    let mut forms: Vec<Vec<String>> = words
        .iter()
        .flat_map(|w| [byte_level(w, &table), byte_level(&format!(" {w}"), &table)])
        .collect();
    forms.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
    forms.dedup();
    let mut merges: Vec<(String, String)> = Vec::new();
    let mut ranks: HashMap<(String, String), usize> = HashMap::new();
    for form in forms {
        let pieces = bpe(form, &ranks);
        let mut left = pieces[0].clone();
        for right in &pieces[1..] {
            let pair = (left.clone(), right.clone());
            left.push_str(right);
            if !ranks.contains_key(&pair) {
                ranks.insert(pair.clone(), merges.len());
                merges.push(pair);
            }
            if !known.contains_key(&left) {
                let id = vocab.len() as u32;
                known.insert(left.clone(), id);
                vocab.push((left.clone(), id));
            }
        }
    }
    let image_token_id = vocab.len() as u32;

    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            added(1, "<pad>"),
            added(2, "</s>"),
            added(3, "<unk>"),
            added(image_token_id, IMAGE_TOKEN),
        ],
        "normalizer": null,
        "pre_tokenizer": {
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "</s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}
            ],
            "pair": [
                {"SpecialToken": {"id": "</s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "</s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}
        },
        "decoder": {
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": Ordered(&vocab),
            "merges": merges.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
        }
    });
    let path = dir.join("tokenizer.json");
    write_json(&path, &tokenizer)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({
            "add_prefix_space": false,
            "backend": "tokenizers",
            "bos_token": "</s>",
            "eos_token": "</s>",
            "errors": "replace",
            "pad_token": "<pad>",
            "processor_class": "Blip2Processor",
            "tokenizer_class": "GPT2Tokenizer",
            "unk_token": "<unk>",
        }),
    )?;
    let loaded = check_loads(&path)?;
    if loaded.token_to_id(IMAGE_TOKEN) != Some(image_token_id) {
        return Err(Error::Invalid(format!(
            "{}: `{IMAGE_TOKEN}` did not get id {image_token_id}",
            path.display()
        )));
    }
    Ok(OptTokenizerInfo {
        vocab_size: image_token_id as usize + 1,
        bos_token_id: 2,
        eos_token_id: 2,
        pad_token_id: 1,
        unk_token_id: 3,
        image_token_id,
    })
}

/// Writes a BERT WordPiece `tokenizer.json` and `tokenizer_config.json` for the Q-Former into
/// `dir` (see the module docs): every one of `words`, lower-cased, is one token; other text
/// falls back to single characters and `##` pieces (`[UNK]` only for characters outside
/// ASCII letters, digits and punctuation). `model_max_length` is the Q-Former's
/// `max_position_embeddings` (texts are truncated to it).
pub fn write_qformer_tokenizer(
    dir: &Path,
    words: &[String],
    model_max_length: usize,
) -> Result<QFormerTokenizerInfo> {
    let words = clean_words(words)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    let mut tokens: Vec<String> = specials.iter().map(|t| t.to_string()).collect();
    let mut singles: Vec<char> = ('!'..='~')
        .filter(|c| c.is_ascii_punctuation() || c.is_ascii_digit() || c.is_ascii_lowercase())
        .collect();
    singles.sort_unstable();
    tokens.extend(singles.iter().map(|c| c.to_string()));
    tokens.extend(
        ('a'..='z')
            .chain('0'..='9')
            .map(|c| format!("##{c}"))
            .collect::<Vec<_>>(),
    );
    let mut lowered: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
    lowered.sort();
    for word in lowered {
        if word.chars().any(|c| c.is_ascii_punctuation()) {
            return Err(Error::Invalid(format!(
                "`{word}` holds punctuation, which BERT's pre-tokenizer splits off"
            )));
        }
        if !tokens.contains(&word) {
            tokens.push(word);
        }
    }
    let vocab: Vec<(String, u32)> = tokens.into_iter().zip(0..).collect();
    let dec_token_id = vocab.len() as u32;
    let image_token_id = dec_token_id + 1;
    let mut added_tokens: Vec<AddedToken> = specials
        .iter()
        .zip(0..)
        .map(|(t, id)| added(id, t))
        .collect();
    added_tokens.push(added(dec_token_id, "[DEC]"));
    added_tokens.push(added(image_token_id, IMAGE_TOKEN));
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {
            "type": "BertNormalizer",
            "clean_text": true,
            "handle_chinese_chars": true,
            "strip_accents": null,
            "lowercase": true
        },
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 0}}
            ],
            "pair": [
                {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 1}}
            ],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {
            "type": "WordPiece",
            "unk_token": "[UNK]",
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
            "vocab": Ordered(&vocab),
        }
    });
    let path = dir.join("tokenizer.json");
    write_json(&path, &tokenizer)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({
            "backend": "tokenizers",
            "bos_token": "[DEC]",
            "cls_token": "[CLS]",
            "do_lower_case": true,
            "mask_token": "[MASK]",
            "model_max_length": model_max_length,
            "pad_token": "[PAD]",
            "processor_class": "Blip2Processor",
            "sep_token": "[SEP]",
            "strip_accents": null,
            "tokenize_chinese_chars": true,
            "tokenizer_class": "BertTokenizer",
            "unk_token": "[UNK]",
        }),
    )?;
    let loaded = check_loads(&path)?;
    if loaded.token_to_id("[DEC]") != Some(dec_token_id) {
        return Err(Error::Invalid(format!(
            "{}: `[DEC]` did not get id {dec_token_id}",
            path.display()
        )));
    }
    Ok(QFormerTokenizerInfo {
        vocab_size: dec_token_id as usize + 1,
        pad_token_id: 0,
        unk_token_id: 1,
        cls_token_id: 2,
        sep_token_id: 3,
        mask_token_id: 4,
        dec_token_id,
        image_token_id,
    })
}
