//! The synthetic shapes world: deterministic, every answer decidable from the pixels, text in
//! the serving template, held-out combinations kept out of training.

use std::path::Path;

use blip2_train::world::{self, Holdout, Scene, WorldConfig, COLORS, POSITIONS, SHAPES};
use image::RgbImage;
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

fn lines(dir: &Path, name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(name))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_same_seed_writes_the_same_bytes_and_another_seed_does_not() {
    let (a, b, c) = (tempdir(), tempdir(), tempdir());
    let summary = world::generate(a.path(), &small()).unwrap();
    world::generate(b.path(), &small()).unwrap();
    world::generate(c.path(), &WorldConfig { seed: 8, ..small() }).unwrap();
    assert_eq!(summary.images, 18);
    // One caption and five questions per image; no novel split without a holdout.
    assert_eq!(
        summary.pairs,
        vec![
            ("train".into(), 72),
            ("val".into(), 18),
            ("test".into(), 18)
        ]
    );
    assert!(!a.path().join("novel.jsonl").exists());
    for name in [
        "train.jsonl",
        "val.jsonl",
        "test.jsonl",
        "labels.jsonl",
        "text.txt",
        "world.json",
        "images/000005.png",
        "images/000017.png",
    ] {
        assert_eq!(read(a.path(), name), read(b.path(), name), "{name}");
    }
    assert!(!a.path().join("images/000018.png").exists());
    assert_ne!(read(a.path(), "train.jsonl"), read(c.path(), "train.jsonl"));
    assert_ne!(
        read(a.path(), "images/000005.png"),
        read(c.path(), "images/000005.png")
    );
}

/// What a reader of the pixels sees, worked out without the generator's code.
#[derive(Debug, PartialEq)]
struct Seen {
    color: usize,
    shapes: Vec<usize>,
    /// The positions whose rule holds (exactly one for a decidable image).
    positions: Vec<usize>,
}

