//! Fan-out: every value to every output.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::base::chunk::Chunk;
use crate::base::config::{ConfigError, EdgeConfig, outputs};
use crate::base::telemetry::{BROADCAST_DETACHED, BROADCAST_DROPPED, Counter, Gauge};
use crate::flow::Flow;
use crate::flow::driver::{self, Full, Operator, Out};

impl<T: Clone + Send + 'static> Flow<T> {
    /// Sends every value to each of `N` outputs.
    ///
    /// - **Pacing**: one task sends each chunk to the outputs in turn, so the
    ///   slowest consumer paces all of them; memory stays bounded by the
    ///   outputs' edges. Put a larger edge (an
    ///   [`async_boundary_with`](Flow::async_boundary_with)) on a branch that
    ///   must absorb bursts, or let a branch that may fall behind shed
    ///   instead ([`Broadcast::with_policy`], [`BranchPolicy`]).
    /// - **Errors** are not cloned: each error item goes to exactly one
    ///   output, the first whose flow is still open and that waits (output 0
    ///   normally; see [`BranchPolicy`]), so a dead-letter queue on that
    ///   branch sees each failure once.
    /// - **A dropped output** stops receiving copies; the others go on. When
    ///   every output is dropped (or detached by its policy), the stages
    ///   upstream stop.
    /// - **Acknowledgements** ([`Ack`](crate::Ack)): each output's copy
    ///   carries a fork, and the item is decided once every copy is. Copies
    ///   a dropped output had not read are never decided, so a replaying
    ///   source (Kafka, [`LineSource`](crate::file::LineSource)) reads
    ///   them again after a restart, and meanwhile stops at its
    ///   `max_unacked` and says so: the safe failure, since the branch may
    ///   have gone because its writer failed. Read every output to its end.
    ///
    /// Counters (stage `broadcast`) count input items, as every stage's
    /// do: `received`; `emitted`, values sent on (once each, however many
    /// outputs got a copy); `errors_passed`; `undelivered`, items no
    /// output took because every output that could have was gone (they are
    /// among the emitted). So `received = emitted + errors_passed +
    /// aborted`. An error whose output goes away while it waits moves on
    /// to the next open output, after the values already queued there
    /// (outputs that wait are delivered to before those that may shed).
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
        let outputs = self.broadcast_to(N);
        match outputs.try_into() {
            Ok(array) => array,
            Err(_) => unreachable!("broadcast_to returns exactly N flows"),
        }
    }

    /// [`broadcast`](Flow::broadcast) to a number of outputs known at run
    /// time. Zero starts nothing, as an invalid stage does for
    /// [`Flow::pipe`]: one flow comes back, holding one
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) item (an invalid
    /// edge: each of the `n` outputs holds one).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let outputs = streamz::iter(0..10).broadcast_to(3);
    /// assert_eq!(outputs.len(), 3);
    /// for out in outputs {
    ///     assert_eq!(out.collect().await.len(), 10);
    /// }
    /// # }
    /// ```
    #[track_caller]
    pub fn broadcast_to(self, n: usize) -> Vec<Flow<T>> {
        self.broadcast_with(Broadcast::new(n))
    }

    /// [`broadcast_to`](Flow::broadcast_to) with the stage's name and the
    /// outputs' edge set. An invalid setting (zero outputs or more than
    /// 65,536, an invalid edge) starts nothing, as for
    /// [`broadcast_to`](Flow::broadcast_to).
    ///
    /// ```
    /// use streamz::{Broadcast, EdgeConfig};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let tee = Broadcast::new(2)
    ///     .named("tee")
    ///     .with_edge(EdgeConfig::new(16, 4));
    /// let flow = streamz::iter(1..=3);
    /// let pipeline = flow.pipeline().clone();
    /// let outputs = flow.broadcast_with(tee);
    /// let all = futures::future::join_all(outputs.into_iter().map(|o| o.collect())).await;
    /// assert!(all.iter().all(|out| out.len() == 3));
    /// assert_eq!(pipeline.stage_metrics("tee").unwrap().emitted, 3);
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[track_caller]
    pub fn broadcast_with(self, broadcast: Broadcast) -> Vec<Flow<T>> {
        let checked = self
            .pipeline()
            .validate()
            .and(outputs(broadcast.outputs, "outputs"))
            .and(broadcast.edge.map_or(Ok(()), |e| e.validate()))
            .and(broadcast.check_policies())
            .map_err(|e| e.in_stage("Broadcast", &broadcast.name));
        if let Err(error) = checked {
            let n = broadcast.outputs;
            return self.refuse_fan_out(broadcast.name.into_owned(), error, n);
        }
        let Broadcast {
            outputs,
            name,
            edge,
            policies,
            stats,
        } = broadcast;
        let mut policy = vec![BranchPolicy::Wait; outputs];
        for (output, p) in policies {
            policy[output] = p;
        }
        let stats = stats.get_or_init(|| BranchStats::new(outputs)).clone();
        let stage = name.clone().into_owned();
        driver::spawn_fan_out_with(self, &name, outputs, edge, move |_, counters| {
            // Series for the outputs that may shed only: a broadcast to
            // thousands of waiting outputs exports nothing per output.
            let labels = counters.labels();
            let series = policy
                .iter()
                .enumerate()
                .map(|(output, p)| {
                    (*p != BranchPolicy::Wait).then(|| {
                        let label = [("output", output.to_string())];
                        let detached = labels.gauge_owned(BROADCAST_DETACHED, &label);
                        detached.set(0.0);
                        (labels.counter_owned(BROADCAST_DROPPED, &label), detached)
                    })
                })
                .collect();
            // Waiting outputs are delivered to first: see `on_refused`.
            let order = (0..outputs)
                .filter(|&l| policy[l] == BranchPolicy::Wait)
                .chain((0..outputs).filter(|&l| policy[l] != BranchPolicy::Wait))
                .collect();
            Copies {
                policy,
                order,
                stats,
                stage,
                series,
            }
        })
    }
}

