//! [`Dedupe`]: drop values whose key was seen recently, in bounded memory.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

use crate::base::chunk::Chunk;
use crate::base::config::{ConfigError, nonzero};
use crate::flow::step::{ChunkCtx, Emit, Item, Step, keep_values};

/// Drops a value whose key was already seen within the last `ttl` (counted
/// as `dropped`), remembering at most `capacity` keys. Errors always pass.
///
/// Memory is bounded: at most `capacity` keys, each forgotten `ttl` after
/// it was first seen, or earlier when `capacity` newer keys push it out
/// (oldest first). A duplicate whose key was forgotten passes: dedupe is
/// exact within the window and the capacity, best effort beyond. Choose
/// `capacity` above the number of distinct keys one `ttl` brings.
///
/// The key function borrows the value; a key function that panics turns
/// that value into a `panicked` error item.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::Dedupe;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let dedupe = Dedupe::new(|order: &(u32, &str)| order.0, 10_000, Duration::from_secs(60));
/// let out = streamz::iter([(1, "a"), (2, "b"), (1, "a again")])
///     .step("dedupe", dedupe)
///     .collect()
///     .await;
/// let kept: Vec<u32> = out.into_iter().map(|r| r.unwrap().0).collect();
/// assert_eq!(kept, [1, 2]);
/// # }
/// ```
pub struct Dedupe<F, K> {
    key: F,
    capacity: usize,
    ttl: Duration,
    /// When each remembered key was first seen.
    seen: HashMap<K, Instant>,
    /// The same keys, oldest first, for expiry and eviction.
    order: VecDeque<(K, Instant)>,
    keep: Vec<bool>,
}

impl<F, K> fmt::Debug for Dedupe<F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedupe")
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .field("remembered", &self.seen.len())
            .finish_non_exhaustive()
    }
}

impl<F, K> Dedupe<F, K>
where
    K: Hash + Eq + Clone,
{
    /// Dedupes by the key `key` returns, remembering up to `capacity`
    /// keys for `ttl` each. A zero `capacity` or `ttl` is refused when the
    /// step is fused or staged.
    pub fn new<T>(key: F, capacity: usize, ttl: Duration) -> Self
    where
        F: FnMut(&T) -> K,
    {
        Dedupe {
            key,
            capacity,
            ttl,
            seen: HashMap::new(),
            order: VecDeque::new(),
            keep: Vec::new(),
        }
    }

    /// How many keys it remembers now.
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }

    /// Whether to keep a value with key `k` seen at `now`.
    fn first(&mut self, k: K, now: Instant) -> bool {
        if self.seen.contains_key(&k) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some((old, _)) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(k.clone(), now);
        self.order.push_back((k, now));
        true
    }

    /// Forgets the keys first seen `ttl` or longer before `now`.
    fn expire(&mut self, now: Instant) {
        while let Some((_, at)) = self.order.front() {
            if now.duration_since(*at) < self.ttl {
                break;
            }
            if let Some((old, _)) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }
}

impl<T, F, K> Step<T, T> for Dedupe<F, K>
where
    T: Send + 'static,
    F: FnMut(&T) -> K + Send + 'static,
    K: Hash + Eq + Clone + Send + 'static,
{
    fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.capacity, "capacity")
            .and(nonzero(self.ttl, "ttl"))
            .map_err(|e| e.in_operator("Dedupe"))
    }

    fn on_item(&mut self, item: Item<'_, T>, out: &mut Emit<'_, T>) {
        let now = Instant::now();
        self.expire(now);
        let k = (self.key)(&item);
        if self.first(k, now) {
            out.emit(item.take());
        }
    }

    fn on_chunk(&mut self, chunk: Chunk<T>, ctx: ChunkCtx<'_>) -> Chunk<T> {
        // One clock read per chunk: the values of a chunk arrived together.
        let now = Instant::now();
        self.expire(now);
        let mut keep = std::mem::take(&mut self.keep);
        let out = keep_values(chunk, ctx.counters, &mut keep, &mut |v| {
            let k = (self.key)(v);
            self.first(k, now)
        });
        self.keep = keep;
        out
    }
}
