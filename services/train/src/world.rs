//! The synthetic shapes world: images of coloured shapes with captions and question-answer
//! pairs, generated deterministically from a seed, for training and evaluating a BLIP-2 that
//! fits on a 2-core CPU.
//!
//! Every image holds one to four objects of **one** shape and **one** colour, all inside one
//! half of the image (the position), on a light background with a slight per-image tint:
//!
//! | attribute | values |
//! |-----------|--------|
//! | colour    | red, green, blue, yellow, purple, orange |
//! | shape     | circle, square, triangle, diamond |
//! | count     | one, two, three, four |
//! | position  | left, right, top, bottom (the only half that holds every object) |
//!
//! so every answer is decidable from the pixels: the objects of a "left" image also reach into
//! both the top and the bottom half (they straddle the horizontal midline), so no other
//! position holds for them, and likewise for the other three. Each image gets a caption
//! (`"three red circles on the left"`) and one question per type, each phrased one of two or
//! three ways, with a one-word answer (`colour`, `shape`, `count`, `position`), plus a
//! `describe` question whose answer is the caption. Prompts are the serving template's
//! first turn, `"Question: {q} Answer:"`, so a model trained on them is asked the same way
//! through the session tier.
//!
//! [`generate`] writes:
//! - `images/NNNNNN.png`;
//! - `train.jsonl`, `val.jsonl`, `test.jsonl`: one line per pair, `{"image", "text",
//!   "prompt" (absent for captions), "kind": "caption"|"qa", "type", "attributes"}`; the
//!   splits are disjoint sets of images;
//! - `labels.jsonl`: per image its attribute indices (for pretraining an image encoder);
//! - `text.txt`: every caption and `"Question: q Answer: a"` line of the train split (for
//!   pretraining a language model);
//! - `world.json`: the configuration and the vocabulary.

use std::io::Write;
use std::path::Path;

use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{Error, Result};

pub const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 165, 60]),
    ("blue", [40, 80, 225]),
    ("yellow", [235, 205, 30]),
    ("purple", [140, 55, 185]),
    ("orange", [245, 135, 25]),
];
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "diamond"];
pub const COUNTS: [&str; 4] = ["one", "two", "three", "four"];
pub const POSITIONS: [&str; 4] = ["left", "right", "top", "bottom"];
/// The question types, in the order each image's questions are written.
pub const QUESTION_TYPES: [&str; 5] = ["color", "shape", "count", "position", "describe"];

/// What to generate.
#[derive(Debug, Clone, Serialize)]
pub struct WorldConfig {
    /// Side of the square images, in pixels (at least 32).
    pub image_size: u32,
    pub train_images: usize,
    pub val_images: usize,
    pub test_images: usize,
    pub seed: u64,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            image_size: 64,
            train_images: 3000,
            val_images: 300,
            test_images: 300,
            seed: 0,
        }
    }
}

/// One image's attributes, as indices into [`COLORS`], [`SHAPES`], [`COUNTS`] (count - 1)
/// and [`POSITIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Scene {
    pub color: usize,
    pub shape: usize,
    pub count: usize,
    pub position: usize,
}

impl Scene {
    fn random(rng: &mut StdRng) -> Self {
        Self {
            color: rng.random_range(0..COLORS.len()),
            shape: rng.random_range(0..SHAPES.len()),
            count: rng.random_range(0..COUNTS.len()),
            position: rng.random_range(0..POSITIONS.len()),
        }
    }

    fn plural(&self) -> bool {
        self.count > 0
    }

    /// `"three red circles on the left"`.
    pub fn caption(&self) -> String {
        let shape = SHAPES[self.shape];
        let noun = if self.plural() {
            format!("{shape}s")
        } else {
            shape.to_string()
        };
        let place = match POSITIONS[self.position] {
            "left" => "on the left",
            "right" => "on the right",
            "top" => "at the top",
            _ => "at the bottom",
        };
        format!(
            "{} {} {noun} {place}",
            COUNTS[self.count], COLORS[self.color].0
        )
    }

    /// The attribute words, by name.
    pub fn attributes(&self) -> serde_json::Value {
        serde_json::json!({
            "color": COLORS[self.color].0,
            "shape": SHAPES[self.shape],
            "count": COUNTS[self.count],
            "position": POSITIONS[self.position],
        })
    }

