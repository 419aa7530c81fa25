//! `write`: images written through [`imgpull_image::Image::write`] and
//! [`imgpull_image::Image::write_zeroes`] (over a real backing chain, with
//! `chain.below(1)` as the copy-on-write source) pass `qemu-img check` and
//! are `qemu-img compare`-identical to a raw model of the expected bytes;
//! our map of the result equals `qemu-img map`, and reading it back through
//! the chain gives the model.
//!
//! Deterministic scenarios per format configuration, a multi-threaded
//! writer, and a proptest property over random write sequences
//! (`IMGPULL_PROPTEST_CASES` raises its case count from 16).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::cases::Fmt;
use common::{
    catch, first_difference, gen_ops, read_through_chain, with_timeout, Failures, Layer, OpKinds,
    Rng, Scratch, KIB, MIB,
};
use imgpull_chain::{Chain, ChainOptions};
use proptest::prelude::*;

/// One write through our API.
#[derive(Clone, Debug)]
enum Op {
    /// `Image::write` of `len` bytes at `off`; bytes from `fill(seed, pos)`.
    Write { off: u64, len: u64, seed: u8 },
    /// `Image::write_zeroes`.
    Zero { off: u64, len: u64 },
}

/// The byte a write with `seed` puts at guest position `pos`: odd seeds
/// give one repeated byte (as `qemu-io write -P`), even seeds a
/// position-dependent pattern that catches misplaced data.
fn fill(seed: u8, pos: u64) -> u8 {
    if seed % 2 == 1 {
        seed
    } else {
        (pos.wrapping_mul(0x9E37_79B1) >> 13) as u8 ^ seed
    }
}

impl Op {
    fn describe(&self) -> String {
        match *self {
            Op::Write { off, len, seed } if seed % 2 == 1 => {
                format!("#   Image::write {off}+{len} (as qemu-io: write -P {seed} {off} {len})")
            }
            Op::Write { off, len, seed } => {
                format!("#   Image::write {off}+{len} position-dependent bytes, seed {seed}")
            }
            Op::Zero { off, len } => {
                format!("#   Image::write_zeroes {off}+{len} (as qemu-io: write -z {off} {len})")
            }
        }
    }
}

/// Where and how to write.
struct Target {
    /// Chain below the top, bottom first (may be empty).
    below: Vec<Layer>,
    /// The top layer (created by qemu-img over `below`; its ops are run by
    /// qemu-io before we write).
    top: Layer,
}

/// Apply `ops` through our API to the top of the chain described by `t`,
/// then judge the result with QEMU. `threads > 1` splits `ops` over that
/// many threads sharing one open chain (ops must then be disjoint).
fn run_writes(t: &Target, ops: &[Op], threads: usize) -> Result<(), String> {
    let s = Scratch::new();
    let top = build_target(&s, t);
    run_writes_on(&s, &top, &t.top.fmt, ops, threads)?;
    s.check_map(&top)
}

fn build_target(s: &Scratch, t: &Target) -> String {
    let mut layers = t.below.clone();
    layers.push(t.top.clone());
    s.build_chain(&layers)
}

