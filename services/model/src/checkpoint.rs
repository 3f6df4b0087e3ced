//! A BLIP-2 checkpoint directory in the Hugging Face layout: `config.json`, `model.safetensors`
//! or shards listed in `model.safetensors.index.json`, the tokenizer files and the processor
//! config. Weights are memory-mapped and read once at load time.
//!
//! Tensors are served to candle-nn's `VarBuilder` through [`WeightStore`], a backend that knows
//! which file holds each tensor, so a missing or misshapen weight is reported with its file and
//! name ([`Error::Weight`]) rather than as a bare tensor error.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// Weight precision chosen at load time. The Q-Former and the query tokens always stay f32, as
/// the reference keeps them (`_keep_in_fp32_modules`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
}

impl WeightDtype {
    pub fn dtype(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            WeightDtype::F16 => DType::F16,
            WeightDtype::Bf16 => DType::BF16,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(WeightDtype::F32),
            "f16" | "float16" | "fp16" => Ok(WeightDtype::F16),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            other => Err(Error::InvalidInput(format!(
                "`dtype` must be f32, f16 or bf16 (got `{other}`)"
            ))),
        }
    }
}

/// The files of a checkpoint directory.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
}

impl CheckpointFiles {
    /// Finds the files of a checkpoint directory, failing with the name of what is missing.
    pub fn locate(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "checkpoint directory not found",
                ),
            });
        }
        let config = dir.join("config.json");
        require_file(&config)?;
        let tokenizer = dir.join("tokenizer.json");
        require_file(&tokenizer)?;
        let weights = weight_files(dir)?;
        Ok(CheckpointFiles {
            dir: dir.to_path_buf(),
            config,
            weights,
            tokenizer,
        })
    }
}

fn require_file(path: &Path) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        })
    }
}

/// `model.safetensors`, or the shards named by `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
            path: index.clone(),
            source,
        })?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: index.clone(),
            message: e.to_string(),
        })?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Config {
                path: index.clone(),
                message: "no `weight_map` object".to_string(),
            })?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        if shards.is_empty() {
            return Err(Error::Config {
                path: index,
                message: "`weight_map` names no shard".to_string(),
            });
        }
        let files: Vec<PathBuf> = shards.into_iter().map(|s| dir.join(s)).collect();
        for file in &files {
            require_file(file)?;
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    require_file(&single)?;
    Ok(vec![single])
}

/// Memory-mapped safetensors files with a name -> file routing table; serves tensors to
/// `VarBuilder` and remembers the first failure with the file and tensor it concerns.
pub struct WeightStore {
    files: Vec<PathBuf>,
    mmaps: Vec<MmapedSafetensors>,
    routing: HashMap<String, usize>,
    failure: Mutex<Option<Error>>,
}

impl WeightStore {
    /// Memory-maps the files and indexes their tensor names.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut mmaps = Vec::with_capacity(files.len());
        let mut routing = HashMap::new();
        for (index, file) in files.iter().enumerate() {
            // SAFETY: the file is mapped read-only; a checkpoint modified while being served is
            // outside what this library supports, as for every memory-mapped model loader.
            let mmap = unsafe { MmapedSafetensors::new(file) }.map_err(|e| Error::Weight {
                path: file.clone(),
                name: String::new(),
                message: format!("not a readable safetensors file: {e}"),
            })?;
            for (name, _) in mmap.tensors() {
                routing.insert(name, index);
            }
            mmaps.push(mmap);
        }
        Ok(WeightStore {
            files: files.to_vec(),
            mmaps,
            routing,
            failure: Mutex::new(None),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    fn describe_files(&self) -> PathBuf {
        match self.files.as_slice() {
            [one] => one.clone(),
            _ => self
                .files
                .first()
                .and_then(|f| f.parent())
                .map(|d| d.join("model.safetensors.index.json"))
                .unwrap_or_default(),
        }
    }

    fn fail(&self, error: Error) -> candle_core::Error {
        let message = error.to_string();
        if let Ok(mut slot) = self.failure.lock() {
            if slot.is_none() {
                *slot = Some(error);
            }
        }
        candle_core::Error::Msg(message)
    }

    /// Turns a candle error raised while building a model into the typed error recorded by the
    /// store, when there is one.
    pub fn explain(&self, error: candle_core::Error) -> Error {
        match self.failure.lock().ok().and_then(|mut slot| slot.take()) {
            Some(recorded) => recorded,
            None => Error::Candle(error),
        }
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(&index) = self.routing.get(name) else {
            return Err(self.fail(Error::Weight {
                path: self.describe_files(),
                name: name.to_string(),
                message: "missing from the checkpoint".to_string(),
            }));
        };
        self.mmaps[index]
            .load(name, dev)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| {
                self.fail(Error::Weight {
                    path: self.files[index].clone(),
                    name: name.to_string(),
                    message: format!("cannot be read: {e}"),
                })
            })
    }

    /// A `VarBuilder` over this store with the given default dtype.
    pub fn var_builder(
        self: &std::sync::Arc<Self>,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(SharedStore(self.clone())), dtype, device.clone())
    }
}

/// `SimpleBackend` over a shared [`WeightStore`].
struct SharedStore(std::sync::Arc<WeightStore>);

impl SimpleBackend for SharedStore {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.0.load(name, dtype, dev)?;
        if tensor.shape() != &shape {
            let index = self.0.routing.get(name).copied().unwrap_or(0);
            return Err(self.0.fail(Error::Weight {
                path: self.0.files[index].clone(),
                name: name.to_string(),
                message: format!(
                    "has shape {:?}, the config implies {:?}",
                    tensor.dims(),
                    shape.dims()
                ),
            }));
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// A weight source that serves every requested tensor as small uniform random values in
/// [-0.05, 0.05): the arithmetic of a real checkpoint of any shape, without one, for benchmarks
/// and timing tests. Not zeros: an all-zero allocation maps the kernel's shared zero page, so
/// decode would read no memory and look faster than it can be. It holds no tensor of its own,
/// so OPT's lm_head is tied to embed_tokens, as in the released checkpoints.
pub struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        _name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::rand(-0.05f32, 0.05, shape, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights have no stored shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_checkpoint(dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join("model.safetensors");
        let t = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a.weight".to_string(), t)]), &file)
            .unwrap();
        file
    }

    #[test]
    fn missing_and_misshapen_tensors_name_file_and_tensor() {
        let dir = std::env::temp_dir().join(format!("blip2-ckpt-{}", std::process::id()));
        let file = write_checkpoint(&dir);
        let store = std::sync::Arc::new(WeightStore::open(std::slice::from_ref(&file)).unwrap());
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let err = vb.get((2, 3), "b.weight").unwrap_err();
        let err = store.explain(err).to_string();
        assert!(
            err.contains("b.weight") && err.contains("model.safetensors"),
            "{err}"
        );
        let err = vb.get((3, 2), "a.weight").unwrap_err();
        let err = store.explain(err).to_string();
        assert!(err.contains("a.weight") && err.contains("[2, 3]"), "{err}");
        assert!(vb.get((2, 3), "a.weight").is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn dtype_flag_parses() {
        assert_eq!("bf16".parse::<WeightDtype>().unwrap(), WeightDtype::Bf16);
        assert!("int3".parse::<WeightDtype>().is_err());
    }
}
