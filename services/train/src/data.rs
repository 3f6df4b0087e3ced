//! Image-text pairs from a JSONL manifest or a directory.
//!
//! A manifest line is `{"image": "images/000001.png", "text": "...", "prompt": "Question: ...
//! Answer:"}` (`prompt` optional; other fields such as the world's `kind`, `type` and
//! `attributes` are kept in [`Pair::extra`]); image paths are relative to the manifest's
//! directory. A directory dataset is image files (png, jpg, jpeg, webp, bmp) each with a
//! same-stem `.txt` file, one caption per line.
//!
//! Each distinct image is decoded and preprocessed once by the checkpoint's image processor.
//! A line that cannot be used (not JSON, no `image` or `text`, a missing or undecodable image)
//! is reported as `file:line: reason` in [`Dataset::skipped`] and left out, or with `strict`
//! stops the load with [`Error::Manifest`]: never silently dropped.
//!
//! Also here: [`load_labels`] (the world's `labels.jsonl`, images with attribute indices for
//! pretraining an image encoder), [`load_text`] (`text.txt`, for pretraining a language model)
//! and [`batches`] (the seeded order of an epoch).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blip2_model::processor::ImageProcessor;
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};
use crate::world::ATTRIBUTES;

/// One image-text training pair.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The image preprocessed by the checkpoint's image processor: `[3, H, W]` f32.
    pub pixels: Tensor,
    /// Which image of the dataset this is: pairs that share an image share the index, so that
    /// a frozen encoder's output can be cached per image.
    pub image_index: usize,
    /// The image's path.
    pub image: PathBuf,
    /// The caption, or with a prompt the answer (the target text).
    pub text: String,
    /// The text before `text` (`"Question: ... Answer:"`); `None`: a plain caption.
    pub prompt: Option<String>,
    /// The line's other fields (the world's `kind`, `type`, `attributes`).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Pair {
    fn extra_str(&self, name: &str) -> Option<&str> {
        self.extra.get(name).and_then(|v| v.as_str())
    }

    /// The line's `kind` (the world's `"caption"` or `"qa"`), if it has one.
    pub fn kind(&self) -> Option<&str> {
        self.extra_str("kind")
    }

    /// The line's `type` (the world's `"caption"`, `"color"`, `"shape"`, `"count"`,
    /// `"position"` or `"describe"`), if it has one.
    pub fn question_type(&self) -> Option<&str> {
        self.extra_str("type")
    }

    /// Whether this is a plain caption: no prompt, and no `kind` other than `"caption"`.
    pub fn is_caption(&self) -> bool {
        self.prompt.is_none() && self.kind().is_none_or(|k| k == "caption")
    }

    /// The words of the line's `attributes` object (`{"color": "red", ...}`): the world's
    /// attributes first, in the order of [`ATTRIBUTES`], then any others by name.
    pub fn attribute_words(&self) -> Vec<String> {
        let Some(serde_json::Value::Object(map)) = self.extra.get("attributes") else {
            return Vec::new();
        };
        let mut names: Vec<&String> = map.keys().collect();
        names.sort_by_key(|name| {
            ATTRIBUTES
                .iter()
                .position(|(a, _)| a == name)
                .unwrap_or(ATTRIBUTES.len())
        });
        names
            .into_iter()
            .filter_map(|name| map.get(name).and_then(|v| v.as_str()).map(str::to_string))
            .collect()
    }
}

/// What a load produced.
#[derive(Debug, Default)]
pub struct Dataset {
    pub pairs: Vec<Pair>,
    /// Distinct images loaded.
    pub images: usize,
    /// The lines left out, each as `file:line: reason`.
    pub skipped: Vec<String>,
}

/// Loads a JSONL manifest, or a directory of images with `.txt` captions (see the module docs).
pub fn load(path: &Path, processor: &ImageProcessor, strict: bool) -> Result<Dataset> {
    if path.is_dir() {
        load_directory(path, processor, strict)
    } else {
        load_manifest(path, processor, strict)
    }
}

struct Loader<'a> {
    processor: &'a ImageProcessor,
    strict: bool,
    index: HashMap<PathBuf, usize>,
    pixels: Vec<Tensor>,
    dataset: Dataset,
}

