//! `blip2 eval world`: how well a checkpoint sees, measured through the running system on the
//! held-out split of the synthetic shapes world (`blip2 train world`).
//!
//! - **VQA**: every question of the split goes to the session tier over gRPC as a user would
//!   send it (a new session, one turn with the image attached, greedy decoding); the answer is
//!   scored by exact match after normalisation, per question type (colour, shape, count,
//!   position).
//! - **Captions**: the "describe" questions' answers are scored with CIDEr-D against the
//!   image's reference caption(s) and by attribute recall (the share of the image's attributes
//!   the answer names).
//! - **Retrieval** (with `--retrieval`): the split's distinct images are added to a retrieval
//!   tier's index, and each caption searches it (`SearchByText`, top 1). Several images of the
//!   world can share one caption (same attributes), so a hit counts when the retrieved image's
//!   caption is the query: text-to-image R@1 up to identical descriptions.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use blip2_proto::v1::retrieval_service_client::RetrievalServiceClient;
use blip2_proto::v1::session_service_client::SessionServiceClient;
use blip2_proto::v1::{
    chat_event, turn_image, AddImagesRequest, ChatRequest, CreateSessionRequest,
    DeleteSessionRequest, GenerationParams, ImageItem, SearchByTextRequest, TurnImage,
};
use blip2_train::metrics;
use clap::Args;
use serde::Serialize;
use tonic::transport::Channel;