/// [`run_writes`] on a chain that already exists in `s` (top `top` of
/// format `fmt`), without the final map comparison.
fn run_writes_on(
    s: &Scratch,
    top: &str,
    fmt: &str,
    ops: &[Op],
    threads: usize,
) -> Result<(), String> {
    let top = top.to_string();
    let fmt = fmt.to_string();
    let mut model = s.qemu_raw_bytes(&top);
    let size = model.len() as u64;
    s.note("# then, through imgpull's API (Chain::open writable, top.write/write_zeroes with chain.below(1)):");
    for op in ops {
        s.note(op.describe());
        match *op {
            Op::Write { off, len, seed } => {
                for i in 0..len {
                    model[(off + i) as usize] = fill(seed, off + i);
                }
            }
            Op::Zero { off, len } => model[off as usize..(off + len) as usize].fill(0),
        }
    }
    let path = s.path(&top);
    let ops_owned: Vec<Op> = ops.to_vec();
    let r = with_timeout(
        "writes through Image",
        Duration::from_secs(120),
        move || apply(&path, &ops_owned, threads),
    );
    r.map_err(|e| format!("write failed: {e}\n{}", s.reproducer()))?;
    std::fs::write(s.path("model.raw"), &model).map_err(|e| e.to_string())?;
    s.note("# model.raw: the expected guest bytes");
    s.qemu_check(&top)
        .map_err(|e| format!("{e}\n{}", s.reproducer()))?;
    let c = s.run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", &fmt, "model.raw", &top],
    );
    if !c.ok() {
        return Err(format!(
            "qemu-img compare: our written image differs from the model:\n{}\n{}",
            c.describe(),
            s.reproducer()
        ));
    }
    let got = read_through_chain(&s.path(&top), 256 * 1024 + 512, 0)
        .map_err(|e| format!("reading back: {e}\n{}", s.reproducer()))?;
    if let Some(at) = first_difference(&model, &got) {
        return Err(format!(
            "reading our written image back through Chain::read differs from the model at {at} (size {size})\n{}",
            s.reproducer()
        ));
    }
    Ok(())
}

fn apply(path: &std::path::Path, ops: &[Op], threads: usize) -> Result<(), String> {
    let chain = Arc::new(
        Chain::open(
            path,
            &ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())?,
    );
    let one = |ops: &[Op], chain: &Chain| -> Result<(), String> {
        let top = chain.top();
        let below = chain.below(1);
        for op in ops {
            match *op {
                Op::Write { off, len, seed } => {
                    let data: Vec<u8> = (0..len).map(|i| fill(seed, off + i)).collect();
                    top.write(off, &data, &below)
                }
                Op::Zero { off, len } => top.write_zeroes(off, len, &below),
            }
            .map_err(|e| format!("{op:?}: {e}"))?;
        }
        Ok(())
    };
    if threads <= 1 {
        one(ops, &chain)?;
    } else {
        let per = ops.len().div_ceil(threads);
        let results: Vec<Result<(), String>> = std::thread::scope(|sc| {
            let hs: Vec<_> = ops
                .chunks(per)
                .map(|part| {
                    let chain = chain.clone();
                    sc.spawn(move || one(part, &chain))
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("writer thread panicked".into()))
                })
                .collect()
        });
        for r in results {
            r?;
        }
    }
    chain.top().flush().map_err(|e| format!("flush: {e}"))
}

/// A fixed script that hits the edges of a layer with allocation unit
/// `unit` (cluster or subcluster) and virtual size `size`.
fn edge_script(size: u64, unit: u64) -> Vec<Op> {
    let u = unit;
    let mut v = vec![
        // Full units, aligned.
        Op::Write {
            off: 0,
            len: u,
            seed: 3,
        },
        // Head and tail copy-on-write inside one unit.
        Op::Write {
            off: 3 * u + 100,
            len: 200,
            seed: 4,
        },
        // Crossing a unit boundary, unaligned both ends.
        Op::Write {
            off: 5 * u - 7,
            len: 20,
            seed: 5,
        },
        // Several units with partial ends.
        Op::Write {
            off: 8 * u + 511,
            len: 3 * u + 2,
            seed: 6,
        },
        // Rewrite allocated data in place.
        Op::Write {
            off: 10,
            len: 30,
            seed: 7,
        },
        // Aligned zeroes (zero clusters where the format can).
        Op::Zero {
            off: 16 * u,
            len: 4 * u,
        },
        // Partial write into a zeroed unit (COW from zeros).
        Op::Write {
            off: 17 * u + 1,
            len: 1,
            seed: 9,
        },
        // Unaligned zeroes spanning allocated data.
        Op::Zero {
            off: 8 * u + 1000,
            len: u + 3,
        },
        // Zero a unit that was data, then write part of it again.
        Op::Zero { off: 0, len: u },
        Op::Write {
            off: u / 2,
            len: 1,
            seed: 11,
        },
        // Byte-granular tiny writes.
        Op::Write {
            off: 21 * u + 1,
            len: 1,
            seed: 13,
        },
        Op::Write {
            off: 21 * u + 3,
            len: 1,
            seed: 14,
        },
    ];
    // The last byte and the last unit of the image.
    v.push(Op::Write {
        off: size - 1,
        len: 1,
        seed: 15,
    });
    v.push(Op::Write {
        off: size - u.min(size),
        len: u.min(size) - 1,
        seed: 16,
    });
    // A large multi-unit write in the middle.
    let mid = size / 2 + 123;
    v.push(Op::Write {
        off: mid,
        len: (8 * u).min(size - mid),
        seed: 18,
    });
    v.push(Op::Zero {
        off: size - 2 * u,
        len: 2 * u,
    });
    v.retain(|op| match *op {
        Op::Write { off, len, .. } | Op::Zero { off, len } => len > 0 && off + len <= size,
    });
    v
}