impl Loader<'_> {
    /// Records a bad line, or fails with it when strict.
    fn bad(&mut self, path: &Path, line: usize, message: String) -> Result<()> {
        if self.strict {
            return Err(Error::Manifest {
                path: path.to_path_buf(),
                line,
                message,
            });
        }
        self.dataset
            .skipped
            .push(format!("{}:{line}: {message}", path.display()));
        Ok(())
    }

    /// The image's index, loading it on first use; `Err(reason)` when it cannot be used.
    fn image(&mut self, image: &Path) -> std::result::Result<usize, String> {
        if let Some(&i) = self.index.get(image) {
            return Ok(i);
        }
        let bytes = std::fs::read(image).map_err(|e| format!("{}: {e}", image.display()))?;
        let pixels = self
            .processor
            .preprocess(&bytes)
            .map_err(|e| format!("{}: {e}", image.display()))?;
        let i = self.pixels.len();
        self.pixels.push(pixels);
        self.index.insert(image.to_path_buf(), i);
        Ok(i)
    }

    fn push(
        &mut self,
        image: PathBuf,
        image_index: usize,
        text: String,
        prompt: Option<String>,
        extra: serde_json::Map<String, serde_json::Value>,
    ) {
        self.dataset.pairs.push(Pair {
            pixels: self.pixels[image_index].clone(),
            image_index,
            image,
            text,
            prompt,
            extra,
        });
    }

    fn finish(mut self) -> Dataset {
        self.dataset.images = self.pixels.len();
        self.dataset
    }
}

/// Loads a JSONL manifest (see the module docs).
pub fn load_manifest(path: &Path, processor: &ImageProcessor, strict: bool) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut loader = Loader {
        processor,
        strict,
        index: HashMap::new(),
        pixels: Vec::new(),
        dataset: Dataset::default(),
    };
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(_) => {
                loader.bad(path, line_no, "not a JSON object".into())?;
                continue;
            }
            Err(e) => {
                loader.bad(path, line_no, format!("not JSON: {e}"))?;
                continue;
            }
        };
        let take =
            |fields: &mut serde_json::Map<String, serde_json::Value>, name: &str| match fields
                .remove(name)
            {
                Some(serde_json::Value::String(s)) => Ok(Some(s)),
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(_) => Err(format!("`{name}` must be a string")),
            };
        let parsed = (|| -> std::result::Result<_, String> {
            let image = take(&mut fields, "image")?.ok_or("no `image`")?;
            let text = take(&mut fields, "text")?.ok_or("no `text`")?;
            let prompt = take(&mut fields, "prompt")?;
            Ok((image, text, prompt))
        })();
        let (image, text, prompt) = match parsed {
            Ok(parsed) => parsed,
            Err(message) => {
                loader.bad(path, line_no, message)?;
                continue;
            }
        };
        let image = dir.join(image);
        match loader.image(&image) {
            Ok(i) => loader.push(image, i, text, prompt, fields),
            Err(message) => loader.bad(path, line_no, message)?,
        }
    }
    Ok(loader.finish())
}

const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

/// Loads a directory of images with same-stem `.txt` captions (see the module docs). An image
/// without a caption file is reported (line 0) and skipped.
pub fn load_directory(dir: &Path, processor: &ImageProcessor, strict: bool) -> Result<Dataset> {
    let mut images: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_lowercase().as_str()))
        })
        .collect();
    images.sort();
    let mut loader = Loader {
        processor,
        strict,
        index: HashMap::new(),
        pixels: Vec::new(),
        dataset: Dataset::default(),
    };
    for image in images {
        let captions = image.with_extension("txt");
        let text = match std::fs::read_to_string(&captions) {
            Ok(text) => text,
            Err(e) => {
                loader.bad(
                    &captions,
                    0,
                    format!("captions of {}: {e}", image.display()),
                )?;
                continue;
            }
        };
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .map(|(n, l)| (n + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty())
            .collect();
        if lines.is_empty() {
            loader.bad(&captions, 0, "no caption".into())?;
            continue;
        }
        let index = match loader.image(&image) {
            Ok(i) => i,
            Err(message) => {
                loader.bad(&captions, lines[0].0, message)?;
                continue;
            }
        };
        for (_, caption) in lines {
            loader.push(
                image.clone(),
                index,
                caption.to_string(),
                None,
                serde_json::Map::new(),
            );
        }
    }
    Ok(loader.finish())
}

