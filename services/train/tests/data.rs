//! Loading training data: manifests and directories with every bad line reported, the world's
//! labels and text corpus, the seeded batch order.

use std::path::Path;

use blip2_model::processor::{DecodeLimits, ImageProcessor, ImageProcessorConfig};
use blip2_train::data;
use blip2_train::world::{self, Scene, WorldConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

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
    let dir = std::env::temp_dir().join(format!("blip2-data-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn small() -> WorldConfig {
    WorldConfig {
        train_images: 12,
        val_images: 3,
        test_images: 3,
        seed: 7,
        ..WorldConfig::default()
    }
}

fn processor() -> ImageProcessor {
    ImageProcessor::new(ImageProcessorConfig::with_size(32), DecodeLimits::default())
}

#[test]
fn a_manifest_loads_each_image_once_and_reports_bad_lines() {
    let dir = tempdir();
    world::generate(dir.path(), &small()).unwrap();
    let ok = data::load(&dir.path().join("val.jsonl"), &processor(), true).unwrap();
    assert_eq!((ok.pairs.len(), ok.images, ok.skipped.len()), (18, 3, 0));
    assert_eq!(ok.pairs[0].pixels.dims(), &[3, 32, 32]);
    // Six pairs per image, sharing its index and its preprocessed pixels.
    assert!(ok.pairs[..6].iter().all(|p| p.image_index == 0));
    assert_eq!(ok.pairs[6].image_index, 1);
    let first: Vec<f32> = ok.pairs[0].pixels.flatten_all().unwrap().to_vec1().unwrap();
    let fifth: Vec<f32> = ok.pairs[5].pixels.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(first, fifth);
    // The world's fields are kept for evaluation.
    let caption = &ok.pairs[0];
    assert!(caption.is_caption());
    assert_eq!(caption.kind(), Some("caption"));
    assert_eq!(caption.question_type(), Some("caption"));
    assert!(caption.prompt.is_none());
    let words = caption.attribute_words();
    assert_eq!(words.len(), 4);
    // color, shape, count, position: "three orange triangles on the right".
    assert!(
        caption
            .text
            .starts_with(&format!("{} {} {}", words[2], words[0], words[1])),
        "{} vs {words:?}",
        caption.text
    );
    assert!(caption.text.ends_with(&words[3]));
    let color = &ok.pairs[1];
    assert!(!color.is_caption());
    assert_eq!(
        (color.kind(), color.question_type()),
        (Some("qa"), Some("color"))
    );
    assert_eq!(color.text, words[0]);
    assert!(color.prompt.as_deref().unwrap().starts_with("Question: "));

    let manifest = dir.path().join("bad.jsonl");
    std::fs::write(
        &manifest,
        [
            r#"{"image": "images/000000.png", "text": "a"}"#,
            r#"{"image": "images/missing.png", "text": "b"}"#,
            "not json",
            r#"{"text": "c"}"#,
            r#"{"image": "text.txt", "text": "d"}"#,
            r#"{"image": "images/000001.png", "text": "e", "prompt": "Question: q Answer:"}"#,
            "",
            r#"{"image": "images/000001.png", "text": 5}"#,
            r#"["image"]"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let loaded = data::load(&manifest, &processor(), false).unwrap();
    assert_eq!(loaded.pairs.len(), 2);
    assert_eq!(loaded.images, 2);
    assert!(loaded.pairs[0].is_caption() && !loaded.pairs[1].is_caption());
    assert_eq!(loaded.skipped.len(), 6, "{:?}", loaded.skipped);
    for (entry, line) in loaded.skipped.iter().zip([2, 3, 4, 5, 8, 9]) {
        assert!(entry.contains(&format!("bad.jsonl:{line}: ")), "{entry}");
    }
    assert!(loaded.skipped[0].contains("missing.png"));
    assert!(loaded.skipped[1].contains("not JSON"));
    assert!(loaded.skipped[2].contains("no `image`"));
    assert!(loaded.skipped[3].contains("text.txt"));
    assert!(loaded.skipped[4].contains("`text` must be a string"));
    assert!(loaded.skipped[5].contains("not a JSON object"));

    let err = data::load(&manifest, &processor(), true).unwrap_err();
    assert!(matches!(err, blip2_train::Error::Manifest { line: 2, .. }));
    assert!(err.to_string().contains("bad.jsonl:2: "), "{err}");
    assert!(data::load(&dir.path().join("nothing.jsonl"), &processor(), false).is_err());
}

#[test]
fn a_directory_pairs_images_with_their_caption_files() {
    let dir = tempdir();
    let img = world::render(
        &Scene {
            color: 1,
            shape: 1,
            count: 1,
            position: 1,
        },
        64,
        &mut StdRng::seed_from_u64(1),
    )
    .unwrap();
    img.save(dir.path().join("a.png")).unwrap();
    img.save(dir.path().join("b.png")).unwrap();
    std::fs::write(dir.path().join("c.png"), b"not a png").unwrap();
    std::fs::write(dir.path().join("c.txt"), "a caption\n").unwrap();
    std::fs::write(
        dir.path().join("a.txt"),
        "two green squares\n\nsquares on the right\n",
    )
    .unwrap();
    let loaded = data::load(dir.path(), &processor(), false).unwrap();
    assert_eq!(loaded.pairs.len(), 2);
    assert_eq!(loaded.images, 1);
    assert_eq!(loaded.pairs[0].text, "two green squares");
    assert_eq!(loaded.pairs[1].text, "squares on the right");
    assert!(loaded
        .pairs
        .iter()
        .all(|p| p.is_caption() && p.image_index == 0));
    assert_eq!(loaded.skipped.len(), 2, "{:?}", loaded.skipped);
    assert!(loaded.skipped[0].contains("b.txt"), "{:?}", loaded.skipped);
    assert!(
        loaded.skipped[1].contains("c.txt:1: "),
        "{:?}",
        loaded.skipped
    );
    assert!(data::load(dir.path(), &processor(), true).is_err());
}

#[test]
fn labels_load_per_split_with_their_heads() {
    let dir = tempdir();
    world::generate(dir.path(), &small()).unwrap();
    let path = dir.path().join("labels.jsonl");
    let all = data::load_labels(&path, &processor(), None, true).unwrap();
    assert_eq!(all.images.len(), 18);
    assert_eq!(
        all.heads,
        [("color", 6), ("shape", 4), ("count", 4), ("position", 4)]
            .map(|(n, c)| (n.to_string(), c))
    );
    let train = data::load_labels(&path, &processor(), Some("train"), true).unwrap();
    assert_eq!(train.images.len(), 12);
    let test = data::load_labels(&path, &processor(), Some("test"), true).unwrap();
    assert_eq!(test.images.len(), 3);
    assert!(test
        .images
        .iter()
        .all(|i| i.split.as_deref() == Some("test")));
    assert_eq!(test.images[0].pixels.dims(), &[3, 32, 32]);
    assert!(test.images[0].image.ends_with("images/000015.png"));
    // The labels are the captions' attributes.
    let manifest = data::load(&dir.path().join("test.jsonl"), &processor(), true).unwrap();
    let caption = &manifest.pairs[0];
    let expected = caption.attribute_words();
    let labels = &test.images[0].labels;
    assert_eq!(
        expected,
        [
            world::COLORS[labels[0]].0,
            world::SHAPES[labels[1]],
            world::COUNTS[labels[2]],
            world::POSITIONS[labels[3]],
        ]
    );

    let bad = dir.path().join("bad-labels.jsonl");
    std::fs::write(
        &bad,
        [
            r#"{"image": "images/000000.png", "color": 1, "shape": 0, "count": 3, "position": 2}"#,
            r#"{"image": "images/000001.png", "color": 6, "shape": 0, "count": 3, "position": 2}"#,
            r#"{"image": "images/000001.png", "color": 1, "count": 3, "position": 2}"#,
            r#"{"image": "images/none.png", "color": 1, "shape": 0, "count": 3, "position": 2}"#,
            "{",
        ]
        .join("\n"),
    )
    .unwrap();
    let loaded = data::load_labels(&bad, &processor(), None, false).unwrap();
    assert_eq!(loaded.images.len(), 1);
    assert_eq!(loaded.images[0].labels, vec![1, 0, 3, 2]);
    assert_eq!(loaded.images[0].split, None);
    assert_eq!(loaded.skipped.len(), 4, "{:?}", loaded.skipped);
    assert!(loaded.skipped[0].contains(":2: `color` 6 is out of range"));
    assert!(loaded.skipped[1].contains(":3: no `shape`"));
    assert!(loaded.skipped[2].contains(":4: ") && loaded.skipped[2].contains("none.png"));
    assert!(loaded.skipped[3].contains(":5: not JSON"));
    assert!(data::load_labels(&bad, &processor(), None, true).is_err());
}

#[test]
fn the_text_corpus_loads_without_blank_lines() {
    let dir = tempdir();
    world::generate(dir.path(), &small()).unwrap();
    let text = data::load_text(&dir.path().join("text.txt")).unwrap();
    assert_eq!(text.len(), 12 * 6);
    assert!(text[1].starts_with(&format!("{}. Question: ", text[0])));
    let path = dir.path().join("t.txt");
    std::fs::write(&path, "  a b \n\n\nc\n").unwrap();
    assert_eq!(data::load_text(&path).unwrap(), ["a b", "c"]);
    std::fs::write(&path, "\n \n").unwrap();
    assert!(data::load_text(&path).is_err());
    assert!(data::load_text(&dir.path().join("missing.txt")).is_err());
}

#[test]
fn batches_cover_every_example_once_in_a_seeded_order() {
    let epoch0 = data::batches(10, 4, 1, 0);
    assert_eq!(epoch0.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
    let mut all: Vec<usize> = epoch0.concat();
    assert_ne!(all, (0..10).collect::<Vec<_>>(), "shuffled");
    all.sort();
    assert_eq!(all, (0..10).collect::<Vec<_>>());
    // Reproducible; a new order each epoch and each seed.
    assert_eq!(data::batches(10, 4, 1, 0), epoch0);
    assert_ne!(data::batches(10, 4, 1, 1), epoch0);
    assert_ne!(data::batches(10, 4, 2, 0), epoch0);
    assert_eq!(data::batches(0, 4, 1, 0), Vec::<Vec<usize>>::new());
    assert_eq!(
        data::batches(3, 0, 1, 0).len(),
        3,
        "a batch size of 0 counts as 1"
    );
    assert_eq!(data::batches(3, 8, 1, 0).len(), 1);
}