/// What a [`broadcast`](Flow::broadcast_with) output does when it falls
/// behind: when its channel (its edge: [`Broadcast::with_edge`]) is full
/// as the broadcast has a copy for it.
///
/// A branch that sheds gets only copies: each item's count and every
/// error go to the first output that waits, so the conservation law of
/// the broadcast stage holds whatever a shedding branch misses (and at
/// least one output must wait). Once every waiting output has gone, the
/// broadcast is a plain one: the outputs left take the counts and errors,
/// and all wait for room whatever their policy.
///
/// A detached output's edge in
/// [`Pipeline::topology`](crate::Pipeline::topology) shows what its
/// channel still holds for the branch to read.
///
/// What a branch missed is counted in [`BranchStats`], and its copies'
/// acknowledgements are met: shedding is a decision, so a replaying
/// source (Kafka) commits past what the branch missed rather than stall
/// at its `max_unacked`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BranchPolicy {
    /// Wait for room: the slowest branch paces the broadcast (the default).
    #[default]
    Wait,
    /// Drop the copies that find the branch full, and count them
    /// ([`BranchStats::dropped`]). The branch gets what fits.
    DropNewest,
    /// The first time the branch is full, detach it: it gets nothing more,
    /// and its flow ends once it has read what its channel holds. Counted
    /// in [`BranchStats::detached`]; every value it missed in
    /// [`BranchStats::dropped`]. A warning is logged.
    Detach,
}

/// Per output of a broadcast: the copies it missed by its
/// [`BranchPolicy`], and whether it was detached. Taken from the
/// [`Broadcast`] before it is applied ([`Broadcast::branch_stats`]).
///
/// ```
/// use streamz::{Broadcast, BranchPolicy};
///
/// let tee = Broadcast::new(2).with_policy(1, BranchPolicy::DropNewest);
/// let stats = tee.branch_stats();
/// assert_eq!((stats.dropped(1), stats.detached(1)), (0, false));
/// ```
#[derive(Debug, Clone)]
pub struct BranchStats(Arc<[Branch]>);

#[derive(Debug, Default)]
struct Branch {
    dropped: AtomicU64,
    detached: AtomicBool,
}

impl BranchStats {
    fn new(outputs: usize) -> Self {
        BranchStats((0..outputs).map(|_| Branch::default()).collect())
    }

    /// Values output `output` did not get because of its policy: copies
    /// dropped, and for a detached output every value since (0 for an
    /// output out of range).
    pub fn dropped(&self, output: usize) -> u64 {
        self.0
            .get(output)
            .map_or(0, |b| b.dropped.load(Ordering::Relaxed))
    }

    /// Whether output `output` was detached ([`BranchPolicy::Detach`]).
    pub fn detached(&self, output: usize) -> bool {
        self.0
            .get(output)
            .is_some_and(|b| b.detached.load(Ordering::Relaxed))
    }

