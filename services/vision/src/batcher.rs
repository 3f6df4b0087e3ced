//! The model's own thread: preprocessed images from every request queue on a bounded channel;
//! the thread takes what is waiting (up to `max_batch_size` images of one size), runs vision
//! encoder + Q-Former + projection once for all of them, caches each soft prompt and answers
//! each image's `oneshot`. After the first image the thread waits at most `batch_window` for
//! more (concurrent calls a few milliseconds apart then share one forward); under load batches
//! form by themselves. An image whose request was cancelled
//! (its reply receiver dropped) is skipped before the forward pass.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blip2_common::soft_prompt::encode_2d;
use blip2_model::model::Blip2Model;
use blip2_proto::v1::SoftPrompt;
use candle_core::{DType, Tensor};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

/// How often the batch window looks for more images.
const BATCH_POLL: Duration = Duration::from_micros(250);
use tracing::Span;

use crate::cache::SoftPromptCache;
use crate::error::Error;

/// What the request tasks and the model thread share.
pub struct Shared {
    pub model: Arc<Blip2Model>,
    pub cache: SoftPromptCache,
    /// Images run through the model.
    pub images_encoded: AtomicU64,
    /// Images answered without running the model.
    pub cache_hits: AtomicU64,
    /// Forward passes run (each over a batch of images).
    pub batches: AtomicU64,
}

/// One image for the model thread.
pub struct Job {
    pub sha256: String,
    /// `[3, H, W]` f32, as the processor returns it.
    pub pixel_values: Tensor,
    /// Element type of the soft prompt on the wire.
    pub dtype: DType,
    /// The request's span, so that the batch's span can point back to it.
    pub span: Span,
    /// Open while the image waits for the model thread (closed when its batch starts).
    pub queue: Span,
    pub reply: oneshot::Sender<Result<SoftPrompt, Error>>,
}

/// Handle to the model thread; the thread ends when the last handle is dropped.
pub struct Batcher {
    jobs: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the model thread with a queue of `queue` images.
    pub fn spawn(
        shared: Arc<Shared>,
        max_batch_size: usize,
        batch_window: Duration,
        queue: usize,
    ) -> Self {
        let (jobs, receiver) = mpsc::channel(queue.max(1));
        let max_batch_size = max_batch_size.max(1);
        let spawned = std::thread::Builder::new()
            .name("blip2-vision-model".into())
            .spawn(move || run(&shared, receiver, max_batch_size, batch_window));
        if let Err(error) = spawned {
            // The receiver went down with the closure: every submit answers UNAVAILABLE.
            tracing::error!(%error, "cannot start the vision model thread");
        }
        Self { jobs }
    }

    /// Queues an image, waiting while the queue is full.
    pub async fn submit(&self, job: Job) -> Result<(), Error> {
        self.jobs
            .send(job)
            .await
            .map_err(|_| Error::ModelThreadStopped)
    }
}

fn run(
    shared: &Shared,
    mut jobs: mpsc::Receiver<Job>,
    max_batch_size: usize,
    batch_window: Duration,
) {
    // A job of another image size than the batch being gathered waits here for the next one.
    let mut held: Option<Job> = None;
    loop {
        let Some(first) = held.take().or_else(|| jobs.blocking_recv()) else {
            return;
        };
        let deadline = Instant::now() + batch_window;
        let mut batch = vec![first];
        while batch.len() < max_batch_size {
            match jobs.try_recv() {
                Ok(job) if job.pixel_values.dims() == batch[0].pixel_values.dims() => {
                    batch.push(job)
                }
                Ok(job) => {
                    held = Some(job);
                    break;
                }
                Err(TryRecvError::Empty) if Instant::now() < deadline => {
                    std::thread::sleep(BATCH_POLL.min(deadline - Instant::now()));
                }
                Err(_) => break,
            }
        }
        batch.retain(|job| !job.reply.is_closed());
        for job in &mut batch {
            job.queue = Span::none();
        }
        if !batch.is_empty() {
            encode_batch(shared, batch);
        }
    }
}

fn encode_batch(shared: &Shared, batch: Vec<Job>) {
    let span = tracing::debug_span!("encode_batch", size = batch.len());
    for job in &batch {
        span.follows_from(&job.span);
    }
    let _entered = span.enter();
    // One `model` span in each image's own trace (a batch serves several traces).
    let model_spans: Vec<Span> = batch
        .iter()
        .map(|job| tracing::info_span!(parent: &job.span, "model", batch_size = batch.len()))
        .collect();
    shared.batches.fetch_add(1, Ordering::Relaxed);
    let pixel_values: Vec<Tensor> = batch.iter().map(|job| job.pixel_values.clone()).collect();
    // The thread outlives one bad batch: a panic in the model answers this batch with INTERNAL.
    let forward = catch_unwind(AssertUnwindSafe(|| -> blip2_model::Result<Tensor> {
        let pixel_values = Tensor::stack(&pixel_values, 0)?;
        Ok(shared.model.encode_pixels(&pixel_values)?.soft_prompt)
    }));
    let soft_prompts = match forward {
        Ok(Ok(soft_prompts)) => soft_prompts,
        Ok(Err(error)) => return answer_all(batch, Error::Model(error)),
        Err(_) => return answer_all(batch, Error::ModelPanicked),
    };
    tracing::debug!("batch encoded");
    for ((row, job), model_span) in batch.into_iter().enumerate().zip(model_spans) {
        let result = finish(shared, &soft_prompts, row, &job);
        drop(model_span);
        // A closed receiver means the client left meanwhile; the cache keeps the work.
        let _ = job.reply.send(result);
    }
}

