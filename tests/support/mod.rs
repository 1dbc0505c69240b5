//! Helpers shared by the integration tests.
#![allow(dead_code)]

use streamz::{Pipeline, Result, StageMetrics};

/// The values of `items`, panicking on an error.
pub fn values<T>(items: Vec<Result<T>>) -> Vec<T> {
    items
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("unexpected error: {e}")))
        .collect()
}

/// Splits items into values and errors, keeping each list's order.
pub fn split<T>(items: Vec<Result<T>>) -> (Vec<T>, Vec<streamz::StreamError>) {
    let mut oks = Vec::new();
    let mut errs = Vec::new();
    for item in items {
        match item {
            Ok(v) => oks.push(v),
            Err(e) => errs.push(e),
        }
    }
    (oks, errs)
}

/// The metrics of the stage named `name`, which must exist.
pub fn stage(pipeline: &Pipeline, name: &str) -> StageMetrics {
    pipeline
        .stage_metrics(name)
        .unwrap_or_else(|| panic!("no stage named {name}: {:?}", pipeline.metrics()))
}

/// Asserts the conservation law of a one-in-one-out stage.
pub fn assert_conserved(m: &StageMetrics) {
    assert_eq!(
        m.received,
        m.emitted + m.failed + m.errors_passed + m.dropped + m.aborted,
        "conservation broken for {m:?}"
    );
}

/// Returns once every other task is idle. Only for tests on a paused clock
/// (`start_paused = true`): the runtime advances a paused clock only when no
/// task can make progress, so this long timer fires exactly when the
/// pipeline has quiesced. No real time passes.
pub async fn settle() {
    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
}

/// Items the chain lost on purpose when it stopped early: discarded
/// unprocessed by a stage, or produced but not delivered.
pub fn stopped_early(pipeline: &Pipeline) -> u64 {
    pipeline
        .metrics()
        .iter()
        .map(|m| m.aborted + m.undelivered)
        .sum()
}

/// Asserts the conservation law for every stage whose name starts with
/// `prefix`.
pub fn assert_all_conserved(pipeline: &Pipeline, prefix: &str) {
    for m in pipeline
        .metrics()
        .iter()
        .filter(|m| m.name.starts_with(prefix))
    {
        assert_conserved(m);
    }
}

/// The `ConfigError` piping `op` gives; panics if `op` is accepted.
pub fn refused<In, Out, P>(op: P) -> streamz::ConfigError
where
    In: Send + 'static,
    Out: Send + 'static,
    P: streamz::Processor<In, Out>,
{
    match streamz::iter(Vec::<In>::new()).try_pipe(op) {
        Ok(_) => panic!("the invalid setting was accepted"),
        Err(e) => e,
    }
}

/// Waits for a health gate to reach `state`, failing the test after 10 s
/// (a bound for a broken run, on the real clock).
pub async fn reached(
    status: &mut tokio::sync::watch::Receiver<streamz::GateStatus>,
    state: streamz::GateState,
) -> streamz::GateStatus {
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        status.wait_for(|s| s.state == state),
    )
    .await
    .unwrap_or_else(|_| panic!("the gate did not become {state:?}"))
    .unwrap()
    .clone()
}

/// Every record of the dead-letter file at `path`, read with `Replay`,
/// panicking on a line that is not one.
pub async fn dead_letters<T>(path: &std::path::Path) -> Vec<streamz::DeadLetter<T>>
where
    T: serde::de::DeserializeOwned + Send + 'static,
{
    streamz::dlq::Replay::<T>::open(path)
        .await
        .unwrap()
        .into_flow()
        .collect()
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

/// Everything a tracing subscriber printed, to check what reaches a log.
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// What was printed so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
