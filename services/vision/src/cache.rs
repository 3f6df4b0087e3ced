//! The soft-prompt cache: `[num_query_tokens, llm_hidden]` tensors in the model dtype, keyed by
//! the image's sha256, bounded in bytes, least recently used evicted first.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use candle_core::Tensor;

struct Entry {
    soft_prompt: Tensor,
    bytes: usize,
    /// Position in [`State::recency`].
    stamp: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// stamp -> key, oldest first: the front is the next to evict.
    recency: BTreeMap<u64, String>,
    next_stamp: u64,
    bytes: usize,
}

impl State {
    fn touch(&mut self, key: &str) -> Option<Tensor> {
        let stamp = self.next_stamp;
        let entry = self.entries.get_mut(key)?;
        self.recency.remove(&entry.stamp);
        entry.stamp = stamp;
        self.next_stamp += 1;
        self.recency.insert(stamp, key.to_string());
        Some(entry.soft_prompt.clone())
    }

    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.entries.remove(key) {
            self.recency.remove(&entry.stamp);
            self.bytes -= entry.bytes;
        }
    }
}

/// A byte-bounded LRU map from image sha256 to soft prompt. Tensors are reference counted, so a
/// hit hands out the cached storage without copying it.
pub struct SoftPromptCache {
    budget: usize,
    state: Mutex<State>,
}

impl SoftPromptCache {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements, so a panic elsewhere cannot leave it half
        // updated: take it back from a poisoned lock.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The soft prompt of an image, marking it most recently used.
    pub fn get(&self, sha256: &str) -> Option<Tensor> {
        self.state().touch(sha256)
    }

    /// Stores a soft prompt, evicting the least recently used ones until it fits. A tensor larger
    /// than the whole budget is not stored.
    pub fn insert(&self, sha256: &str, soft_prompt: Tensor) {
        let bytes = soft_prompt.elem_count() * soft_prompt.dtype().size_in_bytes();
        if bytes > self.budget {
            return;
        }
        let mut state = self.state();
        state.remove(sha256);
        while state.bytes + bytes > self.budget {
            let Some((_, oldest)) = state.recency.pop_first() else {
                break;
            };
            if let Some(entry) = state.entries.remove(&oldest) {
                state.bytes -= entry.bytes;
            }
        }
        let stamp = state.next_stamp;
        state.next_stamp += 1;
        state.recency.insert(stamp, sha256.to_string());
        state.entries.insert(
            sha256.to_string(),
            Entry {
                soft_prompt,
                bytes,
                stamp,
            },
        );
        state.bytes += bytes;
    }

    /// Bytes of tensor data held.
    pub fn bytes(&self) -> usize {
        self.state().bytes
    }

    /// Soft prompts held.
    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A `[2, 4]` f32 soft prompt (32 bytes) filled with `value`.
    fn prompt(value: f32) -> Tensor {
        Tensor::full(value, (2, 4), &Device::Cpu).unwrap()
    }

    fn value(t: &Tensor) -> f32 {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let cache = SoftPromptCache::new(3 * 32);
        cache.insert("a", prompt(1.0));
        cache.insert("b", prompt(2.0));
        cache.insert("c", prompt(3.0));
        assert_eq!(cache.bytes(), 96);
        // Reading "a" makes "b" the oldest.
        assert_eq!(value(&cache.get("a").unwrap()), 1.0);
        cache.insert("d", prompt(4.0));
        assert!(cache.get("b").is_none());
        assert_eq!(cache.len(), 3);
        for (key, v) in [("a", 1.0), ("c", 3.0), ("d", 4.0)] {
            assert_eq!(value(&cache.get(key).unwrap()), v);
        }
        assert_eq!(cache.bytes(), 96);
    }

    #[test]
    fn replacing_a_key_keeps_the_byte_count() {
        let cache = SoftPromptCache::new(64);
        cache.insert("a", prompt(1.0));
        cache.insert("a", prompt(5.0));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), 32);
        assert_eq!(value(&cache.get("a").unwrap()), 5.0);
    }

    #[test]
    fn counts_bytes_by_dtype_and_skips_what_cannot_fit() {
        let cache = SoftPromptCache::new(40);
        cache.insert("half", prompt(1.0).to_dtype(DType::F16).unwrap());
        assert_eq!(cache.bytes(), 16);
        cache.insert(
            "big",
            Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(cache.get("big").is_none());
        assert!(cache.get("half").is_some());
        // A zero budget caches nothing.
        let none = SoftPromptCache::new(0);
        none.insert("a", prompt(1.0));
        assert!(none.is_empty());
    }
}
