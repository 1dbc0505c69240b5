//! Adaptive concurrency (`AsyncMapper::with_adaptive_concurrency`) against
//! a simulated dependency, on a paused clock: the limit finds the knee of a
//! dependency whose latency grows beyond it, and backs off when the
//! dependency sheds load with overload errors.

#[path = "sim/knee.rs"]
mod sim;
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sim::{Knee, Overloaded};
use streamz::{AsyncMapper, ConcurrencyLimit, ErrorKind, Retry};
use tokio::time::Instant;

const BASE: Duration = Duration::from_millis(10);
/// Every test ends well within this much simulated time.
const LIMIT: Duration = Duration::from_secs(3600);

/// A simulated latency in seconds, drawn from a random source.
type Latency = Box<dyn Fn(&mut fastrand::Rng) -> f64 + Send + Sync>;

/// The limit, sampled: time since the start, and the limit then.
type Samples = Arc<Mutex<Vec<(Duration, usize)>>>;

/// Samples `limit` every 10 ms of the (paused) clock until `done`.
fn sample(limit: ConcurrencyLimit) -> (Samples, tokio::task::JoinHandle<()>) {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let out = samples.clone();
    let task = tokio::spawn(async move {
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tick.tick().await;
            out.lock().unwrap().push((start.elapsed(), limit.get()));
        }
    });
    (samples, task)
}

