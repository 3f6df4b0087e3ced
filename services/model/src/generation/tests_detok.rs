//! Incremental detokenisation: pieces never split a UTF-8 character and join to the full decode.

use std::sync::Arc;

use tokenizers::Tokenizer;

use super::Detokenizer;

fn bytelevel() -> Tokenizer {
    include_str!("testdata/bytelevel_tokenizer.json")
        .parse()
        .unwrap()
}

fn metaspace() -> Tokenizer {
    include_str!("testdata/metaspace_tokenizer.json")
        .parse()
        .unwrap()
}

/// Pushes `ids` one by one; checks the joined pieces against `decode` and returns the pieces.
fn stream(tok: &Tokenizer, ids: &[u32], skip: bool) -> Vec<String> {
    let mut d = Detokenizer::new(tok, skip);
    let mut pieces: Vec<String> = ids.iter().map(|&id| d.push(id).unwrap()).collect();
    pieces.push(d.finish().unwrap());
    let joined: String = pieces.concat();
    assert_eq!(joined, tok.decode(ids, skip).unwrap(), "ids {ids:?}");
    pieces
}

/// Deterministic pseudo-random id sequences.
fn random_ids(seed: u64, len: usize, vocab: u32) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

#[test]
fn byte_level_multibyte_characters_are_never_split() {
    let tok = bytelevel();
    for text in [
        "café 日本 🙂",
        "résumé 🙂🙂 naïve",
        "hello world",
        "日本語🙂é",
    ] {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let pieces = stream(&tok, &ids, true);
        assert_eq!(pieces.concat(), text);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    }
    // One token per byte: "🙂" is four tokens and appears whole on the fourth.
    let smile: Vec<u32> = "🙂"
        .as_bytes()
        .iter()
        .map(|b| byte_token(&tok, *b))
        .collect();
    let mut d = Detokenizer::new(&tok, true);
    let pieces: Vec<String> = smile.iter().map(|&id| d.push(id).unwrap()).collect();
    assert_eq!(pieces, ["", "", "", "🙂"]);
    // A dangling partial character is emitted by finish() as U+FFFD, as decode() does.
    let mut d = Detokenizer::new(&tok, true);
    assert_eq!(d.push(smile[0]).unwrap(), "");
    assert_eq!(d.push(smile[1]).unwrap(), "");
    assert_eq!(d.finish().unwrap(), tok.decode(&smile[..2], true).unwrap());
}

/// The id of the single-byte token for byte `b` (GPT-2's byte-to-unicode alphabet).
fn byte_token(tok: &Tokenizer, b: u8) -> u32 {
    let printable = |c: u32| {
        (0x21..=0x7E).contains(&c) || (0xA1..=0xAC).contains(&c) || (0xAE..=0xFF).contains(&c)
    };
    let mut n = 0;
    let mut ch = None;
    for c in 0u32..256 {
        let mapped = if printable(c) {
            c
        } else {
            n += 1;
            255 + n
        };
        if c == b as u32 {
            ch = char::from_u32(mapped);
        }
    }
    tok.token_to_id(&ch.unwrap().to_string()).unwrap()
}

#[test]
fn byte_level_random_sequences_join_to_decode() {
    let tok = bytelevel();
    let vocab = tok.get_vocab_size(true) as u32;
    for seed in 0..300 {
        let ids = random_ids(seed, 1 + (seed as usize % 17), vocab);
        stream(&tok, &ids, true);
        stream(&tok, &ids, false);
    }
}

#[test]
fn metaspace_unigram_joins_to_decode() {
    let tok = metaspace();
    for text in ["hello world", "café 日本 🙂", " a b hello"] {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let pieces = stream(&tok, &ids, true);
        assert_eq!(pieces.concat(), tok.decode(&ids, true).unwrap());
    }
    let vocab = tok.get_vocab_size(true) as u32;
    for seed in 0..300 {
        let ids = random_ids(seed, 1 + (seed as usize % 13), vocab);
        stream(&tok, &ids, true);
        stream(&tok, &ids, false);
    }
    // Leading-space handling: the first word loses its space, later ones keep it.
    let ids = [4u32, 5, 6, 3, 3, 4];
    assert_eq!(stream(&tok, &ids, true).concat(), "hello world   hello");
}

#[test]
fn detokenizer_can_own_an_arc() {
    let tok = Arc::new(metaspace());
    let mut d = Detokenizer::new(Arc::clone(&tok), true);
    assert_eq!(d.push(4).unwrap(), "hello");
    assert_eq!(d.push(1).unwrap(), "");
    assert_eq!(d.push(5).unwrap(), " wor");
    assert_eq!(d.finish().unwrap(), "");
    assert_eq!(d.ids(), [4, 1, 5]);
}