    /// The phrasings of a question type (singular or plural by the count) and its answer.
    pub fn question(&self, kind: &str) -> (&'static [&'static str], String) {
        let plural = self.plural();
        match kind {
            "color" if plural => (
                &["what color are the shapes?", "which color are they?"],
                COLORS[self.color].0.to_string(),
            ),
            "color" => (
                &["what color is the shape?", "which color is it?"],
                COLORS[self.color].0.to_string(),
            ),
            "shape" if plural => (
                &["what shape are they?", "which shape do you see?"],
                SHAPES[self.shape].to_string(),
            ),
            "shape" => (
                &["what shape is it?", "which shape do you see?"],
                SHAPES[self.shape].to_string(),
            ),
            "count" => (
                &[
                    "how many shapes are there?",
                    "how many objects do you see?",
                    "how many shapes are in the image?",
                ],
                COUNTS[self.count].to_string(),
            ),
            "position" if plural => (
                &["where are the shapes?", "where are they?"],
                POSITIONS[self.position].to_string(),
            ),
            "position" => (
                &["where is the shape?", "where is it?"],
                POSITIONS[self.position].to_string(),
            ),
            _ => (
                &["what is in the image?", "describe the image."],
                self.caption(),
            ),
        }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct WorldSummary {
    pub images: usize,
    /// Pairs per split: (name, lines).
    pub pairs: Vec<(String, usize)>,
    pub vocabulary: Vec<String>,
}

/// Every word the world's captions, questions and answers use, sorted.
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let mut add = |text: &str| {
        for word in text
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            words.push(word.to_string());
        }
    };
    add("question answer");
    for color in 0..COLORS.len() {
        for shape in 0..SHAPES.len() {
            for count in 0..COUNTS.len() {
                for position in 0..POSITIONS.len() {
                    let scene = Scene {
                        color,
                        shape,
                        count,
                        position,
                    };
                    add(&scene.caption());
                    for kind in QUESTION_TYPES {
                        let (phrasings, _) = scene.question(kind);
                        for q in phrasings {
                            add(q);
                        }
                    }
                }
            }
        }
    }
    words.sort();
    words.dedup();
    words
}

/// Draws a scene (see the module docs) on a `size x size` image.
pub fn render(scene: &Scene, size: u32, rng: &mut StdRng) -> Result<RgbImage> {
    if size < 32 {
        return Err(Error::Invalid(format!(
            "image size {size} is too small (at least 32)"
        )));
    }
    let tint: [i32; 3] = [
        rng.random_range(-12..=12),
        rng.random_range(-12..=12),
        rng.random_range(-12..=12),
    ];
    let background = Rgb(tint.map(|t| (232 + t).clamp(0, 255) as u8));
    let mut img = RgbImage::from_pixel(size, size, background);
    let s = size as f32;
    // The half that holds the objects: (x0, y0, x1, y1).
    let region = match POSITIONS[scene.position] {
        "left" => (0.0, 0.0, s / 2.0, s),
        "right" => (s / 2.0, 0.0, s, s),
        "top" => (0.0, 0.0, s, s / 2.0),
        _ => (0.0, s / 2.0, s, s),
    };
    let count = scene.count + 1;
    // Placement by rejection: object boxes inside the region, 2 px apart. A region is at
    // least 32 x 16 px at the smallest size, which always fits four objects of the size range
    // after a few tries; the attempt cap only bounds a pathological stream.
    for _attempt in 0..1000 {
        let mut placed: Vec<(f32, f32, f32)> = Vec::with_capacity(count);
        let mut tries = 0;
        while placed.len() < count && tries < 200 {
            tries += 1;
            let diameter = s * rng.random_range(0.16..0.21f32);
            let r = diameter / 2.0;
            let margin = r + 1.0;
            if region.2 - region.0 < 2.0 * margin || region.3 - region.1 < 2.0 * margin {
                break;
            }
            let cx = rng.random_range(region.0 + margin..region.2 - margin);
            let cy = rng.random_range(region.1 + margin..region.3 - margin);
            let clear = placed.iter().all(|&(x, y, rr)| {
                (x - cx).hypot(y - cy) > (r + rr) * std::f32::consts::SQRT_2 + 2.0
            });
            if clear {
                placed.push((cx, cy, r));
            }
        }
        // The position must be the only half that holds every object: the group straddles the
        // other midline (for left/right, the horizontal one) by at least 2 px on each side.
        let straddles = |(lo, hi): (f32, f32)| lo < s / 2.0 - 2.0 && hi > s / 2.0 + 2.0;
        let extent = |axis: fn(&(f32, f32, f32)) -> f32| {
            let lo = placed
                .iter()
                .map(|o| axis(o) - o.2)
                .fold(f32::MAX, f32::min);
            let hi = placed
                .iter()
                .map(|o| axis(o) + o.2)
                .fold(f32::MIN, f32::max);
            (lo, hi)
        };
        let unambiguous = match POSITIONS[scene.position] {
            "left" | "right" => straddles(extent(|o| o.1)),
            _ => straddles(extent(|o| o.0)),
        };
        if placed.len() == count && unambiguous {
            let color = Rgb(COLORS[scene.color].1);
            for (cx, cy, r) in placed {
                draw(&mut img, SHAPES[scene.shape], cx, cy, r, color);
            }
            return Ok(img);
        }
    }
    Err(Error::Invalid(format!(
        "could not place {count} objects on a {size}px image"
    )))
}

