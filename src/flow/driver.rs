//! The operator driver: every operator task's event loop, written once.
//!
//! An operator with its own task (a batcher, a throttle, a window) is a
//! small state machine implementing [`Operator`]: what it does with an input
//! chunk, with its due deadline, with its own work in progress, at the end
//! of the input and at a graceful shutdown, and how many input items it
//! holds. [`run`] owns everything else:
//!
//! - **One priority between events**, checked in this order on every
//!   wake-up: abort, closed output, graceful shutdown (once), the operator's
//!   own work, its due deadline, then the input (only while the operator
//!   wants input). Stopping comes first so that a busy input cannot hide it;
//!   deadlines come before input so that a value whose time has come is not
//!   held back by an input that is always ready.
//! - **Output chunking**: everything the operator emits goes through
//!   [`Out`], which cuts it into chunks of at most the edge's `max_chunk`,
//!   so the per-edge item bound holds whatever the operator or its input
//!   produced. While a chunk waits for room downstream, the operator's own
//!   work keeps being polled (its in-flight calls keep running).
//! - **Deadlines** are [`Deadline`]s: `None` is never, so `Duration::MAX`
//!   cannot panic or spin (see `base/time.rs`).
//! - **Counting**: the driver counts what it hands in (`received`); the
//!   operator counts what leaves through [`Out`]; the driver adds the counts
//!   to the stage's counters once per event and, when the stage stops early,
//!   counts what was not delivered (`undelivered`), what the operator holds
//!   and what waits upstream (`aborted`) exactly once. If the operator
//!   panics, the counts so far are kept, everything it had received and not
//!   accounted for is counted as aborted, a `panicked` error goes downstream,
//!   and the panic is re-raised so [`Pipeline::join`](crate::Pipeline::join)
//!   reports it.
//! - **Drops**: every intentional, counted drop goes through [`Out::drop`],
//!   the one place where a drop is recorded.
//! - **Hand-offs**: an operator that hands items to a task of its own that
//!   counts their fate (the dead-letter queue's writer) says so with
//!   [`Out::hand_off`] and [`Out::take_back`], and keeps its output open
//!   while that task runs ([`Operator::busy`]).

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::time::Instant;

use crate::base::ack::Ack;
use crate::base::channel::{ChunkTx, TrySend, chunk_channel};
use crate::base::chunk::Chunk;
use crate::base::config::EdgeConfig;
use crate::base::counters::{Counters, Local};
use crate::base::error::{ErrorKind, StreamError};
use crate::base::signal::Watch;
use crate::base::time::{Deadline, Timer};
use crate::flow::Flow;
use crate::flow::pipeline::Pipeline;
use crate::flow::source::BoxSource;
use crate::flow::topology::StageKind;

/// The fewest and the most items a new output piece reserves room for.
const MIN_RESERVE: usize = 8;
const MAX_RESERVE: usize = 1024;

/// Whether an operator takes input now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Demand {
    /// Feed it the next chunk when one is ready.
    Input,
    /// Not now: the input waits upstream (backpressure).
    Hold,
    /// Never again: the driver stops the input (counting what waits there
    /// as aborted), delivers what is pending and ends the output.
    Done,
}

/// What [`Operator::on_full`] decided for a piece whose output is full.
pub(crate) enum Full<O> {
    /// Wait for room: the piece, handed back.
    Wait(Chunk<O>),
    /// The operator dropped the piece (and counted it).
    Shed,
    /// The operator dropped the piece; the output is detached: it gets
    /// nothing more, its flow ends after what its channel holds, and its
    /// other pending pieces go to [`Operator::on_refused`].
    Detach,
}

