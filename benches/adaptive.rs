//! Adaptive concurrency on the real clock, against the simulated
//! dependency of `tests/adaptive_concurrency.rs`: latency 10 ms up to 16
//! calls at once, growing in proportion beyond (a service with 16 workers
//! and a queue).
//!
//! `cargo bench --bench adaptive` prints, for fixed limits of 4, 16 (the
//! knee) and 64 and for `with_adaptive_concurrency(1, 200)`, the calls per
//! second and the mean latency of a call over the same time, then traces
//! the adaptive limit over 8 s in which the dependency starts shedding load
//! (503 above 8 calls in flight) at 4 s. The trace goes to
//! `target/adaptive-concurrency.csv` (under `CARGO_TARGET_DIR` if set).
//! With `-- --plot FILE.png` that CSV is then drawn with plotters
//! (docs/images/adaptive-concurrency.png comes from this).

#[path = "../tests/sim/knee.rs"]
mod sim;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sim::{Knee, Overloaded};
use streamz::{AsyncMapper, ConcurrencyLimit, Retry};

const BASE: Duration = Duration::from_millis(10);
const KNEE: usize = 16;

/// How a run set its limit.
#[derive(Clone, Copy)]
enum Limit {
    Fixed(usize),
    Adaptive,
}

/// Calls answered, and their total latency, in a run of `length`.
struct Run {
    calls: u64,
    latency_nanos: u64,
}

