//! The world's tokenizers: loadable by the `tokenizers` crate and by this project's prompt and
//! retrieval code, every world word one token, any text still encodable.

use std::path::{Path, PathBuf};

use blip2_model::config::Blip2Config;
use blip2_model::prompt::{PromptPiece, PromptTokenizer};
use blip2_model::retrieval::RetrievalTokenizer;
use blip2_train::vocab::{self, OptTokenizerInfo};
use blip2_train::world::{self, Scene, QUESTION_TYPES};
use tokenizers::Tokenizer;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> TempDir {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("blip2-vocab-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// Every caption, prompt and "Question: q Answer: a" line the world can write.
fn world_sentences() -> Vec<String> {
    let mut out = Vec::new();
    for color in 0..6 {
        for shape in 0..4 {
            for count in 0..4 {
                for position in 0..4 {
                    let scene = Scene {
                        color,
                        shape,
                        count,
                        position,
                    };
                    out.push(scene.caption());
                    for kind in QUESTION_TYPES {
                        let (phrasings, answer) = scene.question(kind);
                        for q in phrasings {
                            out.push(format!("Question: {q} Answer:"));
                            out.push(format!("Question: {q} Answer: {answer}"));
                        }
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn opt(dir: &Path) -> (OptTokenizerInfo, Tokenizer) {
    let info = vocab::write_opt_tokenizer(dir, &world::tokenizer_words()).unwrap();
    (
        info,
        Tokenizer::from_file(dir.join("tokenizer.json")).unwrap(),
    )
}

fn ids(tok: &Tokenizer, text: &str, special: bool) -> Vec<u32> {
    tok.encode(text, special).unwrap().get_ids().to_vec()
}

#[test]
fn every_world_word_is_one_opt_token_with_and_without_a_space() {
    let dir = tempdir();
    let (info, tok) = opt(dir.path());
    assert_eq!(
        (
            info.bos_token_id,
            info.eos_token_id,
            info.pad_token_id,
            info.unk_token_id
        ),
        (2, 2, 1, 3)
    );
    for (token, id) in [("<s>", 0), ("<pad>", 1), ("</s>", 2), ("<unk>", 3)] {
        assert_eq!(tok.token_to_id(token), Some(id), "{token}");
    }
    assert_eq!(tok.token_to_id("<image>"), Some(info.image_token_id));
    assert_eq!(info.vocab_size, info.image_token_id as usize + 1);
    assert_eq!(tok.get_vocab_size(true), info.vocab_size);
    // 4 specials, 256 byte-level characters, then the merged pieces; small enough for a tiny
    // OPT's embedding.
    assert!(info.vocab_size < 1024, "{}", info.vocab_size);
    for word in world::tokenizer_words() {
        for text in [word.clone(), format!(" {word}")] {
            let got = ids(&tok, &text, false);
            assert_eq!(got.len(), 1, "`{text}` -> {got:?}");
            assert_eq!(tok.decode(&got, false).unwrap(), text);
        }
    }
}

#[test]
fn world_sentences_and_any_text_round_trip_through_the_opt_tokenizer() {
    let dir = tempdir();
    let (info, tok) = opt(dir.path());
    for sentence in world_sentences() {
        let with_bos = ids(&tok, &sentence, true);
        assert_eq!(with_bos[0], 2, "OPT prepends </s>");
        let plain = ids(&tok, &sentence, false);
        assert_eq!(with_bos[1..], plain[..]);
        // One token per word and punctuation mark.
        let pieces = sentence
            .split(' ')
            .map(|w| 1 + w.chars().filter(|c| c.is_ascii_punctuation()).count())
            .sum::<usize>();
        assert_eq!(plain.len(), pieces, "{sentence}");
        assert_eq!(tok.decode(&plain, false).unwrap(), sentence);
        assert!(plain.iter().all(|&id| id != 3 && id < info.image_token_id));
    }
    // Text outside the world falls back to bytes and still round-trips.
    for text in [
        "Héllo, wörld! 123 ✓",
        "  two  spaces",
        "tab\there\nnewline",
        "UPPER red",
    ] {
        let got = ids(&tok, text, false);
        assert_eq!(tok.decode(&got, false).unwrap(), text, "{got:?}");
    }
    // The stage-2 target is encoded with a leading space: " two red circles on the left".
    assert_eq!(ids(&tok, " two red circles on the left", false).len(), 6);
}

#[test]
fn the_opt_tokenizer_is_deterministic_and_shaped_like_the_fixture() {
    let (a, b) = (tempdir(), tempdir());
    opt(a.path());
    opt(b.path());
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(a.path().join(name)).unwrap(),
            std::fs::read(b.path().join(name)).unwrap(),
            "{name}"
        );
    }
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/opt-a");
    let ours = read(a.path().join("tokenizer.json"));
    let theirs = read(fixture.join("tokenizer.json"));
    for key in ["pre_tokenizer", "post_processor", "decoder", "normalizer"] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    // The byte-level alphabet in the fixture's order, right after the four specials.
    let vocab = |v: &serde_json::Value| -> Vec<(String, u64)> {
        let mut items: Vec<(String, u64)> = v["model"]["vocab"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, id)| (k.clone(), id.as_u64().unwrap()))
            .collect();
        items.sort_by_key(|(_, id)| *id);
        items
    };
    assert_eq!(vocab(&ours)[..260], vocab(&theirs)[..260]);
    let config = read(a.path().join("tokenizer_config.json"));
    let fixture_config = read(fixture.join("tokenizer_config.json"));
    for key in [
        "tokenizer_class",
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
        "add_prefix_space",
    ] {
        assert_eq!(config[key], fixture_config[key], "{key}");
    }
}

#[test]
fn the_serving_prompt_tokenizer_builds_the_chat_prompt() {
    let dir = tempdir();
    let (info, tok) = opt(dir.path());
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/opt-a/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    config["image_token_index"] = info.image_token_id.into();
    config["text_config"]["vocab_size"] = info.vocab_size.into();
    config["num_query_tokens"] = 4.into();
    let config =
        Blip2Config::from_json(&config.to_string(), &dir.path().join("config.json")).unwrap();
    let prompt = PromptTokenizer::from_dir(dir.path(), &config).unwrap();
    assert_eq!(prompt.image_token_id(), Some(info.image_token_id));
    let id = |t: &str| tok.token_to_id(t).unwrap();
    let question = vec![
        id("Question"),
        id(":"),
        id("Ġwhat"),
        id("Ġcolor"),
        id("Ġis"),
        id("Ġit"),
        id("?"),
        id("ĠAnswer"),
        id(":"),
    ];
    // The session tier's first turn is `[image, "Question: q Answer:"]`, which the LLM tier
    // tokenises as "<image>Question: ...": the tokenizer's BOS `</s>` comes first, then the
    // marker expands in place to num_query_tokens placeholders, then the question.
    let built = prompt
        .build("<image>Question: what color is it? Answer:", 1)
        .unwrap();
    assert_eq!(
        built.pieces,
        vec![
            PromptPiece::Tokens(vec![2]),
            PromptPiece::Image(0),
            PromptPiece::Tokens(question.clone())
        ]
    );
    let mut expected = vec![2];
    expected.extend([info.image_token_id; 4]);
    expected.extend(&question);
    assert_eq!(built.input_ids, expected);
    assert_eq!(built.num_positions, 14);
    // Without a marker the image goes before everything, BOS included (Blip2Processor's
    // legacy order): a different sequence.
    let unmarked = prompt
        .build("Question: what color is it? Answer:", 1)
        .unwrap();
    let mut legacy = vec![info.image_token_id; 4];
    legacy.push(2);
    legacy.extend(&question);
    assert_eq!(unmarked.input_ids, legacy);
    // A caption is trained with an empty prompt: "<image>" alone.
    assert_eq!(
        prompt.build("<image>", 1).unwrap().pieces,
        vec![PromptPiece::Tokens(vec![2]), PromptPiece::Image(0)]
    );
    // A config whose image_token_index is not `<image>`'s id is refused.
    let mut wrong = config.clone();
    wrong.image_token_index = Some(info.image_token_id - 1);
    assert!(PromptTokenizer::from_dir(dir.path(), &wrong).is_err());
}

#[test]
fn the_qformer_tokenizer_is_bert_wordpiece_with_dec() {
    let dir = tempdir();
    let info = vocab::write_qformer_tokenizer(dir.path(), &world::tokenizer_words(), 32).unwrap();
    let tok = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(
        (
            info.pad_token_id,
            info.unk_token_id,
            info.cls_token_id,
            info.sep_token_id,
            info.mask_token_id
        ),
        (0, 1, 2, 3, 4)
    );
    for (token, id) in [
        ("[PAD]", 0),
        ("[UNK]", 1),
        ("[CLS]", 2),
        ("[SEP]", 3),
        ("[MASK]", 4),
        ("[DEC]", info.dec_token_id),
        ("<image>", info.image_token_id),
    ] {
        assert_eq!(tok.token_to_id(token), Some(id), "{token}");
    }
    assert_eq!(info.vocab_size, info.dec_token_id as usize + 1);
    assert_eq!(info.image_token_id, info.dec_token_id + 1);
    // Words are one token each, lower-cased.
    for word in world::tokenizer_words() {
        let got = ids(&tok, &word, false);
        assert_eq!(got.len(), 1, "{word} -> {got:?}");
        assert_eq!(tok.id_to_token(got[0]).unwrap(), word.to_lowercase());
    }
    for sentence in world_sentences() {
        let got = ids(&tok, &sentence, true);
        assert_eq!((got[0], *got.last().unwrap()), (2, 3), "[CLS] ... [SEP]");
        assert!(!got.contains(&1), "no [UNK] in {sentence}");
        let words = sentence
            .split(' ')
            .map(|w| 1 + w.chars().filter(|c| c.is_ascii_punctuation()).count())
            .sum::<usize>();
        assert_eq!(got.len(), words + 2, "{sentence}");
        // The WordPiece decoder's clean-up joins " ." and " ?" but not " :".
        let decoded = tok.decode(&got, true).unwrap().replace(" :", ":");
        assert_eq!(decoded, sentence.to_lowercase(), "{got:?}");
    }
    // Other words fall back to pieces; only characters outside ASCII are unknown.
    let pieces = ids(&tok, "Hexagon", false);
    assert!(pieces.len() > 1 && !pieces.contains(&1), "{pieces:?}");
    assert_eq!(tok.decode(&pieces, true).unwrap(), "hexagon");
    assert!(ids(&tok, "✓", false).contains(&1));

    // The retrieval tier loads it with an embedding of vocab_size rows.
    let retrieval =
        RetrievalTokenizer::from_file(&dir.path().join("tokenizer.json"), 32, info.vocab_size)
            .unwrap();
    let enc = retrieval.encode("two red circles on the left").unwrap();
    assert_eq!(enc.ids.len(), 8);
    assert_eq!(retrieval.token_to_id("[DEC]"), Some(info.dec_token_id));

    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["bos_token"], "[DEC]");
    assert_eq!(config["tokenizer_class"], "BertTokenizer");
    assert_eq!(config["model_max_length"], 32);
}

#[test]
fn words_with_whitespace_are_refused() {
    let dir = tempdir();
    let bad = vec!["red".to_string(), "two words".to_string()];
    assert!(vocab::write_opt_tokenizer(dir.path(), &bad).is_err());
    assert!(vocab::write_qformer_tokenizer(dir.path(), &bad, 32).is_err());
    assert!(vocab::write_opt_tokenizer(dir.path(), &[String::new()]).is_err());
    let punct = vec!["it's".to_string()];
    assert!(vocab::write_qformer_tokenizer(dir.path(), &punct, 32).is_err());
}
