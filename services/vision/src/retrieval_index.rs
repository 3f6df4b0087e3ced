//! The retrieval tier's index: normalised ITC embeddings of images (`[Q, D]` each) and texts
//! (`[D]` each), searched by brute force (one skinny matmul over all rows, AVX-512 where the CPU
//! has it, then a max over each image's queries and a partial sort for the top k).
//!
//! With a directory ([`RetrievalIndex::open`]) every change is first written as one segment file
//! (temporary file, fsync, rename, fsync of the directory: a segment is on disk whole or not at
//! all) and only then applied in memory, so a failed write changes nothing and a restart replays
//! the segments in order. The checkpoint fingerprint is in every segment: an index built with
//! another checkpoint is refused at start.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blip2_model::kernels::gemv::{self, Weights};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"B2RIDX01";

/// Errors of the index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("index storage {path}: {message}")]
    Storage { path: PathBuf, message: String },
}

fn storage(path: &Path, message: impl std::fmt::Display) -> IndexError {
    IndexError::Storage {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// One indexed image.
#[derive(Debug, Clone)]
pub struct ImageEntry {
    pub id: u64,
    pub label: String,
    /// The encoded image, kept for ITM re-ranking (absent when discarded).
    pub image: Option<Arc<Vec<u8>>>,
}

/// One indexed text.
#[derive(Debug, Clone)]
pub struct TextEntry {
    pub id: u64,
    pub text: String,
}

/// An image to add: its embedding `[Q * D]` and what to keep with it.
pub struct NewImage {
    pub embedding: Vec<f32>,
    pub label: String,
    pub image: Option<Vec<u8>>,
}

/// A text to add: its embedding `[D]`.
pub struct NewText {
    pub embedding: Vec<f32>,
    pub text: String,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum SegmentHeader {
    AddImages {
        fingerprint: String,
        queries: usize,
        dim: usize,
        ids: Vec<u64>,
        labels: Vec<String>,
        /// Byte length of each kept image (0: discarded).
        image_lens: Vec<usize>,
    },
    AddTexts {
        fingerprint: String,
        dim: usize,
        ids: Vec<u64>,
        texts: Vec<String>,
    },
    Remove {
        fingerprint: String,
        image_ids: Vec<u64>,
        text_ids: Vec<u64>,
    },
}

struct Store {
    dir: PathBuf,
    next_segment: u64,
}

impl Store {
    /// Writes one segment atomically (tmp file, fsync, rename, fsync dir).
    fn write(
        &mut self,
        header: &SegmentHeader,
        floats: &[f32],
        blobs: &[&[u8]],
    ) -> Result<(), IndexError> {
        let name = format!("{:012}.seg", self.next_segment);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let header = serde_json::to_vec(header).map_err(|e| storage(&path, e))?;
        let write = || -> std::io::Result<()> {
            let file = std::fs::File::create(&tmp)?;
            let mut out = std::io::BufWriter::new(file);
            out.write_all(MAGIC)?;
            out.write_all(&(header.len() as u64).to_le_bytes())?;
            out.write_all(&header)?;
            for v in floats {
                out.write_all(&v.to_le_bytes())?;
            }
            for blob in blobs {
                out.write_all(blob)?;
            }
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(storage(&path, format!("cannot write: {e}")));
        }
        self.next_segment += 1;
        Ok(())
    }
}

/// The in-memory index (see the module docs).
pub struct RetrievalIndex {
    fingerprint: String,
    queries: usize,
    dim: usize,
    images: Vec<ImageEntry>,
    /// `[images, Q, D]` row-major.
    image_embeds: Vec<f32>,
    image_pos: HashMap<u64, usize>,
    texts: Vec<TextEntry>,
    /// `[texts, D]` row-major.
    text_embeds: Vec<f32>,
    text_pos: HashMap<u64, usize>,
    next_id: u64,
    store: Option<Store>,
}

/// A search result: position-independent id and score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub id: u64,
    pub score: f32,
}

impl RetrievalIndex {
    /// An empty index that lives in memory only.
    pub fn in_memory(fingerprint: &str, queries: usize, dim: usize) -> Self {
        Self {
            fingerprint: fingerprint.to_string(),
            queries,
            dim,
            images: Vec::new(),
            image_embeds: Vec::new(),
            image_pos: HashMap::new(),
            texts: Vec::new(),
            text_embeds: Vec::new(),
            text_pos: HashMap::new(),
            next_id: 1,
            store: None,
        }
    }

    /// The index kept in `dir` (created when missing): replays its segments.
    pub fn open(
        dir: &Path,
        fingerprint: &str,
        queries: usize,
        dim: usize,
    ) -> Result<Self, IndexError> {
        std::fs::create_dir_all(dir).map_err(|e| storage(dir, format!("cannot create: {e}")))?;
        let mut index = Self::in_memory(fingerprint, queries, dim);
        let mut segments = Vec::new();
        for entry in
            std::fs::read_dir(dir).map_err(|e| storage(dir, format!("cannot list: {e}")))?
        {
            let entry = entry.map_err(|e| storage(dir, e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.ends_with(".tmp") {
                // A write that never completed: it was never applied.
                let _ = std::fs::remove_file(entry.path());
            } else if let Some(seq) = name
                .strip_suffix(".seg")
                .and_then(|s| s.parse::<u64>().ok())
            {
                segments.push((seq, entry.path()));
            }
        }
        segments.sort();
        let mut next_segment = 0;
        for (seq, path) in segments {
            index.replay(&path)?;
            next_segment = seq + 1;
        }
        index.store = Some(Store {
            dir: dir.to_path_buf(),
            next_segment,
        });
        Ok(index)
    }

    fn replay(&mut self, path: &Path) -> Result<(), IndexError> {
        let data = std::fs::read(path).map_err(|e| storage(path, format!("cannot read: {e}")))?;
        let bad = |m: &str| storage(path, format!("corrupt segment: {m}"));
        if data.len() < 16 || &data[..8] != MAGIC {
            return Err(bad("bad magic"));
        }
        let len = u64::from_le_bytes(data[8..16].try_into().map_err(|_| bad("header"))?) as usize;
        let body = data.get(16..).ok_or_else(|| bad("header"))?;
        let header_bytes = body.get(..len).ok_or_else(|| bad("short header"))?;
        let header: SegmentHeader =
            serde_json::from_slice(header_bytes).map_err(|e| bad(&e.to_string()))?;
        let rest = &body[len..];
        let check = |fp: &str| -> Result<(), IndexError> {
            if fp != self.fingerprint {
                return Err(storage(
                    path,
                    format!(
                        "built with checkpoint fingerprint {fp}, but this checkpoint's is {}; use another --index-dir",
                        self.fingerprint
                    ),
                ));
            }
            Ok(())
        };
        let floats = |count: usize| -> Result<Vec<f32>, IndexError> {
            let bytes = rest
                .get(..count * 4)
                .ok_or_else(|| bad("short embeddings"))?;
            Ok(bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        match header {
            SegmentHeader::AddImages {
                fingerprint,
                queries,
                dim,
                ids,
                labels,
                image_lens,
            } => {
                check(&fingerprint)?;
                if queries != self.queries || dim != self.dim {
                    return Err(bad("embedding shape differs from the checkpoint's"));
                }
                let n = ids.len();
                if labels.len() != n || image_lens.len() != n {
                    return Err(bad("lengths"));
                }
                let per = queries * dim;
                let embeds = floats(n * per)?;
                let mut blobs = &rest[n * per * 4..];
                let mut items = Vec::with_capacity(n);
                for ((id, label), (len, emb)) in ids
                    .into_iter()
                    .zip(labels)
                    .zip(image_lens.into_iter().zip(embeds.chunks_exact(per)))
                {
                    let image = if len > 0 {
                        let blob = blobs.get(..len).ok_or_else(|| bad("short image bytes"))?;
                        blobs = &blobs[len..];
                        Some(blob.to_vec())
                    } else {
                        None
                    };
                    items.push((
                        id,
                        NewImage {
                            embedding: emb.to_vec(),
                            label,
                            image,
                        },
                    ));
                }
                self.apply_images(items);
            }
            SegmentHeader::AddTexts {
                fingerprint,
                dim,
                ids,
                texts,
            } => {
                check(&fingerprint)?;
                if dim != self.dim || texts.len() != ids.len() {
                    return Err(bad("embedding shape or lengths"));
                }
                let embeds = floats(ids.len() * dim)?;
                let items = ids
                    .into_iter()
                    .zip(texts)
                    .zip(embeds.chunks_exact(dim))
                    .map(|((id, text), e)| {
                        (
                            id,
                            NewText {
                                embedding: e.to_vec(),
                                text,
                            },
                        )
                    })
                    .collect();
                self.apply_texts(items);
            }
            SegmentHeader::Remove {
                fingerprint,
                image_ids,
                text_ids,
            } => {
                check(&fingerprint)?;
                self.apply_remove(&image_ids, &text_ids);
            }
        }
        Ok(())
    }

    /// Room for `images` more images and `texts` more texts without reallocating.
    pub fn reserve(&mut self, images: usize, texts: usize) {
        self.image_embeds.reserve(images * self.queries * self.dim);
        self.images.reserve(images);
        self.text_embeds.reserve(texts * self.dim);
        self.texts.reserve(texts);
    }

    pub fn num_images(&self) -> usize {
        self.images.len()
    }

    pub fn num_texts(&self) -> usize {
        self.texts.len()
    }

    pub fn queries(&self) -> usize {
        self.queries
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn image(&self, id: u64) -> Option<&ImageEntry> {
        self.image_pos.get(&id).map(|&p| &self.images[p])
    }

    /// The embedding `[Q * D]` of an indexed image.
    pub fn image_embedding(&self, id: u64) -> Option<&[f32]> {
        let per = self.queries * self.dim;
        self.image_pos
            .get(&id)
            .map(|&p| &self.image_embeds[p * per..(p + 1) * per])
    }

    pub fn text(&self, id: u64) -> Option<&TextEntry> {
        self.text_pos.get(&id).map(|&p| &self.texts[p])
    }

    fn take_ids(&mut self, n: usize) -> Vec<u64> {
        let ids = (self.next_id..self.next_id + n as u64).collect();
        self.next_id += n as u64;
        ids
    }

    /// Adds images (written to disk first when the index has a directory); returns their ids.
    pub fn add_images(&mut self, items: Vec<NewImage>) -> Result<Vec<u64>, IndexError> {
        let per = self.queries * self.dim;
        if let Some(bad) = items.iter().position(|i| i.embedding.len() != per) {
            return Err(IndexError::Invalid(format!(
                "image {bad}: embedding of {} values, the index holds {per}",
                items[bad].embedding.len()
            )));
        }
        let ids: Vec<u64> = (self.next_id..self.next_id + items.len() as u64).collect();
        if let Some(store) = &mut self.store {
            let header = SegmentHeader::AddImages {
                fingerprint: self.fingerprint.clone(),
                queries: self.queries,
                dim: self.dim,
                ids: ids.clone(),
                labels: items.iter().map(|i| i.label.clone()).collect(),
                image_lens: items
                    .iter()
                    .map(|i| i.image.as_ref().map_or(0, Vec::len))
                    .collect(),
            };
            let floats: Vec<f32> = items
                .iter()
                .flat_map(|i| i.embedding.iter().copied())
                .collect();
            let blobs: Vec<&[u8]> = items.iter().filter_map(|i| i.image.as_deref()).collect();
            store.write(&header, &floats, &blobs)?;
        }
        let taken = self.take_ids(items.len());
        self.apply_images(taken.iter().copied().zip(items).collect());
        Ok(ids)
    }

    fn apply_images(&mut self, items: Vec<(u64, NewImage)>) {
        for (id, item) in items {
            self.image_pos.insert(id, self.images.len());
            self.image_embeds.extend_from_slice(&item.embedding);
            self.images.push(ImageEntry {
                id,
                label: item.label,
                image: item.image.map(Arc::new),
            });
            self.next_id = self.next_id.max(id + 1);
        }
    }

    /// Adds texts; returns their ids.
    pub fn add_texts(&mut self, items: Vec<NewText>) -> Result<Vec<u64>, IndexError> {
        if let Some(bad) = items.iter().position(|i| i.embedding.len() != self.dim) {
            return Err(IndexError::Invalid(format!(
                "text {bad}: embedding of {} values, the index holds {}",
                items[bad].embedding.len(),
                self.dim
            )));
        }
        let ids: Vec<u64> = (self.next_id..self.next_id + items.len() as u64).collect();
        if let Some(store) = &mut self.store {
            let header = SegmentHeader::AddTexts {
                fingerprint: self.fingerprint.clone(),
                dim: self.dim,
                ids: ids.clone(),
                texts: items.iter().map(|i| i.text.clone()).collect(),
            };
            let floats: Vec<f32> = items
                .iter()
                .flat_map(|i| i.embedding.iter().copied())
                .collect();
            store.write(&header, &floats, &[])?;
        }
        let taken = self.take_ids(items.len());
        self.apply_texts(taken.iter().copied().zip(items).collect());
        Ok(ids)
    }

    fn apply_texts(&mut self, items: Vec<(u64, NewText)>) {
        for (id, item) in items {
            self.text_pos.insert(id, self.texts.len());
            self.text_embeds.extend_from_slice(&item.embedding);
            self.texts.push(TextEntry {
                id,
                text: item.text,
            });
            self.next_id = self.next_id.max(id + 1);
        }
    }

    /// Removes images and texts: all or nothing (an unknown id removes nothing).
    pub fn remove(&mut self, image_ids: &[u64], text_ids: &[u64]) -> Result<usize, IndexError> {
        let mut seen = std::collections::HashSet::new();
        for id in image_ids {
            if !self.image_pos.contains_key(id) {
                return Err(IndexError::NotFound(format!(
                    "no indexed image with id {id}"
                )));
            }
            if !seen.insert(*id) {
                return Err(IndexError::Invalid(format!(
                    "image id {id} is listed twice"
                )));
            }
        }
        for id in text_ids {
            if !self.text_pos.contains_key(id) {
                return Err(IndexError::NotFound(format!(
                    "no indexed text with id {id}"
                )));
            }
            if !seen.insert(*id) {
                return Err(IndexError::Invalid(format!("text id {id} is listed twice")));
            }
        }
        if let Some(store) = &mut self.store {
            let header = SegmentHeader::Remove {
                fingerprint: self.fingerprint.clone(),
                image_ids: image_ids.to_vec(),
                text_ids: text_ids.to_vec(),
            };
            store.write(&header, &[], &[])?;
        }
        self.apply_remove(image_ids, text_ids);
        Ok(image_ids.len() + text_ids.len())
    }

    fn apply_remove(&mut self, image_ids: &[u64], text_ids: &[u64]) {
        let per = self.queries * self.dim;
        for id in image_ids {
            if let Some(p) = self.image_pos.remove(id) {
                swap_remove_rows(&mut self.image_embeds, p, per);
                self.images.swap_remove(p);
                if let Some(moved) = self.images.get(p) {
                    self.image_pos.insert(moved.id, p);
                }
            }
        }
        for id in text_ids {
            if let Some(p) = self.text_pos.remove(id) {
                swap_remove_rows(&mut self.text_embeds, p, self.dim);
                self.texts.swap_remove(p);
                if let Some(moved) = self.texts.get(p) {
                    self.text_pos.insert(moved.id, p);
                }
            }
        }
    }

    /// The `k` indexed images with the highest ITC score for a text embedding `[D]`.
    pub fn search_images(&self, text: &[f32], k: usize) -> Vec<Scored> {
        let n = self.images.len();
        if n == 0 || text.len() != self.dim {
            return Vec::new();
        }
        let q = self.queries;
        let mut sims = vec![0f32; n * q];
        gemv::matmul_wt(
            text,
            1,
            self.dim,
            Weights::F32(&self.image_embeds),
            n * q,
            None,
            &mut sims,
        );
        let scores = sims
            .chunks_exact(q)
            .map(|c| c.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        top_k(scores.enumerate().map(|(p, s)| (self.images[p].id, s)), k)
    }

    /// The `k` indexed texts with the highest ITC score for an image embedding `[Q * D]`.
    pub fn search_texts(&self, image: &[f32], k: usize) -> Vec<Scored> {
        let m = self.texts.len();
        let q = self.queries;
        if m == 0 || image.len() != q * self.dim {
            return Vec::new();
        }
        let mut sims = vec![0f32; q * m];
        gemv::matmul_wt(
            image,
            q,
            self.dim,
            Weights::F32(&self.text_embeds),
            m,
            None,
            &mut sims,
        );
        let mut best = vec![f32::NEG_INFINITY; m];
        for row in sims.chunks_exact(m) {
            for (b, s) in best.iter_mut().zip(row) {
                *b = b.max(*s);
            }
        }
        top_k(
            best.into_iter()
                .enumerate()
                .map(|(p, s)| (self.texts[p].id, s)),
            k,
        )
    }
}

fn swap_remove_rows(data: &mut Vec<f32>, row: usize, width: usize) {
    let rows = data.len() / width;
    if row + 1 != rows {
        let (head, tail) = data.split_at_mut((rows - 1) * width);
        head[row * width..(row + 1) * width].copy_from_slice(&tail[..width]);
    }
    data.truncate((rows - 1) * width);
}

/// The `k` best `(id, score)`, best first (ties: lower id first).
fn top_k(items: impl Iterator<Item = (u64, f32)>, k: usize) -> Vec<Scored> {
    let mut all: Vec<Scored> = items.map(|(id, score)| Scored { id, score }).collect();
    let order = |a: &Scored, b: &Scored| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id));
    if k == 0 {
        return Vec::new();
    }
    if all.len() > k {
        all.select_nth_unstable_by(k - 1, order);
        all.truncate(k);
    }
    all.sort_by(order);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    fn image(q0: &[f32], q1: &[f32], label: &str) -> NewImage {
        let mut embedding = unit(q0);
        embedding.extend(unit(q1));
        NewImage {
            embedding,
            label: label.into(),
            image: Some(label.as_bytes().to_vec()),
        }
    }

    #[test]
    fn search_takes_the_best_query_and_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("b2ridx-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let mut index = RetrievalIndex::open(&dir, "fp", 2, 3).unwrap();
            let ids = index
                .add_images(vec![
                    image(&[1.0, 0.0, 0.0], &[0.0, 1.0, 0.0], "a"),
                    image(&[0.0, 0.0, 1.0], &[0.0, 0.0, 1.0], "b"),
                    image(&[0.5, 0.5, 0.0], &[-1.0, 0.0, 0.0], "c"),
                ])
                .unwrap();
            assert_eq!(ids, vec![1, 2, 3]);
            let hits = index.search_images(&unit(&[0.0, 1.0, 0.1]), 2);
            assert_eq!(hits.iter().map(|h| h.id).collect::<Vec<_>>(), vec![1, 3]);
            let t = index
                .add_texts(vec![NewText {
                    embedding: unit(&[0.0, 0.0, 1.0]),
                    text: "blue".into(),
                }])
                .unwrap();
            assert_eq!(t, vec![4]);
            // Unknown id: nothing removed.
            assert!(matches!(
                index.remove(&[1, 99], &[]),
                Err(IndexError::NotFound(_))
            ));
            assert_eq!(index.num_images(), 3);
            assert_eq!(index.remove(&[1], &[]).unwrap(), 1);
        }
        let index = RetrievalIndex::open(&dir, "fp", 2, 3).unwrap();
        assert_eq!((index.num_images(), index.num_texts()), (2, 1));
        assert!(index.image(1).is_none());
        assert_eq!(index.image(3).unwrap().label, "c");
        assert_eq!(
            index.image(3).unwrap().image.as_deref().map(Vec::as_slice),
            Some(&b"c"[..])
        );
        let hits = index.search_texts(index.image_embedding(2).unwrap(), 5);
        assert_eq!(hits.len(), 1);
        assert!((hits[0].score - 1.0).abs() < 1e-6);
        // Ids keep growing after a restart.
        let mut index = index;
        assert_eq!(
            index
                .add_texts(vec![NewText {
                    embedding: unit(&[1.0, 0.0, 0.0]),
                    text: "x".into()
                }])
                .unwrap(),
            vec![5]
        );
        drop(index);
        assert!(RetrievalIndex::open(&dir, "other", 2, 3)
            .err()
            .unwrap()
            .to_string()
            .contains("fingerprint"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