/// A stage's logic as a state machine; [`run`] drives it.
///
/// Every count is in input items: an output that stands for several inputs
/// (a batch, a window) is emitted with [`Out::emit_for`].
pub(crate) trait Operator<In, O>: Send + 'static {
    /// Handles a chunk of input (the driver has counted it as received).
    fn on_chunk(&mut self, chunk: Chunk<In>, out: &mut Out<O>);

    /// The next instant the operator wants [`on_deadline`](Self::on_deadline)
    /// called; `None` for none. Asked before every wait.
    fn deadline(&self) -> Deadline {
        None
    }

    /// The deadline has passed; `now` is the current time.
    fn on_deadline(&mut self, now: Instant, out: &mut Out<O>) {
        let _ = (now, out);
    }

    /// Drives the operator's own work in progress (calls in flight, a
    /// watched state). `Ready` means it made progress and wants to be
    /// called again; `Pending` means it registered `cx`. Also polled while
    /// output waits for room downstream.
    fn poll_work(&mut self, cx: &mut Context<'_>, out: &mut Out<O>) -> Poll<()> {
        let _ = (cx, out);
        Poll::Pending
    }

    /// Whether the operator takes input now.
    fn demand(&self) -> Demand {
        Demand::Input
    }

    /// Called once when a graceful shutdown starts (the sources then end,
    /// so [`on_end`](Self::on_end) follows).
    fn on_shutdown(&mut self, out: &mut Out<O>) {
        let _ = out;
    }

    /// The input has ended: flush. Called again on every wake-up while
    /// [`held`](Self::held) is not zero or the operator is
    /// [`busy`](Self::busy), so an operator may hand out what it holds one
    /// output at a time; one that finishes its held items over time (calls
    /// in flight) emits nothing here and lets its work or its deadline
    /// finish them. Not called after [`Demand::Done`].
    fn on_end(&mut self, out: &mut Out<O>) {
        let _ = out;
    }

    /// A piece meant for output `lane`, standing for `units` input items,
    /// found that output gone. Returns how many of those items are lost
    /// (the driver counts them `undelivered`). An operator that can still
    /// deliver them elsewhere (broadcast: to the next open output)
    /// re-queues them through `out` and returns what it could not place.
    fn on_refused(&mut self, lane: usize, chunk: Chunk<O>, units: u64, out: &mut Out<O>) -> u64 {
        let _ = (lane, chunk, out);
        units
    }

    /// A piece meant for output `lane` found that output's channel full.
    /// The default waits for room (backpressure); a fan-out whose branch
    /// may shed (broadcast's [`BranchPolicy`](crate::BranchPolicy)) can
    /// drop the piece instead, or detach the branch. Whatever it does not
    /// hand back, it accounts for itself.
    fn on_full(&mut self, lane: usize, chunk: Chunk<O>, units: u64, out: &mut Out<O>) -> Full<O> {
        let _ = (lane, units, out);
        Full::Wait(chunk)
    }

    /// The order in which the outputs are delivered to, once per pass
    /// (all of them, each once); `None` for `0..lanes`. A fan-out puts the
    /// outputs that carry items' counts first, so that a piece refused
    /// there can hand its counts to an output not yet delivered to.
    fn lane_order(&self) -> Option<Vec<usize>> {
        None
    }

    /// How many received items the operator holds (not yet emitted, failed,
    /// passed or dropped). Counted as aborted if the stage stops early.
    fn held(&self) -> u64 {
        0
    }

    /// Whether work that holds no received item is still in progress (a
    /// task of the operator's that may still give items back): once the
    /// input has ended, or after [`Demand::Done`], the driver keeps driving
    /// the operator's work and its output open until this is false and
    /// nothing is held. An early stop does not wait for it.
    fn busy(&self) -> bool {
        false
    }
}

/// Where an operator puts what leaves it: output items cut into chunks of at
/// most `max_chunk`, and the counts that go with them.
pub(crate) struct Out<T> {
    /// Per output ("lane"): chunks waiting, each with the input items it
    /// stands for. Most operators have one lane.
    lanes: Vec<Lane<T>>,
    /// Items in `lanes`, kept as they come and go.
    queued: usize,
    max_chunk: usize,
    local: Local,
    /// Items discarded unprocessed on purpose (counted `aborted`).
    discarded: u64,
    /// Items handed to, and taken back from, a task that counts their fate
    /// itself: no counter of the stage, but part of the driver's tally.
    handed_off: u64,
    taken_back: u64,
    stage: Arc<str>,
}

impl<T> Out<T> {
    fn new(lanes: usize, max_chunk: usize, stage: Arc<str>) -> Self {
        Out {
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            queued: 0,
            max_chunk,
            local: Local::default(),
            discarded: 0,
            handed_off: 0,
            taken_back: 0,
            stage,
        }
    }

    /// The stage's name, for the errors it makes.
    pub(crate) fn stage(&self) -> &Arc<str> {
        &self.stage
    }

    /// The piece of `lane` being filled, with room for the one item the
    /// caller pushes next.
    #[inline]
    fn room(&mut self, lane: usize) -> (&mut Chunk<T>, &mut u64) {
        self.queued += 1;
        let max = self.max_chunk;
        let lane = &mut self.lanes[lane];
        if lane.open.len() >= max || lane.open.values.capacity() == 0 {
            lane.next_piece(max);
        }
        (&mut lane.open, &mut lane.units)
    }

    /// Emits a value that stands for one input item, with that item's
    /// acknowledgement.
    #[inline]
    pub(crate) fn emit(&mut self, value: T, ack: Ack) {
        self.emit_for(value, 1, ack);
    }