/// The top-layer configurations written to.
fn top_formats() -> Vec<(Fmt, u64)> {
    // (format, allocation unit for the edge script)
    vec![
        (Fmt::qcow2("cluster_size=64k"), 64 * KIB),
        (Fmt::qcow2("cluster_size=4k"), 4 * KIB),
        (Fmt::qcow2("cluster_size=512"), 512),
        (Fmt::qcow2("cluster_size=2M"), 2 * MIB),
        (Fmt::qcow2("compat=0.10,cluster_size=4k"), 4 * KIB),
        (Fmt::qcow2("extended_l2=on,cluster_size=64k"), 2 * KIB),
        (Fmt::qcow2("extended_l2=on,cluster_size=32k"), KIB),
        (Fmt::qcow2("refcount_bits=1,cluster_size=4k"), 4 * KIB),
        (Fmt::qcow2("refcount_bits=64,cluster_size=4k"), 4 * KIB),
        (Fmt::qcow2("lazy_refcounts=on,cluster_size=4k"), 4 * KIB),
        (Fmt::qcow2("compression_type=zstd,cluster_size=4k"), 4 * KIB),
        (Fmt::qed("cluster_size=4k,table_size=2"), 4 * KIB),
        (Fmt::qed("cluster_size=64k"), 64 * KIB),
        (Fmt::qed("cluster_size=1M,table_size=4"), MIB),
    ]
}

/// Backings to write over: none, a shorter raw file, a qcow2 with
/// compressed clusters, a QED, a depth-2 chain; each with content.
fn backings(size: u64, seed: u64) -> Vec<(&'static str, Vec<Layer>)> {
    let mut rng = Rng::new(seed);
    let raw = Fmt::raw().layer("b.raw", size / 2 + 4096, &mut rng, 8);
    let mut q = Fmt::qcow2("cluster_size=4k").layer("b.qcow2", size, &mut rng, 8);
    // Compressed first: QEMU cannot compress into allocated clusters.
    q.ops
        .insert(0, format!("write -c -P 33 {} {}", 16 * KIB, 16 * KIB));
    q.ops.insert(
        1,
        format!("write -c -P 34 {} {}", size / 2 / 4096 * 4096, 8 * KIB),
    );
    let qed = Fmt::qed("cluster_size=4k,table_size=4").layer("b.qed", size + 8192, &mut rng, 8);
    let l0 = Fmt::qcow2("compat=0.10,cluster_size=64k").layer("l0.qcow2", size, &mut rng, 6);
    let l1 = Fmt::qed("cluster_size=64k").layer("l1.qed", size - 65536, &mut rng, 6);
    vec![
        ("no backing", vec![]),
        ("shorter raw", vec![raw]),
        ("qcow2 with compressed clusters", vec![q]),
        ("longer qed", vec![qed]),
        ("qcow2 v2 <- qed", vec![l0, l1]),
    ]
}

