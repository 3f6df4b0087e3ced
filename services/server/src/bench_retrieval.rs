//! `blip2 bench retrieval`: image-text retrieval throughput with random weights, and brute-force
//! search latency over indexes of random unit embeddings (`tools/bench/retrieval.py` runs it
//! next to a numpy baseline).
//!
//! Shapes: "base" (ViT-B/14 at 224 px, the real BERT-base Q-Former with text input, 32 queries,
//! D = 256) and "vit-g" (the released blip2-itm-vit-g dims: EVA ViT-g/14). The tokenizer is the
//! fixture's WordPiece (a small vocabulary: captions tokenise into somewhat more pieces than
//! with bert-base-uncased; the token count is reported).

use std::time::Instant;

use anyhow::{Context, Result};
use blip2_model::checkpoint::RandomWeights;
use blip2_model::config::Blip2Config;
use blip2_model::processor::{DecodeLimits, ImageProcessor, ImageProcessorConfig};
use blip2_model::retrieval::RetrievalModel;
use blip2_vision::retrieval_index::{NewImage, NewText, RetrievalIndex};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::Args;
use serde::Serialize;

const TOKENIZER: &[u8] =
    include_bytes!("../../../tests/fixtures/models/retrieval-a/tokenizer.json");

#[derive(Debug, Clone, Copy, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetrievalShape {
    Base,
    #[value(name = "vit-g")]
    VitG,
}

#[derive(Args, Debug)]
pub struct RetrievalBenchArgs {
    /// Model shape for the embedding throughput.
    #[arg(long, value_enum, default_value_t = RetrievalShape::Base)]
    shape: RetrievalShape,
    /// Images embedded (after one warm-up), in batches of --batch.
    #[arg(long, default_value_t = 8)]
    images: usize,
    /// Images per forward.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Texts embedded (after one warm-up), in batches of 32.
    #[arg(long, default_value_t = 256)]
    texts: usize,
    /// Index sizes to search (images of [32, 256] and texts of [256], random unit vectors).
    #[arg(long, value_delimiter = ',', default_values_t = [10_000usize, 100_000])]
    index_sizes: Vec<usize>,
    /// Searches timed per index size.
    #[arg(long, default_value_t = 20)]
    searches: usize,
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Skip the model (search latency only).
    #[arg(long)]
    no_model: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct EmbedResult {
    shape: RetrievalShape,
    images: usize,
    batch: usize,
    images_per_second: f64,
    texts: usize,
    mean_text_tokens: f64,
    texts_per_second: f64,
    /// ITM pairs scored per second (one image against 32 captions).
    itm_pairs_per_second: f64,
}

#[derive(Debug, Serialize)]
struct SearchResult {
    indexed: usize,
    queries: usize,
    dim: usize,
    top_k: usize,
    /// Text -> images: max over each image's queries.
    search_by_text_ms_mean: f64,
    search_by_text_ms_p50: f64,
    search_by_text_ms_max: f64,
    /// Image -> texts.
    search_by_image_ms_mean: f64,
    search_by_image_ms_p50: f64,
    index_mib: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    threads: usize,
    embed: Option<EmbedResult>,
    search: Vec<SearchResult>,
}

fn config(shape: RetrievalShape) -> Result<Blip2Config> {
    let vision = match shape {
        RetrievalShape::Base => serde_json::json!({"hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224,
            "patch_size": 14}),
        RetrievalShape::VitG => serde_json::json!({}),
    };
    let json = serde_json::json!({
        "vision_config": vision,
        "qformer_config": {"vocab_size": 30523, "use_qformer_text_input": true},
        "num_query_tokens": 32,
        "image_text_hidden_size": 256
    });
    Ok(Blip2Config::from_json(&json.to_string(), "bench".as_ref())?)
}

const WORDS: [&str; 24] = [
    "a", "photo", "of", "dog", "cat", "running", "on", "the", "beach", "with", "red", "ball",
    "two", "people", "sitting", "at", "table", "in", "kitchen", "man", "riding", "horse", "street",
    "snow",
];

/// xorshift64*: reproducible, fast random numbers for the benchmark data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    /// `rows` unit vectors of width `dim`, concatenated.
    fn units(&mut self, rows: usize, dim: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..rows * dim).map(|_| self.uniform()).collect();
        for row in v.chunks_exact_mut(dim) {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|x| *x /= n);
        }
        v
    }
}

