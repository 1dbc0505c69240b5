//! The durable line source against reading the same file with `BufRead`,
//! in one run: 1,000,000 lines of about 20 bytes.
//!
//! - `bufread`: `std::io::BufRead::read_line` into one reused `String`
//!   (256 KiB buffer, the source's), on a blocking thread, counting lines:
//!   the floor, with no durability.
//! - `bufread_lines`: `BufRead::lines()`, an owned `String` per line, as a
//!   reader that hands lines on must make.
//! - `line_source`: `streamz::file::LineSource` from no checkpoint, read to
//!   the end with `for_each` (every line handed over, so acknowledged) and
//!   its last checkpoint written: what at-least-once costs.
//!
//! Run: `cargo bench --bench line_source`.

mod support;

use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use streamz::Pipeline;
use streamz::file::LineSource;

const N: u64 = 1_000_000;

fn write_input(dir: &Path) -> PathBuf {
    let path = dir.join("input.jsonl");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for i in 0..N {
        writeln!(out, "{{\"id\":{i:>10}}}").unwrap();
    }
    out.flush().unwrap();
    path
}

fn bufread(path: &Path) -> u64 {
    let mut input = BufReader::with_capacity(256 * 1024, std::fs::File::open(path).unwrap());
    let mut line = String::new();
    let mut n = 0;
    while input.read_line(&mut line).unwrap() > 0 {
        n += 1;
        black_box(&line);
        line.clear();
    }
    n
}

fn bufread_lines(path: &Path) -> u64 {
    let input = BufReader::with_capacity(256 * 1024, std::fs::File::open(path).unwrap());
    let mut n = 0;
    for line in input.lines() {
        black_box(line.unwrap());
        n += 1;
    }
    n
}

async fn line_source(path: PathBuf, checkpoint: PathBuf) -> u64 {
    let _ = std::fs::remove_file(&checkpoint);
    let pipeline = Pipeline::new();
    let (lines, _) = LineSource::new(path, checkpoint).start(&pipeline).unwrap();
    let mut n = 0;
    lines
        .for_each(|l| n += u64::from(black_box(l).is_ok()))
        .await;
    pipeline.join().await.unwrap();
    n
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_input(dir.path());
    let checkpoint = dir.path().join("input.checkpoint");
    let mut group = c.benchmark_group("lines_1M");
    group.throughput(Throughput::Elements(N));
    group.sample_size(10);
    for (rt_name, rt) in support::runtimes() {
        let p = path.clone();
        assert_eq!(
            rt.block_on(async move {
                tokio::task::spawn_blocking(move || bufread(&p))
                    .await
                    .unwrap()
            }),
            N
        );
        group.bench_function(BenchmarkId::new("bufread", rt_name), |b| {
            b.iter(|| {
                let p = path.clone();
                rt.block_on(async move {
                    tokio::task::spawn_blocking(move || bufread(&p))
                        .await
                        .unwrap()
                })
            })
        });
        group.bench_function(BenchmarkId::new("bufread_lines", rt_name), |b| {
            b.iter(|| {
                let p = path.clone();
                rt.block_on(async move {
                    tokio::task::spawn_blocking(move || bufread_lines(&p))
                        .await
                        .unwrap()
                })
            })
        });
        let run = || {
            let (p, cp) = (path.clone(), checkpoint.clone());
            rt.block_on(async move { tokio::spawn(line_source(p, cp)).await.unwrap() })
        };
        assert_eq!(run(), N);
        group.bench_function(BenchmarkId::new("line_source", rt_name), |b| b.iter(run));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