    /// Emits a value on output `lane` (of an operator with several).
    pub(crate) fn emit_to(&mut self, lane: usize, value: T, ack: Ack) {
        self.local.emitted += 1;
        let (piece, units) = self.room(lane);
        piece.push_acked(value, ack);
        *units += 1;
    }

    /// Passes an upstream error on unchanged, on output `lane`.
    pub(crate) fn pass_to(&mut self, lane: usize, error: StreamError) {
        self.local.errors_passed += 1;
        let (piece, units) = self.room(lane);
        piece.push_error(error);
        *units += 1;
    }

    /// Sends an error this stage made from an input item on output `lane`.
    pub(crate) fn fail_to(&mut self, lane: usize, error: StreamError) {
        self.local.failed += 1;
        let (piece, units) = self.room(lane);
        piece.push_error(error);
        *units += 1;
    }

    /// Emits a value that stands for `inputs` input items (a batch), with
    /// their acknowledgements ([`Ack::merge`]).
    #[inline]
    pub(crate) fn emit_for(&mut self, value: T, inputs: u64, ack: Ack) {
        self.local.emitted += inputs;
        let (piece, units) = self.room(0);
        piece.push_acked(value, ack);
        *units += inputs;
    }

    /// Emits values, one input item each, in bulk, with their
    /// acknowledgements (parallel to `values`, if any): a vector that fits
    /// an empty output moves over without copying.
    pub(crate) fn emit_all(&mut self, values: Vec<T>, acks: Option<Vec<Ack>>) {
        if values.is_empty() {
            return;
        }
        let n = values.len() as u64;
        if self.queued == 0 && values.len() <= self.max_chunk {
            self.local.emitted += n;
            self.queued += values.len();
            let mut chunk = Chunk::from_values(values);
            chunk.acks = acks;
            self.lanes[0].full.push_back((chunk, n));
            return;
        }
        let mut acks = acks.map(Vec::into_iter);
        for v in values {
            let ack = acks.as_mut().and_then(Iterator::next).unwrap_or_default();
            self.emit(v, ack);
        }
    }

    /// Forwards a chunk unchanged (values emitted, errors passed): a chunk
    /// that fits an empty output moves over without copying.
    pub(crate) fn forward(&mut self, chunk: Chunk<T>) {
        if self.queued == 0 && chunk.len() <= self.max_chunk {
            self.queued += chunk.len();
            self.local.emitted += chunk.values.len() as u64;
            self.local.errors_passed += chunk.errors.len() as u64;
            let n = chunk.len() as u64;
            self.lanes[0].full.push_back((chunk, n));
            return;
        }
        chunk
            .into_acked()
            .for_each(|(item, ack)| self.push(item, ack));
    }

    /// Emits a value (with its acknowledgement) or passes an upstream
    /// error (which carries its own), in order.
    #[inline]
    pub(crate) fn push(&mut self, item: crate::Result<T>, ack: Ack) {
        match item {
            Ok(v) => self.emit(v, ack),
            Err(e) => self.pass(e.with_ack(ack)),
        }
    }

    /// Passes an upstream error on unchanged.
    pub(crate) fn pass(&mut self, error: StreamError) {
        self.local.errors_passed += 1;
        self.push_error(error, 1);
    }

    /// Sends an error this stage made from an input item (counted failed).
    pub(crate) fn fail(&mut self, error: StreamError) {
        self.local.failed += 1;
        self.push_error(error, 1);
    }

    /// Sends an error standing for `inputs` items (errors of a window).
    pub(crate) fn push_error(&mut self, error: StreamError, inputs: u64) {
        let (piece, units) = self.room(0);
        piece.push_error(error);
        *units += inputs;
    }

    /// Drops an item on purpose, counts it and meets its acknowledgement:
    /// the one place where an operator's intentional drops are recorded.
    pub(crate) fn drop<I>(&mut self, item: I, ack: Ack) {
        drop(item);
        ack.ack();
        self.local.dropped += 1;
    }

    /// Discards an item unprocessed because the operator ends the stream on
    /// purpose (the rest of a chunk after a failure that ends it): counted
    /// `aborted`, like what the driver then leaves upstream.
    pub(crate) fn discard<I>(&mut self, item: I) {
        drop(item);
        self.discarded += 1;
    }

    /// `inputs` items left the operator for a task of its own that counts
    /// what becomes of them (a dead-letter queue's writer, which counts
    /// `dead_lettered` or `aborted`): no counter here.
    pub(crate) fn hand_off(&mut self, inputs: u64) {
        self.handed_off += inputs;
    }

