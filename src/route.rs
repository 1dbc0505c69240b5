//! The task behind [`Partition`](crate::Partition) and
//! [`Switch`](crate::Switch): each value to one output of several.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::task::Context;

use tokio_util::sync::CancellationToken;

use crate::channel::{ChunkTx, chunk_channel};
use crate::chunk::Chunk;
use crate::counters::{Counters, Local};
use crate::error::{BoxError, StreamError};
use crate::flow::Flow;
use crate::source::BoxSource;
use crate::stage::{receive_or_stop, send_or_stop};

/// Where one value goes.
pub(crate) enum Pick {
    /// To output `i`.
    To(usize),
    /// Nowhere: dropped and counted.
    Unrouted,
    /// The choice failed: a `failed` error item with this source, carrying
    /// the value, goes to the error output.
    Failed(BoxError),
}

/// Spawns the router task for `input` into `n` new outputs; errors (from
/// upstream, and of the choice) go to output `errors_to`.
pub(crate) fn spawn_router<T, P>(
    input: Flow<T>,
    name: &str,
    n: usize,
    errors_to: usize,
    pick: P,
) -> Vec<Flow<T>>
where
    T: Send + 'static,
    P: FnMut(&T) -> Pick + Send + 'static,
{
    let pipeline = input.pipeline().clone();
    let edge = pipeline.edge();
    let counters = pipeline.register(name);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| chunk_channel(edge)).unzip();
    let task = run(
        input.into_source(),
        txs,
        errors_to,
        pipeline.abort_token(),
        counters.clone(),
        pick,
    );
    pipeline.spawn(counters.name().clone(), task);
    rxs.into_iter()
        .map(|rx| Flow::from_source(pipeline.clone(), Box::new(rx)))
        .collect()
}

async fn run<T, P>(
    mut src: BoxSource<T>,
    outputs: Vec<ChunkTx<T>>,
    errors_to: usize,
    abort: CancellationToken,
    counters: Counters,
    mut pick: P,
) where
    T: Send + 'static,
    P: FnMut(&T) -> Pick + Send + 'static,
{
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
        let mut pieces: Vec<Chunk<T>> = (0..outputs.len())
            .map(|_| Chunk::with_capacity(0))
            .collect();
        for item in chunk {
            let value = match item {
                Ok(v) => v,
                Err(e) => {
                    local.errors_passed += 1;
                    pieces[errors_to].push_error(e);
                    continue;
                }
            };
            let picked: Result<Pick, Box<dyn Any + Send>> =
                catch_unwind(AssertUnwindSafe(|| pick(&value)));
            match picked {
                Ok(Pick::To(i)) => {
                    local.emitted += 1;
                    pieces[i].values.push(value);
                }
                Ok(Pick::Unrouted) => local.dropped += 1,
                Ok(Pick::Failed(why)) => {
                    local.failed += 1;
                    let err =
                        StreamError::failed(counters.name().to_string(), why).with_item(value);
                    pieces[errors_to].push_error(err);
                }
                Err(payload) => {
                    local.failed += 1;
                    let err = StreamError::panicked(counters.name(), payload).with_item(value);
                    pieces[errors_to].push_error(err);
                }
            }
        }
        counters.add(&local);
        let mut parts = outputs.iter().zip(pieces);
        while let Some((tx, piece)) = parts.next() {
            if piece.is_empty() {
                continue;
            }
            let len = piece.len() as u64;
            if tx.is_closed() {
                // Nobody reads that output any more: produced, counted,
                // not delivered.
                counters.add_undelivered(len);
                continue;
            }
            let stop = |cx: &mut Context<'_>| aborted.as_mut().poll(cx).is_ready();
            match send_or_stop(tx, piece, stop).await {
                Some(Ok(())) => {}
                Some(Err(_)) => counters.add_undelivered(len),
                None => {
                    // Aborted: this part and the parts for the outputs
                    // after it were produced and not delivered.
                    let rest: u64 = parts.map(|(_, p)| p.len() as u64).sum();
                    counters.add_undelivered(len + rest);
                    counters.add_drained(src.abandon());
                    return;
                }
            }
        }
        if outputs.iter().all(ChunkTx::is_closed) {
            counters.add_drained(src.abandon());
            return;
        }
    }
}
