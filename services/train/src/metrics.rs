//! Scores for generated answers: exact match and accuracy per question type (VQA), CIDEr-D
//! and attribute recall (captions), recall@K (retrieval).

use std::collections::{BTreeMap, HashMap};

/// Lower case, whitespace collapsed, trailing punctuation and spaces removed: `" Red. "` and
/// `"red"` are the same answer.
pub fn normalize(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let joined = words.join(" ").to_lowercase();
    joined
        .trim_end_matches(|c: char| c.is_ascii_punctuation() || c.is_whitespace())
        .trim_start()
        .to_string()
}

/// Whether `answer` is `expected` after [`normalize`].
pub fn exact_match(answer: &str, expected: &str) -> bool {
    normalize(answer) == normalize(expected)
}

/// Exact-match counts of one question type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
}

impl Accuracy {
    /// The share answered correctly; 0 with no questions.
    pub fn rate(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// Exact match per question type over `(type, answer, expected)` triples, by type name.
pub fn accuracy_by_type<'a>(
    results: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
) -> BTreeMap<String, Accuracy> {
    let mut out: BTreeMap<String, Accuracy> = BTreeMap::new();
    for (kind, answer, expected) in results {
        let entry = out.entry(kind.to_string()).or_default();
        entry.total += 1;
        if exact_match(answer, expected) {
            entry.correct += 1;
        }
    }
    out
}

/// The words of a text for the caption metrics: lower case, split on anything that is not a
/// letter or digit.
pub fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// The share of `attributes` (single words: `"red"`, `"circle"`, `"two"`) that `answer`
/// names as a word, a plural `-s`/`-es` counting for its singular. No attributes: 1.
pub fn attribute_recall(answer: &str, attributes: &[String]) -> f64 {
    if attributes.is_empty() {
        return 1.0;
    }
    let said = words(answer);
    let named = attributes
        .iter()
        .filter(|attribute| {
            let a = attribute.to_lowercase();
            said.iter().any(|w| {
                *w == a
                    || w.strip_suffix('s') == Some(a.as_str())
                    || w.strip_suffix("es") == Some(a.as_str())
            })
        })
        .count();
    named as f64 / attributes.len() as f64
}

type Grams = HashMap<Vec<String>, f64>;

/// n-gram counts, n = 1..=4.
fn ngrams(text: &str) -> [Grams; 4] {
    let w = words(text);
    let mut out: [Grams; 4] = Default::default();
    for (n, grams) in out.iter_mut().enumerate() {
        for window in w.windows(n + 1) {
            *grams.entry(window.to_vec()).or_default() += 1.0;
        }
    }
    out
}

/// CIDEr-D (Vedantam et al. 2015, as the coco-caption scorer computes it) of `candidates[i]`
/// against `references[i]`, averaged over the candidates: TF-IDF vectors of 1- to 4-grams, the
/// document frequencies counted over the reference sets (idf = ln(images) - ln(max(1, df))),
/// candidate weights clipped to the reference's, a Gaussian length penalty (sigma 6), the mean
/// over n, over the references, times 10. The length is, as in coco-caption's scorer, the
/// number of bigrams (one less than the words, for texts of at least one word). Words are
/// lower-cased and split on punctuation (coco-caption tokenises with PTB rules).
pub fn cider_d(candidates: &[String], references: &[Vec<String>]) -> f64 {
    const SIGMA: f64 = 6.0;
    let n_images = candidates.len().min(references.len());
    if n_images == 0 {
        return 0.0;
    }
    let refs: Vec<Vec<[Grams; 4]>> = references[..n_images]
        .iter()
        .map(|set| set.iter().map(|r| ngrams(r)).collect())
        .collect();
    let mut df: HashMap<Vec<String>, f64> = HashMap::new();
    for set in &refs {
        let mut seen: std::collections::HashSet<&Vec<String>> = std::collections::HashSet::new();
        for r in set {
            for grams in r {
                seen.extend(grams.keys());
            }
        }
        for gram in seen {
            *df.entry(gram.clone()).or_default() += 1.0;
        }
    }
    let log_n = (n_images as f64).ln();
    // TF-IDF vectors, their norms, and the length (bigram count, as coco-caption's `n == 1`).
    let vectorise = |grams: &[Grams; 4]| -> ([Grams; 4], [f64; 4], f64) {
        let mut vec: [Grams; 4] = Default::default();
        let mut norm = [0.0; 4];
        let mut length = 0.0;
        for (n, g) in grams.iter().enumerate() {
            for (gram, &tf) in g {
                let idf = log_n - df.get(gram).copied().unwrap_or(0.0).max(1.0).ln();
                let value = tf * idf;
                vec[n].insert(gram.clone(), value);
                norm[n] += value * value;
                if n == 1 {
                    length += tf;
                }
            }
        }
        (vec, norm.map(f64::sqrt), length)
    };
    let mut total = 0.0;
    for (candidate, ref_set) in candidates.iter().zip(&refs) {
        if ref_set.is_empty() {
            continue;
        }
        let (hyp, hyp_norm, hyp_len) = vectorise(&ngrams(candidate));
        let mut score = [0.0f64; 4];
        for r in ref_set {
            let (rv, r_norm, r_len) = vectorise(r);
            let delta = hyp_len - r_len;
            for n in 0..4 {
                let mut value = 0.0;
                for (gram, &h) in &hyp[n] {
                    if let Some(&x) = rv[n].get(gram) {
                        value += h.min(x) * x;
                    }
                }
                if hyp_norm[n] != 0.0 && r_norm[n] != 0.0 {
                    value /= hyp_norm[n] * r_norm[n];
                }
                score[n] += value * (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
            }
        }
        let mean_over_n = score.iter().sum::<f64>() / 4.0;
        total += mean_over_n / ref_set.len() as f64 * 10.0;
    }
    total / n_images as f64
}

/// Recall@K from a similarity matrix `sim[query][item]` whose correct item for query `i` is
/// `i`: the share of queries whose correct item ranks among the K highest. Ties count against
/// the query (an item scoring the same as the correct one ranks above it), so a model that
/// scores everything alike gets 0 for every K below the number of items; a NaN score is a
/// miss.
pub fn recall_at_k(sim: &[Vec<f32>], k: usize) -> f64 {
    let gold: Vec<Vec<usize>> = (0..sim.len()).map(|i| vec![i]).collect();
    recall_at_k_gold(sim, &gold, k)
}

/// Recall@K when a query has several correct items (`gold[query]`, e.g. every image whose
/// caption is the query text): a hit when the best-scoring correct item has fewer than K
/// wrong items scoring at least as high. A query without a correct item in range is a miss.
pub fn recall_at_k_gold(sim: &[Vec<f32>], gold: &[Vec<usize>], k: usize) -> f64 {
    if sim.is_empty() {
        return 0.0;
    }
    let hits = sim
        .iter()
        .zip(gold.iter().chain(std::iter::repeat(&Vec::new())))
        .filter(|(row, correct)| {
            let best = correct
                .iter()
                .filter_map(|&j| row.get(j).copied())
                .filter(|s| !s.is_nan())
                .fold(None, |best: Option<f32>, s| {
                    Some(best.map_or(s, |b| b.max(s)))
                });
            let Some(best) = best else {
                return false;
            };
            let above = row
                .iter()
                .enumerate()
                .filter(|&(j, &s)| !correct.contains(&j) && s >= best)
                .count();
            above < k
        })
        .count();
    hits as f64 / sim.len() as f64
}

/// For texts `texts[i]` (one per item), the items sharing each text: `gold[i]` = every `j`
/// with `texts[j] == texts[i]` after [`normalize`]. In the shapes world several images share a
/// caption, so a caption's correct images (and an image's correct captions) are all of them.
pub fn gold_by_equal_text(texts: &[String]) -> Vec<Vec<usize>> {
    let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, t) in texts.iter().enumerate() {
        groups.entry(normalize(t)).or_default().push(i);
    }
    texts
        .iter()
        .map(|t| groups.get(&normalize(t)).cloned().unwrap_or_default())
        .collect()
}
