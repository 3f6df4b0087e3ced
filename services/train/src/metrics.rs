//! Scores for generated answers: exact match (VQA), CIDEr-D and attribute recall (captions),
//! recall@K (retrieval).

use std::collections::HashMap;

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
/// document frequencies counted over the reference sets, candidate weights clipped to the
/// reference's, a Gaussian length penalty (sigma 6), the mean over n, over the references, times 10.
/// Words are lower-cased and split on punctuation (coco-caption tokenises with PTB rules).
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
    // TF-IDF vectors, their norms, and the length (unigram count).
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
                if n == 0 {
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
/// `i`: the share of queries whose correct item ranks among the K highest.
pub fn recall_at_k(sim: &[Vec<f32>], k: usize) -> f64 {
    if sim.is_empty() {
        return 0.0;
    }
    let hits = sim
        .iter()
        .enumerate()
        .filter(|(i, row)| {
            let Some(&own) = row.get(*i) else {
                return false;
            };
            row.iter().filter(|&&s| s > own).count() < k
        })
        .count();
    hits as f64 / sim.len() as f64
}
