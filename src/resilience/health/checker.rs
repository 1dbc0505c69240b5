//! The checker task: asks the health check on a fixed schedule and moves the
//! gate's state with hysteresis.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use crate::base::watch;
use futures::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{GateConfig, GateState, GateStatus, Health, HealthCheck, Stats};
use crate::base::error::PanicError;
use crate::base::telemetry::GateSeries;
use crate::base::time::{self, Deadline};

pub(super) struct Checker<C> {
    pub(super) check: C,
    pub(super) config: GateConfig,
    pub(super) status: watch::Sender<GateStatus>,
    pub(super) stats: Arc<Stats>,
    pub(super) stage: Arc<str>,
    /// Exported series (feature `metrics`).
    pub(super) series: GateSeries,
}

/// The first scheduled check after `now`: checks start every `interval`
/// from the first, whatever a check took, so a slow probe does not shift
/// the later ones; ticks missed while a check ran are skipped, not run in
/// a burst. `None` (an interval of `Duration::MAX`): no more scheduled
/// checks.
fn next_tick(prev: Instant, interval: std::time::Duration, now: Instant) -> Deadline {
    let next = time::after(prev, interval)?;
    if next > now {
        return Some(next);
    }
    let step = interval.as_nanos();
    let behind = now.duration_since(next).as_nanos();
    let skip = behind / step + 1;
    let ahead = u64::try_from(skip.checked_mul(step)?).ok()?;
    time::after(next, std::time::Duration::from_nanos(ahead))
}

/// Where the checker is in its schedule and its runs of answers.
struct Schedule {
    healthy_run: u32,
    unhealthy_run: u32,
    /// The last scheduled check.
    tick: Instant,
    next: Deadline,
    /// A `changed` that panics is not asked again: the gate polls.
    watch_changes: bool,
}

impl Schedule {
    fn new() -> Self {
        // The first check runs at once; the schedule counts from it.
        let tick = Instant::now();
        Schedule {
            healthy_run: 0,
            unhealthy_run: 0,
            tick,
            next: Some(tick),
            watch_changes: true,
        }
    }
}

/// Resolves once no mapper holds its calls on the gate's state. Registered
/// for the release signal before the count is read, so the last holder
/// letting go in between still wakes it (tests/loom_gate.rs).
pub(super) async fn released(stats: &Stats) {
    loop {
        let released = stats.released.notified();
        let mut released = std::pin::pin!(released);
        released.as_mut().enable();
        if stats.holders.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return;
        }
        released.await;
    }
}

impl<C: HealthCheck> Checker<C> {
    /// Checks until the gate ends (`stop`); then, while mappers still hold
    /// their calls on the gate's state ([`DependencySignal`](crate::DependencySignal)),
    /// goes on for them in a task of its own, which the pipeline's `join`
    /// does not wait for, until they let go or the pipeline aborts.
    pub(super) async fn run(mut self, stop: CancellationToken, abort: CancellationToken) {
        let open = self.status.borrow().state == GateState::Open;
        self.series.open.set(if open { 1.0 } else { 0.0 });
        let mut schedule = Schedule::new();
        self.check_until(&mut schedule, std::pin::pin!(stop.cancelled()))
            .await;
        let holders = self
            .stats
            .holders
            .load(std::sync::atomic::Ordering::Acquire);
        if holders == 0 || abort.is_cancelled() {
            return;
        }
        tokio::spawn(async move {
            let stats = self.stats.clone();
            let until = async {
                tokio::select! {
                    () = abort.cancelled() => {}
                    () = released(&stats) => {}
                }
            };
            self.check_until(&mut schedule, std::pin::pin!(until)).await;
        });
    }