#[derive(Args, Debug)]
pub struct EvalWorldArgs {
    /// The session tier to ask (`blip2 serve all` listens on 127.0.0.1:50050).
    #[arg(long, default_value = "http://127.0.0.1:50050")]
    session: String,
    /// The world directory written by `blip2 train world`.
    #[arg(long)]
    data: PathBuf,
    /// The manifest of the split to score, relative to --data.
    #[arg(long, default_value = "test.jsonl")]
    split: String,
    /// Score only the first N questions of each type (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Turns in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 24)]
    max_new_tokens: u32,
    /// A retrieval tier (`blip2 serve retrieval` on the stage-1 checkpoint) to measure R@1 on.
    #[arg(long)]
    retrieval: Option<String>,
    /// Also write the figures (and every answer) as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Every image's reference captions, by path.
type Captions = BTreeMap<PathBuf, Vec<String>>;

/// One question of the manifest.
#[derive(Debug, Clone)]
struct Question {
    image: PathBuf,
    question: String,
    answer: String,
    kind: String,
    attributes: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Answered {
    image: String,
    kind: String,
    question: String,
    expected: String,
    answer: String,
    correct: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    split: String,
    questions: usize,
    /// Exact-match accuracy over the one-word questions (every type but "describe").
    vqa_accuracy: f64,
    accuracy_by_type: BTreeMap<String, f64>,
    count_by_type: BTreeMap<String, usize>,
    caption_cider: Option<f64>,
    caption_attribute_recall: Option<f64>,
    retrieval_r_at_1: Option<f64>,
    retrieval_queries: usize,
    answers: Vec<Answered>,
}

pub fn run(args: EvalWorldArgs) -> Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let manifest = args.data.join(&args.split);
    let (questions, captions) = read_manifest(&manifest, args.limit)?;
    if questions.is_empty() {
        bail!("{} has no questions", manifest.display());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(drive(&args, questions, captions))?;
    print_report(&report);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The manifest's questions (pairs with a prompt), and every image's captions.
fn read_manifest(path: &Path, limit: usize) -> Result<(Vec<Question>, Captions)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut questions = Vec::new();
    let mut captions = Captions::new();
    let mut per_kind: HashMap<String, usize> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
        let field = |name: &str| value.get(name).and_then(|v| v.as_str());
        let (Some(image), Some(answer)) = (field("image"), field("text")) else {
            bail!("{}:{}: needs `image` and `text`", path.display(), n + 1);
        };
        let image = dir.join(image);
        let Some(prompt) = field("prompt") else {
            captions.entry(image).or_default().push(answer.to_string());
            continue;
        };
        let question = prompt
            .trim()
            .strip_prefix("Question:")
            .and_then(|q| q.strip_suffix("Answer:"))
            .map(str::trim)
            .with_context(|| {
                format!(
                    "{}:{}: the prompt is not \"Question: ... Answer:\"",
                    path.display(),
                    n + 1
                )
            })?;
        let kind = field("type").unwrap_or("qa").to_string();
        let seen = per_kind.entry(kind.clone()).or_default();
        if limit > 0 && *seen >= limit {
            continue;
        }
        *seen += 1;
        let attributes = match value.get("attributes") {
            Some(serde_json::Value::Object(map)) => map
                .values()
                .filter_map(|v| match v {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        questions.push(Question {
            image,
            question: question.to_string(),
            answer: answer.to_string(),
            kind,
            attributes,
        });
    }
    Ok((questions, captions))
}

async fn drive(
    args: &EvalWorldArgs,
    questions: Vec<Question>,
    captions: Captions,
) -> Result<Report> {
    let channel = Channel::from_shared(args.session.clone())
        .with_context(|| format!("bad address {}", args.session))?
        .connect()
        .await
        .with_context(|| format!("connecting to the session tier at {}", args.session))?;
    let client = SessionServiceClient::new(channel);
    let params = GenerationParams {
        max_new_tokens: Some(args.max_new_tokens),
        temperature: Some(0.0),
        num_beams: Some(1),
        ..GenerationParams::default()
    };
    let progress = indicatif::ProgressBar::new(questions.len() as u64);
    let limit = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for (index, q) in questions.iter().cloned().enumerate() {
        let mut client = client.clone();
        let params = params.clone();
        let limit = limit.clone();
        let progress = progress.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let answer = ask(&mut client, &q, params).await;
            progress.inc(1);
            (index, answer)
        });
    }
    let mut answers = vec![String::new(); questions.len()];
    while let Some(joined) = tasks.join_next().await {
        let (index, answer) = joined.context("a question task panicked")?;
        answers[index] = answer?;
    }
    progress.finish_and_clear();

    let mut correct_by_type: BTreeMap<String, usize> = BTreeMap::new();
    let mut count_by_type: BTreeMap<String, usize> = BTreeMap::new();
    let mut answered = Vec::with_capacity(questions.len());
    let mut cider_candidates = Vec::new();
    let mut cider_references = Vec::new();
    let mut recalls = Vec::new();
    for (q, answer) in questions.iter().zip(answers) {
        let correct = metrics::exact_match(&answer, &q.answer);
        *count_by_type.entry(q.kind.clone()).or_default() += 1;
        if correct {
            *correct_by_type.entry(q.kind.clone()).or_default() += 1;
        }
        if q.kind == "describe" {
            let mut references = captions.get(&q.image).cloned().unwrap_or_default();
            if references.is_empty() {
                references.push(q.answer.clone());
            }
            cider_candidates.push(answer.clone());
            cider_references.push(references);
            recalls.push(metrics::attribute_recall(&answer, &q.attributes));
        }
        answered.push(Answered {
            image: q.image.display().to_string(),
            kind: q.kind.clone(),
            question: q.question.clone(),
            expected: q.answer.clone(),
            answer,
            correct,
        });
    }
    let accuracy_by_type: BTreeMap<String, f64> = count_by_type
        .iter()
        .map(|(kind, &n)| {
            let correct = correct_by_type.get(kind).copied().unwrap_or(0);
            (kind.clone(), correct as f64 / n as f64)
        })
        .collect();
    let (vqa_correct, vqa_total) = count_by_type
        .iter()
        .filter(|(kind, _)| kind.as_str() != "describe")
        .fold((0, 0), |(c, t), (kind, &n)| {
            (c + correct_by_type.get(kind).copied().unwrap_or(0), t + n)
        });
    let caption_cider = (!cider_candidates.is_empty())
        .then(|| metrics::cider_d(&cider_candidates, &cider_references));
    let caption_attribute_recall =
        (!recalls.is_empty()).then(|| recalls.iter().sum::<f64>() / recalls.len() as f64);

    let (retrieval_r_at_1, retrieval_queries) = match &args.retrieval {
        Some(addr) => {
            let (r1, n) = retrieval_r_at_1(addr, &captions).await?;
            (Some(r1), n)
        }
        None => (None, 0),
    };
    Ok(Report {
        split: args.split.clone(),
        questions: questions.len(),
        vqa_accuracy: if vqa_total == 0 {
            0.0
        } else {
            vqa_correct as f64 / vqa_total as f64
        },
        accuracy_by_type,
        count_by_type,
        caption_cider,
        caption_attribute_recall,
        retrieval_r_at_1,
        retrieval_queries,
        answers: answered,
    })
}

/// One question in a new session; the session is deleted afterwards.
async fn ask(
    client: &mut SessionServiceClient<Channel>,
    q: &Question,
    params: GenerationParams,
) -> Result<String> {
    let image =
        std::fs::read(&q.image).with_context(|| format!("reading {}", q.image.display()))?;
    let session_id = client
        .create_session(CreateSessionRequest {
            default_params: Some(params.clone()),
            ..CreateSessionRequest::default()
        })
        .await
        .context("CreateSession")?
        .into_inner()
        .session_id;
    let request = ChatRequest {
        session_id: session_id.clone(),
        text: q.question.clone(),
        images: vec![TurnImage {
            source: Some(turn_image::Source::Data(image)),
        }],
        params: Some(params),
        idempotency_key: String::new(),
    };
    let result = async {
        let mut stream = client.chat(request).await.context("Chat")?.into_inner();
        let mut text = String::new();
        while let Some(event) = stream.message().await.context("Chat stream")? {
            match event.kind {
                Some(chat_event::Kind::Text(piece)) => text.push_str(&piece),
                Some(chat_event::Kind::Done(done)) => return Ok(done.text),
                None => {}
            }
        }
        bail!("the chat stream ended without `done` (after {text:?})")
    }
    .await;
    // The figures do not depend on the clean-up.
    let _ = client
        .delete_session(DeleteSessionRequest { session_id })
        .await;
    result.with_context(|| format!("asking {:?} about {}", q.question, q.image.display()))
}

/// Text-to-image R@1 over the split's distinct images (see the module docs).
async fn retrieval_r_at_1(addr: &str, captions: &Captions) -> Result<(f64, usize)> {
    let channel = Channel::from_shared(addr.to_string())
        .with_context(|| format!("bad address {addr}"))?
        .connect()
        .await
        .with_context(|| format!("connecting to the retrieval tier at {addr}"))?;
    let mut client = RetrievalServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let mut label_captions: HashMap<String, Vec<String>> = HashMap::new();
    let images: Vec<(&PathBuf, &Vec<String>)> = captions.iter().collect();
    for chunk in images.chunks(32) {
        let mut items = Vec::with_capacity(chunk.len());
        for (path, caps) in chunk {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let label = path.display().to_string();
            label_captions.insert(label.clone(), (*caps).clone());
            items.push(ImageItem {
                image: bytes,
                label,
            });
        }
        client
            .add_images(AddImagesRequest {
                images: items,
                discard_images: true,
            })
            .await
            .context("AddImages")?;
    }
    let (mut hits, mut queries) = (0usize, 0usize);
    for caps in captions.values() {
        for caption in caps {
            let response = client
                .search_by_text(SearchByTextRequest {
                    text: caption.clone(),
                    top_k: 1,
                    rerank_top_n: 0,
                })
                .await
                .context("SearchByText")?
                .into_inner();
            queries += 1;
            let hit = response.hits.first().is_some_and(|hit| {
                label_captions
                    .get(&hit.label)
                    .is_some_and(|found| found.iter().any(|c| c == caption))
            });
            hits += usize::from(hit);
        }
    }
    if queries == 0 {
        bail!("the split has no captions to search with");
    }
    Ok((hits as f64 / queries as f64, queries))
}

fn print_report(r: &Report) {
    println!("split {} ({} questions)", r.split, r.questions);
    println!("{:<12} {:>6} {:>9}", "type", "n", "accuracy");
    for (kind, accuracy) in &r.accuracy_by_type {
        let n = r.count_by_type.get(kind).copied().unwrap_or(0);
        println!("{kind:<12} {n:>6} {:>8.1}%", accuracy * 100.0);
    }
    println!(
        "VQA exact match (all one-word types): {:.1}%",
        r.vqa_accuracy * 100.0
    );
    if let Some(cider) = r.caption_cider {
        println!("captions: CIDEr-D {cider:.3}");
    }
    if let Some(recall) = r.caption_attribute_recall {
        println!("captions: attribute recall {:.1}%", recall * 100.0);
    }
    if let Some(r1) = r.retrieval_r_at_1 {
        println!(
            "retrieval: text-to-image R@1 {:.1}% over {} captions",
            r1 * 100.0,
            r.retrieval_queries
        );
    }
}
