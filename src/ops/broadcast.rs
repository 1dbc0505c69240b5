//! Fan-out: every value to every output.

use std::borrow::Cow;

use crate::base::chunk::Chunk;
use crate::base::config::{EdgeConfig, outputs};
use crate::flow::Flow;
use crate::flow::driver::{self, Operator, Out};

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
    /// output took because every output that could have was gone. So
    /// `received = emitted + errors_passed + undelivered + aborted`.
    /// An error whose output goes away while it waits moves on to the next
    /// open output, after the values already queued there.
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
            .map_err(|e| e.in_stage("Broadcast", &broadcast.name));
        if let Err(error) = checked {
            let n = broadcast.outputs;
            return self.refuse_fan_out(broadcast.name.into_owned(), error, n);
        }
        let Broadcast {
            outputs,
            name,
            edge,
        } = broadcast;
        driver::spawn_fan_out(self, &name, outputs, edge, Copies)
    }
}

/// A fan-out's settings for [`Flow::broadcast_with`]: how many outputs,
/// the stage's name (`broadcast` by default) and the outputs' edge (the
/// pipeline's by default).
#[derive(Debug, Clone)]
pub struct Broadcast {
    outputs: usize,
    name: Cow<'static, str>,
    edge: Option<EdgeConfig>,
}

impl Broadcast {
    /// A fan-out to `outputs` outputs (zero is refused when applied).
    pub fn new(outputs: usize) -> Self {
        Broadcast {
            outputs,
            name: Cow::Borrowed("broadcast"),
            edge: None,
        }
    }

    crate::flow::processor::name_and_edge!("Sets every output's edge.");
}

/// The operator: each value to the first open output (counted there) and a
/// copy to every other open one; each error to the first open output.
struct Copies;

impl<T: Clone + Send + 'static> Operator<T, T> for Copies {
    fn on_chunk(&mut self, chunk: Chunk<T>, out: &mut Out<T>) {
        let lanes = out.lanes();
        // With every output gone the driver stops the stage; until it
        // notices, output 0 takes the items and counts them undelivered.
        let first = (0..lanes).find(|&l| out.is_open(l)).unwrap_or(0);
        let others: Vec<usize> = (first + 1..lanes).filter(|&l| out.is_open(l)).collect();
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

    fn on_refused(&mut self, lane: usize, chunk: Chunk<T>, units: u64, out: &mut Out<T>) -> u64 {
        if units == 0 {
            // Copies only: their items are counted where the originals went.
            return 0;
        }
        // The originals' output is gone. Their values reached every later
        // open output as copies (those are delivered after this one); their
        // errors went nowhere else, so they move on to the next open output.
        let Some(next) = (lane + 1..out.lanes()).find(|&l| out.is_open(l)) else {
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
