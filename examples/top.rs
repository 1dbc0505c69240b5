//! A live view of a running pipeline, like `vector top`: every second, a
//! table of its stages with their rates in and out, errors, how full their
//! output channel is, and the health gate's state.
//!
//! The demonstration pipeline reads orders pushed at about 2,000 a second,
//! passes a health gate whose dependency goes down for a second in every
//! six, parses them (1 % fail), enriches each with an async call (1-4 ms, 2 %
//! fail once and are retried), throttles to 1,500 a second, batches them
//! and dead-letters what failed for good.
//!
//! Everything on screen comes from `Pipeline::topology()` (stages, edges,
//! counters) and the gate's handle; rates are the change between two
//! snapshots.
//!
//! Run: `cargo run --example top` (`q`, `Esc` or Ctrl-C to quit), or
//! `cargo run --example top -- --for 10` to stop after 10 s. Without a
//! terminal (piped, or in CI) it prints the table as text instead, for 3 s
//! unless `--for` says otherwise.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::layout::Constraint;
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Block, Row, Table};
use streamz::{
    AsyncMapper, Batcher, DeadLetterQueue, GateHandle, GateState, HealthGate, Pipeline, Retry,
    StageKind, Throttle, Topology, health_fn,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One line of the table.
struct Line {
    stage: String,
    kind: &'static str,
    in_rate: f64,
    out_rate: f64,
    errors: u64,
    queue: String,
    state: String,
}

const HEADER: [&str; 7] = ["stage", "kind", "in/s", "out/s", "errors", "queue", "state"];

/// The table between two snapshots taken `dt` apart.
fn lines(before: &Topology, now: &Topology, dt: f64, gate: &GateHandle) -> Vec<Line> {
    now.stages
        .iter()
        .enumerate()
        .map(|(i, stage)| {
            let m = &stage.metrics;
            let was = before
                .stages
                .iter()
                .find(|s| s.name == stage.name)
                .map(|s| s.metrics.clone())
                .unwrap_or_default();
            let rate = |now: u64, was: u64| now.saturating_sub(was) as f64 / dt;
            // The stage's output channel: what it holds of its capacity.
            let queue = now
                .edges
                .iter()
                .find(|e| e.from == i)
                .and_then(|e| e.queue)
                .map_or_else(|| "-".to_owned(), |q| format!("{}/{}", q.held, q.capacity));
            let state = match stage.name.as_str() {
                "gate" => match gate.state() {
                    GateState::Open => "open".to_owned(),
                    GateState::Closed => "CLOSED".to_owned(),
                },
                _ => "-".to_owned(),
            };
            Line {
                stage: stage.name.clone(),
                kind: match stage.kind {
                    StageKind::Source => "source",
                    StageKind::Fused => "fused",
                    _ => "task",
                },
                in_rate: rate(m.received, was.received),
                out_rate: rate(m.emitted, was.emitted),
                errors: m.failed,
                queue,
                state,
            }
        })
        .collect()
}

fn cells(line: &Line) -> [String; 7] {
    [
        line.stage.clone(),
        line.kind.to_owned(),
        format!("{:.0}", line.in_rate),
        format!("{:.0}", line.out_rate),
        line.errors.to_string(),
        line.queue.clone(),
        line.state.clone(),
    ]
}

/// Builds and starts the demonstration pipeline; returns it, the gate's
/// handle, and the task feeding and draining it.
fn start() -> (Pipeline, GateHandle, tokio::task::JoinHandle<()>) {
    let pipeline = Pipeline::builder().with_name("demo").build();
    let (orders, flow) = pipeline.channel::<u64>();

    // The dependency is down for one second in every six.
    let started = Instant::now();
    let gate = HealthGate::new(health_fn(move || {
        let up = started.elapsed().as_secs() % 6 != 5;
        async move { up }
    }))
    .named("gate")
    .starting_open()
    .with_interval(Duration::from_millis(100))
    .with_failures_to_close(1);
    let handle = gate.handle();

    let failed_once = Arc::new(AtomicU64::new(u64::MAX));
    let enrich = AsyncMapper::new(move |n: &u64| {
        let n = *n;
        let failed_once = failed_once.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(1 + n % 4)).await;
            // 2 % fail on their first attempt; the retry succeeds.
            if n % 50 == 7 && failed_once.swap(n, Ordering::Relaxed) != n {
                return Err(std::io::Error::other("busy"));
            }
            Ok(n * 2)
        }
    })
    .named("enrich")
    .with_concurrency(16)
    .with_retry(
        Retry::attempts(2).with_backoff(Duration::from_millis(5), Duration::from_millis(5)),
    );

    let (dead, letters) = streamz::dlq::channel::<u64>(1024);
    let mut out = flow
        .pipe(gate)
        .try_map(|n: &u64| {
            if n % 100 == 99 {
                Err("malformed order")
            } else {
                Ok(*n)
            }
        })
        .named("parse")
        .pipe(enrich)
        .pipe(Throttle::new(1_500, Duration::from_secs(1)).named("throttle"))
        .pipe(Batcher::new(100, Duration::from_millis(100)).named("batch"))
        .pipe(DeadLetterQueue::new(dead).named("dlq"));

    let task = tokio::spawn(async move {
        let producer = tokio::spawn(async move {
            // About 2,000 a second, in bursts of 20 every 10 ms.
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for n in 0.. {
                if n % 20 == 0 {
                    tick.tick().await;
                }
                if orders.send(n).await.is_err() {
                    break;
                }
            }
        });
        let drain = tokio::spawn(async move { while letters.recv().await.is_ok() {} });
        while out.next_chunk().await.is_some() {}
        producer.abort();
        let _ = drain.await;
    });
    (pipeline, handle, task)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: Option<u64> = args
        .iter()
        .position(|a| a == "--for")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse())
        .transpose()?;
    let tty = std::io::stdout().is_terminal();
    let run_for = seconds
        .map(Duration::from_secs)
        .or((!tty).then_some(Duration::from_secs(3)));

    let (pipeline, gate, task) = start();
    let started = Instant::now();
    let mut before = pipeline.topology();
    let mut taken = Instant::now();
    let mut terminal = tty.then(ratatui::init);
    loop {
        // Waits a second, or for a key on a terminal.
        let quit = match &terminal {
            Some(_) => {
                let key = tokio::task::spawn_blocking(|| -> std::io::Result<bool> {
                    if event::poll(Duration::from_secs(1))? {
                        if let Event::Key(k) = event::read()? {
                            let ctrl_c = k.code == KeyCode::Char('c')
                                && k.modifiers.contains(KeyModifiers::CONTROL);
                            return Ok(
                                matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c
                            );
                        }
                    }
                    Ok(false)
                });
                key.await??
            }
            None => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                false
            }
        };
        let now = pipeline.topology();
        let dt = taken.elapsed().as_secs_f64();
        taken = Instant::now();
        let table = lines(&before, &now, dt, &gate);
        before = now;
        let elapsed = started.elapsed().as_secs();
        match &mut terminal {
            Some(terminal) => {
                terminal.draw(|frame| {
                    let lengths = [10u16, 7, 8, 8, 8, 11, 7];
                    // Borders, and one space between columns.
                    let need_width = lengths.iter().sum::<u16>() + lengths.len() as u16 - 1 + 2;
                    let need_height = table.len() as u16 + 1 + 2;
                    let area = frame.area();
                    if area.width < need_width || area.height < need_height {
                        // Clipped cells would show wrong numbers (2002/s
                        // as 200): say so instead.
                        let text = format!(
                            "streamz top needs {need_width}x{need_height}, this terminal is {}x{}",
                            area.width, area.height
                        );
                        frame.render_widget(
                            ratatui::widgets::Paragraph::new(text)
                                .wrap(ratatui::widgets::Wrap { trim: true }),
                            area,
                        );
                        return;
                    }
                    let rows = table.iter().map(|l| Row::new(cells(l)));
                    let widths = lengths.map(Constraint::Length);
                    let title = format!(" streamz top: pipeline demo, {elapsed} s (q to quit) ");
                    let view = Table::new(rows, widths)
                        .header(Row::new(HEADER).style(Style::new().add_modifier(Modifier::BOLD)))
                        .block(Block::bordered().title(title));
                    frame.render_widget(view, area);
                })?;
            }
            None => {
                println!("pipeline demo, {elapsed} s");
                println!(
                    "{:<10} {:<7} {:>8} {:>8} {:>8} {:>11} {:<7}",
                    HEADER[0], HEADER[1], HEADER[2], HEADER[3], HEADER[4], HEADER[5], HEADER[6]
                );
                for l in &table {
                    let [stage, kind, i, o, e, q, s] = cells(l);
                    println!("{stage:<10} {kind:<7} {i:>8} {o:>8} {e:>8} {q:>11} {s:<7}");
                }
            }
        }
        if quit || run_for.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    if terminal.is_some() {
        ratatui::restore();
    }
    pipeline.shutdown();
    task.await?;
    pipeline.join().await?;
    Ok(())
}
