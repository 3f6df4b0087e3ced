//! The low-latency fork-join pool shared by the kernels (decode GEMV and encoder GEMM, so the
//! two never oversubscribe the cores).
//!
//! Why not workers blocking on a channel (or rayon from outside its pool): every call would
//! pay a futex wake-up (tens of µs). One decoded token runs ~75 projections of 30-100 µs each, so
//! that latency would eat a visible share of the token. Here the helpers spin for a short
//! while after each job (the next projection of the same token usually arrives within
//! microseconds) and only then park; a posted job is picked up in well under a microsecond.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

type TaskRef = &'static (dyn Fn() + Sync);

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_micros(200);

/// One helper's mailbox. For job `g` the caller sets `owner` to `2g` and posts `g`; the helper
/// takes the job by moving `owner` from `2g` to `2g + 1`, the caller revokes an untaken job by
/// moving it from `2g` to `0`. So a helper that wakes late never touches a finished job, and
/// the caller never waits for a helper that is not running (on a loaded machine the caller
/// simply does all the chunks itself).
struct Slot {
    posted: AtomicUsize,
    owner: AtomicUsize,
    /// Generation of the last job the helper finished.
    done: AtomicUsize,
    panicked: AtomicBool,
    task: Mutex<Option<TaskRef>>,
}

struct Helper {
    slot: &'static Slot,
    thread: Thread,
}

struct Pool {
    helpers: Mutex<Vec<Helper>>,
    generation: AtomicUsize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        helpers: Mutex::new(Vec::new()),
        generation: AtomicUsize::new(0),
    })
}

/// Threads the decode kernels split work over (candle's setting: RAYON_NUM_THREADS or the
/// available cores), read once: candle's getter counts the physical cores by reading
/// /proc/cpuinfo on every call, which every kernel call paid (~2.5% of an int8 decode profile
/// was the kernel formatting that file).
pub fn num_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().clamp(1, 64))
}

fn helper_loop(slot: &'static Slot) {
    let mut last = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let generation = loop {
            let g = slot.posted.load(Ordering::Acquire);
            if g != last {
                break g;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                // `unpark` before `park` makes `park` return at once, so a job posted between the
                // check above and here is not missed.
                std::thread::park_timeout(Duration::from_millis(50));
            }
        };
        last = generation;
        let taken = slot
            .owner
            .compare_exchange(
                2 * generation,
                2 * generation + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if !taken {
            continue;
        }
        let task = slot
            .task
            .lock()
            .map(|t| *t)
            .unwrap_or_else(|e| *e.into_inner());
        if let Some(task) = task {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(task)).is_err() {
                slot.panicked.store(true, Ordering::Release);
            }
        }
        slot.done.store(generation, Ordering::Release);
    }
}

/// Runs `f(i)` for every `i < chunks` and returns when all are done. The caller and the
/// helpers claim chunks from a shared counter, so the split adapts to whoever is actually
/// running. When another caller holds the helpers, or one cannot be started, the chunks run
/// one after another on this thread (same result, no oversubscription).
pub fn par_chunks(chunks: usize, threads: usize, f: &(dyn Fn(usize) + Sync)) {
    let threads = threads.min(chunks);
    if threads <= 1 {
        (0..chunks).for_each(f);
        return;
    }
    let pool = pool();
    let Ok(mut helpers) = pool.helpers.try_lock() else {
        (0..chunks).for_each(f);
        return;
    };
    while helpers.len() < threads - 1 {
        let slot: &'static Slot = Box::leak(Box::new(Slot {
            posted: AtomicUsize::new(0),
            owner: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            task: Mutex::new(None),
        }));
        match std::thread::Builder::new()
            .name("blip2-gemv".into())
            .spawn(move || helper_loop(slot))
        {
            Ok(handle) => helpers.push(Helper {
                slot,
                thread: handle.thread().clone(),
            }),
            Err(_) => {
                drop(helpers);
                (0..chunks).for_each(f);
                return;
            }
        }
    }
    let next = AtomicUsize::new(0);
    let claim = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= chunks {
            break;
        }
        f(i);
    };
    let generation = pool.generation.fetch_add(1, Ordering::Relaxed) + 1;
    let claim_ref: &(dyn Fn() + Sync) = &claim;
    // SAFETY: the reference is used only by a helper that took job `generation`, and the guard
    // below waits for every such helper before this function returns or unwinds, so `claim`
    // (and what it borrows) outlives its uses; an untaken job is revoked, never run later.
    let task: TaskRef = unsafe { std::mem::transmute::<&(dyn Fn() + Sync), TaskRef>(claim_ref) };
    let used = &helpers[..threads - 1];
    for helper in used {
        if let Ok(mut slot_task) = helper.slot.task.lock() {
            *slot_task = Some(task);
        }
        helper.slot.owner.store(2 * generation, Ordering::Release);
        helper.slot.posted.store(generation, Ordering::Release);
        helper.thread.unpark();
    }
    struct Wait<'a>(&'a [Helper], usize);
    impl Drop for Wait<'_> {
        fn drop(&mut self) {
            let g = self.1;
            for helper in self.0 {
                let revoked = helper
                    .slot
                    .owner
                    .compare_exchange(2 * g, 0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
                if !revoked {
                    let mut spins = 0u32;
                    while helper.slot.done.load(Ordering::Acquire) != g {
                        spins = spins.wrapping_add(1);
                        if spins.is_multiple_of(256) {
                            std::thread::yield_now();
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                }
                if let Ok(mut slot_task) = helper.slot.task.lock() {
                    *slot_task = None;
                }
            }
        }
    }
    let wait = Wait(used, generation);
    claim();
    drop(wait);
    for helper in used {
        if helper.slot.panicked.swap(false, Ordering::AcqRel) {
            panic!("a decode kernel task panicked");
        }
    }
}