fn embed(args: &RetrievalBenchArgs) -> Result<EmbedResult> {
    let config = config(args.shape)?;
    let dir = std::env::temp_dir().join(format!("blip2-bench-retrieval-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let tokenizer = dir.join("tokenizer.json");
    std::fs::write(&tokenizer, TOKENIZER)?;
    let size = config.vision_config.image_size;
    let processor = ImageProcessor::new(
        ImageProcessorConfig::with_size(size),
        DecodeLimits::default(),
    );
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
    let model = RetrievalModel::from_weights(config, vb, &tokenizer, processor, &dir)
        .context("building the random retrieval model")?;
    let _ = std::fs::remove_dir_all(&dir);

    let batch = args.batch.max(1);
    let pixels = Tensor::randn(0f32, 1.0, (batch, 3, size, size), &Device::Cpu)?;
    model.embed_pixels(&pixels)?; // warm-up
    let rounds = args.images.div_ceil(batch).max(1);
    let t0 = Instant::now();
    for _ in 0..rounds {
        model.embed_pixels(&pixels)?;
    }
    let images_per_second = (rounds * batch) as f64 / t0.elapsed().as_secs_f64();

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let captions: Vec<String> = (0..args.texts.max(32))
        .map(|_| {
            let n = 6 + (rng.next() % 8) as usize;
            (0..n)
                .map(|_| WORDS[(rng.next() % WORDS.len() as u64) as usize])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let tokenized = model.tokenize(&refs)?;
    let mean_text_tokens =
        tokenized.iter().map(|t| t.ids.len()).sum::<usize>() as f64 / tokenized.len() as f64;
    model.embed_texts(&tokenized[..32])?; // warm-up
    let t0 = Instant::now();
    for chunk in tokenized.chunks(32) {
        model.embed_texts(chunk)?;
    }
    let texts_per_second = tokenized.len() as f64 / t0.elapsed().as_secs_f64();

    let one = pixels.narrow(0, 0, 1)?;
    let t0 = Instant::now();
    model.match_pixels(&one, &tokenized[..32])?;
    let itm_pairs_per_second = 32.0 / t0.elapsed().as_secs_f64();
    Ok(EmbedResult {
        shape: args.shape,
        images: rounds * batch,
        batch,
        images_per_second,
        texts: tokenized.len(),
        mean_text_tokens,
        texts_per_second,
        itm_pairs_per_second,
    })
}

fn stats(mut ms: Vec<f64>) -> (f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    (mean, ms[ms.len() / 2], ms[ms.len() - 1])
}

fn search(n: usize, args: &RetrievalBenchArgs) -> Result<SearchResult> {
    let (q, d) = (32, 256);
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ n as u64);
    let mut index = RetrievalIndex::in_memory("bench", q, d);
    index.reserve(n, n);
    let chunk = 4096;
    let mut left = n;
    while left > 0 {
        let m = left.min(chunk);
        let data = rng.units(m * q, d);
        let items = data
            .chunks_exact(q * d)
            .map(|e| NewImage {
                embedding: e.to_vec(),
                label: String::new(),
                image: None,
            })
            .collect();
        index.add_images(items)?;
        let texts = rng.units(m, d);
        index.add_texts(
            texts
                .chunks_exact(d)
                .map(|e| NewText {
                    embedding: e.to_vec(),
                    text: String::new(),
                })
                .collect(),
        )?;
        left -= m;
    }
    let searches = args.searches.max(1);
    let text_queries = rng.units(searches, d);
    let image_queries = rng.units(searches * q, d);
    index.search_images(&text_queries[..d], args.top_k); // warm-up
    let mut by_text = Vec::with_capacity(searches);
    for t in text_queries.chunks_exact(d) {
        let t0 = Instant::now();
        let hits = index.search_images(t, args.top_k);
        by_text.push(t0.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(hits.len() == args.top_k.min(n), "short result");
    }
    let mut by_image = Vec::with_capacity(searches);
    for image in image_queries.chunks_exact(q * d) {
        let t0 = Instant::now();
        let hits = index.search_texts(image, args.top_k);
        by_image.push(t0.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(hits.len() == args.top_k.min(n), "short result");
    }
    let (mean, p50, max) = stats(by_text);
    let (image_mean, image_p50, _) = stats(by_image);
    Ok(SearchResult {
        indexed: n,
        queries: q,
        dim: d,
        top_k: args.top_k,
        search_by_text_ms_mean: mean,
        search_by_text_ms_p50: p50,
        search_by_text_ms_max: max,
        search_by_image_ms_mean: image_mean,
        search_by_image_ms_p50: image_p50,
        index_mib: (n * (q + 1) * d * 4) as f64 / (1 << 20) as f64,
    })
}

pub fn run(args: RetrievalBenchArgs) -> Result<()> {
    let embed = if args.no_model {
        None
    } else {
        Some(embed(&args)?)
    };
    let search = args
        .index_sizes
        .iter()
        .map(|&n| search(n, &args))
        .collect::<Result<Vec<_>>>()?;
    let results = Results {
        threads: blip2_model::kernels::gemm::num_threads(),
        embed,
        search,
    };
    if args.json {
        println!("{}", serde_json::to_string(&results)?);
    } else {
        if let Some(e) = &results.embed {
            println!(
                "{:?}: {:.2} images/s (batch {}), {:.1} texts/s ({:.1} tokens each), {:.1} ITM pairs/s",
                e.shape, e.images_per_second, e.batch, e.texts_per_second, e.mean_text_tokens,
                e.itm_pairs_per_second
            );
        }
        for s in &results.search {
            println!(
                "{:>7} indexed: search by text {:.2} ms (p50 {:.2}, max {:.2}), by image {:.2} ms ({:.0} MiB)",
                s.indexed,
                s.search_by_text_ms_mean,
                s.search_by_text_ms_p50,
                s.search_by_text_ms_max,
                s.search_by_image_ms_mean,
                s.index_mib
            );
        }
    }
    Ok(())
}