/// Edge scripts into every top format over every backing.
#[test]
fn edge_scripts_over_backings() {
    let mut f = Failures::new();
    for (i, (fmt, unit)) in top_formats().into_iter().enumerate() {
        let size = (24 * unit).max(2 * MIB) + 512 * 3;
        // Fewer backings for the slowest configurations.
        for (j, (bname, below)) in backings(size, 40 + i as u64).into_iter().enumerate() {
            if unit >= MIB && j != 0 && j != 2 {
                continue;
            }
            let top = Layer::new(&format!("top.{}", fmt.ext()), fmt.fmt, size).opts(&fmt.opts);
            let case = format!("{} [{}] over {bname}", fmt.fmt, fmt.opts);
            let ops = edge_script(size, unit);
            f.check(
                &case,
                catch(move || run_writes(&Target { below, top }, &ops, 1)),
            );
        }
    }
    f.finish();
}

/// Writing over data QEMU put in the top layer: its own data clusters,
/// zero clusters, compressed clusters (COW from compressed), discarded
/// ranges, preallocated metadata.
#[test]
fn writes_over_existing_top_content() {
    let mut f = Failures::new();
    let configs = [
        Fmt::qcow2("cluster_size=4k"),
        Fmt::qcow2("compat=0.10,cluster_size=4k"),
        Fmt::qcow2("extended_l2=on,cluster_size=64k"),
        Fmt::qcow2("compression_type=zstd,cluster_size=64k"),
        // With a backing file QEMU allows preallocation only with extended L2.
        Fmt::qcow2("preallocation=metadata,extended_l2=on,cluster_size=32k"),
        Fmt::qed("cluster_size=4k,table_size=4"),
    ];
    for (i, fmt) in configs.into_iter().enumerate() {
        let size = 2 * MIB;
        let mut rng = Rng::new(70 + i as u64);
        let base = Fmt::qcow2("cluster_size=64k").layer("base.qcow2", size, &mut rng, 6);
        let mut top = fmt.layer(&format!("top.{}", fmt.ext()), size, &mut rng, 12);
        if fmt.fmt == "qcow2" && !fmt.opts.contains("preallocation") {
            // Compressed first: QEMU cannot compress into allocated clusters.
            top.ops
                .insert(0, format!("write -c -P 21 0 {}", 4 * fmt.cluster));
            top.ops.insert(
                1,
                format!("write -c -P 22 {} {}", 8 * fmt.cluster, fmt.cluster),
            );
        }
        let mut ops = Vec::new();
        let mut r = Rng::new(90 + i as u64);
        for k in 0..24u8 {
            let off = r.below(size - 1);
            let len = 1 + r.below((3 * fmt.cluster).min(size - off));
            ops.push(if k % 5 == 4 {
                Op::Zero { off, len }
            } else {
                Op::Write {
                    off,
                    len,
                    seed: k.wrapping_mul(7),
                }
            });
        }
        ops.push(Op::Write {
            off: 100,
            len: 50,
            seed: 1,
        });
        ops.push(Op::Write {
            off: 8 * fmt.cluster + 5,
            len: 5,
            seed: 2,
        });
        let case = format!("{} [{}] with existing content", fmt.fmt, fmt.opts);
        f.check(
            &case,
            catch(move || {
                run_writes(
                    &Target {
                        below: vec![base],
                        top,
                    },
                    &ops,
                    1,
                )
            }),
        );
    }
    f.finish();
}

/// Enough allocations with small clusters and wide refcounts that the
/// refcount table must grow (512-byte clusters with 64-bit refcounts:
/// one refcount block covers 32 KiB of file, the first table 2 MiB).
#[test]
fn refcount_table_growth() {
    let mut f = Failures::new();
    for opts in [
        "cluster_size=512,refcount_bits=64",
        "cluster_size=512,refcount_bits=16,compat=0.10",
        "cluster_size=1024,refcount_bits=32",
    ] {
        let fmt = Fmt::qcow2(opts);
        let size = 16 * MIB;
        let top = Layer::new("grow.qcow2", "qcow2", size).opts(opts);
        // Scattered writes: every allocation a new cluster (and L2 tables).
        let ops: Vec<Op> = (0..600u64)
            .map(|k| Op::Write {
                off: (k * 7919 * 512) % (size - 4096) + (k % 3),
                len: 700 + (k % 5) * 1000,
                seed: (k % 250) as u8,
            })
            .collect();
        f.check(
            &format!("qcow2 [{}]", fmt.opts),
            catch(move || run_writes(&Target { below: vec![], top }, &ops, 1)),
        );
    }
    f.finish();
}