    /// `inputs` handed-off items came back from that task; the operator
    /// now accounts for them again (and sends them on through `self`).
    pub(crate) fn take_back(&mut self, inputs: u64) {
        self.taken_back += inputs;
    }

    /// Emits a value that stands for `values` input values and `errors`
    /// upstream errors it carries (a window).
    pub(crate) fn emit_counted(&mut self, value: T, values: u64, errors: u64, ack: Ack) {
        self.local.emitted += values;
        self.local.errors_passed += errors;
        let (piece, units) = self.room(0);
        piece.push_acked(value, ack);
        *units += values + errors;
    }

    /// Counts attempts retried and timed out (an `AsyncMapper`).
    pub(crate) fn count_attempts(&mut self, retries: u64, timeouts: u64) {
        self.local.retries += retries;
        self.local.timeouts += timeouts;
    }

    /// The number of outputs (lanes).
    pub(crate) fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Whether output `lane` was still read when the driver last looked
    /// (before each input chunk, and at each delivery). Once gone, an
    /// output stays gone.
    pub(crate) fn is_open(&self, lane: usize) -> bool {
        self.lanes[lane].reading
    }

    /// Queues a copy of a value for output `lane` without counting it: the
    /// input item it stands for is counted by the one original sent
    /// elsewhere (broadcast).
    pub(crate) fn copy_to(&mut self, lane: usize, value: T, ack: Ack) {
        let (piece, _) = self.room(lane);
        piece.push_acked(value, ack);
    }

    /// Re-queues on output `lane` errors already counted when they were
    /// first queued elsewhere, with the `units` input items they (and the
    /// rest of their piece) stand for.
    pub(crate) fn requeue_errors(&mut self, lane: usize, errors: Vec<StreamError>, units: u64) {
        for error in errors {
            let (piece, _) = self.room(lane);
            piece.push_error(error);
        }
        self.lanes[lane].units += units;
    }

    /// Adds `units` input items to what output `lane`'s pending items stand
    /// for; false (nothing added) if that output has nothing pending.
    pub(crate) fn add_units(&mut self, lane: usize, units: u64) -> bool {
        let lane = &mut self.lanes[lane];
        if let Some((_, n)) = lane.full.front_mut() {
            *n += units;
        } else if !lane.open.is_empty() {
            lane.units += units;
        } else {
            return false;
        }
        true
    }

    /// Output items waiting to be delivered.
    pub(crate) fn len(&self) -> usize {
        self.queued
    }

    /// The next piece of `lane` to deliver.
    fn pop(&mut self, lane: usize) -> Option<(Chunk<T>, u64)> {
        let lane = &mut self.lanes[lane];
        let piece = match lane.full.pop_front() {
            Some(piece) => piece,
            None if !lane.open.is_empty() => (
                std::mem::take(&mut lane.open),
                std::mem::take(&mut lane.units),
            ),
            None => return None,
        };
        lane.last = piece.0.values.len();
        self.queued -= piece.0.len();
        Some(piece)
    }

    fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Takes every piece out, with its lane.
    fn drain(&mut self) -> impl Iterator<Item = (usize, Chunk<T>, u64)> + '_ {
        self.queued = 0;
        self.lanes.iter_mut().enumerate().flat_map(|(i, lane)| {
            let open = (!lane.open.is_empty()).then(|| {
                (
                    std::mem::take(&mut lane.open),
                    std::mem::take(&mut lane.units),
                )
            });
            lane.full.drain(..).chain(open).map(move |(c, n)| (i, c, n))
        })
    }
}

/// One output's pieces: full ones waiting to be delivered, and the one
/// being filled, kept apart so that pushing an item touches one place.
struct Lane<T> {
    full: VecDeque<(Chunk<T>, u64)>,
    open: Chunk<T>,
    /// The input items `open` stands for.
    units: u64,
    /// Whether the output was still read when the driver last looked.
    reading: bool,
    /// The operator detached the output ([`Full::Detach`]): never read again.
    detached: bool,
    /// The values of the piece delivered last: what the next one reserves.
    last: usize,
}

impl<T> Lane<T> {
    /// Queues the open piece once it holds `max` items and gives the open
    /// piece room for values: once per piece, so out of the per-item path
    /// of [`Out::room`].
    #[inline(never)]
    fn next_piece(&mut self, max: usize) {
        if self.open.len() >= max {
            let full = std::mem::take(&mut self.open);
            self.full.push_back((full, std::mem::take(&mut self.units)));
        }
        if self.open.values.capacity() == 0 {
            // Room up front for as many as the last piece held (a full
            // chunk's worth for a stage that fills its chunks, a few for
            // a batcher; bounded for a huge `max_chunk`): a piece then
            // fills without reallocating, and a sparse one does not pay
            // for a chunk's worth. Allocated directly: `reserve` on an
            // empty vector takes the slower growth path.
            let hint = self.last.clamp(MIN_RESERVE, MAX_RESERVE);
            self.open.values = Vec::with_capacity(max.min(hint));
        }
    }
}

