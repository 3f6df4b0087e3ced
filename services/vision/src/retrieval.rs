//! [`RetrievalTier`]: `blip2.v1.RetrievalService`, image-text retrieval on a
//! `Blip2ForImageTextRetrieval` checkpoint (served by `blip2 serve retrieval`).
//!
//! Every model call runs on the blocking pool; at most `max_concurrency` calls that touch the
//! model run at once, one more is refused with RESOURCE_EXHAUSTED. The index
//! ([`crate::retrieval_index`]) is read-locked by searches and write-locked only to apply a
//! change whose embeddings are already computed, so a failed call (bad input, a model error, a
//! failed disk write) changes nothing.

use std::future::Future;
use std::sync::{Arc, RwLock};

use blip2_model::retrieval::{match_probability, RetrievalModel, TokenizedText};
use blip2_proto::v1::retrieval_service_server::{RetrievalService, RetrievalServiceServer};
use blip2_proto::v1::{
    search_by_image_request, AddImagesRequest, AddImagesResponse, AddTextsRequest,
    AddTextsResponse, EmbedImageRequest, EmbedImageResponse, EmbedTextRequest, EmbedTextResponse,
    Embedding, MatchRequest, MatchResponse, MatchScore, RemoveItemsRequest, RemoveItemsResponse,
    RetrievalInfoRequest, RetrievalInfoResponse, SearchByImageRequest, SearchByTextRequest,
    SearchHit, SearchResponse, TextTokens,
};
use candle_core::Tensor;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::retrieval_index::{IndexError, NewImage, NewText, RetrievalIndex, Scored};

/// Limits of a retrieval tier.
#[derive(Debug, Clone)]
pub struct RetrievalConfig {
    /// Largest `top_k` of a search.
    pub max_top_k: usize,
    /// Largest `rerank_top_n` (each re-ranked image runs the vision encoder).
    pub max_rerank: usize,
    /// Images in one EmbedImage / AddImages / Match call.
    pub max_images_per_request: usize,
    /// Texts in one EmbedText / AddTexts / Match call.
    pub max_texts_per_request: usize,
    /// Bytes of one text (longer texts are refused before tokenising; texts over the Q-Former's
    /// positions in tokens are truncated and reported).
    pub max_text_bytes: usize,
    /// Calls running the model at once.
    pub max_concurrency: usize,
    /// Images run through the vision encoder in one forward.
    pub batch_size: usize,
    /// Largest request message in bytes (the images of one call together).
    pub max_request_bytes: usize,
    /// How long calls in flight may go on after shutdown starts (then they are cut).
    pub shutdown_grace: std::time::Duration,
}

