//! The prefix cache: KV of earlier prompts (and their generated continuations), so that the
//! next turn of a conversation, whose prompt starts with the previous turn's prompt and answer,
//! computes only its new positions.
//!
//! Every position has a key: a token id, or (content hash of a soft prompt, row). The hash is
//! taken over the soft prompt's bytes as received, never over the client's claimed image hash,
//! so the same text with another image (or a client that mislabels one) never shares KV. A hit
//! is the longest common prefix with any entry, cut so that at least one prompt position is
//! left to compute (its logits start the generation). Entries are evicted least recently used
//! first under a byte budget; an entry that is a prefix of a newer one is dropped as redundant.
//! Decoder-only models only: an encoder-decoder's bidirectional encoder has no reusable prefix.

use blip2_model::llm::SeqCache;
use blip2_model::prompt::{Prompt, PromptPiece};
use sha2::{Digest, Sha256};

/// The key of one prompt position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PosKey {
    Token(u32),
    /// Row `row` of the soft prompt whose bytes hash to the digest.
    Image([u8; 32], u32),
}

/// Content hash of a soft prompt's element type and bytes.
pub(crate) fn soft_prompt_digest(dtype: &str, bytes: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(dtype.as_bytes());
    hasher.update([0u8]);
    hasher.update(bytes);
    hasher.finalize().into()
}

/// The position keys of a prompt, given one digest per image in placeholder order.
pub(crate) fn prompt_keys(prompt: &Prompt, image_digests: &[[u8; 32]], rows: usize) -> Vec<PosKey> {
    let mut keys = Vec::with_capacity(prompt.num_positions);
    for piece in &prompt.pieces {
        match piece {
            PromptPiece::Tokens(ids) => keys.extend(ids.iter().map(|&id| PosKey::Token(id))),
            PromptPiece::Image(index) => {
                if let Some(digest) = image_digests.get(*index) {
                    keys.extend((0..rows).map(|r| PosKey::Image(*digest, r as u32)));
                }
            }
        }
    }
    keys
}

struct Entry {
    keys: Vec<PosKey>,
    cache: SeqCache,
    bytes: usize,
    last_used: u64,
}

/// What [`PrefixCache::lookup`] found.
pub(crate) struct Hit {
    /// A cache holding the first `len` positions.
    pub cache: SeqCache,
    pub len: usize,
}

/// Counters of the cache, for `Info` and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PrefixStats {
    pub hits: u64,
    pub misses: u64,
    pub tokens: u64,
    pub bytes: u64,
}

/// Prompt KV under a byte budget (see the module docs).
pub(crate) struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    bytes: usize,
    clock: u64,
    stats: PrefixStats,
}

fn common_prefix(a: &[PosKey], b: &[PosKey]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// A cache holding at most `budget` bytes of KV (0 disables it).
    pub fn new(budget: usize) -> Self {
        PrefixCache {
            entries: Vec::new(),
            budget,
            bytes: 0,
            clock: 0,
            stats: PrefixStats::default(),
        }
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            bytes: self.bytes as u64,
            ..self.stats
        }
    }

    /// The longest cached prefix of `keys`, at most `keys.len() - 1` positions; counts a hit or
    /// a miss.
    pub fn lookup(&mut self, keys: &[PosKey]) -> Option<Hit> {
        let limit = keys.len().saturating_sub(1);
        let best = self
            .entries
            .iter_mut()
            .map(|entry| {
                let len = common_prefix(&entry.keys, keys)
                    .min(limit)
                    .min(entry.cache.len);
                (len, entry)
            })
            .filter(|(len, _)| *len > 0)
            .max_by_key(|(len, entry)| (*len, entry.last_used));
        let hit = match best {
            Some((len, entry)) => {
                self.clock += 1;
                entry.last_used = self.clock;
                entry
                    .cache
                    .truncated(len)
                    .ok()
                    .map(|cache| Hit { cache, len })
            }
            None => None,
        };
        match &hit {
            Some(hit) => {
                self.stats.hits += 1;
                self.stats.tokens += hit.len as u64;
            }
            None => self.stats.misses += 1,
        }
        hit
    }

    /// Keeps `cache` (whose positions are `keys[..cache.len]`) for later prompts.
    pub fn insert(&mut self, mut keys: Vec<PosKey>, cache: SeqCache) {
        if self.budget == 0 || cache.len == 0 || !cache.cross_kv.is_empty() {
            return;
        }
        keys.truncate(cache.len);
        if keys.len() < cache.len {
            return;
        }
        // Already covered by an entry at least as long: refresh it instead.
        if let Some(entry) = self
            .entries
            .iter_mut()
            .find(|e| e.keys.len() >= keys.len() && e.keys[..keys.len()] == keys[..])
        {
            self.clock += 1;
            entry.last_used = self.clock;
            return;
        }
        let bytes = cache.size_in_bytes();
        if bytes > self.budget {
            return;
        }
        // Entries this one extends are redundant now.
        let mut freed = 0;
        self.entries.retain(|e| {
            let redundant = e.keys.len() <= keys.len() && keys[..e.keys.len()] == e.keys[..];
            if redundant {
                freed += e.bytes;
            }
            !redundant
        });
        self.bytes -= freed;
        while self.bytes + bytes > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            let evicted = self.entries.swap_remove(oldest);
            self.bytes -= evicted.bytes;
        }
        self.clock += 1;
        self.bytes += bytes;
        self.entries.push(Entry {
            keys,
            cache,
            bytes,
            last_used: self.clock,
        });
    }
}