impl<T> Default for Lane<T> {
    fn default() -> Self {
        Lane {
            full: VecDeque::new(),
            open: Chunk::default(),
            units: 0,
            reading: true,
            detached: false,
            last: MAX_RESERVE,
        }
    }
}

/// Registers an operator stage named `name`, spawns its task driving `op`
/// between `input` and a new channel on `edge` (the pipeline's by default),
/// and returns the flow reading that channel.
pub(crate) fn spawn<In, O, Op>(
    input: Flow<In>,
    name: &str,
    edge: Option<EdgeConfig>,
    op: Op,
) -> Flow<O>
where
    In: Send + 'static,
    O: Send + 'static,
    Op: Operator<In, O>,
{
    spawn_with(input, name, edge, |_, _| op)
}

/// Like [`spawn`], for an operator that needs the pipeline or the stage's
/// counters to be built (one that starts a task of its own): `make` gets
/// them once the stage is registered, before its task starts.
pub(crate) fn spawn_with<In, O, Op>(
    input: Flow<In>,
    name: &str,
    edge: Option<EdgeConfig>,
    make: impl FnOnce(&Pipeline, &Counters) -> Op,
) -> Flow<O>
where
    In: Send + 'static,
    O: Send + 'static,
    Op: Operator<In, O>,
{
    spawn_fan_out_with(input, name, 1, edge, make)
        .pop()
        .expect("one output")
}

/// [`spawn`] for an operator with `outputs` outputs (lanes of [`Out`]),
/// each on its own channel. The stage stops early when every output is
/// gone; an output that goes away alone counts what was meant for it as
/// undelivered.
pub(crate) fn spawn_fan_out<In, O, Op>(
    input: Flow<In>,
    name: &str,
    outputs: usize,
    edge: Option<EdgeConfig>,
    op: Op,
) -> Vec<Flow<O>>
where
    In: Send + 'static,
    O: Send + 'static,
    Op: Operator<In, O>,
{
    spawn_fan_out_with(input, name, outputs, edge, |_, _| op)
}

/// [`spawn_fan_out`] for an operator built once the stage is registered
/// (as [`spawn_with`]).
pub(crate) fn spawn_fan_out_with<In, O, Op>(
    input: Flow<In>,
    name: &str,
    outputs: usize,
    edge: Option<EdgeConfig>,
    make: impl FnOnce(&Pipeline, &Counters) -> Op,
) -> Vec<Flow<O>>
where
    In: Send + 'static,
    O: Send + 'static,
    Op: Operator<In, O>,
{
    let pipeline = input.pipeline().clone();
    let edge = edge.unwrap_or(pipeline.edge());
    let counters = pipeline.register(name);
    counters.mark(StageKind::Task);
    input.connect(&counters);
    let op = make(&pipeline, &counters);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..outputs).map(|_| chunk_channel(edge)).unzip();
    let io = Io {
        src: input.into_source(),
        txs,
        abort: pipeline.abort_signal().watch(),
        shutdown: pipeline.shutdown_signal().watch(),
        counters: counters.clone(),
        max_chunk: edge.max_chunk(),
    };
    pipeline.spawn(counters.name().clone(), run(op, io));
    rxs.into_iter()
        .map(|rx| {
            let fill = rx.fill();
            Flow::from_source(pipeline.clone(), Box::new(rx)).output_of(counters.clone(), fill)
        })
        .collect()
}

struct Io<In, O> {
    src: BoxSource<In>,
    txs: Vec<ChunkTx<O>>,
    abort: Watch,
    shutdown: Watch,
    counters: Counters,
    max_chunk: usize,
}

enum Event<In> {
    Abort,
    Closed,
    Shutdown,
    Work,
    Deadline(Instant),
    Input(Option<Chunk<In>>),
}

/// Why the stage stops before its input ended.
enum Stop {
    Early,
    Panicked(Box<dyn std::any::Any + Send>),
}

/// What the operator has been handed and what left it, to account for
/// everything if it panics.
#[derive(Default)]
struct Tally {
    received: u64,
    left: u64,
}

