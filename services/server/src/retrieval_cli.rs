//! `blip2 match` and `blip2 embed`: image-text retrieval on a `Blip2ForImageTextRetrieval`
//! checkpoint (ITM probability, ITC score, normalised embeddings). Their `--json` forms are used
//! for checks from outside: keep them stable.
//!
//! - `blip2 match --model DIR --image FILE --text TEXT --json` prints one object with
//!   `itm_probability`, `itc_score`, `itm_logits`, `num_tokens`, `truncated` for that pair; with
//!   `--text` repeated, `results` holds one such object per text, in order (and the top-level
//!   fields describe the first text).
//! - `blip2 embed --model DIR --image FILE --json` prints `image_embeds` (`[queries][D]`, each
//!   row unit-norm) and `shape`; `blip2 embed --model DIR --text TEXT --json` prints
//!   `text_embeds` (`[D]`, unit-norm), `shape`, `num_tokens` and `truncated`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use blip2_model::retrieval::{RetrievalLoadOptions, RetrievalModel, TokenizedText};
use clap::Args;

#[derive(Args, Debug)]
pub struct RetrievalModelArgs {
    /// A `Blip2ForImageTextRetrieval` checkpoint directory (e.g. Salesforce/blip2-itm-vit-g), or
    /// its Hugging Face repo id (needs the `hub` feature).
    #[arg(long, env = "BLIP2_MODEL")]
    model: PathBuf,
}

impl RetrievalModelArgs {
    pub fn load(&self) -> Result<RetrievalModel> {
        let dir = crate::default_model::resolve_model_dir(Some(&self.model))?;
        RetrievalModel::load(&dir, &RetrievalLoadOptions::default())
            .with_context(|| format!("loading {}", dir.display()))
    }
}

#[derive(Args, Debug)]
pub struct MatchArgs {
    #[command(flatten)]
    model: RetrievalModelArgs,
    /// Image file.
    #[arg(long)]
    image: PathBuf,
    /// Caption to score against the image; repeat for several.
    #[arg(long = "text", required = true)]
    texts: Vec<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
#[group(id = "input", required = true, multiple = false, args = ["image", "text"])]
pub struct EmbedArgs {
    #[command(flatten)]
    model: RetrievalModelArgs,
    /// Image file: prints its query embeddings `[queries, D]`.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Text: prints its embedding `[D]`.
    #[arg(long)]
    text: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn warn_truncated(model: &RetrievalModel, texts: &[TokenizedText]) {
    for (i, t) in texts.iter().enumerate().filter(|(_, t)| t.truncated) {
        eprintln!(
            "warning: text {i} has {} tokens; truncated to the Q-Former's {} positions",
            t.num_tokens,
            model.tokenizer().max_len()
        );
    }
}

pub fn run_match(args: MatchArgs) -> Result<()> {
    let model = args.model.load()?;
    let bytes = read(&args.image)?;
    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    let tokenized = model.tokenize(&texts)?;
    warn_truncated(&model, &tokenized);
    let pixels = model.preprocess(&bytes)?;
    let scores = model.match_pixels(&pixels, &tokenized)?;
    let results: Vec<serde_json::Value> = scores
        .iter()
        .zip(&tokenized)
        .zip(&texts)
        .map(|((s, t), text)| {
            serde_json::json!({
                "text": text,
                "itm_probability": s.itm_probability,
                "itm_logits": s.itm_logits,
                "itc_score": s.itc_score,
                "num_tokens": t.num_tokens,
                "truncated": t.truncated,
            })
        })
        .collect();
    if args.json {
        let mut out = results.first().cloned().context("no text to match")?;
        if let Some(map) = out.as_object_mut() {
            map.insert("results".into(), serde_json::Value::Array(results));
        }
        println!("{out}");
    } else {
        for (s, text) in scores.iter().zip(&texts) {
            println!(
                "itm_probability {:.6}  itc_score {:.6}  {text}",
                s.itm_probability, s.itc_score
            );
        }
    }
    Ok(())
}

pub fn run_embed(args: EmbedArgs) -> Result<()> {
    let model = args.model.load()?;
    let json = match (&args.image, &args.text) {
        (Some(image), None) => {
            let bytes = read(image)?;
            let embeds = model.embed_images(&[bytes.as_slice()])?.squeeze(0)?;
            let rows = embeds.to_vec2::<f32>()?;
            serde_json::json!({
                "kind": "image",
                "shape": embeds.dims(),
                "image_embeds": rows,
            })
        }
        (None, Some(text)) => {
            let tokenized = model.tokenize(&[text.as_str()])?;
            warn_truncated(&model, &tokenized);
            let embeds = model.embed_texts(&tokenized)?.squeeze(0)?;
            serde_json::json!({
                "kind": "text",
                "shape": embeds.dims(),
                "text_embeds": embeds.to_vec1::<f32>()?,
                "num_tokens": tokenized[0].num_tokens,
                "truncated": tokenized[0].truncated,
            })
        }
        _ => anyhow::bail!("give exactly one of --image and --text"),
    };
    if args.json {
        println!("{json}");
    } else {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(())
}

/// `blip2 serve retrieval`: RetrievalService (with health and reflection) on one listener.
#[derive(Args, Debug)]
pub struct RetrievalServeArgs {
    #[arg(long, default_value = "127.0.0.1:50053")]
    listen: std::net::SocketAddr,
    #[command(flatten)]
    model: RetrievalModelArgs,
    #[command(flatten)]
    tls: crate::serve::TlsArgs,
    /// Keep the index in this directory (one segment file per change, written atomically) so
    /// that it survives a restart; without it the index lives in memory only.
    #[arg(long, env = "BLIP2_INDEX_DIR")]
    index_dir: Option<PathBuf>,
    /// Largest top_k of a search.
    #[arg(long, default_value_t = 1000)]
    max_top_k: usize,
    /// Largest rerank_top_n of a search (each re-ranked image runs the vision encoder).
    #[arg(long, default_value_t = 128)]
    max_rerank: usize,
    /// Calls running the model at once; one more is refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 4)]
    max_concurrency: usize,
    #[command(flatten)]
    pub(crate) shutdown: crate::serve::ShutdownArgs,
    #[command(flatten)]
    pub(crate) observability: crate::observability::ObservabilityArgs,
}

pub async fn serve(
    args: RetrievalServeArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use blip2_vision::retrieval::{RetrievalConfig, RetrievalTier};
    let model = args.model.load()?;
    let index = RetrievalTier::open_index(&model, args.index_dir.as_deref())
        .context("opening the retrieval index")?;
    let config = RetrievalConfig {
        max_top_k: args.max_top_k,
        max_rerank: args.max_rerank,
        max_concurrency: args.max_concurrency,
        shutdown_grace: args.shutdown.grace(),
        ..RetrievalConfig::default()
    };
    let name = args.model.model.display().to_string();
    let tier = RetrievalTier::new(std::sync::Arc::new(model), name, index, config);
    let listener = crate::serve::bind("retrieval", args.listen).await?;
    crate::observability::metrics_endpoint(&args.observability).await?;
    crate::serve::announce("retrieval", &listener)?;
    blip2_vision::retrieval::serve(tier, listener, shutdown, args.tls.load()?).await?;
    Ok(())
}