/// Four threads writing interleaved 512-byte pieces into the same
/// clusters of one shared open image (allocation and COW races).
#[test]
fn concurrent_writers_share_one_image() {
    let mut f = Failures::new();
    for fmt in [
        Fmt::qcow2("cluster_size=4k"),
        Fmt::qcow2("extended_l2=on,cluster_size=64k"),
        Fmt::qed("cluster_size=4k,table_size=4"),
    ] {
        let size = 2 * MIB;
        let mut rng = Rng::new(5);
        let base = Fmt::qcow2("cluster_size=64k").layer("base.qcow2", size, &mut rng, 8);
        let top = Layer::new(&format!("top.{}", fmt.ext()), fmt.fmt, size).opts(&fmt.opts);
        // Thread t (of 4) gets pieces k*2048 + t*512; the pieces are
        // ordered so each thread's list is contiguous in `ops`.
        let threads = 4u64;
        let mut ops = Vec::new();
        for t in 0..threads {
            for k in 0..200u64 {
                let off = (k * 2048 * 5) % (size - 2048) / 2048 * 2048 + t * 512;
                ops.push(if k % 7 == 6 {
                    Op::Zero { off, len: 512 }
                } else {
                    Op::Write {
                        off,
                        len: 512,
                        seed: (t * 50 + k % 50) as u8,
                    }
                });
            }
        }
        // Offsets repeat only within one thread (whose order is kept), so
        // the model does not depend on how the threads interleave.
        let case = format!("{} [{}] 4 threads", fmt.fmt, fmt.opts);
        f.check(
            &case,
            catch(move || {
                run_writes(
                    &Target {
                        below: vec![base],
                        top,
                    },
                    &ops,
                    threads as usize,
                )
            }),
        );
    }
    f.finish();
}

// ---------------------------------------------------------------------
// The property test.
// ---------------------------------------------------------------------

/// Top formats for the property (small clusters so few bytes cover many).
const PROP_TOPS: &[(&str, &str)] = &[
    ("qcow2", "cluster_size=4k"),
    ("qcow2", "cluster_size=512"),
    ("qcow2", "compat=0.10,cluster_size=4k"),
    ("qcow2", "extended_l2=on,cluster_size=64k"),
    ("qcow2", "extended_l2=on,cluster_size=32k,refcount_bits=1"),
    ("qed", "cluster_size=4k,table_size=2"),
    ("qed", "cluster_size=64k,table_size=4"),
];

/// Backing kinds for the property.
const PROP_BACKINGS: &[(&str, &str)] = &[
    ("none", ""),
    ("raw", ""),
    ("qcow2", "cluster_size=4k"),
    ("qcow2", "compat=0.10,cluster_size=64k"),
    ("qed", "cluster_size=4k,table_size=4"),
];

const PROP_SIZE: u64 = MIB;