impl Default for RetrievalConfig {
    fn default() -> Self {
        Self {
            max_top_k: 1000,
            max_rerank: 128,
            max_images_per_request: 64,
            max_texts_per_request: 1024,
            max_text_bytes: 64 << 10,
            max_concurrency: 4,
            batch_size: 8,
            max_request_bytes: 64 << 20,
            shutdown_grace: blip2_common::server::DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Why a retrieval call failed.
#[derive(Debug, thiserror::Error)]
pub enum RetrievalError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("this retrieval replica is running {0} calls already; retry later")]
    Overloaded(usize),
    #[error(transparent)]
    Model(#[from] blip2_model::Error),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("model computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("a blocking task failed: {0}")]
    Blocking(#[from] tokio::task::JoinError),
    #[error("the index lock is poisoned (a call panicked)")]
    Poisoned,
}

impl From<RetrievalError> for Status {
    fn from(error: RetrievalError) -> Self {
        match &error {
            RetrievalError::InvalidArgument(m) => Status::invalid_argument(m.clone()),
            RetrievalError::NotFound(m) => Status::not_found(m.clone()),
            RetrievalError::FailedPrecondition(m) => Status::failed_precondition(m.clone()),
            RetrievalError::Overloaded(_) => Status::resource_exhausted(error.to_string()),
            RetrievalError::Model(e) => blip2_common::status::model_error(e),
            RetrievalError::Index(IndexError::NotFound(m)) => Status::not_found(m.clone()),
            RetrievalError::Index(IndexError::Invalid(m)) => Status::invalid_argument(m.clone()),
            RetrievalError::Index(IndexError::Storage { .. }) => {
                Status::unavailable(error.to_string())
            }
            RetrievalError::Tensor(_) | RetrievalError::Blocking(_) | RetrievalError::Poisoned => {
                Status::internal(error.to_string())
            }
        }
    }
}

type Result<T> = std::result::Result<T, RetrievalError>;

/// The retrieval tier: cheap to clone, every clone serves the same model and index.
#[derive(Clone)]
pub struct RetrievalTier {
    inner: Arc<Inner>,
}

struct Inner {
    model: Arc<RetrievalModel>,
    index: RwLock<RetrievalIndex>,
    checkpoint: String,
    config: RetrievalConfig,
    admission: Arc<Semaphore>,
}

fn tokens(t: &TokenizedText) -> TextTokens {
    TextTokens {
        num_tokens: t.num_tokens as u32,
        truncated: t.truncated,
    }
}

fn embedding(shape: Vec<u32>, values: Vec<f32>) -> Embedding {
    Embedding { shape, values }
}

impl RetrievalTier {
    /// `index`: the index to serve (in memory, or opened on a directory).
    pub fn new(
        model: Arc<RetrievalModel>,
        checkpoint: String,
        index: RetrievalIndex,
        config: RetrievalConfig,
    ) -> Self {
        let admission = Arc::new(Semaphore::new(config.max_concurrency));
        Self {
            inner: Arc::new(Inner {
                model,
                index: RwLock::new(index),
                checkpoint,
                config,
                admission,
            }),
        }
    }

    /// Opens the index of `model` on `dir` (or in memory when `None`).
    pub fn open_index(
        model: &RetrievalModel,
        dir: Option<&std::path::Path>,
    ) -> std::result::Result<RetrievalIndex, IndexError> {
        let (q, d) = (model.num_query_tokens(), model.embed_dim());
        match dir {
            Some(dir) => RetrievalIndex::open(dir, model.fingerprint(), q, d),
            None => Ok(RetrievalIndex::in_memory(model.fingerprint(), q, d)),
        }
    }

    pub fn into_server(self) -> RetrievalServiceServer<Self> {
        let limit = self.inner.config.max_request_bytes;
        RetrievalServiceServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX)
    }

    fn admit(&self) -> Result<OwnedSemaphorePermit> {
        self.inner
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| RetrievalError::Overloaded(self.inner.config.max_concurrency))
    }

    /// Runs `f` on the blocking pool with a model slot held.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let permit = self.admit()?;
        let inner = self.inner.clone();
        let out = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&inner)
        })
        .await?;
        out
    }

    fn check_texts(&self, texts: &[String], what: &str) -> Result<()> {
        let c = &self.inner.config;
        if texts.is_empty() {
            return Err(RetrievalError::InvalidArgument(format!(
                "`{what}` is empty: give at least one text"
            )));
        }
        if texts.len() > c.max_texts_per_request {
            return Err(RetrievalError::InvalidArgument(format!(
                "{} texts in `{what}`; at most {} per call",
                texts.len(),
                c.max_texts_per_request
            )));
        }
        for (i, t) in texts.iter().enumerate() {
            check_text(t, &format!("{what}[{i}]"), c.max_text_bytes)?;
        }
        Ok(())
    }

    fn check_images(&self, count: usize, what: &str) -> Result<()> {
        let c = &self.inner.config;
        if count == 0 {
            return Err(RetrievalError::InvalidArgument(format!(
                "`{what}` is empty: give at least one image"
            )));
        }
        if count > c.max_images_per_request {
            return Err(RetrievalError::InvalidArgument(format!(
                "{count} images in `{what}`; at most {} per call",
                c.max_images_per_request
            )));
        }
        Ok(())
    }

    fn check_search(&self, top_k: u32, rerank: u32) -> Result<()> {
        let c = &self.inner.config;
        if top_k == 0 || top_k as usize > c.max_top_k {
            return Err(RetrievalError::InvalidArgument(format!(
                "top_k must be between 1 and {}, got {top_k}",
                c.max_top_k
            )));
        }
        if rerank as usize > c.max_rerank {
            return Err(RetrievalError::InvalidArgument(format!(
                "rerank_top_n must be at most {}, got {rerank}",
                c.max_rerank
            )));
        }
        Ok(())
    }
}

