//! Reading through a chain and mapping it: guest reads of a 3-layer chain
//! (1 MiB requests), the allocation map of a 16-layer 4 KiB-cluster chain,
//! and the map of a mostly unallocated 1 TiB image.
//!
//! `cargo bench -p imgpull-benches --bench chain`

mod common;

use std::process::Command;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use imgpull_chain::{Chain, ChainOptions};

use common::{bench_dir, build_chain};

fn open(p: &std::path::Path) -> Chain {
    Chain::open(p, &ChainOptions::default()).expect("open chain")
}

fn read_through_chain(c: &mut Criterion) {
    let mut g = c.benchmark_group("read-chain");
    g.sample_size(10).measurement_time(Duration::from_secs(6));
    for fmt in ["qcow2", "qed"] {
        let dir = bench_dir(&format!("read-{fmt}"));
        let size = 256u64 << 20;
        let paths = build_chain(&dir, fmt, size, 65536, 3, 0.6, 0.07);
        let chain = open(paths.last().unwrap());
        g.throughput(Throughput::Bytes(size));
        g.bench_function(format!("{fmt}/1M-reads"), |b| {
            let mut buf = vec![0u8; 1 << 20];
            b.iter(|| {
                let mut off = 0;
                while off < size {
                    chain.read(off, &mut buf).unwrap();
                    off += buf.len() as u64;
                }
            })
        });
        drop(chain);
        let _ = std::fs::remove_dir_all(&dir);
    }
    g.finish();
}

fn map_metadata_heavy(c: &mut Criterion) {
    let mut g = c.benchmark_group("map");
    g.sample_size(10).measurement_time(Duration::from_secs(6));
    let dir = bench_dir("map-16");
    let paths = build_chain(&dir, "qcow2", 512 << 20, 4096, 16, 0.25, 0.02);
    let chain = open(paths.last().unwrap());
    g.bench_function("qcow2/16-layers/cluster-4k", |b| {
        b.iter(|| chain.map().unwrap())
    });
    drop(chain);

    let sparse = dir.join("sparse.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&sparse)
        .arg("1T")
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 2 500G 64k",
            "-c",
            "write -z 900G 1G",
        ])
        .arg(&sparse)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let chain = open(&sparse);
    g.bench_function("qcow2/1T-mostly-unallocated", |b| {
        b.iter(|| chain.map().unwrap())
    });
    drop(chain);
    let _ = std::fs::remove_dir_all(&dir);
    g.finish();
}

criterion_group!(benches, read_through_chain, map_metadata_heavy);
criterion_main!(benches);
