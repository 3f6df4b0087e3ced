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
//! | position  | left, right, top, bottom (the half that holds every object) |
//!
//! Every answer is decidable from the pixels:
//! - the objects are drawn in the exact colour of [`COLORS`], far from any background tint;
//! - objects never touch (at least 2 px between them), so the count is the number of connected
//!   regions of that colour;
//! - the shapes differ in outline (round, a full square, a triangle with its apex up, a
//!   diamond) at their 10-14 px size on a 64 px image;
//! - the position follows [`position_of`]: all objects lie in the named half, clear of the
//!   midline, and together they reach at least two pixel rows (columns) across the other
//!   midline. Without that second condition one object in the top-left corner would be both
//!   "left" and "top"; with it, exactly one position holds for every image.
//!
//! Each image gets a caption (`"three red circles on the left"`, `"one red circle at the
//! bottom"`) and one question per type, each phrased one of two or three ways, with a one-word
//! answer (`color`, `shape`, `count`, `position`), plus a `describe` question whose answer is
//! the caption (see [`Scene::question`] for every phrasing). Prompts are the serving template's
//! first turn, `"Question: {q} Answer:"`, so a model trained on them is asked the same way
//! through the session tier.
//!
//! The splits are disjoint sets of images. With a [`Holdout`] ([`generate_with_holdout`]),
//! some colour-shape combinations (e.g. [`SUGGESTED_HOLDOUT`]: red triangles, blue circles,
//! yellow diamonds) are left out of train, val and test and make up a fourth split, `novel`:
//! every word of it is seen in training, but never in that combination, which measures
//! compositional generalisation. [`generate`] holds nothing out, so the demo model sees every
//! combination.
//!
//! [`generate`] writes:
//! - `images/NNNNNN.png`;
//! - `train.jsonl`, `val.jsonl`, `test.jsonl` (and `novel.jsonl` with a holdout): one line per
//!   pair, `{"image", "text", "prompt" (absent for captions), "kind": "caption"|"qa", "type",
//!   "attributes"}`;
//! - `labels.jsonl`: per image its split and attribute indices (for pretraining an image
//!   encoder on the train split);
//! - `text.txt`: the train split's text for pretraining a language model: every caption, and
//!   every question after its image's caption, `"{caption}. Question: q Answer: a"`. The answer
//!   follows from the description before it, so the language model learns to answer from its
//!   context, which stage 2 then fills with the image's soft prompt instead of a caption (as a
//!   real LLM answers from whatever precedes the question);
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
/// The attributes, in the order of [`Scene::labels`], with their number of values: the
/// classification heads an image encoder can be pretrained with.
pub const ATTRIBUTES: [(&str, usize); 4] = [
    ("color", COLORS.len()),
    ("shape", SHAPES.len()),
    ("count", COUNTS.len()),
    ("position", POSITIONS.len()),
];
/// The capitalised words of the prompt template (`"Question: ... Answer:"`).
pub const TEMPLATE_WORDS: [&str; 2] = ["Question", "Answer"];
/// Colour-shape combinations (indices into [`COLORS`] and [`SHAPES`]) to hold out for a
/// compositional test: red triangles, blue circles, yellow diamonds.
pub const SUGGESTED_HOLDOUT: [(usize, usize); 3] = [(0, 2), (2, 0), (3, 3)];

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

/// Colour-shape combinations that train, val and test never show, and the `novel` split made
/// of them (see the module docs). The default holds nothing out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Holdout {
    /// Indices into [`COLORS`] and [`SHAPES`] (e.g. [`SUGGESTED_HOLDOUT`]).
    pub combos: Vec<(usize, usize)>,
    /// Images of the held-out combinations, written as `novel.jsonl`.
    pub novel_images: usize,
}

