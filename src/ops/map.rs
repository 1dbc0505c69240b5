//! `Map` and `TryMap`: one value in, one value (or one error) out.

use std::fmt;

use crate::base::chunk::Chunk;
use crate::base::error::BoxError;
use crate::flow::step::{ChunkCtx, Emit, Item, Step, map_values};

/// The step behind [`Flow::map`](crate::Flow::map): applies a function to
/// each value.
///
/// The function borrows the value. Borrowing is what lets a panic hand the
/// whole item back in its `panicked` error without cloning every item; clone
/// inside the closure what the output needs to own.
///
/// # Examples
///
/// As its own stage on its own task:
///
/// ```
/// use streamz::{Map, Stage};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let out = streamz::iter(["a", "bb"])
///     .pipe(Stage::new("len", Map::new(|s: &&str| s.len())))
///     .collect()
///     .await;
/// assert_eq!(out.into_iter().map(Result::unwrap).collect::<Vec<_>>(), [1, 2]);
/// # }
/// ```
pub struct Map<F> {
    f: F,
}

impl<F> Map<F> {
    /// A map step applying `f`.
    pub fn new<In, Out>(f: F) -> Self
    where
        F: FnMut(&In) -> Out,
    {
        Map { f }
    }
}

impl<F> fmt::Debug for Map<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Map").finish_non_exhaustive()
    }
}

impl<In, Out, F> Step<In, Out> for Map<F>
where
    In: Send + 'static,
    Out: 'static,
    F: FnMut(&In) -> Out + Send + 'static,
{
    #[inline]
    fn on_item(&mut self, item: Item<'_, In>, out: &mut Emit<'_, Out>) {
        out.emit((self.f)(&item));
    }

    fn on_chunk(&mut self, chunk: Chunk<In>, ctx: ChunkCtx<'_>) -> Chunk<Out> {
        map_values(chunk, ctx.counters, &mut self.f)
    }
}

/// The step behind [`Flow::try_map`](crate::Flow::try_map): applies a
/// fallible function; an `Err` becomes a `failed` error item carrying the
/// input.
///
/// # Examples
///
/// ```
/// use streamz::{ErrorKind, Stage, TryMap};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut out = streamz::iter(["7", "seven"])
///     .pipe(Stage::new("parse", TryMap::new(|s: &&str| s.parse::<u8>())))
///     .collect()
///     .await;
/// let mut err = out.pop().unwrap().unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Failed);
/// assert_eq!(err.take_item::<&str>(), Some("seven"));
/// assert_eq!(out.pop().unwrap().unwrap(), 7);
/// # }
/// ```
pub struct TryMap<F> {
    f: F,
}

impl<F> TryMap<F> {
    /// A fallible map step applying `f`.
    pub fn new<In, Out, E>(f: F) -> Self
    where
        F: FnMut(&In) -> Result<Out, E>,
        E: Into<BoxError>,
    {
        TryMap { f }
    }
}

impl<F> fmt::Debug for TryMap<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TryMap").finish_non_exhaustive()
    }
}

impl<In, Out, E, F> Step<In, Out> for TryMap<F>
where
    In: Send + 'static,
    E: Into<BoxError>,
    F: FnMut(&In) -> Result<Out, E> + Send + 'static,
{
    #[inline]
    fn on_item(&mut self, item: Item<'_, In>, out: &mut Emit<'_, Out>) {
        match (self.f)(&item) {
            Ok(value) => out.emit(value),
            Err(e) => out.fail(item, e),
        }
    }
}