/// The mapper over the simulated dependency, timing each successful call.
fn mapper(
    knee: &Knee,
    limit: Limit,
    timed: Arc<(AtomicU64, AtomicU64)>,
) -> (impl streamz::Processor<u64, ()> + use<>, ConcurrencyLimit) {
    let dependency = knee.clone();
    let m = AsyncMapper::new(move |_: &u64| {
        let (dependency, timed) = (dependency.clone(), timed.clone());
        async move {
            let start = Instant::now();
            let r = dependency.call().await;
            if r.is_ok() {
                timed.0.fetch_add(1, Ordering::Relaxed);
                timed
                    .1
                    .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            r
        }
    })
    .overload_if(|_: &Overloaded| true)
    .with_retry(Retry::attempts(u32::MAX).with_backoff(BASE, Duration::from_millis(100)))
    .unordered();
    let m = match limit {
        Limit::Fixed(n) => m.with_concurrency(n),
        Limit::Adaptive => m.with_adaptive_concurrency(1, 200),
    };
    let handle = m.concurrency_limit();
    (m, handle)
}

/// Runs an endless source through the mapper for `length`, sampling the
/// limit every 20 ms; at `shed_at`, the dependency starts refusing calls
/// beyond 8 in flight.
async fn run(
    limit: Limit,
    length: Duration,
    shed_at: Option<Duration>,
) -> (Run, Vec<(Duration, usize)>) {
    let knee = Knee::new(KNEE, BASE);
    let timed = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let (m, handle) = mapper(&knee, limit, timed.clone());
    let out = streamz::iter(0u64..).pipe(m);
    let pipeline = out.pipeline().clone();
    let drain = tokio::spawn(out.for_each(|_| {}));
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while start.elapsed() < length {
        tick.tick().await;
        if shed_at.is_some_and(|at| start.elapsed() >= at) {
            knee.shed_above(8);
        }
        samples.push((start.elapsed(), handle.get()));
    }
    let run = Run {
        calls: timed.0.load(Ordering::Relaxed),
        latency_nanos: timed.1.load(Ordering::Relaxed),
    };
    pipeline.abort();
    let _ = drain.await;
    (run, samples)
}

/// Draws the trace in the CSV at `csv` (`seconds,limit` lines) as a PNG.
fn plot(csv: &std::path::Path, path: &str) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    use plotters::style::{FontStyle, register_font};

    let text = std::fs::read_to_string(csv)?;
    let samples: Vec<(Duration, usize)> = text
        .lines()
        .skip(1)
        .map(|line| {
            let (t, l) = line.split_once(',').ok_or("a line without a comma")?;
            Ok::<_, Box<dyn std::error::Error>>((Duration::from_secs_f64(t.parse()?), l.parse()?))
        })
        .collect::<Result<_, _>>()?;

    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, font).map_err(|_| "bad font")?;

    let root = BitMapBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let end = samples.last().map_or(1.0, |(t, _)| t.as_secs_f64());
    let top = samples.iter().map(|(_, l)| *l).max().unwrap_or(1) as f64 * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "AsyncMapper::with_adaptive_concurrency(1, 200), real clock",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..end, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("concurrency limit")
        .label_style(("sans-serif", 14))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|(t, l)| (t.as_secs_f64(), *l as f64)),
            BLUE.stroke_width(2),
        ))?
        .label("limit")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            [(0.0, KNEE as f64), (4.0, KNEE as f64)],
            RED.stroke_width(1),
        ))?
        .label("latency grows beyond 16 calls")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(1)));
    chart
        .draw_series(LineSeries::new(
            [(4.0, 8.0), (end, 8.0)],
            MAGENTA.stroke_width(1),
        ))?
        .label("from 4 s: 503 beyond 8 calls")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], MAGENTA.stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE)
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let plot_to = args
        .iter()
        .position(|a| a == "--plot")
        .and_then(|i| args.get(i + 1).cloned());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("knee at {KNEE} calls of {BASE:?}; 3 s per run, one run each, side by side");
        println!("{:<22} {:>10} {:>14}", "limit", "calls/s", "mean latency");
        for limit in [
            Limit::Fixed(4),
            Limit::Fixed(KNEE),
            Limit::Fixed(64),
            Limit::Adaptive,
        ] {
            let length = Duration::from_secs(3);
            let (r, samples) = run(limit, length, None).await;
            let name = match limit {
                Limit::Fixed(n) => format!("fixed {n}"),
                Limit::Adaptive => {
                    let last: Vec<usize> = samples
                        .iter()
                        .filter(|(t, _)| *t >= Duration::from_secs(1))
                        .map(|(_, l)| *l)
                        .collect();
                    let mean = last.iter().sum::<usize>() as f64 / last.len().max(1) as f64;
                    format!("adaptive (mean {mean:.1})")
                }
            };
            let rate = r.calls as f64 / length.as_secs_f64();
            let latency = Duration::from_nanos(r.latency_nanos / r.calls.max(1));
            println!("{name:<22} {rate:>10.0} {latency:>14.2?}");
        }
        let (_, trace) = run(
            Limit::Adaptive,
            Duration::from_secs(8),
            Some(Duration::from_secs(4)),
        )
        .await;
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("adaptive-concurrency.csv");
        let mut text = String::from("seconds,limit\n");
        for (t, l) in &trace {
            text.push_str(&format!("{:.3},{l}\n", t.as_secs_f64()));
        }
        std::fs::write(&csv, text).unwrap();
        let settled = |from: f64, to: f64| {
            let v: Vec<usize> = trace
                .iter()
                .filter(|(t, _)| (from..to).contains(&t.as_secs_f64()))
                .map(|(_, l)| *l)
                .collect();
            (
                v.iter().min().copied().unwrap_or(0),
                v.iter().max().copied().unwrap_or(0),
                v.iter().sum::<usize>() as f64 / v.len().max(1) as f64,
            )
        };
        let (lo, hi, mean) = settled(1.0, 4.0);
        println!("trace, 1-4 s (knee 16): limit {lo}..{hi}, mean {mean:.1}");
        let (lo, hi, mean) = settled(5.0, 8.0);
        println!("trace, 5-8 s (503 above 8): limit {lo}..{hi}, mean {mean:.1}");
        println!("trace written to {}", csv.display());
        if let Some(path) = plot_to {
            plot(&csv, &path).expect("plot");
            println!("plot written to {path}");
        }
    });
}