/// Parses a colour-shape combination such as `"red-triangle"` (also `"red triangle"`,
/// `"red:triangle"`, `"red triangles"`) into indices into [`COLORS`] and [`SHAPES`].
pub fn parse_combo(text: &str) -> Result<(usize, usize)> {
    let bad = || {
        Error::Invalid(format!(
            "`{text}` is not a colour-shape combination such as red-triangle (colours: {}; shapes: {})",
            COLORS.map(|(name, _)| name).join(", "),
            SHAPES.join(", ")
        ))
    };
    let parts: Vec<&str> = text
        .split(['-', ' ', ':', '/'])
        .filter(|p| !p.is_empty())
        .collect();
    let [color, shape] = parts[..] else {
        return Err(bad());
    };
    let color = color.to_lowercase();
    let shape = shape.to_lowercase();
    let shape = shape.strip_suffix('s').unwrap_or(&shape);
    let color = COLORS
        .iter()
        .position(|(name, _)| *name == color)
        .ok_or_else(bad)?;
    let shape = SHAPES.iter().position(|s| *s == shape).ok_or_else(bad)?;
    Ok((color, shape))
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
    /// A uniformly random scene whose colour-shape combination is not in `holdout`.
    fn random(rng: &mut StdRng, holdout: &[(usize, usize)]) -> Self {
        loop {
            let scene = Self {
                color: rng.random_range(0..COLORS.len()),
                shape: rng.random_range(0..SHAPES.len()),
                count: rng.random_range(0..COUNTS.len()),
                position: rng.random_range(0..POSITIONS.len()),
            };
            if !holdout.contains(&(scene.color, scene.shape)) {
                return scene;
            }
        }
    }

    /// A random scene of one of the `holdout` combinations (not empty).
    fn random_novel(rng: &mut StdRng, holdout: &[(usize, usize)]) -> Self {
        let (color, shape) = holdout[rng.random_range(0..holdout.len())];
        Self {
            color,
            shape,
            count: rng.random_range(0..COUNTS.len()),
            position: rng.random_range(0..POSITIONS.len()),
        }
    }

    fn plural(&self) -> bool {
        self.count > 0
    }

    /// The number of objects, 1 to 4.
    pub fn objects(&self) -> usize {
        self.count + 1
    }

    /// `"three red circles on the left"`, `"one red circle at the bottom"`.
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

    /// The attribute indices in the order of [`ATTRIBUTES`].
    pub fn labels(&self) -> [usize; 4] {
        [self.color, self.shape, self.count, self.position]
    }

    /// The attribute words in the order of [`ATTRIBUTES`]: `["red", "circle", "three", "left"]`.
    pub fn words(&self) -> [&'static str; 4] {
        [
            COLORS[self.color].0,
            SHAPES[self.shape],
            COUNTS[self.count],
            POSITIONS[self.position],
        ]
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
    /// An unknown type is the describe question.
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

/// Every word the world's captions, questions and answers use, lower case, sorted (the
/// template's `Question` and `Answer` as `question`, `answer`).
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let mut add = |text: &str| {
        for word in text
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            words.push(word.to_lowercase());
        }
    };
    for word in TEMPLATE_WORDS {
        add(word);
    }
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

/// The words a tokenizer for the world should keep whole, as they are written: the
/// [`vocabulary`] plus the template's capitalised [`TEMPLATE_WORDS`].
pub fn tokenizer_words() -> Vec<String> {
    let mut words = vocabulary();
    words.extend(TEMPLATE_WORDS.map(str::to_string));
    words
}

/// The position (index into [`POSITIONS`]) that a set of object pixels shows on a
/// `size x size` image, or `None` when none does. With pixel centres at `x + 0.5` and the
/// midline at `size / 2`: "left" when every pixel centre lies at least 1 px left of the
/// vertical midline and the pixels reach at least 1.5 px above and below the horizontal
/// midline; "right", "top" and "bottom" likewise. The four cases exclude each other.
pub fn position_of(pixels: &[(u32, u32)], size: u32) -> Option<usize> {
    if pixels.is_empty() {
        return None;
    }
    let mid = size as f32 / 2.0;
    let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
    for &(x, y) in pixels {
        let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
        x0 = x0.min(px);
        x1 = x1.max(px);
        y0 = y0.min(py);
        y1 = y1.max(py);
    }
    let across_rows = y0 <= mid - 1.5 && y1 >= mid + 1.5;
    let across_columns = x0 <= mid - 1.5 && x1 >= mid + 1.5;
    if x1 <= mid - 1.0 && across_rows {
        Some(0)
    } else if x0 >= mid + 1.0 && across_rows {
        Some(1)
    } else if y1 <= mid - 1.0 && across_columns {
        Some(2)
    } else if y0 >= mid + 1.0 && across_columns {
        Some(3)
    } else {
        None
    }
}

/// Draws a scene (see the module docs) on a `size x size` image.
pub fn render(scene: &Scene, size: u32, rng: &mut StdRng) -> Result<RgbImage> {
    if size < 32 {
        return Err(Error::Invalid(format!(
            "image size {size} is too small (at least 32)"
        )));
    }
    if scene.color >= COLORS.len()
        || scene.shape >= SHAPES.len()
        || scene.count >= COUNTS.len()
        || scene.position >= POSITIONS.len()
    {
        return Err(Error::Invalid(format!("no such scene: {scene:?}")));
    }
    let tint: [i32; 3] = [
        rng.random_range(-12..=12),
        rng.random_range(-12..=12),
        rng.random_range(-12..=12),
    ];
    let background = Rgb(tint.map(|t| (232 + t).clamp(0, 255) as u8));
    let mut img = RgbImage::from_pixel(size, size, background);
    let s = size as f32;
    let mid = s / 2.0;
    let count = scene.objects();
    let shape = SHAPES[scene.shape];
    // Placement by rejection: object centres inside the named half, clear of the midline by
    // 1 px (pixel centres lie within r of the object's centre) and of the borders, objects
    // apart so that even square corners keep 2 px between them; then the whole arrangement
    // must show its position by [`position_of`] (it must reach across the other midline).
    // A half is at least 32 x 16 px at the smallest size, which fits four objects of the size
    // range; the attempt cap only bounds a pathological stream.
    for _attempt in 0..2000 {
        let mut placed: Vec<(f32, f32, f32)> = Vec::with_capacity(count);
        let mut tries = 0;
        while placed.len() < count && tries < 200 {
            tries += 1;
            let r = s * rng.random_range(0.16..0.21f32) / 2.0;
            let (x0, y0, x1, y1) = match POSITIONS[scene.position] {
                "left" => (r + 1.0, r + 1.0, mid - 1.0 - r, s - r - 1.0),
                "right" => (mid + 1.0 + r, r + 1.0, s - r - 1.0, s - r - 1.0),
                "top" => (r + 1.0, r + 1.0, s - r - 1.0, mid - 1.0 - r),
                _ => (r + 1.0, mid + 1.0 + r, s - r - 1.0, s - r - 1.0),
            };
            if x1 <= x0 || y1 <= y0 {
                break;
            }
            let cx = rng.random_range(x0..x1);
            let cy = rng.random_range(y0..y1);
            let clear = placed.iter().all(|&(x, y, rr)| {
                (x - cx).hypot(y - cy) > (r + rr) * std::f32::consts::SQRT_2 + 2.0
            });
            if clear {
                placed.push((cx, cy, r));
            }
        }
        if placed.len() != count {
            continue;
        }
        let pixels: Vec<(u32, u32)> = placed
            .iter()
            .flat_map(|&(cx, cy, r)| shape_pixels(shape, cx, cy, r, size))
            .collect();
        if position_of(&pixels, size) != Some(scene.position) {
            continue;
        }
        let color = Rgb(COLORS[scene.color].1);
        for (x, y) in pixels {
            img.put_pixel(x, y, color);
        }
        return Ok(img);
    }
    Err(Error::Invalid(format!(
        "could not place {count} objects on a {size}px image"
    )))
}

/// The pixels of a `size x size` image whose centres lie inside `shape` of radius `r` around
/// (`cx`, `cy`): a circle, a square of half-side 0.85 r, a triangle with its apex up (height
/// 2r, base 2r) or a diamond (half-diagonals r). Every pixel centre is within r of the centre
/// on both axes.
fn shape_pixels(shape: &str, cx: f32, cy: f32, r: f32, size: u32) -> Vec<(u32, u32)> {
    let limit = size as f32;
    let x0 = (cx - r - 1.0).max(0.0) as u32;
    let y0 = (cy - r - 1.0).max(0.0) as u32;
    let x1 = (cx + r + 1.0).min(limit) as u32;
    let y1 = (cy + r + 1.0).min(limit) as u32;
    let mut out = Vec::new();
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
                out.push((x, y));
            }
        }
    }
    out
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

