//! Pull throughput: the stream job copying a 3-layer chain into its top,
//! per format and cluster size, on tmpfs; and a metadata-heavy 16-layer
//! chain of 4 KiB clusters. Throughput is the bytes the pull copies.
//!
//! `cargo bench -p imgpull-benches --bench pull`

mod common;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use imgpull_jobs::StreamOptions;

use common::{bench_dir, build_chain, fresh_top, pull};

fn pull_formats(c: &mut Criterion) {
    let mut g = c.benchmark_group("pull");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for fmt in ["qcow2", "qed"] {
        for (cluster, size) in [
            (4096u64, 64u64 << 20),
            (65536, 256 << 20),
            (2 << 20, 256 << 20),
        ] {
            if fmt == "qed" && cluster < 4096 {
                continue;
            }
            let dir = bench_dir(&format!("pull-{fmt}-{cluster}"));
            let chain = build_chain(&dir, fmt, size, cluster, 3, 0.6, 0.07);
            let work = dir.join("work");
            std::fs::create_dir_all(&work).unwrap();
            let top = chain.last().unwrap().clone();
            // One pull to learn how many bytes a pull copies.
            let copied = pull(&fresh_top(&top, &work), StreamOptions::default());
            g.throughput(Throughput::Bytes(copied));
            g.bench_function(format!("{fmt}/cluster-{}k", cluster / 1024), |b| {
                b.iter_batched(
                    || fresh_top(&top, &work),
                    |t| pull(&t, StreamOptions::default()),
                    BatchSize::PerIteration,
                )
            });
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    g.finish();
}

fn pull_metadata_heavy(c: &mut Criterion) {
    let mut g = c.benchmark_group("pull-metadata");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    let dir = bench_dir("pull-16");
    let chain = build_chain(&dir, "qcow2", 512 << 20, 4096, 16, 0.25, 0.02);
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let top = chain.last().unwrap().clone();
    let copied = pull(&fresh_top(&top, &work), StreamOptions::default());
    g.throughput(Throughput::Bytes(copied));
    g.bench_function("qcow2/16-layers/cluster-4k", |b| {
        b.iter_batched(
            || fresh_top(&top, &work),
            |t| pull(&t, StreamOptions::default()),
            BatchSize::PerIteration,
        )
    });
    let _ = std::fs::remove_dir_all(&dir);
    g.finish();
}

criterion_group!(benches, pull_formats, pull_metadata_heavy);
criterion_main!(benches);