#[derive(Clone, Debug)]
struct PropCase {
    top: usize,
    backing: usize,
    /// Backing size in 64 KiB units (8..=24 → shorter, equal or longer).
    backing_units: u64,
    backing_seed: u64,
    ops: Vec<Op>,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let size = PROP_SIZE;
    // Offsets near allocation boundaries are the interesting ones.
    let off = prop_oneof![
        0..size,
        (
            0..size / 4096,
            0u64..3,
            prop_oneof![Just(0u64), 1..16u64, 4080..4096u64]
        )
            .prop_map(move |(c, k, j)| (c * 4096 + k * 512 + j).min(size - 1)),
        (0..size / 65536, 0..32u64).prop_map(|(c, s)| c * 65536 + s * 2048),
    ];
    let len = prop_oneof![
        1..64u64,
        1..4097u64,
        4096..140_000u64,
        Just(65536u64),
        Just(2048u64)
    ];
    (off, len, any::<u8>(), prop::bool::weighted(0.2)).prop_map(move |(off, len, seed, zero)| {
        let len = len.min(size - off).max(1);
        if zero {
            Op::Zero { off, len }
        } else {
            Op::Write { off, len, seed }
        }
    })
}

fn prop_case(tops: std::ops::Range<usize>) -> impl Strategy<Value = PropCase> {
    (
        tops,
        0..PROP_BACKINGS.len(),
        8u64..=24,
        any::<u64>(),
        prop::collection::vec(op_strategy(), 1..24),
    )
        .prop_map(
            |(top, backing, backing_units, backing_seed, ops)| PropCase {
                top,
                backing,
                backing_units,
                backing_seed,
                ops,
            },
        )
}

fn run_prop(c: &PropCase) -> Result<(), String> {
    let (tf, to) = PROP_TOPS[c.top];
    let (bf, bo) = PROP_BACKINGS[c.backing];
    let mut below = Vec::new();
    if bf != "none" {
        let bsize = c.backing_units * 64 * KIB;
        let kinds = match bf {
            "raw" => OpKinds::RAW,
            "qed" => OpKinds::QED,
            _ => OpKinds::QCOW2,
        };
        let cluster = common::cases::opt_size(bo, "cluster_size").unwrap_or(4 * KIB);
        let mut rng = Rng::new(c.backing_seed);
        let ops = gen_ops(&mut rng, bsize, cluster, 6, kinds);
        below.push(
            Layer::new(&format!("back.{bf}"), bf, bsize)
                .opts(bo)
                .ops(ops),
        );
    }
    let top = Layer::new(&format!("top.{tf}"), tf, PROP_SIZE).opts(to);
    // The property judges the write path only (check, compare, read-back);
    // maps are compared by the deterministic tests, so a known map
    // difference cannot mask a write bug here.
    let s = Scratch::new();
    let t = Target { below, top };
    let name = build_target(&s, &t);
    run_writes_on(&s, &name, &t.top.fmt, &c.ops, 1)
}

fn prop_config() -> ProptestConfig {
    let cases = std::env::var("IMGPULL_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    ProptestConfig {
        cases,
        // Every case runs QEMU; keep shrinking bounded.
        max_shrink_iters: 256,
        max_shrink_time: 120_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(prop_config())]

    /// Random writes and zero writes into qcow2 layers (v2, v3, extended
    /// L2, small clusters) over random backings.
    #[test]
    fn prop_random_writes_qcow2(c in prop_case(0..5)) {
        if let Err(e) = catch(move || run_prop(&c)) {
            return Err(TestCaseError::fail(e));
        }
    }

    /// Random writes and zero writes into QED layers over random backings.
    #[test]
    fn prop_random_writes_qed(c in prop_case(5..PROP_TOPS.len())) {
        if let Err(e) = catch(move || run_prop(&c)) {
            return Err(TestCaseError::fail(e));
        }
    }
}

// ---------------------------------------------------------------------
// Dirty images and header edits.
// ---------------------------------------------------------------------

