//! The synthetic shapes world: deterministic, decidable from pixels, manifests that load.

use std::path::Path;

use blip2_model::processor::{DecodeLimits, ImageProcessor, ImageProcessorConfig};
use blip2_train::data;
use blip2_train::world::{self, Scene, WorldConfig, COLORS};
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
    let dir = std::env::temp_dir().join(format!("blip2-world-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn small() -> WorldConfig {
    WorldConfig {
        image_size: 64,
        train_images: 12,
        val_images: 3,
        test_images: 3,
        seed: 7,
    }
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

#[test]
fn the_same_seed_writes_the_same_bytes_and_another_seed_does_not() {
    let (a, b, c) = (tempdir(), tempdir(), tempdir());
    let summary = world::generate(a.path(), &small()).unwrap();
    world::generate(b.path(), &small()).unwrap();
    world::generate(c.path(), &WorldConfig { seed: 8, ..small() }).unwrap();
    assert_eq!(summary.images, 18);
    // One caption and five questions per image.
    assert_eq!(
        summary.pairs,
        vec![
            ("train".into(), 72),
            ("val".into(), 18),
            ("test".into(), 18)
        ]
    );
    for name in [
        "train.jsonl",
        "test.jsonl",
        "labels.jsonl",
        "text.txt",
        "images/000005.png",
    ] {
        assert_eq!(read(a.path(), name), read(b.path(), name), "{name}");
    }
    assert_ne!(read(a.path(), "train.jsonl"), read(c.path(), "train.jsonl"));
}

/// Pixels of exactly the object colour, on a clean render.
fn colour_pixels(scene: &Scene, seed: u64) -> (usize, [usize; 4]) {
    let img = world::render(scene, 64, &mut StdRng::seed_from_u64(seed)).unwrap();
    let colour = COLORS[scene.color].1;
    // Per half: left, right, top, bottom.
    let mut halves = [0usize; 4];
    let mut total = 0;
    for (x, y, px) in img.enumerate_pixels() {
        if px.0 == colour {
            total += 1;
            halves[if x < 32 { 0 } else { 1 }] += 1;
            halves[if y < 32 { 2 } else { 3 }] += 1;
        }
    }
    (total, halves)
}

#[test]
fn the_answers_are_in_the_pixels() {
    for seed in 0..20u64 {
        for position in 0..4 {
            let scene = |count| Scene {
                color: (seed % 6) as usize,
                shape: (seed % 4) as usize,
                count,
                position,
            };
            let (one, halves) = colour_pixels(&scene(0), seed);
            let (four, _) = colour_pixels(&scene(3), seed);
            assert!(one > 20, "an object is drawn ({one} px)");
            // Four objects cover clearly more than one (sizes vary by at most 1.3x in diameter).
            assert!(four as f64 > 2.0 * one as f64, "{four} vs {one}");
            // Everything lies in the named half.
            let (inside, outside) = match position {
                0 => (halves[0], halves[1]),
                1 => (halves[1], halves[0]),
                2 => (halves[2], halves[3]),
                _ => (halves[3], halves[2]),
            };
            assert_eq!((inside, outside), (one, 0), "position {position}");
            // ... and in no other half: the objects reach both halves of the other axis.
            let (a, b) = if position < 2 {
                (halves[2], halves[3])
            } else {
                (halves[0], halves[1])
            };
            assert!(
                a > 0 && b > 0,
                "position {position} is ambiguous: {halves:?}"
            );
        }
    }
}

#[test]
fn captions_and_questions_follow_the_serving_template() {
    let scene = Scene {
        color: 0,
        shape: 0,
        count: 2,
        position: 0,
    };
    assert_eq!(scene.caption(), "three red circles on the left");
    let single = Scene {
        count: 0,
        position: 3,
        ..scene
    };
    assert_eq!(single.caption(), "one red circle at the bottom");
    let dir = tempdir();
    world::generate(dir.path(), &small()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("test.jsonl")).unwrap();
    let mut types = std::collections::BTreeSet::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let kind = v["type"].as_str().unwrap().to_string();
        match v.get("prompt").and_then(|p| p.as_str()) {
            Some(prompt) => {
                assert!(prompt.starts_with("Question: ") && prompt.ends_with(" Answer:"));
                let answer = v["text"].as_str().unwrap();
                if kind != "describe" {
                    assert_eq!(answer, v["attributes"][&kind].as_str().unwrap());
                }
            }
            None => assert_eq!(kind, "caption"),
        }
        types.insert(kind);
    }
    assert_eq!(
        types.into_iter().collect::<Vec<_>>(),
        ["caption", "color", "count", "describe", "position", "shape"]
    );
    // Every word of every split is in the vocabulary.
    let vocab = world::vocabulary();
    for word in blip2_train::metrics::words(&text.replace("\"", " ")) {
        if word.chars().all(|c| c.is_ascii_lowercase())
            && word.len() > 2
            && ![
                "image",
                "images",
                "text",
                "prompt",
                "kind",
                "type",
                "attributes",
                "caption",
                "color",
                "shape",
                "count",
                "position",
                "describe",
                "png",
                "qa",
            ]
            .contains(&word.as_str())
        {
            assert!(vocab.contains(&word), "{word} missing from the vocabulary");
        }
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
    assert_eq!(ok.pairs[0].extra["type"], "caption");
    assert!(ok.pairs[1]
        .prompt
        .as_deref()
        .unwrap()
        .starts_with("Question: "));

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
        ]
        .join("\n"),
    )
    .unwrap();
    let loaded = data::load(&manifest, &processor(), false).unwrap();
    assert_eq!(loaded.pairs.len(), 2);
    assert_eq!(loaded.skipped.len(), 4, "{:?}", loaded.skipped);
    for (entry, line) in loaded.skipped.iter().zip([2, 3, 4, 5]) {
        assert!(entry.contains(&format!("bad.jsonl:{line}: ")), "{entry}");
    }
    assert!(loaded.skipped[0].contains("missing.png"));
    assert!(loaded.skipped[2].contains("no `image`"));

    let err = data::load(&manifest, &processor(), true).unwrap_err();
    assert!(err.to_string().contains("bad.jsonl:2: "), "{err}");
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
    std::fs::write(
        dir.path().join("a.txt"),
        "two green squares\n\nsquares on the right\n",
    )
    .unwrap();
    let loaded = data::load(dir.path(), &processor(), false).unwrap();
    assert_eq!(loaded.pairs.len(), 2);
    assert_eq!(loaded.images, 1);
    assert_eq!(loaded.pairs[1].text, "squares on the right");
    assert_eq!(loaded.skipped.len(), 1);
    assert!(loaded.skipped[0].contains("b.txt"), "{:?}", loaded.skipped);
    assert!(data::load(dir.path(), &processor(), true).is_err());
}