/// Caches row `row` of the batch's soft prompts and puts it into wire form.
fn finish(
    shared: &Shared,
    soft_prompts: &Tensor,
    row: usize,
    job: &Job,
) -> Result<SoftPrompt, Error> {
    // A copy, so that the cache holds this image's storage rather than the whole batch's.
    let soft_prompt = soft_prompts
        .get(row)
        .and_then(|row| row.copy())
        .map_err(blip2_model::Error::from)?;
    shared.images_encoded.fetch_add(1, Ordering::Relaxed);
    shared.cache.insert(&job.sha256, soft_prompt.clone());
    to_wire(
        &soft_prompt,
        job.dtype,
        &job.sha256,
        shared.model.fingerprint(),
    )
}

fn answer_all(batch: Vec<Job>, error: Error) {
    let error = Arc::new(error);
    for job in batch {
        let _ = job.reply.send(Err(Error::Batch(error.clone())));
    }
}

/// `[Q, H]` -> `blip2.v1.SoftPrompt` in `dtype`.
pub fn to_wire(
    soft_prompt: &Tensor,
    dtype: DType,
    sha256: &str,
    fingerprint: &str,
) -> Result<SoftPrompt, Error> {
    Ok(encode_2d(soft_prompt, dtype, sha256, fingerprint)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blip2_model::model::{Components, LoadOptions};
    use std::path::Path;

    fn shared() -> Shared {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let options = LoadOptions {
            components: Components {
                vision: true,
                language_model: false,
            },
            ..LoadOptions::default()
        };
        let model = Blip2Model::load(&dir.join("models/opt-a"), &options).unwrap();
        Shared {
            model: Arc::new(model),
            cache: SoftPromptCache::new(1 << 20),
            images_encoded: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        }
    }

    fn image(name: &str) -> Vec<u8> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images");
        std::fs::read(dir.join(name)).unwrap()
    }

    type Reply = oneshot::Receiver<Result<SoftPrompt, Error>>;

    fn job(sha256: &str, pixel_values: Tensor) -> (Job, Reply) {
        let (reply, receiver) = oneshot::channel();
        let job = Job {
            sha256: sha256.into(),
            pixel_values,
            dtype: DType::F32,
            span: Span::none(),
            queue: Span::none(),
            reply,
        };
        (job, receiver)
    }

    fn rows(soft_prompt: &SoftPrompt) -> Vec<f32> {
        let tensor =
            blip2_common::soft_prompt::decode(soft_prompt, [8, 64], &candle_core::Device::Cpu);
        tensor.unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn batches_what_is_queued_skips_the_cancelled_and_holds_other_sizes() {
        let shared = shared();
        let names = ["photo.jpg", "rgba.png", "gray.png"];
        let pixels: Vec<Tensor> = names
            .iter()
            .map(|name| shared.model.preprocess(&image(name)).unwrap())
            .collect();
        let (sender, receiver) = mpsc::channel(8);
        let mut replies = vec![];
        for (name, pixel_values) in names.iter().zip(&pixels) {
            let (job, reply) = job(name, pixel_values.clone());
            sender.try_send(job).unwrap();
            replies.push(reply);
        }
        // Cancelled before the thread looks: never encoded.
        let (cancelled, _) = job("cancelled", pixels[0].clone());
        sender.try_send(cancelled).unwrap();
        // Another image size cannot stack with the others: it is held for a pass of its own.
        let small = Tensor::zeros((3, 8, 8), DType::F32, &candle_core::Device::Cpu).unwrap();
        let (odd, odd_reply) = job("small", small);
        sender.try_send(odd).unwrap();
        drop(sender);

        run(&shared, receiver, 8, Duration::ZERO);

        for ((name, reply), pixel_values) in names.iter().zip(replies).zip(&pixels) {
            let wire = reply.blocking_recv().unwrap().unwrap();
            let alone = shared
                .model
                .encode_pixels(&pixel_values.unsqueeze(0).unwrap())
                .unwrap()
                .soft_prompt;
            let alone: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
            let diff = rows(&wire)
                .iter()
                .zip(&alone)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff <= 1e-5, "{name}: max |diff| {diff}");
            assert!(shared.cache.get(name).is_some());
        }
        let odd = odd_reply.blocking_recv().unwrap().unwrap();
        assert_eq!(odd.shape, vec![8, 64]);
        assert_eq!(shared.images_encoded.load(Ordering::Relaxed), 4);
        assert_eq!(shared.batches.load(Ordering::Relaxed), 2);
        assert!(shared.cache.get("cancelled").is_none());
        // Each cached soft prompt owns one image's storage, not the batch's.
        assert_eq!(shared.cache.bytes(), 4 * 8 * 64 * 4);
    }

    #[test]
    fn the_batch_window_gathers_images_that_arrive_shortly_after() {
        let shared = shared();
        let a = shared.model.preprocess(&image("gray.png")).unwrap();
        let b = shared.model.preprocess(&image("rgba.png")).unwrap();
        let (sender, receiver) = mpsc::channel(8);
        let (first, first_reply) = job("a", a);
        sender.try_send(first).unwrap();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let (second, second_reply) = job("b", b);
            sender.try_send(second).unwrap();
            second_reply
        });
        run(&shared, receiver, 8, Duration::from_secs(2));
        assert!(first_reply.blocking_recv().unwrap().is_ok());
        assert!(late.join().unwrap().blocking_recv().unwrap().is_ok());
        // One forward for both; without a window the first would have gone alone.
        assert_eq!(shared.batches.load(Ordering::Relaxed), 1);
        assert_eq!(shared.images_encoded.load(Ordering::Relaxed), 2);
    }
}