    /// Checks on the schedule (and on the check's own change signal) until
    /// `until` resolves.
    async fn check_until(
        &mut self,
        schedule: &mut Schedule,
        mut until: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) {
        loop {
            let check = &mut self.check;
            let watch_changes = schedule.watch_changes;
            let changed = async {
                if !watch_changes {
                    return std::future::pending().await;
                }
                AssertUnwindSafe(async { check.changed().await })
                    .catch_unwind()
                    .await
            };
            let scheduled = tokio::select! {
                biased;
                () = &mut until => return,
                () = time::sleep_until(schedule.next) => true,
                result = changed => {
                    if let Err(payload) = result {
                        let panic = PanicError::from_payload(payload);
                        tracing::error!(stage = %self.stage, %panic, "the health check's change signal panicked; polling only");
                        schedule.watch_changes = false;
                    }
                    false
                }
            };
            let health = tokio::select! {
                biased;
                () = &mut until => return,
                health = self.ask() => health,
            };
            if scheduled {
                // `next` was the tick that just ran; a check that a change
                // signal triggered leaves the schedule alone.
                schedule.tick = schedule.next.unwrap_or(schedule.tick);
                schedule.next = next_tick(schedule.tick, self.config.interval, Instant::now());
            }
            self.stats.checks.fetch_add(1, Relaxed);
            self.record(
                health,
                &mut schedule.healthy_run,
                &mut schedule.unhealthy_run,
            );
        }
    }

    pub(super) fn record(
        &mut self,
        health: Health,
        healthy_run: &mut u32,
        unhealthy_run: &mut u32,
    ) {
        let (state, since) = {
            let status = self.status.borrow();
            (status.state, status.since)
        };
        match health {
            Health::Healthy => {
                self.series.healthy.increment(1);
                *healthy_run = healthy_run.saturating_add(1);
                *unhealthy_run = 0;
                if state == GateState::Closed && *healthy_run >= self.config.open_after {
                    tracing::info!(stage = %self.stage, "health gate opens");
                    self.series.open.set(1.0);
                    self.series.closed.record(since.elapsed().as_secs_f64());
                    self.status.send_replace(GateStatus {
                        state: GateState::Open,
                        reason: None,
                        since: Instant::now(),
                    });
                }
            }
            Health::Unhealthy(reason) => {
                self.series.unhealthy.increment(1);
                self.stats.unhealthy.fetch_add(1, Relaxed);
                *unhealthy_run = unhealthy_run.saturating_add(1);
                *healthy_run = 0;
                if state == GateState::Open && *unhealthy_run >= self.config.close_after {
                    tracing::warn!(stage = %self.stage, %reason, "health gate closes");
                    self.series.open.set(0.0);
                    self.stats.closings.fetch_add(1, Relaxed);
                    self.status.send_replace(GateStatus {
                        state: GateState::Closed,
                        reason: Some(reason),
                        since: Instant::now(),
                    });
                } else if state == GateState::Closed {
                    self.status.send_if_modified(|s| {
                        let changed = s.reason.as_deref() != Some(reason.as_str());
                        s.reason = Some(reason);
                        changed
                    });
                }
            }
        }
    }

    async fn ask(&mut self) -> Health {
        let check = &mut self.check;
        let call = AssertUnwindSafe(async move { check.check().await }).catch_unwind();
        match time::timeout(self.config.check_timeout, call).await {
            Ok(Ok(health)) => health,
            Ok(Err(payload)) => Health::unhealthy(format!(
                "the health check {}",
                PanicError::from_payload(payload)
            )),
            Err(_) => Health::unhealthy(format!(
                "the health check took longer than {:?}",
                self.config.check_timeout
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn ticks_keep_their_schedule_and_skip_missed_ones() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        // On time: the next tick is one interval after the previous one.
        assert_eq!(
            next_tick(t0, s, t0 + Duration::from_millis(300)),
            Some(t0 + s)
        );
        // A check that took 2.5 intervals: the ticks it overran are skipped.
        assert_eq!(
            next_tick(t0, s, t0 + Duration::from_millis(2500)),
            Some(t0 + 3 * s)
        );
        // Exactly on a tick: that tick has started, the next one is due.
        assert_eq!(next_tick(t0, s, t0 + s), Some(t0 + 2 * s));
        assert_eq!(next_tick(t0, Duration::MAX, t0), None);
    }
}