    /// How many outputs the broadcast has.
    pub fn outputs(&self) -> usize {
        self.0.len()
    }
}

/// A fan-out's settings for [`Flow::broadcast_with`]: how many outputs,
/// the stage's name (`broadcast` by default) and the outputs' edge (the
/// pipeline's by default).
#[derive(Debug)]
pub struct Broadcast {
    outputs: usize,
    name: Cow<'static, str>,
    edge: Option<EdgeConfig>,
    /// Outputs that do not wait, in the order set.
    policies: Vec<(usize, BranchPolicy)>,
    stats: std::sync::OnceLock<BranchStats>,
}

impl Clone for Broadcast {
    /// The same settings, with [`BranchStats`] of its own: two broadcasts
    /// never share their counts.
    fn clone(&self) -> Self {
        Broadcast {
            outputs: self.outputs,
            name: self.name.clone(),
            edge: self.edge,
            policies: self.policies.clone(),
            stats: std::sync::OnceLock::new(),
        }
    }
}

impl Broadcast {
    /// A fan-out to `outputs` outputs (zero is refused when applied).
    pub fn new(outputs: usize) -> Self {
        Broadcast {
            outputs,
            name: Cow::Borrowed("broadcast"),
            edge: None,
            policies: Vec::new(),
            stats: std::sync::OnceLock::new(),
        }
    }

    /// What output `output` (counted from 0) does when it falls behind by
    /// more than its edge holds ([`BranchPolicy`]; every output waits by
    /// default). Refused when applied ([`ConfigError`], field
    /// `policy`): an output out of range, or no output left waiting.
    ///
    /// A metrics branch that must never stall the main path:
    ///
    /// ```
    /// use streamz::{Broadcast, BranchPolicy, EdgeConfig};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let tee = Broadcast::new(2)
    ///     .with_policy(1, BranchPolicy::DropNewest)
    ///     .with_edge(EdgeConfig::new(8, 8));
    /// let stats = tee.branch_stats();
    /// let [main, metrics]: [_; 2] = streamz::iter(0..1_000u32)
    ///     .broadcast_with(tee)
    ///     .try_into()
    ///     .unwrap();
    /// // The metrics branch is never read: the main path gets everything
    /// // all the same, and the branch's misses are counted.
    /// let main = main.collect().await;
    /// assert_eq!(main.len(), 1_000);
    /// assert_eq!(stats.dropped(1), 1_000 - 8);
    /// # drop(metrics);
    /// # }
    /// ```
    pub fn with_policy(mut self, output: usize, policy: BranchPolicy) -> Self {
        self.policies.retain(|(o, _)| *o != output);
        self.policies.push((output, policy));
        self
    }

    /// A handle on the outputs' [`BranchStats`], to read while the
    /// broadcast runs.
    pub fn branch_stats(&self) -> BranchStats {
        self.stats
            .get_or_init(|| BranchStats::new(self.outputs.min(crate::base::config::MAX_OUTPUTS)))
            .clone()
    }

    /// Checks the policies: each names an output, and one output waits.
    fn check_policies(&self) -> Result<(), ConfigError> {
        if let Some((output, _)) = self.policies.iter().find(|(o, _)| *o >= self.outputs) {
            return Err(ConfigError::new(
                "policy",
                format!(
                    "names output {output}, but the broadcast has {} (counted from 0)",
                    self.outputs
                ),
            ));
        }
        let shedding = self
            .policies
            .iter()
            .filter(|(_, p)| *p != BranchPolicy::Wait)
            .count();
        if self.outputs > 0 && shedding == self.outputs {
            return Err(ConfigError::new(
                "policy",
                "must leave one output waiting: it carries each item's count and the errors",
            ));
        }
        Ok(())
    }

    crate::flow::processor::name_and_edge!("Sets every output's edge.");
}

/// The operator: each value to the first open waiting output (counted
/// there) and a copy to every other open one; each error to that first
/// output. Outputs whose policy sheds get copies only.
struct Copies {
    policy: Vec<BranchPolicy>,
    /// The outputs, waiting ones first: the order of delivery, and of the
    /// search for an output to take the counts and errors.
    order: Vec<usize>,
    stats: BranchStats,
    stage: String,
    /// Per shedding output: its exported drops and detached flag
    /// (feature `metrics`).
    series: Vec<Option<(Counter, Gauge)>>,
}