#[tokio::test(start_paused = true)]
async fn the_limit_settles_near_the_knee() {
    let knee = Knee::new(16, BASE);
    let dependency = knee.clone();
    // Each call checks, as it starts, that the calls in flight (itself
    // included) are within the limit: a cut cancels nothing, but no new
    // item starts until enough have left.
    let limit = Arc::new(std::sync::OnceLock::<ConcurrencyLimit>::new());
    let over = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (l, o) = (limit.clone(), over.clone());
    let mapper = AsyncMapper::new(move |_: &u32| {
        let now = dependency.in_flight() + 1;
        if now > l.get().unwrap().get() {
            o.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        dependency.clone().call()
    })
    .with_adaptive_concurrency(1, 200)
    .named("lookup");
    limit.set(mapper.concurrency_limit()).unwrap();
    let limit = limit.get().unwrap().clone();
    assert_eq!(limit.get(), 1);
    let (samples, sampler) = sample(limit.clone());
    // About 10 s at the knee's 1,600 calls/s.
    let out = streamz::iter(0..16_000u32).pipe(mapper);
    let pipeline = out.pipeline().clone();
    let results = tokio::time::timeout(LIMIT, out.collect())
        .await
        .expect("ended");
    sampler.abort();
    assert_eq!(results.len(), 16_000);
    assert!(results.iter().all(Result::is_ok));
    support::assert_conserved(&support::stage(&pipeline, "lookup"));

    let samples = samples.lock().unwrap().clone();
    let reached = samples.iter().find(|(_, l)| *l >= 16).map(|(t, _)| *t);
    assert!(
        reached.is_some_and(|t| t < Duration::from_secs(1)),
        "the limit climbs to the knee within a second: {reached:?}"
    );
    // From 2 s on, within 25 % of the knee (12..=20), and on average close.
    let settled: Vec<usize> = samples
        .iter()
        .filter(|(t, _)| *t >= Duration::from_secs(2))
        .map(|(_, l)| *l)
        .collect();
    assert!(settled.len() > 500, "{} samples", settled.len());
    let (lo, hi) = (settled.iter().min().unwrap(), settled.iter().max().unwrap());
    let mean = settled.iter().sum::<usize>() as f64 / settled.len() as f64;
    println!("settled between {lo} and {hi}, mean {mean:.2}");
    let mut histogram = std::collections::BTreeMap::new();
    for l in &settled {
        *histogram.entry(*l).or_insert(0) += 1;
    }
    println!("{histogram:?}");
    assert!(*lo >= 12 && *hi <= 20, "settled between {lo} and {hi}");
    // And on average within 15 %.
    assert!((13.6..=18.4).contains(&mean), "mean limit {mean:.1}");
    let cuts = samples.windows(2).filter(|w| w[1].1 < w[0].1).count();
    assert!(cuts > 10, "the limit was cut {cuts} times");
    assert_eq!(
        over.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a call started above the limit"
    );
}

#[tokio::test(start_paused = true)]
async fn jitter_that_does_not_grow_with_load_does_not_hold_the_limit_down() {
    // Latency 10 ms plus up to 100 % random jitter, whatever the load:
    // the dependency is never the bottleneck, and the limit must climb
    // (a fixed tolerance against the fastest window would take the jitter
    // for load and pin the limit near 1).
    // Shapes: 10 ms plus up to 50 % or 100 % uniform jitter; uniform 5 to
    // 15 ms; exponential with a mean of 10 ms; a cache (90 % answered at
    // once, the rest in 10 ms).
    let uniform = |lo: f64, hi: f64| move |r: &mut fastrand::Rng| lo + r.f64() * (hi - lo);
    let shapes: [(&str, Latency, bool); 6] = [
        ("10-15 ms", Box::new(uniform(0.010, 0.015)), true),
        ("10-20 ms", Box::new(uniform(0.010, 0.020)), true),
        (
            "10-20 ms, unordered",
            Box::new(uniform(0.010, 0.020)),
            false,
        ),
        ("5-15 ms", Box::new(uniform(0.005, 0.015)), true),
        (
            "exponential",
            Box::new(|r: &mut fastrand::Rng| -0.010 * (1.0 - r.f64()).ln()),
            true,
        ),
        (
            "cache",
            Box::new(|r: &mut fastrand::Rng| if r.f64() < 0.9 { 0.0 } else { 0.010 }),
            false,
        ),
    ];
    for (jitter, latency, ordered) in shapes {
        let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(7)));
        let mapper = AsyncMapper::new(move |_: &u32| {
            let secs = latency(&mut rng.lock().unwrap());
            async move {
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                Ok::<_, Overloaded>(())
            }
        })
        .with_adaptive_concurrency(1, 64);
        let mapper = if ordered { mapper } else { mapper.unordered() };
        let limit = mapper.concurrency_limit();
        let (samples, sampler) = sample(limit.clone());
        let out = tokio::time::timeout(LIMIT, streamz::iter(0..20_000u32).pipe(mapper).collect())
            .await
            .expect("ended");
        sampler.abort();
        assert_eq!(out.len(), 20_000);
        let samples = samples.lock().unwrap().clone();
        let late = &samples[samples.len() / 2..];
        let mean = late.iter().map(|(_, l)| *l).sum::<usize>() as f64 / late.len() as f64;
        println!("{jitter}: mean limit {mean:.1} in the second half");
        assert!(
            mean >= 32.0,
            "jitter {jitter}, ordered {ordered}: mean limit {mean:.1}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_deadline_is_not_an_overload() {
    // Even items answer in 10 ms. Odd items fail at once (an error not
    // marked as overload), and their retry, 40 ms long, is cut by the
    // item's 35 ms deadline: timeouts, but of the item's deadline, which
    // say nothing of the dependency. The limit climbs on the even items.
    let tried = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let mapper = AsyncMapper::new(move |x: &u32| {
        let x = *x;
        let first = tried.lock().unwrap().insert(x);
        async move {
            if x % 2 == 1 && first {
                return Err(Overloaded);
            }
            let latency = if x % 2 == 0 { 10 } else { 40 };
            tokio::time::sleep(Duration::from_millis(latency)).await;
            Ok(x)
        }
    })
    .with_adaptive_concurrency(1, 8)
    .overload_if(|_: &Overloaded| false)
    .with_retry(
        Retry::attempts(2)
            .with_backoff(BASE, BASE)
            .with_deadline(Duration::from_millis(35)),
    );
    let limit = mapper.concurrency_limit();
    let out = tokio::time::timeout(LIMIT, streamz::iter(0..2_000u32).pipe(mapper).collect())
        .await
        .expect("ended");
    let (values, errors) = support::split(out);
    assert_eq!(values.len(), 1_000);
    assert_eq!(errors.len(), 1_000);
    assert!(errors.iter().all(|e| e.kind() == ErrorKind::TimedOut));
    assert_eq!(limit.get(), 8, "deadline timeouts did not cut the limit");
}

#[tokio::test(start_paused = true)]
async fn the_limit_backs_off_on_overload_errors() {
    // No knee in latency: the limit climbs to its max, until the
    // dependency starts refusing calls beyond 8 in flight.
    let knee = Knee::new(usize::MAX, BASE);
    let dependency = knee.clone();
    let mapper = AsyncMapper::new(move |_: &u32| dependency.clone().call())
        .with_adaptive_concurrency(2, 48)
        .overload_if(|_: &Overloaded| true)
        .with_retry(Retry::attempts(1_000).with_backoff(BASE, BASE))
        .named("lookup");
    let limit = mapper.concurrency_limit();
    let (samples, sampler) = sample(limit.clone());
    let shed = knee.clone();
    let shedder = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        shed.shed_above(8);
    });
    let out = streamz::iter(0..40_000u32).pipe(mapper);
    let pipeline = out.pipeline().clone();
    let results = tokio::time::timeout(LIMIT, out.collect())
        .await
        .expect("ended");
    sampler.abort();
    shedder.await.unwrap();
    assert_eq!(results.len(), 40_000);
    assert!(
        results.iter().all(Result::is_ok),
        "every item got through on a retry"
    );
    let m = support::stage(&pipeline, "lookup");
    support::assert_conserved(&m);
    assert!(m.retries > 0, "calls were refused and retried");

    let samples = samples.lock().unwrap().clone();
    let before: Vec<usize> = samples
        .iter()
        .filter(|(t, _)| *t < Duration::from_secs(2))
        .map(|(_, l)| *l)
        .collect();
    assert_eq!(
        before.iter().max(),
        Some(&48),
        "climbed to max while nothing failed"
    );
    let after: Vec<usize> = samples
        .iter()
        .filter(|(t, _)| *t >= Duration::from_millis(2_500))
        .map(|(_, l)| *l)
        .collect();
    assert!(after.len() > 100, "{} samples", after.len());
    let hi = *after.iter().max().unwrap();
    assert!(
        hi <= 10,
        "backed off to the shedding point (8): at most {hi}"
    );
    assert!(after.iter().all(|l| *l >= 2), "never below min");
}

