//! `cargo run --example top`, the live view, run in a real pseudo-terminal
//! (a tmux pane): the table must show every stage of the demonstration
//! pipeline and its counts must move from one redraw to the next.
//!
//! Uses the example's binary that `cargo test` builds next to this test
//! (`target/<profile>/examples/top`; with `--test top` alone, run `cargo
//! build --example top` first), and tmux (.ci/run installs it).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const STAGES: [&str; 7] = [
    "channel", "gate", "parse", "enrich", "throttle", "batch", "dlq",
];

fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/top-<hash> -> target/<profile>/examples/top
    let profile = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let bin = profile.join("examples").join("top");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds it (or run `cargo build --example top`)",
        bin.display()
    );
    bin
}

/// A detached tmux session, killed when dropped (also when the test fails).
struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}

impl Session {
    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.0])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The table's row for `stage` on a screen, as its cells.
fn row(screen: &str, stage: &str) -> Option<Vec<String>> {
    screen.lines().find_map(|line| {
        let cells: Vec<String> = line
            .trim_matches(|c: char| c == '│' || c.is_whitespace())
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        (cells.first().map(String::as_str) == Some(stage)).then_some(cells)
    })
}

/// The errors column of `parse` (cumulative: it only grows).
fn parse_errors(screen: &str) -> Option<u64> {
    row(screen, "parse")?.get(4)?.parse().ok()
}

#[test]
fn the_live_view_shows_every_stage_with_moving_counts() {
    let version = Command::new("tmux").arg("-V").output();
    assert!(
        version.is_ok_and(|v| v.status.success()),
        "tmux is needed for this test (apt-get install tmux)"
    );
    let session = Session(format!("streamz-top-{}", std::process::id()));
    let command = format!("{} --for 60", example().display());
    let started = Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-s",
            &session.0,
            "-x",
            "100",
            "-y",
            "20",
            &command,
        ])
        .status()
        .expect("tmux new-session");
    assert!(started.success());

    // The view redraws every second: look at the pane until it shows every
    // stage, then until a later redraw shows more parse errors (the
    // example's parse fails 1 % of its input). Polling an outside process's
    // screen, with a deadline so a view that never draws fails the test.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut first: Option<(u64, String)> = None;
    loop {
        let screen = session.screen();
        if screen.contains("streamz top") && STAGES.iter().all(|s| row(&screen, s).is_some()) {
            let errors = parse_errors(&screen).expect("a number in parse's errors column");
            match &first {
                None => first = Some((errors, screen.clone())),
                Some((before, _)) if errors > *before => {
                    // Every row has its cells: kind, rates, errors, queue, state.
                    for stage in STAGES {
                        let cells = row(&screen, stage).unwrap();
                        assert_eq!(cells.len(), 7, "{stage}: {cells:?}\n{screen}");
                    }
                    let enrich = row(&screen, "enrich").unwrap();
                    assert_eq!(enrich[1], "task", "{screen}");
                    let in_rate: f64 = enrich[2].parse().unwrap();
                    assert!(in_rate > 0.0, "enrich takes input:\n{screen}");
                    assert_eq!(row(&screen, "parse").unwrap()[1], "fused", "{screen}");
                    assert!(
                        ["open", "CLOSED"].contains(&row(&screen, "gate").unwrap()[6].as_str()),
                        "{screen}"
                    );
                    return;
                }
                Some(_) => {}
            }
        }
        assert!(
            Instant::now() < deadline,
            "the view did not show every stage with moving counts within 30 s; first:\n{}\nlast:\n{screen}",
            first.map(|(_, s)| s).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