/// Images left dirty by a crash (qcow2 lazy refcounts: qemu-io `abort`
/// after allocating writes; QED with NEED_CHECK set) are repaired when we
/// open them for writing: after our writes, `qemu-img check` is clean and
/// the content is the model.
#[test]
fn dirty_images_repaired_on_write_open() {
    let mut f = Failures::new();
    for (fmt, opts) in [
        ("qcow2", "lazy_refcounts=on,cluster_size=4k"),
        ("qcow2", "lazy_refcounts=on,cluster_size=64k,extended_l2=on"),
        ("qed", "cluster_size=4k,table_size=4"),
    ] {
        f.check(
            &format!("{fmt} [{opts}] left dirty"),
            catch(move || {
                let s = Scratch::new();
                let name = format!("dirty.{fmt}");
                s.qemu_img(&["create", "-q", "-f", fmt, "-o", opts, &name, "2M"]);
                // Allocating writes, then a crash.
                let o = s.run(
                    "qemu-io",
                    &[
                        "-f",
                        fmt,
                        "-c",
                        "write -P 1 0 12k",
                        "-c",
                        "write -P 2 1M 64k",
                        "-c",
                        "write -P 3 300k 5k",
                        "-c",
                        "abort",
                        &name,
                    ],
                );
                if o.ok() {
                    return Err(format!("setup: qemu-io abort exited 0\n{}", o.describe()));
                }
                if fmt == "qcow2" {
                    if common::get_be64(&s.path(&name), 72) & 1 == 0 {
                        return Err("setup: no dirty bit after the crash".into());
                    }
                } else {
                    let feat = common::get_le64(&s.path(&name), 16);
                    s.le64(&name, 16, feat | 2);
                }
                let ops = vec![
                    Op::Write {
                        off: 4096,
                        len: 100,
                        seed: 5,
                    },
                    Op::Write {
                        off: 1 << 20,
                        len: 3000,
                        seed: 6,
                    },
                    Op::Zero {
                        off: 300 * KIB,
                        len: 4096,
                    },
                    Op::Write {
                        off: 1500 * KIB,
                        len: 70000,
                        seed: 8,
                    },
                ];
                run_writes_on(&s, &name, fmt, &ops, 1)?;
                let info = s.qemu_info(&name, false);
                if info["dirty-flag"] != serde_json::json!(false) {
                    return Err(format!(
                        "the image is still marked dirty after our writes and flush: {}\n{}",
                        info["dirty-flag"],
                        s.reproducer()
                    ));
                }
                s.check_map(&name)
            }),
        );
    }
    f.finish();
}

