//! Which I/O backend carries a pull's data. On the default backend at
//! least 95% of the bytes a pull copies are written through io_uring
//! (spliced from the backing files where the kernel can); forced to
//! `pread` (`IMGPULL_IO_BACKEND=pread`) they go through `pwrite`. This file
//! holds one test, so its process runs nothing else and the process-wide
//! byte counters count this test's pulls alone.

mod common;

use common::*;
use imgpull_image::uring::{self, io_counters, Backend, StorageOptions};
use imgpull_jobs::{Outcome, StreamOptions};

/// A chain of `fmt` images with `cluster`-byte clusters: a base mostly
/// data, two overlays of scattered writes (whole clusters, partial ones,
/// zeros), a top with a few writes of its own.
fn chain(fmt: &str, cluster: &str, seed: u64) -> Vec<Layer> {
    let size = 48 * MIB;
    let opts = format!("cluster_size={cluster}");
    let mut rng = Rng::new(seed);
    let mut base = Vec::new();
    let mut off = 0;
    while off < size {
        let len = (1 + rng.below(64)) * 64 * KIB;
        if rng.below(10) < 7 {
            base.push(format!(
                "write -P {} {off} {}",
                1 + rng.below(250),
                len.min(size - off)
            ));
        }
        off += len;
    }
    let mut layers = vec![Layer::new(&format!("base.{fmt}"), fmt, size)
        .opts(&opts)
        .ops(base)];
    for (i, n) in [("mid", 200), ("top", 40)] {
        let c = parse_size(cluster);
        layers.push(
            Layer::new(&format!("{i}.{fmt}"), fmt, size)
                .opts(&opts)
                .ops(random_ops(&mut rng, size, c, n, false)),
        );
    }
    layers
}

#[test]
fn pulled_data_goes_through_the_selected_backend() {
    let backend = match StorageOptions::from_env().expect("backend options").backend {
        Backend::Pread => Backend::Pread,
        _ if uring::uring_available().is_err() => Backend::Pread,
        _ => Backend::Uring,
    };
    for (k, (fmt, cluster)) in [("qcow2", "64k"), ("qed", "64k"), ("qcow2", "4k")]
        .into_iter()
        .enumerate()
    {
        let what = format!("{fmt} with {cluster} clusters on {backend:?}");
        let d = Dir::new();
        let layers = chain(fmt, cluster, 7 + k as u64);
        d.build(&layers);
        let top = layers.last().unwrap().name.clone();
        d.dump(&top, "orig.raw");
        let before = io_counters();
        let p = pull(&d.path(&top), None, StreamOptions::default(), 0);
        let moved = io_counters().since(&before);
        assert_eq!(p.outcome, Outcome::Completed, "{what}");
        d.compare("orig.raw", &top)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        d.check(&top).unwrap_or_else(|e| panic!("{what}: {e}"));
        let copied = p.stats.copied();
        assert!(copied >= 16 * MIB, "{what}: only {copied} bytes copied");
        match backend {
            Backend::Uring => {
                assert!(
                    moved.uring_written as f64 >= 0.95 * copied as f64,
                    "{what}: {copied} bytes copied, counters {moved:?}"
                );
                assert!(
                    moved.pread_bytes() as f64 <= 0.05 * copied as f64,
                    "{what}: {copied} bytes copied, counters {moved:?}"
                );
            }
            _ => {
                assert!(
                    moved.pread_written >= copied && moved.uring_bytes() == 0,
                    "{what}: {copied} bytes copied, counters {moved:?}"
                );
            }
        }
    }
}