/// Reads an image: the object colour (the only non-background colour), the objects
/// (8-connected regions of it), each one's shape from its outline, and the position rule of
/// the world's docs.
fn read_pixels(img: &RgbImage) -> Seen {
    let (w, h) = img.dimensions();
    let mut color = None;
    let mut object = vec![false; (w * h) as usize];
    for (x, y, px) in img.enumerate_pixels() {
        if let Some(c) = COLORS.iter().position(|(_, rgb)| *rgb == px.0) {
            assert!(color.is_none() || color == Some(c), "two object colours");
            color = Some(c);
            object[(y * w + x) as usize] = true;
        } else {
            // The background: light grey with a tint of at most 12 per channel.
            assert!(px.0.iter().all(|&v| (220..=244).contains(&v)), "{px:?}");
        }
    }
    let color = color.expect("no object pixels");
    let mut seen = vec![false; object.len()];
    let mut regions: Vec<Vec<(u32, u32)>> = Vec::new();
    for start in 0..object.len() {
        if !object[start] || seen[start] {
            continue;
        }
        let mut stack = vec![start];
        seen[start] = true;
        let mut region = Vec::new();
        while let Some(i) = stack.pop() {
            let (x, y) = ((i as u32) % w, (i as u32) / w);
            region.push((x, y));
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = (ny as u32 * w + nx as u32) as usize;
                    if object[j] && !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        regions.push(region);
    }
    let shapes = regions.iter().map(|r| shape_of(r)).collect();
    let all: Vec<(u32, u32)> = regions.concat();
    let x0 = all.iter().map(|p| p.0).min().unwrap();
    let x1 = all.iter().map(|p| p.0).max().unwrap();
    let y0 = all.iter().map(|p| p.1).min().unwrap();
    let y1 = all.iter().map(|p| p.1).max().unwrap();
    // On an even-sized image: inside a half with a free pixel column (row) before the
    // midline, and reaching two rows (columns) across the other midline.
    let m = w / 2;
    let across_rows = y0 + 2 <= m && y1 > m;
    let across_columns = x0 + 2 <= m && x1 > m;
    let rules = [
        x1 + 2 <= m && across_rows,
        x0 > m && across_rows,
        y1 + 2 <= m && across_columns,
        y0 > m && across_columns,
    ];
    let positions = (0..4).filter(|&p| rules[p]).collect();
    Seen {
        color,
        shapes,
        positions,
    }
}

/// A region's shape from its outline: a square fills its bounding box, a circle 0.66-0.9 of
/// it (pi/4 for large ones), a triangle or diamond 0.5-0.6; of those two, the triangle (apex up) has most pixels in its lower
/// half and the diamond is symmetric.
fn shape_of(region: &[(u32, u32)]) -> usize {
    let x0 = region.iter().map(|p| p.0).min().unwrap();
    let x1 = region.iter().map(|p| p.0).max().unwrap();
    let y0 = region.iter().map(|p| p.1).min().unwrap();
    let y1 = region.iter().map(|p| p.1).max().unwrap();
    let (bw, bh) = (x1 - x0 + 1, y1 - y0 + 1);
    let fill = region.len() as f64 / (bw * bh) as f64;
    let upper = region.iter().filter(|p| 2 * (p.1 - y0) + 1 < bh).count();
    let lower = region.iter().filter(|p| 2 * (p.1 - y0) + 1 > bh).count();
    if fill > 0.95 {
        1
    } else if fill > 0.63 {
        0
    } else if lower as f64 > 1.8 * upper as f64 {
        2
    } else {
        3
    }
}

#[test]
fn the_answers_are_in_the_pixels() {
    // Every scene, rendered with several seeds: a reader that knows only the docs' rules
    // recovers colour, shape, count and position from the pixels.
    let mut rendered = 0u64;
    for seed in 0..5u64 {
        for color in 0..COLORS.len() {
            for shape in 0..SHAPES.len() {
                for count in 0..4 {
                    for position in 0..POSITIONS.len() {
                        let scene = Scene {
                            color,
                            shape,
                            count,
                            position,
                        };
                        let mut rng = StdRng::seed_from_u64(seed * 1000 + rendered);
                        let img = world::render(&scene, 64, &mut rng).unwrap();
                        assert_eq!(
                            read_pixels(&img),
                            Seen {
                                color,
                                shapes: vec![shape; count + 1],
                                positions: vec![position],
                            },
                            "{scene:?}, seed {seed}"
                        );
                        rendered += 1;
                    }
                }
            }
        }
    }
    assert_eq!(rendered, 5 * 384);
}

#[test]
fn small_and_odd_sizes_still_place_every_scene() {
    for size in [32, 33, 48] {
        for count in 0..4 {
            for position in 0..4 {
                let scene = Scene {
                    color: 1,
                    shape: 1,
                    count,
                    position,
                };
                let img = world::render(&scene, size, &mut StdRng::seed_from_u64(3)).unwrap();
                let pixels: Vec<(u32, u32)> = img
                    .enumerate_pixels()
                    .filter(|(_, _, px)| px.0 == COLORS[1].1)
                    .map(|(x, y, _)| (x, y))
                    .collect();
                assert_eq!(world::position_of(&pixels, size), Some(position));
            }
        }
    }
    assert!(world::render(
        &Scene {
            color: 0,
            shape: 0,
            count: 0,
            position: 0
        },
        31,
        &mut StdRng::seed_from_u64(0)
    )
    .is_err());
    assert!(world::render(
        &Scene {
            color: 6,
            shape: 0,
            count: 0,
            position: 0
        },
        64,
        &mut StdRng::seed_from_u64(0)
    )
    .is_err());
}

#[test]
fn the_position_rule_picks_at_most_one_half() {
    let square = |x0: u32, y0: u32| -> Vec<(u32, u32)> {
        (x0..x0 + 8)
            .flat_map(|x| (y0..y0 + 8).map(move |y| (x, y)))
            .collect()
    };
    // One object in the top-left corner is in the left half and in the top half: neither.
    assert_eq!(world::position_of(&square(4, 4), 64), None);
    // The same object on the left, across the horizontal midline: left.
    assert_eq!(world::position_of(&square(4, 28), 64), Some(0));
    // Two objects, upper left and lower left: left as a group.
    let pair = [square(4, 4), square(4, 44)].concat();
    assert_eq!(world::position_of(&pair, 64), Some(0));
    // Upper left and upper right: top.
    let pair = [square(4, 4), square(44, 4)].concat();
    assert_eq!(world::position_of(&pair, 64), Some(2));
    // Touching the midline column: not "left".
    assert_eq!(world::position_of(&square(24, 28), 64), None);
    // Reaching only one row past the midline: not enough.
    assert_eq!(world::position_of(&square(4, 25), 64), None);
    assert_eq!(world::position_of(&[], 64), None);
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
    assert_eq!(scene.words(), ["red", "circle", "three", "left"]);
    let single = Scene {
        count: 0,
        position: 3,
        ..scene
    };
    assert_eq!(single.caption(), "one red circle at the bottom");
    assert_eq!(
        single.question("color").0,
        ["what color is the shape?", "which color is it?"]
    );
    assert_eq!(
        Scene {
            position: 2,
            ..scene
        }
        .caption(),
        "three red circles at the top"
    );

    let dir = tempdir();
    world::generate(
        dir.path(),
        &WorldConfig {
            train_images: 40,
            ..small()
        },
    )
    .unwrap();
    let vocab = world::vocabulary();
    let in_vocab = |text: &str| {
        for word in text
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            assert!(
                vocab.contains(&word.to_lowercase()),
                "`{word}` of `{text}` missing from the vocabulary"
            );
        }
    };
    let mut types = std::collections::BTreeSet::new();
    for split in ["train.jsonl", "val.jsonl", "test.jsonl"] {
        for v in lines(dir.path(), split) {
            let kind = v["type"].as_str().unwrap().to_string();
            let text = v["text"].as_str().unwrap();
            let attrs = &v["attributes"];
            let plural = attrs["count"] != "one";
            in_vocab(text);
            assert!(!text.ends_with('.') && text == text.trim());
            match v.get("prompt").and_then(|p| p.as_str()) {
                Some(prompt) => {
                    assert_eq!(v["kind"], "qa");
                    let q = prompt
                        .strip_prefix("Question: ")
                        .and_then(|p| p.strip_suffix(" Answer:"))
                        .unwrap();
                    in_vocab(q);
                    // Singular and plural agree with the count (count questions are the same
                    // for both).
                    let says_plural = q.contains(" are ") || q.contains(" they");
                    let says_singular = q.contains(" is it") || q.contains(" the shape?");
                    if kind != "count" {
                        let agrees = if plural { !says_singular } else { !says_plural };
                        assert!(agrees, "{q}");
                    }
                    match kind.as_str() {
                        "describe" => {
                            let scene_caption = lines(dir.path(), split)
                                .into_iter()
                                .find(|c| c["image"] == v["image"] && c["kind"] == "caption")
                                .unwrap();
                            assert_eq!(text, scene_caption["text"].as_str().unwrap());
                        }
                        _ => assert_eq!(text, attrs[&kind].as_str().unwrap()),
                    }
                }
                None => {
                    assert_eq!((kind.as_str(), &v["kind"]), ("caption", &"caption".into()));
                    let words: Vec<&str> = text.split(' ').collect();
                    assert_eq!(words[0], attrs["count"]);
                    assert_eq!(words[1], attrs["color"]);
                    let shape = attrs["shape"].as_str().unwrap();
                    let noun = if plural {
                        format!("{shape}s")
                    } else {
                        shape.to_string()
                    };
                    assert_eq!(words[2], noun);
                    assert_eq!(words.last().unwrap(), &attrs["position"].as_str().unwrap());
                }
            }
            types.insert(kind);
        }
    }
    assert_eq!(
        types.into_iter().collect::<Vec<_>>(),
        ["caption", "color", "count", "describe", "position", "shape"]
    );
    // text.txt: the train split's captions, and its questions each after its image's caption.
    let corpus = std::fs::read_to_string(dir.path().join("text.txt")).unwrap();
    assert_eq!(corpus.lines().count(), 40 * 6);
    let train = lines(dir.path(), "train.jsonl");
    let mut caption = "";
    for (line, pair) in corpus.lines().zip(&train) {
        in_vocab(line);
        match pair["prompt"].as_str() {
            None => {
                assert_eq!(line, pair["text"].as_str().unwrap());
                caption = line;
            }
            Some(prompt) => {
                let want = format!("{caption}. {prompt} {}", pair["text"].as_str().unwrap());
                assert_eq!(line, want);
                assert!(
                    line.contains("? Answer: ") || line.contains(". Answer: "),
                    "{line}"
                );
            }
        }
    }
    let labels = lines(dir.path(), "labels.jsonl");
    assert_eq!(labels.len(), 46);
    assert_eq!(labels[40]["split"], "val");
    assert_eq!(labels[45]["image"], "images/000045.png");
    assert!(world::tokenizer_words().contains(&"Question".to_string()));
}

