//! Turn-taking between the model threads of one process, so that the LLM tier's decode steps
//! and the vision tier's encodes alternate instead of running at once.
//!
//! Why: `blip2 serve all` runs both tiers in one process on the same cores. Run at the same
//! time, an image encode (~0.3 s on 2 cores at the base shape) and the decode steps share the
//! cores for its whole length: every token of every running stream waits behind it (inter-token
//! p99 340 ms at 8 sessions), and the kernels' fork-join pool serves only one of them, so the
//! other runs on one thread. With turns, the vision encoder asks for one turn per transformer
//! layer and the LLM scheduler for one per batched step; the turns are granted first come,
//! first served, so while both want the cores a decode step waits for at most one vision
//! layer (~25 ms), and each gets all the cores while it runs.
//!
//! Where the tiers run in separate processes (the Kubernetes deployment) nobody waits: a turn
//! nobody else wants costs one uncontended lock. Turns are re-entrant on a thread (an inner
//! call inside a turn runs at once), so no code path can deadlock on itself.

use std::cell::Cell;
use std::sync::{Condvar, Mutex, PoisonError};

/// Tickets handed out and the ticket being served.
struct Gate {
    tickets: Mutex<(u64, u64)>,
    turn_over: Condvar,
}

static GATE: Gate = Gate {
    tickets: Mutex::new((0, 0)),
    turn_over: Condvar::new(),
};

thread_local! {
    /// Turns this thread holds (nested ones count, only the outermost waits).
    static HELD: Cell<usize> = const { Cell::new(0) };
}

/// The right to compute until it is dropped; see [`turn`].
#[must_use = "the turn ends when this is dropped"]
pub struct Turn {
    outermost: bool,
}

impl Drop for Turn {
    fn drop(&mut self) {
        HELD.with(|held| held.set(held.get().saturating_sub(1)));
        if self.outermost {
            let mut tickets = GATE.tickets.lock().unwrap_or_else(PoisonError::into_inner);
            tickets.1 += 1;
            drop(tickets);
            GATE.turn_over.notify_all();
        }
    }
}

/// Waits for this thread's turn to use the cores (first come, first served) and holds it until
/// the returned guard is dropped. Keep a turn to one unit of work (a batched decode step, one
/// encoder layer): whoever asks next waits for it to end.
pub fn turn() -> Turn {
    let nested = HELD.with(|held| {
        let n = held.get();
        held.set(n + 1);
        n > 0
    });
    if nested {
        return Turn { outermost: false };
    }
    let mut tickets = GATE.tickets.lock().unwrap_or_else(PoisonError::into_inner);
    let ticket = tickets.0;
    tickets.0 += 1;
    while tickets.1 != ticket {
        tickets = GATE
            .turn_over
            .wait(tickets)
            .unwrap_or_else(PoisonError::into_inner);
    }
    Turn { outermost: true }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    use super::*;

    #[test]
    fn turns_exclude_each_other_and_alternate_between_two_threads() {
        // Two threads each take 20 turns; inside a turn nobody else may be inside, and while
        // both keep asking, neither gets two turns in a row more than once (at the start).
        let inside = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let start = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|id| {
                let (inside, order, start) = (inside.clone(), order.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for _ in 0..20 {
                        let _turn = turn();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two inside");
                        order.lock().unwrap().push(id);
                        std::thread::sleep(Duration::from_millis(2));
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let order = order.lock().unwrap();
        assert_eq!(order.len(), 40);
        let repeats = order.windows(2).filter(|w| w[0] == w[1]).count();
        // Each thread asks again right after its turn while the other is already waiting, so
        // turns alternate; allow a few repeats where a thread was slow to ask again.
        assert!(repeats <= 6, "turns did not alternate: {order:?}");
    }

    #[test]
    fn a_nested_turn_does_not_wait_for_itself() {
        let outer = turn();
        let inner = turn();
        drop(inner);
        drop(outer);
        // The gate is free again for another thread.
        std::thread::spawn(|| drop(turn())).join().unwrap();
    }
}
