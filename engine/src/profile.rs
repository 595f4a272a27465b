//! Where decode time goes: wall time per kind of work, summed over calls, when enabled
//! (`moe-worker bench` turns it on for one measured pass). Off, each probe is one relaxed
//! atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// Kinds of work timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Matrix products (weights streamed from memory), including their threads' fork and
    /// join.
    Matmul,
    /// Attention over the KV cache (scores, softmax, weighted sums, rotary embeddings).
    Attention,
    /// Routers' top-k and expert gathering/combining outside the products.
    Routing,
}

const PARTS: usize = 3;
static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; PARTS] = [const { AtomicU64::new(0) }; PARTS];
static BYTES: AtomicU64 = AtomicU64::new(0);

/// Starts (clearing) or stops collecting.
pub fn enable(on: bool) {
    if on {
        for n in &NANOS {
            n.store(0, Ordering::Relaxed);
        }
        BYTES.store(0, Ordering::Relaxed);
    }
    ON.store(on, Ordering::Relaxed);
}

/// Times a region of `part` until dropped (only the calling thread's wall time).
pub fn time(part: Part) -> Option<Timer> {
    ON.load(Ordering::Relaxed).then(|| Timer {
        part,
        start: Instant::now(),
    })
}

/// Counts weight bytes read by the products.
pub fn add_bytes(b: u64) {
    if ON.load(Ordering::Relaxed) {
        BYTES.fetch_add(b, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Timer {
    part: Part,
    start: Instant,
}

impl Drop for Timer {
    fn drop(&mut self) {
        NANOS[self.part as usize]
            .fetch_add(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Seconds per part (matmul, attention, routing) and weight bytes read, since `enable(true)`.
pub fn report() -> ([f64; PARTS], u64) {
    (
        NANOS
            .each_ref()
            .map(|n| n.load(Ordering::Relaxed) as f64 / 1e9),
        BYTES.load(Ordering::Relaxed),
    )
}