/// Runs `op` until its input has ended and everything it held has been
/// delivered, or until the stage must stop (see the module docs).
async fn run<In, O, Op>(mut op: Op, io: Io<In, O>)
where
    In: Send + 'static,
    O: Send + 'static,
    Op: Operator<In, O>,
{
    let Io {
        mut src,
        txs,
        abort,
        shutdown,
        counters,
        max_chunk,
    } = io;
    let mut out = Out::new(txs.len(), max_chunk, counters.name().clone());
    let mut tally = Tally::default();
    let mut timer = Timer::new();
    let mut aborted = pin!(abort.token().cancelled());
    let mut closed = pin!(futures::future::join_all(txs.iter().map(ChunkTx::closed)));
    let order: Vec<usize> = op.lane_order().unwrap_or_else(|| (0..txs.len()).collect());
    debug_assert_eq!(order.len(), txs.len(), "every output once");
    let mut detached = 0;
    let mut shutdown_seen = false;
    let mut shutting = pin!(shutdown.token().cancelled());
    let mut input_open = true;

    let stop = loop {
        // Deliver what is pending, keeping the operator's work going.
        if !out.is_empty() {
            let delivered = deliver(
                &mut op,
                &mut out,
                &txs,
                &order,
                &abort,
                aborted.as_mut(),
                &counters,
            )
            .await;
            flush(&mut out, &counters, &mut tally);
            // A detached output is gone for the stage, although its reader
            // may never read its end: wait for the others only.
            let now_detached = out.lanes.iter().filter(|l| l.detached).count();
            if now_detached != detached {
                detached = now_detached;
                let live = txs
                    .iter()
                    .zip(&out.lanes)
                    .filter(|(_, lane)| !lane.detached)
                    .map(|(tx, _)| tx.closed());
                closed.set(futures::future::join_all(live));
            }
            match delivered {
                Ok(true) => {}
                Ok(false) => break Stop::Early,
                Err(payload) => break Stop::Panicked(payload),
            }
        }
        let demand = op.demand();
        if demand == Demand::Done && input_open {
            counters.add_drained(src.abandon());
            input_open = false;
        }
        if !input_open {
            if op.held() == 0 && !op.busy() && out.is_empty() {
                debug_assert_eq!(
                    tally.received, tally.left,
                    "{}: items unaccounted",
                    out.stage
                );
                return;
            }
            if demand != Demand::Done {
                if let Err(payload) = guarded(|| op.on_end(&mut out)) {
                    break Stop::Panicked(payload);
                }
                if !out.is_empty() {
                    continue;
                }
            }
        }
        timer.set(op.deadline());
        let want_input = input_open && demand == Demand::Input;
        let mut work_panic = None;
        let event = poll_fn(|cx: &mut Context<'_>| {
            // The stop signals first, as flags: a wake-up that has work to
            // do pays a few atomic loads, not the locks that registering
            // for them takes (that happens below, only before sleeping).
            if abort.is_raised() {
                return Poll::Ready(Event::Abort);
            }
            if txs
                .iter()
                .zip(&out.lanes)
                .all(|(tx, lane)| lane.detached || tx.is_closed())
            {
                return Poll::Ready(Event::Closed);
            }
            if !shutdown_seen && shutdown.is_raised() {
                return Poll::Ready(Event::Shutdown);
            }
            match catch_unwind(AssertUnwindSafe(|| op.poll_work(cx, &mut out))) {
                Ok(Poll::Ready(())) => return Poll::Ready(Event::Work),
                Ok(Poll::Pending) if !out.is_empty() => return Poll::Ready(Event::Work),
                Ok(Poll::Pending) => {}
                Err(payload) => {
                    work_panic = Some(payload);
                    return Poll::Ready(Event::Work);
                }
            }
            if let Poll::Ready(now) = timer.poll_due(cx) {
                return Poll::Ready(Event::Deadline(now.max(Instant::now())));
            }
            if want_input {
                if let Poll::Ready(chunk) = src.poll_chunk(cx) {
                    return Poll::Ready(Event::Input(chunk));
                }
            }
            // Nothing to do: be woken by a stop signal too.
            if aborted.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Abort);
            }
            if closed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Closed);
            }
            if !shutdown_seen && shutting.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Shutdown);
            }
            Poll::Pending
        })
        .await;
        if let Some(payload) = work_panic {
            break Stop::Panicked(payload);
        }
        let handled = match event {
            Event::Abort | Event::Closed => break Stop::Early,
            Event::Shutdown => {
                shutdown_seen = true;
                guarded(|| op.on_shutdown(&mut out))
            }
            Event::Work => Ok(()),
            Event::Deadline(now) => guarded(|| op.on_deadline(now, &mut out)),
            Event::Input(Some(chunk)) => {
                // An abort wins over input that arrived at the same time.
                if abort.is_raised() {
                    counters.add_drained(chunk.len() as u64);
                    break Stop::Early;
                }
                if txs.len() > 1 {
                    for (lane, tx) in out.lanes.iter_mut().zip(&txs) {
                        lane.reading = !lane.detached && !tx.is_closed();
                    }
                }
                let n = chunk.len() as u64;
                out.local.received += n;
                guarded(|| op.on_chunk(chunk, &mut out))
            }
            Event::Input(None) => {
                input_open = false;
                Ok(())
            }
        };
        flush(&mut out, &counters, &mut tally);
        if let Err(payload) = handled {
            break Stop::Panicked(payload);
        }
    };

    // The stop epilogue: every item is accounted for exactly once.
    flush(&mut out, &counters, &mut tally);
    let undelivered: u64 = out.drain().map(|(_, _, n)| n).sum();
    counters.add_undelivered(undelivered);
    match stop {
        Stop::Early => counters.add_aborted(op.held()),
        Stop::Panicked(payload) => {
            // The operator's state is suspect: whatever it received and did
            // not account for is lost with it, and counted as such.
            counters.add_aborted(tally.received.saturating_sub(tally.left));
            counters.add_drained(src.abandon());
            let error =
                StreamError::new(ErrorKind::Panicked, out.stage.to_string()).with_source(format!(
                    "the stage's operator panicked ({}); items it held are counted as aborted",
                    crate::base::error::PanicError::from_payload_ref(&payload)
                ));
            let mut chunk = Chunk::default();
            chunk.push_error(error);
            // To the first output still read.
            let open = txs
                .iter()
                .zip(&out.lanes)
                .find(|(tx, lane)| !lane.detached && !tx.is_closed());
            if let Some((tx, _)) = open {
                let _ = tx.send_now(chunk);
            }
            resume_unwind(payload);
        }
    }
    counters.add_drained(src.abandon());
}

