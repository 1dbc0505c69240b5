//! Fan-out: every value to every output.

use std::future::Future;
use std::num::NonZeroUsize;
use std::pin::pin;
use std::task::Context;

use tokio_util::sync::CancellationToken;

use crate::base::channel::{ChunkTx, chunk_channel};
use crate::base::chunk::Chunk;
use crate::base::counters::{Counters, Local};
use crate::flow::Flow;
use crate::flow::source::BoxSource;
use crate::flow::stage::{receive_or_stop, send_or_stop};

impl<T: Clone + Send + 'static> Flow<T> {
    /// Sends every value to each of `N` outputs.
    ///
    /// - **Pacing**: one task sends each chunk to the outputs in turn, so the
    ///   slowest consumer paces all of them; memory stays bounded by the
    ///   outputs' edges. Put a larger edge (an
    ///   [`async_boundary_with`](Flow::async_boundary_with)) on a branch that
    ///   must absorb bursts.
    /// - **Errors** are not cloned: each error item goes to exactly one
    ///   output, the first whose flow is still open (output 0 normally), so a
    ///   dead-letter queue on that branch sees each failure once.
    /// - **A dropped output** stops receiving copies; the others go on. When
    ///   every output is dropped, the stages upstream stop.
    ///
    /// Counters (stage `broadcast`): `received` counts input items,
    /// `emitted` counts delivered copies of values, `errors_passed` counts
    /// errors delivered; an item no output took is `aborted`.
    ///
    /// `N = 0` does not compile.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let [a, b] = streamz::iter(1..=3).broadcast();
    /// let (a, b) = tokio::join!(a.collect(), b.collect());
    /// assert_eq!(a.len(), 3);
    /// assert_eq!(b.len(), 3);
    /// # }
    /// ```
    #[track_caller]
    pub fn broadcast<const N: usize>(self) -> [Flow<T>; N] {
        const { assert!(N > 0, "broadcast needs at least one output") };
        let outputs = self.broadcast_to(NonZeroUsize::new(N).expect("checked above"));
        match outputs.try_into() {
            Ok(array) => array,
            Err(_) => unreachable!("broadcast_to returns exactly N flows"),
        }
    }

    /// [`broadcast`](Flow::broadcast) to a number of outputs known at run time.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let n = std::num::NonZeroUsize::new(3).unwrap();
    /// let outputs = streamz::iter(0..10).broadcast_to(n);
    /// assert_eq!(outputs.len(), 3);
    /// for out in outputs {
    ///     assert_eq!(out.collect().await.len(), 10);
    /// }
    /// # }
    /// ```
    #[track_caller]
    pub fn broadcast_to(self, n: NonZeroUsize) -> Vec<Flow<T>> {
        let pipeline = self.pipeline().clone();
        let edge = pipeline.edge();
        let counters = pipeline.register("broadcast");
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n.get()).map(|_| chunk_channel(edge)).unzip();
        let task = run(
            self.into_source(),
            txs,
            pipeline.abort_token(),
            counters.clone(),
        );
        pipeline.spawn(counters.name().clone(), task);
        rxs.into_iter()
            .map(|rx| Flow::from_source(pipeline.clone(), Box::new(rx)))
            .collect()
    }
}

async fn run<T: Clone + Send + 'static>(
    mut src: BoxSource<T>,
    outputs: Vec<ChunkTx<T>>,
    abort: CancellationToken,
    counters: Counters,
) {
    let mut aborted = pin!(abort.cancelled());
    let mut all_closed = pin!(futures::future::join_all(
        outputs.iter().map(ChunkTx::closed)
    ));
    loop {
        let stop = |cx: &mut Context<'_>| {
            aborted.as_mut().poll(cx).is_ready() || all_closed.as_mut().poll(cx).is_ready()
        };
        let Some(chunk) = receive_or_stop(&mut src, &abort, &counters, stop).await else {
            return;
        };
        let mut local = Local {
            received: chunk.len() as u64,
            ..Local::default()
        };
        // The original chunk (values and errors) goes to the first open
        // output; the others get copies of its values. If an output goes
        // away mid-send, the original moves on to the next one.
        let mut original = Some(chunk);
        let mut copies: Option<Vec<T>> = None;
        for (i, tx) in outputs.iter().enumerate() {
            if tx.is_closed() {
                continue;
            }
            let last = outputs[i + 1..].iter().all(ChunkTx::is_closed);
            let is_original = original.is_some();
            let piece = match original.take() {
                Some(orig) => {
                    if !last && copies.is_none() {
                        copies = Some(orig.values.clone());
                    }
                    orig
                }
                None => {
                    let c = copies
                        .as_mut()
                        .expect("copies exist once the original is sent");
                    Chunk::from_values(if last { std::mem::take(c) } else { c.clone() })
                }
            };
            let (oks, errs) = (piece.values.len() as u64, piece.errors.len() as u64);
            let stop = |cx: &mut Context<'_>| aborted.as_mut().poll(cx).is_ready();
            let outcome = send_or_stop(tx, piece, stop).await;
            match outcome {
                Some(Ok(())) => {
                    local.emitted += oks;
                    local.errors_passed += errs;
                }
                Some(Err(refused)) if is_original => original = Some(refused),
                Some(Err(_)) => {}
                None => {
                    // Aborted mid-send: the chunk is lost only if no output
                    // has received it yet.
                    counters.add(&local);
                    let held = if is_original { oks + errs } else { 0 };
                    counters.add_aborted(held);
                    counters.add_drained(src.abandon());
                    return;
                }
            }
        }
        // Every open output refused the original: nobody got these items.
        if let Some(orig) = original {
            counters.add_aborted(orig.len() as u64);
        }
        counters.add(&local);
        // With every output gone, stop now: an always-ready source would
        // otherwise never let the wait above notice.
        if outputs.iter().all(ChunkTx::is_closed) {
            counters.add_drained(src.abandon());
            return;
        }
    }
}