/// Leaves the in-flight count when a call ends or is cancelled (timed out).
struct Leave(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Leave {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn timeouts_count_as_overload() {
    // A dependency whose answers take 10 ms whatever the load, but which
    // never answers a call beyond 4 in flight: only the mapper's timeout
    // tells, and the limit comes back down toward 4.
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hung = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (a, h) = (active.clone(), hung.clone());
    let mapper = AsyncMapper::new(move |_: &u32| {
        let (a, h) = (a.clone(), h.clone());
        async move {
            let n = a.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let _leave = Leave(a);
            if n > 4 {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(BASE).await;
            Ok::<_, Overloaded>(())
        }
    })
    .with_adaptive_concurrency(1, 32)
    .with_timeout(Duration::from_millis(50))
    .with_retry(
        Retry::attempts(1_000)
            .with_backoff(BASE, BASE)
            .with_timeouts_retried(true),
    )
    .named("lookup");
    let limit = mapper.concurrency_limit();
    let (samples, sampler) = sample(limit.clone());
    let out = streamz::iter(0..5_000u32).pipe(mapper);
    let pipeline = out.pipeline().clone();
    let results = tokio::time::timeout(LIMIT, out.collect())
        .await
        .expect("ended");
    sampler.abort();
    assert!(results.iter().all(Result::is_ok));
    let m = support::stage(&pipeline, "lookup");
    support::assert_conserved(&m);
    assert!(m.timeouts > 0 && hung.load(std::sync::atomic::Ordering::SeqCst) > 0);
    let samples = samples.lock().unwrap().clone();
    let late: Vec<usize> = samples
        .iter()
        .filter(|(t, _)| *t >= Duration::from_secs(2))
        .map(|(_, l)| *l)
        .collect();
    assert!(late.len() > 100, "{} samples", late.len());
    let hi = *late.iter().max().unwrap();
    let mean = late.iter().sum::<usize>() as f64 / late.len() as f64;
    println!(
        "timeouts: between {} and {hi}, mean {mean:.2}",
        late.iter().min().unwrap()
    );
    // A timeout tells 50 ms (five calls' time) after the call began, while
    // the limit keeps climbing on the answered calls: it rises past 4 by a
    // few before each cut.
    assert!(
        hi <= 10,
        "the limit stays near the 4 calls the dependency answers: {hi}"
    );
    assert!((3.0..=8.0).contains(&mean), "mean limit {mean:.2}");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_overload_predicate_fails_the_item_and_keeps_the_count() {
    let mapper = AsyncMapper::new(|x: &u32| {
        let x = *x;
        async move { if x % 2 == 0 { Err(Overloaded) } else { Ok(x) } }
    })
    .with_adaptive_concurrency(1, 4)
    .overload_if(|_: &Overloaded| panic!("predicate bug"))
    .named("lookup");
    let out = streamz::iter(0..10u32).pipe(mapper);
    let pipeline = out.pipeline().clone();
    let results = tokio::time::timeout(LIMIT, out.collect())
        .await
        .expect("ended");
    let (values, errors) = support::split(results);
    assert_eq!(values, [1, 3, 5, 7, 9]);
    assert_eq!(errors.len(), 5);
    for mut e in errors {
        assert_eq!(e.kind(), ErrorKind::Panicked);
        assert!(e.take_item::<u32>().is_some_and(|x| x % 2 == 0));
    }
    support::assert_conserved(&support::stage(&pipeline, "lookup"));
}

#[tokio::test]
async fn bad_bounds_are_refused() {
    let f = |x: &u32| std::future::ready(Ok::<_, Overloaded>(*x));
    let e = support::refused(
        AsyncMapper::new(f)
            .with_adaptive_concurrency(0, 4)
            .named("m"),
    );
    assert_eq!(e.field(), "adaptive_concurrency.min");
    assert!(e.is_zero());
    let e = support::refused(
        AsyncMapper::new(f)
            .with_adaptive_concurrency(5, 4)
            .named("m"),
    );
    assert_eq!(e.field(), "adaptive_concurrency.max");
    assert_eq!(
        e.to_string(),
        "AsyncMapper `m`: `adaptive_concurrency.max` must be at least `min` (5), is 4"
    );
    // Huge bounds are fine: slots are made as items need them.
    let out = streamz::iter(0..100u32)
        .pipe(AsyncMapper::new(f).with_adaptive_concurrency(usize::MAX, usize::MAX))
        .collect()
        .await;
    assert_eq!(out.len(), 100);
    // A later fixed concurrency wins.
    let m = AsyncMapper::new(f)
        .with_adaptive_concurrency(0, 4)
        .with_concurrency(3);
    assert_eq!(m.concurrency_limit().get(), 3);
    let out = streamz::iter(0..10u32).pipe(m).collect().await;
    assert_eq!(out.len(), 10);
}

#[tokio::test(start_paused = true)]
async fn the_limit_never_leaves_its_bounds_and_holds_no_more_items_than_it() {
    // A dependency whose latency does not depend on load: the limit climbs
    // to max and stays; the calls in flight never exceed the limit.
    let knee = Knee::new(usize::MAX, BASE);
    let dependency = knee.clone();
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (p, a) = (peak.clone(), active.clone());
    let mapper = AsyncMapper::new(move |_: &u32| {
        let (p, a, d) = (p.clone(), a.clone(), dependency.clone());
        async move {
            let n = a.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            p.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
            let r = d.call().await;
            a.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            r
        }
    })
    .with_adaptive_concurrency(3, 7);
    let limit = mapper.concurrency_limit();
    let out = tokio::time::timeout(LIMIT, streamz::iter(0..2_000u32).pipe(mapper).collect())
        .await
        .expect("ended");
    assert_eq!(out.len(), 2_000);
    assert_eq!(limit.get(), 7);
    assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 7);
}

#[tokio::test(start_paused = true)]
async fn held_items_and_an_adaptive_limit_end_together() {
    // A dependency that goes down for a second: the held items fill the
    // limit (no call, no latency learnt) and every item still arrives once
    // it is back, in order.
    let (health, signal) = tokio::sync::watch::channel(streamz::Health::Healthy);
    let mapper = AsyncMapper::new(|x: &u32| {
        let x = *x;
        async move {
            tokio::time::sleep(BASE).await;
            Ok::<_, Overloaded>(x)
        }
    })
    .with_adaptive_concurrency(2, 16)
    .hold_while_down(signal)
    .named("lookup");
    let limit = mapper.concurrency_limit();
    let out = streamz::iter(0..3_000u32).pipe(mapper);
    let pipeline = out.pipeline().clone();
    let flip = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        health.send(streamz::Health::unhealthy("failover")).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        health.send(streamz::Health::Healthy).unwrap();
        health
    });
    let results = tokio::time::timeout(LIMIT, out.collect())
        .await
        .expect("ended");
    let _health = flip.await.unwrap();
    assert_eq!(support::values(results), (0..3_000).collect::<Vec<_>>());
    support::assert_conserved(&support::stage(&pipeline, "lookup"));
    assert!((2..=16).contains(&limit.get()));
}