impl Copies {
    /// The first open output in delivery order (a waiting one, if any is
    /// open), after position `after` in that order if given.
    fn first_open<T>(&self, out: &Out<T>, after: Option<usize>) -> Option<usize> {
        let start = after.and_then(|lane| self.order.iter().position(|&l| l == lane));
        let skip = start.map_or(0, |p| p + 1);
        self.order[skip..].iter().copied().find(|&l| out.is_open(l))
    }

    /// Counts copies output `lane` missed and meets their acknowledgements
    /// (a shed copy is decided: see [`BranchPolicy`]).
    fn shed<T>(&self, lane: usize, chunk: Chunk<T>) {
        let n = chunk.values.len() as u64;
        for (_, ack) in chunk.into_acked() {
            ack.ack();
        }
        self.missed(lane, n);
    }

    /// Output `lane` missed `n` values.
    fn missed(&self, lane: usize, n: u64) {
        self.stats.0[lane].dropped.fetch_add(n, Ordering::Relaxed);
        if let Some((dropped, _)) = &self.series[lane] {
            dropped.increment(n);
        }
    }
}

impl<T: Clone + Send + 'static> Operator<T, T> for Copies {
    fn on_chunk(&mut self, chunk: Chunk<T>, out: &mut Out<T>) {
        let lanes = out.lanes();
        // With every output gone the driver stops the stage; until it
        // notices, output 0 takes the items and counts them undelivered.
        let first = self.first_open(out, None).unwrap_or(0);
        let others: Vec<usize> = (0..lanes)
            .filter(|&l| l != first && out.is_open(l))
            .collect();
        // A detached output misses every value from now on: counted.
        let values = chunk.values.len() as u64;
        for (lane, policy) in self.policy.iter().enumerate() {
            if *policy == BranchPolicy::Detach && self.stats.detached(lane) {
                self.missed(lane, values);
            }
        }
        for (item, ack) in chunk.into_acked() {
            match item {
                Ok(value) => {
                    // Each copy is an obligation of its own: the item is
                    // acknowledged once every output's copy is.
                    for &lane in &others {
                        out.copy_to(lane, value.clone(), ack.fork());
                    }
                    out.emit_to(first, value, ack);
                }
                Err(error) => out.pass_to(first, error),
            }
        }
    }

    fn on_full(&mut self, lane: usize, chunk: Chunk<T>, units: u64, out: &mut Out<T>) -> Full<T> {
        // Once every waiting output is gone, the broadcast is a plain one:
        // the outputs left carry the counts and errors, and wait.
        let waiting = self
            .order
            .iter()
            .any(|&l| self.policy[l] == BranchPolicy::Wait && out.is_open(l));
        if !waiting || units > 0 || !chunk.errors.is_empty() {
            return Full::Wait(chunk);
        }
        match self.policy[lane] {
            BranchPolicy::Wait => Full::Wait(chunk),
            BranchPolicy::DropNewest => {
                self.shed(lane, chunk);
                Full::Shed
            }
            BranchPolicy::Detach => {
                self.shed(lane, chunk);
                self.stats.0[lane].detached.store(true, Ordering::Relaxed);
                if let Some((_, detached)) = &self.series[lane] {
                    detached.set(1.0);
                }
                tracing::warn!(
                    stage = %self.stage,
                    output = lane,
                    "broadcast output fell behind by more than its edge holds: detached"
                );
                Full::Detach
            }
        }
    }

    fn lane_order(&self) -> Option<Vec<usize>> {
        Some(self.order.clone())
    }

    fn on_refused(&mut self, lane: usize, chunk: Chunk<T>, units: u64, out: &mut Out<T>) -> u64 {
        if units == 0 {
            // Copies only: their items are counted where the originals
            // went. A detached output's are shed (counted, decided); those
            // of an output whose reader went away stay undecided.
            if self.stats.detached(lane) {
                self.shed(lane, chunk);
            }
            return 0;
        }
        // The originals' output is gone. Their values reached every other
        // open output as copies (those later in delivery order get them
        // after this one); their errors went nowhere else, so they move on
        // to the next open output in that order.
        let Some(next) = self.first_open(out, Some(lane)) else {
            return units;
        };
        let (_, errors) = chunk.into_parts();
        if errors.is_empty() {
            if out.add_units(next, units) { 0 } else { units }
        } else {
            out.requeue_errors(next, errors, units);
            0
        }
    }
}
