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

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blip2_model::processor::ImageProcessor;
use candle_core::Tensor;

use crate::error::{Error, Result};

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