/// `Image::set_backing` rewrites the backing reference (name and format)
/// or removes it; qemu-img then sees the new chain, check stays clean, and
/// unknown qcow2 header extensions survive the rewrite byte for byte.
#[test]
fn set_backing_rewrites_header() {
    let mut f = Failures::new();
    for (fmt, opts) in [
        ("qcow2", "cluster_size=4k"),
        ("qcow2", "compat=0.10,cluster_size=4k"),
        ("qed", "cluster_size=4k,table_size=4"),
    ] {
        for new_backing in [
            Some(("other-backing-file.raw", "raw")),
            Some(("b2.qed", "qed")),
            None,
        ] {
            let case = format!("{fmt} [{opts}] -> {new_backing:?}");
            f.check(
                &case,
                catch(move || {
                    let s = Scratch::new();
                    s.qemu_img(&["create", "-q", "-f", "qcow2", "b1.qcow2", "1M"]);
                    s.qemu_io("qcow2", "b1.qcow2", &["write -P 1 0 1M".into()]);
                    s.qemu_img(&["create", "-q", "-f", "raw", "other-backing-file.raw", "1M"]);
                    s.qemu_io("raw", "other-backing-file.raw", &["write -P 2 0 512k".into()]);
                    s.qemu_img(&["create", "-q", "-f", "qed", "b2.qed", "1M"]);
                    s.qemu_io("qed", "b2.qed", &["write -P 3 256k 256k".into()]);
                    let top = format!("top.{fmt}");
                    s.qemu_img(&[
                        "create", "-q", "-f", fmt, "-o", opts, "-b", "b1.qcow2", "-F", "qcow2", &top,
                    ]);
                    s.qemu_io(fmt, &top, &["write -P 9 64k 4k".into()]);
                    // An unknown header extension that must survive.
                    let ext = b"\x7e\x57\x7e\x57\x00\x00\x00\x08keepme!!\x00\x00\x00\x00\x00\x00\x00\x00";
                    let mut ext_at = None;
                    if fmt == "qcow2" {
                        // Insert it before the end marker, moving the
                        // backing file name (stored right after the
                        // extensions) behind it.
                        let tp = s.path(&top);
                        let end = common::qcow2_extension(&tp, 0).ok_or("no extension end")?;
                        let name_off = common::get_be64(&tp, 8);
                        let name_len = common::get_be32(&tp, 16) as usize;
                        let name = common::read_bytes(&tp, name_off, name_len);
                        let mut block = ext.to_vec();
                        block.extend_from_slice(&name);
                        s.patch(&top, end, &block);
                        s.be64(&top, 8, end + 24);
                        ext_at = Some(end);
                        s.qemu_check(&top).map_err(|e| format!("setup: {e}"))?;
                        let i = s.qemu_info(&top, false);
                        if i["backing-filename"] != "b1.qcow2" {
                            return Err(format!("setup: extension insertion broke the header: {i}"));
                        }
                    }
                    s.note(format!("# imgpull: Image::set_backing({new_backing:?}) on {top}"));
                    let p = s.path(&top);
                    let nb = new_backing.map(|(n, f)| imgpull_image::BackingFile {
                        name: n.to_string(),
                        format: Some(f.to_string()),
                    });
                    let r = with_timeout("set_backing", Duration::from_secs(30), move || {
                        let img = imgpull_image::Image::open(
                            &p,
                            &imgpull_image::OpenOptions {
                                writable: true,
                                ..Default::default()
                            },
                        )
                        .map_err(|e| e.to_string())?;
                        img.set_backing(nb.as_ref()).map_err(|e| e.to_string())?;
                        img.flush().map_err(|e| e.to_string())
                    });
                    r.map_err(|e| format!("set_backing failed: {e}\n{}", s.reproducer()))?;
                    s.qemu_check(&top).map_err(|e| format!("{e}\n{}", s.reproducer()))?;
                    let info = s.qemu_info(&top, false);
                    let (want_name, want_fmt) = match new_backing {
                        Some((n, f)) => (serde_json::json!(n), serde_json::json!(f)),
                        None => (serde_json::Value::Null, serde_json::Value::Null),
                    };
                    let got_name = info.get("backing-filename").cloned().unwrap_or(serde_json::Value::Null);
                    let got_fmt = info.get("backing-filename-format").cloned().unwrap_or(serde_json::Value::Null);
                    // QED records a format only for raw backings (as the
                    // no-probe flag); qemu-img then shows none for others.
                    let fmt_ok = got_fmt == want_fmt || (fmt == "qed" && want_fmt == "qed" && got_fmt.is_null());
                    if got_name != want_name || !fmt_ok {
                        return Err(format!(
                            "qemu-img info after set_backing: backing {got_name} format {got_fmt}, want {want_name} {want_fmt}\n{}",
                            s.reproducer()
                        ));
                    }
                    if let Some(at) = ext_at {
                        let now = common::qcow2_extension(&s.path(&top), 0x7e57_7e57);
                        let bytes = now.map(|o| common::read_bytes(&s.path(&top), o, 16));
                        if bytes.as_deref() != Some(&ext[..16]) {
                            return Err(format!(
                                "the unknown header extension (was at {at}) did not survive set_backing: now {now:?} {bytes:?}\n{}",
                                s.reproducer()
                            ));
                        }
                    }
                    // The guest view is the new chain's.
                    let mut model = match new_backing {
                        Some((n, _)) => s.qemu_raw_bytes(n),
                        None => vec![0u8; 1 << 20],
                    };
                    model.resize(1 << 20, 0);
                    model[64 * 1024..68 * 1024].fill(9);
                    let got = read_through_chain(&s.path(&top), 1 << 20, 0)?;
                    if let Some(at) = first_difference(&model, &got) {
                        return Err(format!("content after set_backing differs at {at}\n{}", s.reproducer()));
                    }
                    Ok(())
                }),
            );
        }
    }
    f.finish();
}