fn check_text(text: &str, what: &str, max_bytes: usize) -> Result<()> {
    if text.trim().is_empty() {
        return Err(RetrievalError::InvalidArgument(format!(
            "`{what}` is empty"
        )));
    }
    if text.len() > max_bytes {
        return Err(RetrievalError::InvalidArgument(format!(
            "`{what}` is {} bytes; at most {max_bytes}",
            text.len()
        )));
    }
    Ok(())
}

fn named(what: &str, i: usize, e: blip2_model::Error) -> RetrievalError {
    match e {
        blip2_model::Error::Image(m) => {
            RetrievalError::InvalidArgument(format!("`{what}[{i}]`: cannot use the image: {m}"))
        }
        other => RetrievalError::Model(other),
    }
}

impl Inner {
    fn index_read(&self) -> Result<std::sync::RwLockReadGuard<'_, RetrievalIndex>> {
        self.index.read().map_err(|_| RetrievalError::Poisoned)
    }

    fn index_write(&self) -> Result<std::sync::RwLockWriteGuard<'_, RetrievalIndex>> {
        self.index.write().map_err(|_| RetrievalError::Poisoned)
    }

    /// Preprocesses images (naming the bad one) and runs them in batches through `f`.
    fn pixels(&self, images: &[&[u8]], what: &str) -> Result<Vec<Tensor>> {
        images
            .iter()
            .enumerate()
            .map(|(i, b)| self.model.preprocess(b).map_err(|e| named(what, i, e)))
            .collect()
    }

    /// Normalised embeddings `[Q * D]` of images, in batches.
    fn embed_images(&self, images: &[&[u8]], what: &str) -> Result<Vec<Vec<f32>>> {
        let pixels = self.pixels(images, what)?;
        let mut out = Vec::with_capacity(images.len());
        for chunk in pixels.chunks(self.config.batch_size.max(1)) {
            let batch = Tensor::stack(chunk, 0)?;
            let embeds = self.model.embed_pixels(&batch)?;
            for i in 0..chunk.len() {
                out.push(embeds.get(i)?.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(out)
    }

    fn tokenize(&self, texts: &[String]) -> Result<Vec<TokenizedText>> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        Ok(self.model.tokenize(&refs)?)
    }

    /// ITM probabilities of one image's vision features `[1, T, W]` against texts.
    fn itm_one_image(&self, features: &Tensor, texts: &[TokenizedText]) -> Result<Vec<f32>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self.model.itm_logits_one_image(features, texts)?;
        Ok(logits.into_iter().map(match_probability).collect())
    }

    /// ITM probabilities of one text against images (encoded bytes), in batches.
    fn itm_one_text(&self, text: &TokenizedText, images: &[&[u8]]) -> Result<Vec<f32>> {
        let pixels = self.pixels(images, "indexed image")?;
        let mut out = Vec::with_capacity(images.len());
        for chunk in pixels.chunks(self.config.batch_size.max(1)) {
            let batch = Tensor::stack(chunk, 0)?;
            let features = self.model.vision_features(&batch)?;
            let texts = vec![text.clone(); chunk.len()];
            let logits = self.model.itm_logits(&features, &texts)?.to_vec2::<f32>()?;
            out.extend(logits.into_iter().map(|l| match_probability([l[0], l[1]])));
        }
        Ok(out)
    }
}

/// Hits from ITC `candidates`, the first `rerank` of them re-ranked by `itm` (None: could not be
/// re-ranked), truncated to `top_k`.
fn rank(
    candidates: Vec<Scored>,
    itm: Vec<Option<f32>>,
    top_k: usize,
    label: impl Fn(u64) -> String,
) -> Vec<SearchHit> {
    let mut reranked: Vec<(Scored, f32)> = Vec::new();
    let mut rest: Vec<Scored> = Vec::new();
    for (i, c) in candidates.into_iter().enumerate() {
        match itm.get(i).copied().flatten() {
            Some(p) => reranked.push((c, p)),
            None => rest.push(c),
        }
    }
    reranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.0.score.total_cmp(&a.0.score)));
    reranked
        .into_iter()
        .map(|(c, p)| SearchHit {
            id: c.id,
            itc_score: c.score,
            itm_probability: Some(p),
            label: label(c.id),
        })
        .chain(rest.into_iter().map(|c| SearchHit {
            id: c.id,
            itc_score: c.score,
            itm_probability: None,
            label: label(c.id),
        }))
        .take(top_k)
        .collect()
}