/// Calls into the operator, catching a panic.
fn guarded(f: impl FnOnce()) -> Result<(), Box<dyn std::any::Any + Send>> {
    catch_unwind(AssertUnwindSafe(f))
}

/// Adds the counts gathered since the last flush to the stage's counters.
fn flush<T>(out: &mut Out<T>, counters: &Counters, tally: &mut Tally) {
    let l = std::mem::take(&mut out.local);
    let discarded = std::mem::take(&mut out.discarded);
    tally.received += l.received + std::mem::take(&mut out.taken_back);
    tally.left += l.emitted
        + l.failed
        + l.errors_passed
        + l.dropped
        + discarded
        + std::mem::take(&mut out.handed_off);
    counters.add(&l);
    counters.add_aborted(discarded);
}

/// Sends every pending piece, polling the operator's work while a send
/// waits for room. A piece for an output that is gone is counted as
/// undelivered. `Ok(false)`: the stage must stop (abort); the pieces not
/// sent stay in `out`.
async fn deliver<In, O, Op>(
    op: &mut Op,
    out: &mut Out<O>,
    txs: &[ChunkTx<O>],
    order: &[usize],
    abort: &Watch,
    mut aborted: std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
    counters: &Counters,
) -> Result<bool, Box<dyn std::any::Any + Send>>
where
    Op: Operator<In, O>,
{
    for &lane in order {
        let tx = &txs[lane];
        while let Some((chunk, units)) = out.pop(lane) {
            // Room now (the usual case): no waiting future to set up.
            let chunk = match tx.try_send(chunk) {
                Ok(()) => continue,
                Err(TrySend::Closed(chunk)) => {
                    refused(op, out, lane, chunk, units, counters)?;
                    continue;
                }
                Err(TrySend::Full(chunk)) => {
                    let mut full = Full::Shed;
                    guarded(|| full = op.on_full(lane, chunk, units, out))?;
                    match full {
                        Full::Wait(chunk) => chunk,
                        Full::Shed => continue,
                        Full::Detach => {
                            detach(op, out, tx, lane, counters)?;
                            continue;
                        }
                    }
                }
            };
            let mut send = pin!(tx.send(chunk));
            let mut panic = None;
            let sent = poll_fn(|cx| {
                if abort.is_raised() {
                    return Poll::Ready(None);
                }
                if let Poll::Ready(r) = send.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                if aborted.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                // Keep the operator's calls running while downstream is full.
                match catch_unwind(AssertUnwindSafe(|| op.poll_work(cx, out))) {
                    Ok(Poll::Ready(())) => cx.waker().wake_by_ref(),
                    Ok(Poll::Pending) => {}
                    Err(payload) => {
                        panic = Some(payload);
                        return Poll::Ready(None);
                    }
                }
                Poll::Pending
            })
            .await;
            match sent {
                Some(Ok(())) => {}
                // That output went away while waiting for room.
                Some(Err(chunk)) => refused(op, out, lane, chunk, units, counters)?,
                None => {
                    counters.add_undelivered(units);
                    return match panic {
                        Some(payload) => Err(payload),
                        None => Ok(false),
                    };
                }
            }
        }
    }
    Ok(true)
}