#[test]
fn a_holdout_keeps_its_combinations_out_of_training_and_in_the_novel_split() {
    let dir = tempdir();
    let cfg = WorldConfig {
        train_images: 60,
        val_images: 10,
        test_images: 10,
        ..small()
    };
    let holdout = Holdout {
        combos: vec![world::parse_combo("red-triangle").unwrap(), (2, 0)],
        novel_images: 8,
    };
    let summary = world::generate_with_holdout(dir.path(), &cfg, &holdout).unwrap();
    assert_eq!(summary.images, 88);
    assert_eq!(summary.pairs.last().unwrap(), &("novel".to_string(), 48));
    for (split, novel) in [
        ("train", false),
        ("val", false),
        ("test", false),
        ("novel", true),
    ] {
        for v in lines(dir.path(), &format!("{split}.jsonl")) {
            let combo = (
                v["attributes"]["color"].as_str().unwrap(),
                v["attributes"]["shape"].as_str().unwrap(),
            );
            let held = combo == ("red", "triangle") || combo == ("blue", "circle");
            assert_eq!(held, novel, "{split}: {v}");
        }
    }
    let labels = lines(dir.path(), "labels.jsonl");
    assert_eq!(labels.iter().filter(|l| l["split"] == "novel").count(), 8);
    assert_eq!(labels[0]["split"], "train");
    // The held-out combinations never reach the language-model corpus either.
    let corpus = std::fs::read_to_string(dir.path().join("text.txt")).unwrap();
    assert!(!corpus.contains("red triangle") && !corpus.contains("blue circle"));
    let world_json = std::fs::read_to_string(dir.path().join("world.json")).unwrap();
    assert!(world_json.contains("red-triangle") && world_json.contains("blue-circle"));

    assert!(world::parse_combo("red-hexagon").is_err());
    assert!(world::parse_combo("red").is_err());
    assert_eq!(world::parse_combo("Yellow Diamonds").unwrap(), (3, 3));
    let everything: Vec<(usize, usize)> =
        (0..6).flat_map(|c| (0..4).map(move |s| (c, s))).collect();
    let all = Holdout {
        combos: everything,
        novel_images: 0,
    };
    let err = world::generate_with_holdout(tempdir().path(), &small(), &all).unwrap_err();
    assert!(err.to_string().contains("no colour-shape"), "{err}");
    let nothing_held = Holdout {
        combos: Vec::new(),
        novel_images: 3,
    };
    assert!(world::generate_with_holdout(tempdir().path(), &small(), &nothing_held).is_err());
    // An empty holdout is the plain world, byte for byte.
    let (a, b) = (tempdir(), tempdir());
    world::generate(a.path(), &small()).unwrap();
    world::generate_with_holdout(b.path(), &small(), &Holdout::default()).unwrap();
    for name in ["train.jsonl", "labels.jsonl", "world.json"] {
        assert_eq!(read(a.path(), name), read(b.path(), name), "{name}");
    }
}