/// Fills the pixels whose centres lie inside `shape` of radius `r` around (`cx`, `cy`).
fn draw(img: &mut RgbImage, shape: &str, cx: f32, cy: f32, r: f32, color: Rgb<u8>) {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let x0 = (cx - r - 1.0).max(0.0) as u32;
    let y0 = (cy - r - 1.0).max(0.0) as u32;
    let x1 = (cx + r + 1.0).min(w) as u32;
    let y1 = (cy + r + 1.0).min(h) as u32;
    for y in y0..y1 {
        for x in x0..x1 {
            let dx = x as f32 + 0.5 - cx;
            let dy = y as f32 + 0.5 - cy;
            let inside = match shape {
                "circle" => dx * dx + dy * dy <= r * r,
                "square" => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
                "diamond" => dx.abs() + dy.abs() <= r,
                // Apex up: the half-width grows from 0 at the top to r at the bottom.
                _ => dy.abs() <= r && dx.abs() <= (dy + r) / 2.0,
            };
            if inside {
                img.put_pixel(x, y, color);
            }
        }
    }
}

/// One manifest line.
#[derive(Debug, Serialize)]
struct Line<'a> {
    image: &'a str,
    text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<String>,
    kind: &'a str,
    #[serde(rename = "type")]
    kind_of: &'a str,
    attributes: serde_json::Value,
}

/// Writes the world into `dir` (created if missing; files of an earlier world are
/// overwritten). Deterministic: the same configuration writes the same bytes.
pub fn generate(dir: &Path, cfg: &WorldConfig) -> Result<WorldSummary> {
    let images_dir = dir.join("images");
    std::fs::create_dir_all(&images_dir).map_err(|e| Error::io(&images_dir, e))?;
    let splits = [
        ("train", cfg.train_images),
        ("val", cfg.val_images),
        ("test", cfg.test_images),
    ];
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut index = 0usize;
    let mut labels = String::new();
    let mut text = String::new();
    let mut pairs = Vec::new();
    for (split, n) in splits {
        let mut manifest = String::new();
        let mut lines = 0usize;
        for _ in 0..n {
            let scene = Scene::random(&mut rng);
            let img = render(&scene, cfg.image_size, &mut rng)?;
            let name = format!("images/{index:06}.png");
            let path = dir.join(&name);
            img.save(&path)
                .map_err(|e| Error::io(&path, std::io::Error::other(e)))?;
            index += 1;
            labels.push_str(
                &serde_json::to_string(&serde_json::json!({
                    "image": name,
                    "color": scene.color,
                    "shape": scene.shape,
                    "count": scene.count,
                    "position": scene.position,
                }))
                .map_err(|e| Error::Invalid(e.to_string()))?,
            );
            labels.push('\n');
            let caption = scene.caption();
            let mut push = |line: Line| -> Result<()> {
                manifest.push_str(
                    &serde_json::to_string(&line).map_err(|e| Error::Invalid(e.to_string()))?,
                );
                manifest.push('\n');
                lines += 1;
                Ok(())
            };
            push(Line {
                image: &name,
                text: caption.clone(),
                prompt: None,
                kind: "caption",
                kind_of: "caption",
                attributes: scene.attributes(),
            })?;
            if split == "train" {
                text.push_str(&caption);
                text.push('\n');
            }
            for kind in QUESTION_TYPES {
                let (phrasings, answer) = scene.question(kind);
                let question = phrasings[rng.random_range(0..phrasings.len())];
                if split == "train" {
                    text.push_str(&format!("Question: {question} Answer: {answer}\n"));
                }
                push(Line {
                    image: &name,
                    text: answer,
                    prompt: Some(format!("Question: {question} Answer:")),
                    kind: "qa",
                    kind_of: kind,
                    attributes: scene.attributes(),
                })?;
            }
        }
        write(&dir.join(format!("{split}.jsonl")), manifest.as_bytes())?;
        pairs.push((split.to_string(), lines));
    }
    write(&dir.join("labels.jsonl"), labels.as_bytes())?;
    write(&dir.join("text.txt"), text.as_bytes())?;
    let summary = WorldSummary {
        images: index,
        pairs,
        vocabulary: vocabulary(),
    };
    let world = serde_json::json!({
        "config": cfg,
        "colors": COLORS.map(|(name, _)| name),
        "shapes": SHAPES,
        "counts": COUNTS,
        "positions": POSITIONS,
        "question_types": QUESTION_TYPES,
        "vocabulary": summary.vocabulary,
    });
    let json = serde_json::to_string_pretty(&world).map_err(|e| Error::Invalid(e.to_string()))?;
    write(&dir.join("world.json"), (json + "\n").as_bytes())?;
    Ok(summary)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(bytes).map_err(|e| Error::io(path, e))
}