fn check(cfg: &WorldConfig, holdout: &Holdout) -> Result<()> {
    if cfg.image_size < 32 {
        return Err(Error::Invalid(format!(
            "image size {} is too small (at least 32)",
            cfg.image_size
        )));
    }
    for &(color, shape) in &holdout.combos {
        if color >= COLORS.len() || shape >= SHAPES.len() {
            return Err(Error::Invalid(format!(
                "held-out combination ({color}, {shape}) is out of range"
            )));
        }
    }
    let mut combos = holdout.combos.clone();
    combos.sort();
    combos.dedup();
    if combos.len() == COLORS.len() * SHAPES.len() {
        return Err(Error::Invalid(
            "the holdout leaves no colour-shape combination to train on".into(),
        ));
    }
    if holdout.novel_images > 0 && holdout.combos.is_empty() {
        return Err(Error::Invalid(
            "novel images need held-out combinations (holdout is empty)".into(),
        ));
    }
    Ok(())
}

fn json_line(value: &impl Serialize) -> Result<String> {
    let mut line = serde_json::to_string(value).map_err(|e| Error::Invalid(e.to_string()))?;
    line.push('\n');
    Ok(line)
}

/// Writes the world into `dir` (created if missing; files of an earlier world are
/// overwritten), every colour-shape combination in every split. Deterministic: the same
/// configuration writes the same bytes. The images are numbered across the splits in the order
/// train, val, test.
pub fn generate(dir: &Path, cfg: &WorldConfig) -> Result<WorldSummary> {
    generate_with_holdout(dir, cfg, &Holdout::default())
}