/// One image of `labels.jsonl` with its attribute indices.
#[derive(Debug, Clone)]
pub struct LabeledImage {
    /// The image preprocessed by the checkpoint's image processor: `[3, H, W]` f32.
    pub pixels: Tensor,
    pub image: PathBuf,
    /// The line's `split` (`"train"`, `"val"`, `"test"`, `"novel"`), if it has one.
    pub split: Option<String>,
    /// One class index per head of [`LabelSet::heads`].
    pub labels: Vec<usize>,
}

/// What [`load_labels`] produced.
#[derive(Debug, Default)]
pub struct LabelSet {
    /// The classification heads: (attribute, number of classes), the world's [`ATTRIBUTES`].
    pub heads: Vec<(String, usize)>,
    pub images: Vec<LabeledImage>,
    /// The lines left out, each as `file:line: reason`.
    pub skipped: Vec<String>,
}

/// Loads the world's `labels.jsonl`: per line `{"image", "split", "color", "shape", "count",
/// "position"}` with class indices (see [`crate::world::ATTRIBUTES`]), image paths relative
/// to the file's directory. With `split`, only that split's lines are read (the others are
/// neither decoded nor reported). Bad lines (not JSON, a missing or out-of-range label, a
/// missing or undecodable image) are reported and skipped as in [`load_manifest`], or with
/// `strict` stop the load.
pub fn load_labels(
    path: &Path,
    processor: &ImageProcessor,
    split: Option<&str>,
    strict: bool,
) -> Result<LabelSet> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut loader = Loader {
        processor,
        strict,
        index: HashMap::new(),
        pixels: Vec::new(),
        dataset: Dataset::default(),
    };
    let mut images = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(_) => {
                loader.bad(path, line_no, "not a JSON object".into())?;
                continue;
            }
            Err(e) => {
                loader.bad(path, line_no, format!("not JSON: {e}"))?;
                continue;
            }
        };
        let line_split = fields
            .get("split")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        if let Some(wanted) = split {
            if line_split.as_deref() != Some(wanted) {
                continue;
            }
        }
        let parsed = (|| -> std::result::Result<_, String> {
            let image = fields
                .get("image")
                .and_then(|v| v.as_str())
                .ok_or("no `image`")?;
            let labels = ATTRIBUTES
                .iter()
                .map(
                    |&(name, classes)| match fields.get(name).and_then(|v| v.as_u64()) {
                        Some(i) if (i as usize) < classes => Ok(i as usize),
                        Some(i) => Err(format!("`{name}` {i} is out of range (0..{classes})")),
                        None => Err(format!("no `{name}` class index")),
                    },
                )
                .collect::<std::result::Result<Vec<usize>, String>>()?;
            Ok((image.to_string(), labels))
        })();
        let (image, labels) = match parsed {
            Ok(parsed) => parsed,
            Err(message) => {
                loader.bad(path, line_no, message)?;
                continue;
            }
        };
        let image = dir.join(image);
        match loader.image(&image) {
            Ok(i) => images.push(LabeledImage {
                pixels: loader.pixels[i].clone(),
                image,
                split: line_split,
                labels,
            }),
            Err(message) => loader.bad(path, line_no, message)?,
        }
    }
    Ok(LabelSet {
        heads: ATTRIBUTES
            .iter()
            .map(|&(name, classes)| (name.to_string(), classes))
            .collect(),
        images,
        skipped: loader.finish().skipped,
    })
}

/// Reads a text corpus such as the world's `text.txt`: one text per line, trimmed, blank lines
/// left out. A file without any text is an error.
pub fn load_text(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if lines.is_empty() {
        return Err(Error::Invalid(format!("{}: no text", path.display())));
    }
    Ok(lines)
}

/// The batches of one epoch over `n` examples: a permutation of `0..n` drawn from `seed` and
/// `epoch` (the same pair gives the same order; each epoch its own), cut into batches of
/// `batch_size` (at least 1), the last one shorter when `batch_size` does not divide `n`.
pub fn batches(n: usize, batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    // Each epoch its own stream: the epoch spread over the seed's bits (golden-ratio step).
    let stream = seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    order.shuffle(&mut StdRng::seed_from_u64(stream));
    order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}