#[cfg(test)]
mod tests {
    use blip2_model::llm::LayerKv;
    use candle_core::{DType, Device, Tensor};

    use super::*;

    /// A one-layer cache of `len` positions whose values are their positions.
    fn cache(len: usize) -> SeqCache {
        let k = Tensor::arange(0f32, len as f32, &Device::Cpu)
            .unwrap()
            .reshape((1, len, 1))
            .unwrap();
        let mut cache = SeqCache::new(1);
        cache.self_kv[0] = Some(LayerKv {
            k: k.clone(),
            v: k.to_dtype(DType::F32).unwrap(),
        });
        cache.len = len;
        cache
    }

    fn tokens(ids: &[u32]) -> Vec<PosKey> {
        ids.iter().map(|&id| PosKey::Token(id)).collect()
    }

    #[test]
    fn longest_prefix_wins_and_leaves_one_position() {
        let mut pc = PrefixCache::new(1 << 20);
        pc.insert(tokens(&[1, 2, 3]), cache(3));
        pc.insert(tokens(&[1, 2, 9, 9, 9]), cache(5));
        let hit = pc.lookup(&tokens(&[1, 2, 9, 9, 7])).unwrap();
        assert_eq!(hit.len, 4);
        assert_eq!(hit.cache.len, 4);
        let k: Vec<f32> = hit.cache.self_kv[0]
            .as_ref()
            .unwrap()
            .k
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(k, vec![0.0, 1.0, 2.0, 3.0]);
        // The same prompt again: all but its last position.
        let hit = pc.lookup(&tokens(&[1, 2, 3])).unwrap();
        assert_eq!(hit.len, 2);
        assert!(pc.lookup(&tokens(&[5, 1, 2])).is_none());
        let stats = pc.stats();
        assert_eq!((stats.hits, stats.misses, stats.tokens), (2, 1, 6));
    }

    #[test]
    fn another_image_never_matches() {
        let mut pc = PrefixCache::new(1 << 20);
        let a = soft_prompt_digest("f32", &[1, 2, 3, 4]);
        let b = soft_prompt_digest("f32", &[1, 2, 3, 5]);
        let b16 = soft_prompt_digest("f16", &[1, 2, 3, 4]);
        assert_ne!(a, b);
        assert_ne!(a, b16);
        let with = |d: [u8; 32]| {
            let mut keys = vec![PosKey::Token(2)];
            keys.extend((0..2).map(|r| PosKey::Image(d, r)));
            keys.push(PosKey::Token(7));
            keys
        };
        pc.insert(with(a), cache(4));
        // Only the BOS position before the image is shared.
        assert_eq!(pc.lookup(&with(b)).unwrap().len, 1);
        assert_eq!(pc.lookup(&with(b16)).unwrap().len, 1);
        assert_eq!(pc.lookup(&with(a)).unwrap().len, 3);
    }

    #[test]
    fn budget_evicts_least_recently_used_and_drops_redundant_prefixes() {
        let one = cache(1).size_in_bytes();
        let mut pc = PrefixCache::new(one * 7);
        pc.insert(tokens(&[1, 2]), cache(2));
        pc.insert(tokens(&[1, 2, 3, 4]), cache(4)); // replaces [1, 2]
        assert_eq!(pc.stats().bytes as usize, one * 4);
        pc.insert(tokens(&[8, 8, 8]), cache(3));
        assert_eq!(pc.stats().bytes as usize, one * 7);
        // Touch [1, 2, 3, 4]; then a new entry evicts [8, 8, 8].
        assert!(pc.lookup(&tokens(&[1, 2, 3, 5])).is_some());
        pc.insert(tokens(&[6, 6]), cache(2));
        assert!(pc.lookup(&tokens(&[8, 8, 8, 8])).is_none());
        assert_eq!(pc.lookup(&tokens(&[1, 2, 3, 4, 5])).unwrap().len, 4);
        assert_eq!(pc.stats().bytes as usize, one * 6);
        // Too large for the budget: not kept.
        pc.insert(tokens(&[9; 8]), cache(8));
        assert!(pc.lookup(&tokens(&[9; 9])).is_none());
        // A disabled cache keeps nothing.
        let mut off = PrefixCache::new(0);
        off.insert(tokens(&[1, 2]), cache(2));
        assert!(off.lookup(&tokens(&[1, 2, 3])).is_none());
    }
}