/// [`generate`] with `holdout`'s combinations kept out of train, val and test and written as
/// the `novel` split (images numbered after test's). With an empty holdout this is
/// [`generate`], byte for byte.
pub fn generate_with_holdout(
    dir: &Path,
    cfg: &WorldConfig,
    holdout: &Holdout,
) -> Result<WorldSummary> {
    check(cfg, holdout)?;
    let images_dir = dir.join("images");
    std::fs::create_dir_all(&images_dir).map_err(|e| Error::io(&images_dir, e))?;
    let mut splits = vec![
        ("train", cfg.train_images),
        ("val", cfg.val_images),
        ("test", cfg.test_images),
    ];
    if !holdout.combos.is_empty() {
        splits.push(("novel", holdout.novel_images));
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut index = 0usize;
    let mut labels = String::new();
    let mut text = String::new();
    let mut pairs = Vec::new();
    for (split, n) in splits {
        let mut manifest = String::new();
        let mut lines = 0usize;
        for _ in 0..n {
            let scene = if split == "novel" {
                Scene::random_novel(&mut rng, &holdout.combos)
            } else {
                Scene::random(&mut rng, &holdout.combos)
            };
            let img = render(&scene, cfg.image_size, &mut rng)?;
            let name = format!("images/{index:06}.png");
            let path = dir.join(&name);
            img.save(&path)
                .map_err(|e| Error::io(&path, std::io::Error::other(e)))?;
            index += 1;
            labels.push_str(&json_line(&serde_json::json!({
                "image": name,
                "split": split,
                "color": scene.color,
                "shape": scene.shape,
                "count": scene.count,
                "position": scene.position,
            }))?);
            let caption = scene.caption();
            let mut push = |line: Line| -> Result<()> {
                manifest.push_str(&json_line(&line)?);
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
                    text.push_str(&format!(
                        "{caption}. Question: {question} Answer: {answer}\n"
                    ));
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
    let held_out: Vec<String> = holdout
        .combos
        .iter()
        .map(|&(color, shape)| format!("{}-{}", COLORS[color].0, SHAPES[shape]))
        .collect();
    let world = serde_json::json!({
        "config": cfg,
        "colors": COLORS.map(|(name, _)| name),
        "shapes": SHAPES,
        "counts": COUNTS,
        "positions": POSITIONS,
        "question_types": QUESTION_TYPES,
        "holdout": held_out,
        "novel_images": holdout.novel_images,
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