type EmbedImageStream = ReceiverStream<std::result::Result<EmbedImageResponse, Status>>;

#[tonic::async_trait]
impl RetrievalService for RetrievalTier {
    type EmbedImageStream = EmbedImageStream;

    async fn embed_image(
        &self,
        request: Request<EmbedImageRequest>,
    ) -> std::result::Result<Response<Self::EmbedImageStream>, Status> {
        let images = request.into_inner().images;
        self.check_images(images.len(), "images")?;
        let permit = self.admit()?;
        let inner = self.inner.clone();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let _permit = permit;
            for (i, image) in images.into_iter().enumerate() {
                let inner = inner.clone();
                let done = tokio::task::spawn_blocking(move || -> Result<Embedding> {
                    let e =
                        inner
                            .embed_images(&[image.as_slice()], "images")
                            .map_err(|e| match e {
                                RetrievalError::InvalidArgument(m) => {
                                    RetrievalError::InvalidArgument(m.replacen(
                                        "images[0]",
                                        &format!("images[{i}]"),
                                        1,
                                    ))
                                }
                                other => other,
                            })?;
                    let q = inner.model.num_query_tokens() as u32;
                    let d = inner.model.embed_dim() as u32;
                    Ok(embedding(vec![q, d], e.into_iter().flatten().collect()))
                })
                .await;
                let message = match done {
                    Ok(Ok(e)) => Ok(EmbedImageResponse {
                        index: i as u32,
                        embedding: Some(e),
                    }),
                    Ok(Err(e)) => Err(Status::from(e)),
                    Err(e) => Err(Status::from(RetrievalError::Blocking(e))),
                };
                let failed = message.is_err();
                if tx.send(message).await.is_err() || failed {
                    return; // the client left, or the call ends with this error
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn embed_text(
        &self,
        request: Request<EmbedTextRequest>,
    ) -> std::result::Result<Response<EmbedTextResponse>, Status> {
        let texts = request.into_inner().texts;
        self.check_texts(&texts, "texts")?;
        let out = self
            .blocking(move |inner| {
                let tokenized = inner.tokenize(&texts)?;
                let embeds = inner.model.embed_texts(&tokenized)?.to_vec2::<f32>()?;
                let d = inner.model.embed_dim() as u32;
                Ok(EmbedTextResponse {
                    embeddings: embeds.into_iter().map(|v| embedding(vec![d], v)).collect(),
                    tokens: tokenized.iter().map(tokens).collect(),
                })
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn r#match(
        &self,
        request: Request<MatchRequest>,
    ) -> std::result::Result<Response<MatchResponse>, Status> {
        let MatchRequest { image, texts } = request.into_inner();
        if image.is_empty() {
            return Err(Status::invalid_argument("`image` is empty"));
        }
        self.check_texts(&texts, "texts")?;
        let out = self
            .blocking(move |inner| {
                let tokenized = inner.tokenize(&texts)?;
                let pixels = inner
                    .model
                    .preprocess(&image)
                    .map_err(|e| named("image", 0, e))?;
                let scores = inner.model.match_pixels(&pixels, &tokenized)?;
                Ok(MatchResponse {
                    scores: scores
                        .iter()
                        .zip(&tokenized)
                        .map(|(s, t)| MatchScore {
                            itm_probability: s.itm_probability,
                            itc_score: s.itc_score,
                            tokens: Some(tokens(t)),
                        })
                        .collect(),
                })
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn add_images(
        &self,
        request: Request<AddImagesRequest>,
    ) -> std::result::Result<Response<AddImagesResponse>, Status> {
        let AddImagesRequest {
            images,
            discard_images,
        } = request.into_inner();
        self.check_images(images.len(), "images")?;
        let ids = self
            .blocking(move |inner| {
                let bytes: Vec<&[u8]> = images.iter().map(|i| i.image.as_slice()).collect();
                let embeds = inner.embed_images(&bytes, "images")?;
                let items = images
                    .into_iter()
                    .zip(embeds)
                    .map(|(item, embedding)| NewImage {
                        embedding,
                        label: item.label,
                        image: (!discard_images).then_some(item.image),
                    })
                    .collect();
                Ok(inner.index_write()?.add_images(items)?)
            })
            .await?;
        Ok(Response::new(AddImagesResponse { ids }))
    }

    async fn add_texts(
        &self,
        request: Request<AddTextsRequest>,
    ) -> std::result::Result<Response<AddTextsResponse>, Status> {
        let texts = request.into_inner().texts;
        self.check_texts(&texts, "texts")?;
        let out = self
            .blocking(move |inner| {
                let tokenized = inner.tokenize(&texts)?;
                let embeds = inner.model.embed_texts(&tokenized)?.to_vec2::<f32>()?;
                let items = texts
                    .into_iter()
                    .zip(embeds)
                    .map(|(text, embedding)| NewText { embedding, text })
                    .collect();
                let ids = inner.index_write()?.add_texts(items)?;
                Ok(AddTextsResponse {
                    ids,
                    tokens: tokenized.iter().map(tokens).collect(),
                })
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn search_by_text(
        &self,
        request: Request<SearchByTextRequest>,
    ) -> std::result::Result<Response<SearchResponse>, Status> {
        let SearchByTextRequest {
            text,
            top_k,
            rerank_top_n,
        } = request.into_inner();
        check_text(&text, "text", self.inner.config.max_text_bytes)?;
        self.check_search(top_k, rerank_top_n)?;
        let out = self
            .blocking(move |inner| {
                let tokenized = inner.tokenize(std::slice::from_ref(&text))?;
                let t = inner
                    .model
                    .embed_texts(&tokenized)?
                    .squeeze(0)?
                    .to_vec1::<f32>()?;
                let want = (top_k as usize).max(rerank_top_n as usize);
                // Candidates and the bytes to re-rank them, under the read lock only.
                let (candidates, stored, searched) = {
                    let index = inner.index_read()?;
                    let candidates = index.search_images(&t, want);
                    let stored: Vec<Option<Arc<Vec<u8>>>> = candidates
                        .iter()
                        .take(rerank_top_n as usize)
                        .map(|c| index.image(c.id).and_then(|e| e.image.clone()))
                        .collect();
                    (candidates, stored, index.num_images())
                };
                let kept: Vec<&[u8]> = stored.iter().flatten().map(|b| b.as_slice()).collect();
                let probs = inner.itm_one_text(&tokenized[0], &kept)?;
                let mut probs = probs.into_iter();
                let itm: Vec<Option<f32>> = stored
                    .iter()
                    .map(|s| s.as_ref().and_then(|_| probs.next()))
                    .collect();
                let index = inner.index_read()?;
                let label = |id: u64| index.image(id).map(|e| e.label.clone()).unwrap_or_default();
                Ok(SearchResponse {
                    hits: rank(candidates, itm, top_k as usize, label),
                    searched: searched as u64,
                    tokens: Some(tokens(&tokenized[0])),
                })
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn search_by_image(
        &self,
        request: Request<SearchByImageRequest>,
    ) -> std::result::Result<Response<SearchResponse>, Status> {
        let SearchByImageRequest {
            query,
            top_k,
            rerank_top_n,
        } = request.into_inner();
        self.check_search(top_k, rerank_top_n)?;
        let query = query.ok_or_else(|| {
            Status::invalid_argument(
                "give the query image as `image` bytes or an indexed `image_id`",
            )
        })?;
        let out = self
            .blocking(move |inner| {
                // The query's bytes (for ITM) and embedding.
                let (bytes, stored_embedding) = match query {
                    search_by_image_request::Query::Image(bytes) => {
                        if bytes.is_empty() {
                            return Err(RetrievalError::InvalidArgument("`image` is empty".into()));
                        }
                        (Some(Arc::new(bytes)), None)
                    }
                    search_by_image_request::Query::ImageId(id) => {
                        let index = inner.index_read()?;
                        let entry = index.image(id).ok_or_else(|| {
                            RetrievalError::NotFound(format!("no indexed image with id {id}"))
                        })?;
                        let embedding = index.image_embedding(id).map(<[f32]>::to_vec);
                        (entry.image.clone(), embedding)
                    }
                };
                if rerank_top_n > 0 && bytes.is_none() {
                    return Err(RetrievalError::FailedPrecondition(
                        "this indexed image was added with discard_images, so it cannot be re-ranked by ITM; set rerank_top_n to 0".into(),
                    ));
                }
                let features = match &bytes {
                    Some(b) if rerank_top_n > 0 || stored_embedding.is_none() => {
                        let pixels = inner.model.preprocess(b).map_err(|e| named("image", 0, e))?;
                        Some(inner.model.vision_features(&pixels.unsqueeze(0)?)?)
                    }
                    _ => None,
                };
                let embedding = match (stored_embedding, &features) {
                    (Some(e), _) => e,
                    (None, Some(f)) => inner
                        .model
                        .image_embeds_from_features(f)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                    (None, None) => {
                        return Err(RetrievalError::InvalidArgument("no query image".into()))
                    }
                };
                let want = (top_k as usize).max(rerank_top_n as usize);
                let (candidates, texts, searched) = {
                    let index = inner.index_read()?;
                    let candidates = index.search_texts(&embedding, want);
                    let texts: Vec<String> = candidates
                        .iter()
                        .take(rerank_top_n as usize)
                        .map(|c| index.text(c.id).map(|t| t.text.clone()).unwrap_or_default())
                        .collect();
                    (candidates, texts, index.num_texts())
                };
                let itm = match &features {
                    Some(f) if !texts.is_empty() => {
                        let tokenized = inner.tokenize(&texts)?;
                        inner.itm_one_image(f, &tokenized)?.into_iter().map(Some).collect()
                    }
                    _ => Vec::new(),
                };
                let index = inner.index_read()?;
                let label = |id: u64| index.text(id).map(|t| t.text.clone()).unwrap_or_default();
                Ok(SearchResponse {
                    hits: rank(candidates, itm, top_k as usize, label),
                    searched: searched as u64,
                    tokens: None,
                })
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn remove_items(
        &self,
        request: Request<RemoveItemsRequest>,
    ) -> std::result::Result<Response<RemoveItemsResponse>, Status> {
        let RemoveItemsRequest {
            image_ids,
            text_ids,
        } = request.into_inner();
        if image_ids.is_empty() && text_ids.is_empty() {
            return Err(Status::invalid_argument("give at least one id to remove"));
        }
        let removed = self
            .blocking(move |inner| Ok(inner.index_write()?.remove(&image_ids, &text_ids)?))
            .await?;
        Ok(Response::new(RemoveItemsResponse {
            removed: removed as u32,
        }))
    }

    async fn retrieval_info(
        &self,
        _request: Request<RetrievalInfoRequest>,
    ) -> std::result::Result<Response<RetrievalInfoResponse>, Status> {
        let inner = &self.inner;
        let model = &inner.model;
        let (images, texts) = {
            let index = inner.index_read()?;
            (index.num_images(), index.num_texts())
        };
        Ok(Response::new(RetrievalInfoResponse {
            checkpoint: inner.checkpoint.clone(),
            checkpoint_fingerprint: model.fingerprint().to_string(),
            image_size: model.config().vision_config.image_size as u32,
            num_query_tokens: model.num_query_tokens() as u32,
            embed_dim: model.embed_dim() as u32,
            max_text_tokens: model.tokenizer().max_len() as u32,
            indexed_images: images as u64,
            indexed_texts: texts as u64,
            max_top_k: inner.config.max_top_k as u32,
            max_rerank: inner.config.max_rerank as u32,
        }))
    }
}

/// Serves RetrievalService, grpc.health.v1 and reflection on `listener` until `shutdown`
/// resolves, then finishes the calls in flight.
pub async fn serve(
    tier: RetrievalTier,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> std::result::Result<(), tonic::transport::Error> {
    let grace = tier.inner.config.shutdown_grace;
    blip2_common::server::serve_tier(
        "retrieval",
        <RetrievalServiceServer<RetrievalTier> as tonic::server::NamedService>::NAME,
        |routes| routes.add_service(tier.into_server()),
        listener,
        shutdown,
        tls,
        grace,
    )
    .await
}