/// The operator detached output `lane`: it is never read again, its
/// channel ends after what it holds, and its pending pieces are refused.
fn detach<In, O, Op>(
    op: &mut Op,
    out: &mut Out<O>,
    tx: &ChunkTx<O>,
    lane: usize,
    counters: &Counters,
) -> Result<(), Box<dyn std::any::Any + Send>>
where
    Op: Operator<In, O>,
{
    out.lanes[lane].detached = true;
    out.lanes[lane].reading = false;
    tx.end();
    while let Some((chunk, units)) = out.pop(lane) {
        refused(op, out, lane, chunk, units, counters)?;
    }
    Ok(())
}

/// A piece for `lane` found its output gone: the operator may place its
/// items elsewhere; what it cannot place is counted undelivered.
fn refused<In, O, Op>(
    op: &mut Op,
    out: &mut Out<O>,
    lane: usize,
    chunk: Chunk<O>,
    units: u64,
    counters: &Counters,
) -> Result<(), Box<dyn std::any::Any + Send>>
where
    Op: Operator<In, O>,
{
    out.lanes[lane].reading = false;
    let mut lost = units;
    guarded(|| lost = op.on_refused(lane, chunk, units, out))?;
    counters.add_undelivered(lost);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::config::EdgeConfig;
    use crate::flow::pipeline::Pipeline;

    /// Holds every value; panics on the value 7, after emitting what it held.
    struct Fragile {
        held: Vec<u32>,
    }

    impl Operator<u32, u32> for Fragile {
        fn on_chunk(&mut self, chunk: Chunk<u32>, out: &mut Out<u32>) {
            for item in chunk {
                let v = item.unwrap();
                assert!(v != 7, "operator bug");
                self.held.push(v);
                if self.held.len() == 3 {
                    self.held.drain(..).for_each(|v| out.emit(v, Ack::none()));
                }
            }
        }

        fn held(&self) -> u64 {
            self.held.len() as u64
        }
    }

    #[tokio::test]
    async fn an_operator_panic_keeps_the_counts_and_reaches_join() {
        let pipeline = Pipeline::with_edge(EdgeConfig::new(4, 2));
        let flow = pipeline.iter(0..20u32);
        let out = spawn(flow, "fragile", None, Fragile { held: Vec::new() });
        let items = out.collect().await;
        // 0..=5 left in two threes; 6 was held; 7 panicked.
        let values: Vec<u32> = items
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        assert_eq!(values, [0, 1, 2, 3, 4, 5]);
        let last = items.last().unwrap().as_ref().unwrap_err();
        assert_eq!(last.kind(), ErrorKind::Panicked);
        let err = pipeline.join().await.unwrap_err();
        assert!(err.to_string().contains("operator bug"), "{err}");
        let m = pipeline.stage_metrics("fragile").unwrap();
        assert_eq!(m.emitted, 6);
        assert_eq!(
            m.received,
            m.emitted + m.failed + m.errors_passed + m.dropped + m.aborted,
            "{m:?}"
        );
        assert!(m.aborted >= 2, "6 and 7 at least: {m:?}");
    }

    #[tokio::test]
    async fn outputs_are_cut_to_max_chunk() {
        let pipeline = Pipeline::with_edge(EdgeConfig::new(4, 3));
        let flow = pipeline.stream(futures::stream::iter(0..10u32));
        struct Burst;
        impl Operator<u32, u32> for Burst {
            fn on_chunk(&mut self, chunk: Chunk<u32>, out: &mut Out<u32>) {
                // Five outputs per input, counted as the one input.
                for v in chunk.values {
                    out.emit(v, Ack::none());
                    (0..4).for_each(|_| out.emit_for(v, 0, Ack::none()));
                }
            }
        }
        let mut out = spawn(flow, "burst", None, Burst);
        let mut n = 0;
        while let Some(chunk) = out.next_chunk().await {
            assert!(chunk.len() <= 3, "{}", chunk.len());
            n += chunk.len();
        }
        assert_eq!(n, 50);
        pipeline.join().await.unwrap();
        let m = pipeline.stage_metrics("burst").unwrap();
        assert_eq!((m.received, m.emitted), (10, 10));
    }
}
