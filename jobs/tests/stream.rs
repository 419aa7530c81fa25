//! The stream job on chains made by qemu-img / qemu-io, judged by QEMU:
//! after a pull `qemu-img compare` with the original guest content says
//! identical, `qemu-img check` is clean, `qemu-img info` shows the expected
//! backing, the other layers are byte-for-byte untouched, and no range that
//! no layer held got allocated in the top.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use imgpull_chain::{Chain, ChainOptions};
use imgpull_jobs::{EventBus, Job, JobOptions, JobStatus, Outcome, StreamJob, StreamOptions};
use serde_json::Value;

/// One pull scenario: layers bottom first; `base` indexes them.
struct Case {
    name: String,
    layers: Vec<Layer>,
    base: Option<usize>,
    keep_relative: bool,
}

impl Case {
    fn new(name: &str, layers: Vec<Layer>) -> Case {
        Case {
            name: name.into(),
            layers,
            base: None,
            keep_relative: false,
        }
    }
    fn base(mut self, i: usize) -> Case {
        self.base = Some(i);
        self
    }
    fn relative(mut self) -> Case {
        self.keep_relative = true;
        self
    }
}

fn expected_backing(c: &Case, d: &Dir) -> (Option<String>, Option<String>) {
    let top = c.layers.last().unwrap();
    match c.base {
        None => (None, None),
        Some(b) => {
            let base = &c.layers[b];
            let name = if c.keep_relative {
                relative_name(&top.name, &base.name)
            } else {
                d.path(&base.name).to_string_lossy().into_owned()
            };
            let fmt = match top.fmt.as_str() {
                "qed" => (base.fmt == "raw").then(|| "raw".to_string()),
                _ => Some(base.fmt.clone()),
            };
            (Some(name), fmt)
        }
    }
}

/// Build, pull, judge. Returns the scratch dir for extra checks.
fn run_case(c: &Case, opts: StreamOptions) -> Dir {
    let d = Dir::new();
    d.build(&c.layers);
    let top = c.layers.last().unwrap().name.clone();
    d.dump(&top, "orig.raw");
    let map_before = d.map(&top);
    let before = snapshot(&d, &c.layers);
    let size = c.layers.last().unwrap().size;
    let base_path = c.base.map(|b| d.path(&c.layers[b].name));
    let opts = StreamOptions {
        keep_relative: c.keep_relative,
        ..opts
    };
    let p = pull(&d.path(&top), base_path.as_deref(), opts, 0);
    let ctx = &c.name;
    assert_eq!(p.outcome, Outcome::Completed, "{ctx}");
    assert_eq!(p.progress, (size, size), "{ctx}: progress");
    d.check(&top).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    d.compare("orig.raw", &top)
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let info = d.info(&top);
    let (want_name, want_fmt) = expected_backing(c, &d);
    assert_eq!(
        info["backing-filename"].as_str().map(String::from),
        want_name,
        "{ctx}: backing name"
    );
    assert_eq!(
        info["backing-filename-format"].as_str().map(String::from),
        want_fmt,
        "{ctx}: backing format"
    );
    for l in &c.layers[..c.layers.len() - 1] {
        assert!(
            before[&l.name] == d.bytes(&l.name),
            "{ctx}: {} was modified",
            l.name
        );
    }
    // Whole granules of the top that no layer held stay unallocated (a
    // granule that must be allocated for a neighbouring piece of data is
    // allocated whole), except where a shorter intermediate layer hid data
    // of the kept base, which the top must now mask.
    let map_after = d.map(&top);
    let g = top_granule(c.layers.last().unwrap());
    let mut unalloc = shrink_to(&unallocated_ranges(&map_before), g);
    if let Some(b) = c.base {
        let base_data: Vec<(u64, u64)> = d
            .map(&c.layers[b].name)
            .iter()
            .filter(|e| e["data"] == Value::Bool(true))
            .map(|e| {
                let s = e["start"].as_u64().unwrap();
                let e = s + e["length"].as_u64().unwrap();
                (s / g * g, e.div_ceil(g) * g)
            })
            .collect();
        unalloc = subtract(&unalloc, &base_data);
    }
    if let Some(r) = overlap(&unalloc, &top_ranges(&map_after)) {
        panic!("{ctx}: range {r:?} was unallocated in the whole chain but got allocated");
    }
    d
}

/// The top's allocation unit (subcluster with extended L2).
fn top_granule(l: &Layer) -> u64 {
    if l.opts.contains("extended_l2=on") {
        l.cluster() / 32
    } else {
        l.cluster()
    }
}

/// The whole `g`-granules inside each range.
fn shrink_to(r: &[(u64, u64)], g: u64) -> Vec<(u64, u64)> {
    r.iter()
        .map(|&(s, e)| (s.div_ceil(g) * g, e / g * g))
        .filter(|(s, e)| s < e)
        .collect()
}

/// `a` minus every range of `b`.
fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in a {
        let mut pieces = vec![(s, e)];
        for &(bs, be) in b {
            pieces = pieces
                .into_iter()
                .flat_map(|(ps, pe)| {
                    if be <= ps || pe <= bs {
                        vec![(ps, pe)]
                    } else {
                        [(ps, bs.max(ps)), (be.min(pe), pe)]
                            .into_iter()
                            .filter(|(x, y)| x < y)
                            .collect()
                    }
                })
                .collect();
        }
        out.extend(pieces);
    }
    out
}

fn run(c: Case) -> Dir {
    run_case(&c, StreamOptions::default())
}

/// The map entry covering guest offset `off`.
fn entry_at(map: &[Value], off: u64) -> Value {
    map.iter()
        .find(|e| {
            let s = e["start"].as_u64().unwrap();
            s <= off && off < s + e["length"].as_u64().unwrap()
        })
        .cloned()
        .unwrap()
}

fn data_ops() -> Vec<&'static str> {
    vec![
        "write -P 0x11 0 1M",
        "write -P 0x12 1536k 700k",
        "write -P 0x13 3000k 512",
    ]
}

#[test]
fn qcow2_and_qed_tops_over_raw() {
    for top_fmt in ["qcow2", "qed"] {
        let layers = vec![
            Layer::new("base.raw", "raw", 4 * MIB).ops(data_ops()),
            Layer::new("top", top_fmt, 4 * MIB).ops(["write -P 0x77 100k 8k"]),
        ];
        run(Case::new(&format!("{top_fmt} over raw"), layers));
    }
}

#[test]
fn depth_three_with_and_without_base() {
    let layers = || {
        vec![
            Layer::new("base.raw", "raw", 4 * MIB).ops(data_ops()),
            Layer::new("mid.qed", "qed", 4 * MIB).ops([
                "write -P 0x21 512k 100k",
                "write -z 0 64k",
                "write -P 0x22 2M 4k",
            ]),
            Layer::new("top.qcow2", "qcow2", 4 * MIB).ops(["write -P 0x31 700k 3k"]),
        ]
    };
    run(Case::new("depth3 full", layers()));
    run(Case::new("depth3 base=raw", layers()).base(0));
    run(Case::new("depth3 base=raw relative", layers())
        .base(0)
        .relative());
    // The base is the immediate backing: nothing to copy, backing rewritten.
    let d = run(Case::new("depth3 base=mid", layers()).base(1));
    let _ = d;
}

#[test]
fn depth_four_across_directories_relative() {
    let layers = || {
        vec![
            Layer::new("a/base.qcow2", "qcow2", 6 * MIB).ops([
                "write -P 0x41 0 2M",
                "write -c -P 0x42 2M 128k",
                "write -z 3M 64k",
            ]),
            Layer::new("b/mid.qed", "qed", 6 * MIB).ops([
                "write -P 0x51 1M 33k",
                "write -z 2M 64k",
                "write -P 0x52 5M 1M",
            ]),
            Layer::new("c/mid2.qcow2", "qcow2", 6 * MIB)
                .opts("compat=0.10,cluster_size=4k")
                .ops(["write -P 0x61 3M 5k", "write -P 0x62 1536k 512"]),
            Layer::new("d/e/top.qcow2", "qcow2", 6 * MIB)
                .opts("extended_l2=on")
                .ops(["write -P 0x71 10k 2k", "write -z 4M 4k"]),
        ]
    };
    run(Case::new("depth4 full", layers()));
    run(Case::new("depth4 base=a relative", layers())
        .base(0)
        .relative());
    run(Case::new("depth4 base=b relative", layers())
        .base(1)
        .relative());
    run(Case::new("depth4 base=b absolute", layers()).base(1));
}

#[test]
fn depth_eight() {
    let fmts = [
        "raw", "qed", "qcow2", "qcow2", "qed", "qcow2", "qed", "qcow2",
    ];
    let opts = [
        "",
        "cluster_size=4k",
        "compat=0.10",
        "extended_l2=on",
        "",
        "cluster_size=512",
        "",
        "",
    ];
    let layers = || {
        (0..8)
            .map(|i| {
                let name = format!("d{}/l{i}.{}", i % 3, fmts[i]);
                Layer::new(&name, fmts[i], 8 * MIB).opts(opts[i]).ops([
                    format!("write -P {} {} 300k", 0x10 + i, i as u64 * 900 * KIB),
                    format!("write -z {} 64k", (i as u64 + 1) * 700 * KIB),
                    format!(
                        "write -P {} {} 512",
                        0x40 + i,
                        7 * MIB + i as u64 * 4096 + 512
                    ),
                ])
            })
            .collect::<Vec<_>>()
    };
    run(Case::new("depth8 full", layers()));
    run(Case::new("depth8 base=l0 relative", layers())
        .base(0)
        .relative());
    run(Case::new("depth8 base=l3", layers()).base(3));
    run(Case::new("depth8 base=l5 relative", layers())
        .base(5)
        .relative());
}

#[test]
fn qed_top_records_a_format_only_for_raw() {
    let layers = || {
        vec![
            Layer::new("base.qcow2", "qcow2", 4 * MIB).ops(data_ops()),
            Layer::new("mid.qcow2", "qcow2", 4 * MIB).ops(["write -P 0x21 1M 1M"]),
            Layer::new("top.qed", "qed", 4 * MIB).ops(["write -P 0x31 0 4k"]),
        ]
    };
    run(Case::new("qed over qcow2 base", layers()).base(0));
    let layers = vec![
        Layer::new("base.raw", "raw", 4 * MIB).ops(data_ops()),
        Layer::new("mid.qcow2", "qcow2", 4 * MIB).ops(["write -P 0x21 1M 1M"]),
        Layer::new("top.qed", "qed", 4 * MIB),
    ];
    run(Case::new("qed over raw base", layers).base(0).relative());
}

#[test]
fn cluster_sizes_512_to_2m() {
    let combos = [
        ("qcow2", "cluster_size=512", "qcow2", "cluster_size=2M"),
        ("qcow2", "cluster_size=2M", "qcow2", "cluster_size=512"),
        ("qed", "cluster_size=4k", "qcow2", "cluster_size=2M"),
        ("qcow2", "cluster_size=2M", "qed", "cluster_size=4k"),
        ("qcow2", "cluster_size=512", "qed", "cluster_size=1M"),
    ];
    for (tf, to, mf, mo) in combos {
        let layers = || {
            vec![
                Layer::new("base.raw", "raw", 5 * MIB).ops(data_ops()),
                Layer::new("mid", mf, 5 * MIB).opts(mo).ops([
                    "write -P 0x21 1000k 3k",
                    "write -z 2M 1M",
                    "write -P 0x22 4M 512",
                ]),
                Layer::new("top", tf, 5 * MIB)
                    .opts(to)
                    .ops(["write -P 0x31 4096 512", "write -P 0x32 3M 70k"]),
            ]
        };
        let name = format!("{tf}({to}) over {mf}({mo})");
        run(Case::new(&name, layers()));
        run(Case::new(&format!("{name} base=raw"), layers()).base(0));
    }
}

#[test]
fn extended_l2_subclusters() {
    let layers = || {
        vec![
            Layer::new("base.qcow2", "qcow2", 4 * MIB)
                .opts("extended_l2=on,cluster_size=64k")
                .ops(["write -P 0x11 0 3M", "write -z 70k 2k"]),
            Layer::new("mid.qcow2", "qcow2", 4 * MIB)
                .opts("extended_l2=on,cluster_size=32k")
                .ops([
                    "write -P 0x21 1k 1k",
                    "write -z 100k 3k",
                    "write -P 0x22 1M 5k",
                ]),
            Layer::new("top.qcow2", "qcow2", 4 * MIB)
                .opts("extended_l2=on,cluster_size=128k")
                .ops(["write -P 0x31 4k 4k", "write -P 0x32 129k 1k"]),
        ]
    };
    run(Case::new("extended l2 full", layers()));
    run(Case::new("extended l2 base=base", layers()).base(0));
}

#[test]
fn compressed_clusters_in_backings() {
    for top_fmt in ["qcow2", "qed"] {
        let layers = || {
            vec![
                Layer::new("base.qcow2", "qcow2", 4 * MIB)
                    .ops(["write -c -P 0x11 0 1M", "write -P 0x12 2M 1M"]),
                Layer::new("mid.qcow2", "qcow2", 4 * MIB)
                    .opts("cluster_size=4k")
                    .ops(["write -c -P 0x21 512k 8k", "write -c -P 0x22 3M 4k"]),
                Layer::new("top", top_fmt, 4 * MIB),
            ]
        };
        run(Case::new(&format!("compressed, {top_fmt} top"), layers()));
        run(Case::new(&format!("compressed, {top_fmt} top, base"), layers()).base(0));
    }
}

#[test]
fn zero_ranges_hiding_base_data_become_zero_clusters() {
    for (top_fmt, opts) in [("qcow2", ""), ("qed", ""), ("qcow2", "compat=0.10")] {
        let layers = || {
            vec![
                Layer::new("base.raw", "raw", 4 * MIB).ops(["write -P 0x11 0 4M"]),
                Layer::new("mid.qcow2", "qcow2", 4 * MIB).ops([
                    "write -z 1M 1M",
                    "write -z 3M 4k",
                    "write -P 0x21 2M 64k",
                ]),
                Layer::new("top", top_fmt, 4 * MIB).opts(opts),
            ]
        };
        let name = format!("zeros over data, {top_fmt} {opts}");
        let d = run(Case::new(&name, layers()).base(0));
        let m = d.map("top");
        let e = entry_at(&m, 1024 * KIB + 5);
        assert_eq!(e["depth"], 0, "{name}: masked in the top: {e}");
        if opts.is_empty() {
            assert_eq!(e["zero"], Value::Bool(true), "{name}: {e}");
            assert_eq!(e["data"], Value::Bool(false), "{name}: a zero cluster: {e}");
        } else {
            // qcow2 v2 has no zero flag: zeros written as data.
            assert_eq!(e["data"], Value::Bool(true), "{name}: {e}");
        }
        // Without a base the zeros need nothing below them.
        let d = run(Case::new(&format!("{name}, no base"), layers()));
        if opts == "compat=0.10" {
            let m = d.map("top");
            let e = entry_at(&m, 1024 * KIB + 5);
            assert_eq!(
                e["present"],
                Value::Bool(false),
                "{name}: v2 needs no data: {e}"
            );
        }
    }
}

#[test]
fn backings_shorter_than_the_top() {
    for (top_fmt, opts) in [("qcow2", ""), ("qed", ""), ("qcow2", "compat=0.10")] {
        let layers = || {
            vec![
                Layer::new("base.raw", "raw", 6 * MIB).ops(["write -P 0x11 0 6M"]),
                Layer::new("mid.qcow2", "qcow2", 3 * MIB).ops(["write -P 0x21 1M 64k"]),
                Layer::new("mid2.qcow2", "qcow2", 5 * MIB).ops(["write -P 0x31 4M 64k"]),
                Layer::new("top", top_fmt, 8 * MIB)
                    .opts(opts)
                    .ops(["write -P 0x41 7M 4k"]),
            ]
        };
        let name = format!("short backings, {top_fmt} {opts}");
        run(Case::new(&name, layers()));
        run(Case::new(&format!("{name} base=raw"), layers()).base(0));
        run(Case::new(&format!("{name} base=mid"), layers()).base(1));
    }
    // An odd virtual size (not a cluster multiple) and a raw base that is
    // not a sector multiple either.
    let layers = vec![
        Layer::new("base.raw", "raw", 3 * MIB + 1000).ops(["write -P 0x11 0 3M"]),
        Layer::new("top.qcow2", "qcow2", 4 * MIB + 512).ops(["write -P 0x21 4M 512"]),
    ];
    run(Case::new("odd sizes", layers));
}

/// Random chains: depth 2–5, random formats and cluster sizes, random
/// data / zero / compressed writes in every layer, random base.
#[test]
fn random_chains() {
    let seeds: u64 = std::env::var("IMGPULL_STREAM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    for seed in 0..seeds {
        let mut rng = Rng::new(seed + 1);
        let depth = 2 + rng.below(4) as usize;
        let size = (2 + rng.below(6)) * MIB + rng.below(4) * 512;
        let mut layers = Vec::new();
        for i in 0..depth {
            let fmt = if i == 0 {
                ["raw", "qcow2", "qed"][rng.below(3) as usize]
            } else {
                ["qcow2", "qed"][rng.below(2) as usize]
            };
            let opts = match fmt {
                "qcow2" => [
                    "",
                    "cluster_size=512",
                    "cluster_size=4k",
                    "cluster_size=2M",
                    "extended_l2=on",
                    "compat=0.10",
                    "extended_l2=on,cluster_size=16k",
                ][rng.below(7) as usize],
                "qed" => ["", "cluster_size=4k", "cluster_size=1M"][rng.below(3) as usize],
                _ => "",
            };
            let lsize = if i < depth - 1 && rng.below(4) == 0 {
                size / 2 / 512 * 512
            } else {
                size
            };
            let mut l = Layer::new(&format!("l{i}.{fmt}"), fmt, lsize).opts(opts);
            let cluster = l.cluster();
            let compressed =
                fmt == "qcow2" && !opts.contains("compat") && (4 * KIB..2 * MIB).contains(&cluster);
            let n = 4 + rng.below(8) as usize;
            l.ops = random_ops(&mut rng, lsize, cluster, n, compressed);
            if fmt == "raw" {
                l.ops.retain(|o| !o.contains("-c"));
            }
            layers.push(l);
        }
        let mut c = Case::new(&format!("random seed {seed}"), layers);
        if rng.below(2) == 0 && depth > 2 {
            c = c.base(rng.below(depth as u64 - 2) as usize);
            if rng.below(2) == 0 {
                c = c.relative();
            }
        }
        let desc = format!(
            "{}: {:?} base {:?}",
            c.name,
            c.layers
                .iter()
                .map(|l| format!("{} {} {} {:?}", l.name, l.opts, l.size, l.ops))
                .collect::<Vec<_>>(),
            c.base
        );
        let opts = StreamOptions {
            workers: 1 + rng.below(4) as usize,
            max_chunk: [64 * KIB, 256 * KIB, 4 * MIB][rng.below(3) as usize],
            window: [100 * KIB, MIB, 64 * MIB][rng.below(3) as usize],
            ..Default::default()
        };
        let r = std::panic::catch_unwind(|| run_case(&c, opts));
        assert!(r.is_ok(), "failed: {desc}");
    }
}

/// A standalone top: nothing to do, no byte changed.
#[test]
fn standalone_top_is_a_no_op() {
    let d = Dir::new();
    d.build(&[Layer::new("top.qcow2", "qcow2", 4 * MIB).ops(["write -P 1 0 1M"])]);
    let before = d.bytes("top.qcow2");
    let p = pull(&d.path("top.qcow2"), None, StreamOptions::default(), 0);
    assert_eq!(p.outcome, Outcome::Completed);
    assert_eq!(p.progress, (4 * MIB, 4 * MIB));
    assert!(before == d.bytes("top.qcow2"), "no byte may change");
}

fn chain_for_cancel(d: &Dir) -> Vec<Layer> {
    let layers = vec![
        Layer::new("base.raw", "raw", 16 * MIB).ops(["write -P 0x11 0 12M", "write -z 12M 1M"]),
        Layer::new("mid.qcow2", "qcow2", 16 * MIB).ops([
            "write -P 0x21 3M 2M",
            "write -z 6M 1M",
            "write -P 0x22 14M 1M",
        ]),
        Layer::new("top.qcow2", "qcow2", 16 * MIB).ops(["write -P 0x31 0 64k"]),
    ];
    d.build(&layers);
    layers
}

fn open_rw(p: &Path) -> Arc<Chain> {
    Arc::new(
        Chain::open(
            p,
            &ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

/// Cancel mid-pull: the chain stays valid with the same content and its
/// backing link; a new pull copies exactly what was left.
#[test]
fn cancel_then_resume_copies_only_the_rest() {
    // Reference: bytes a full pull copies.
    let full = {
        let d = Dir::new();
        chain_for_cancel(&d);
        let p = pull(&d.path("top.qcow2"), None, StreamOptions::default(), 0);
        assert_eq!(p.outcome, Outcome::Completed);
        p.stats.copied()
    };
    let d = Dir::new();
    let layers = chain_for_cancel(&d);
    d.dump("top.qcow2", "orig.raw");
    let before = snapshot(&d, &layers);
    let chain = open_rw(&d.path("top.qcow2"));
    let sj = StreamJob::new(chain.clone(), &StreamOptions::default()).unwrap();
    let stats = sj.stats();
    let bus = Arc::new(EventBus::new());
    let events = bus.subscribe();
    let job = Job::new(
        "pull0",
        Box::new(sj),
        JobOptions {
            speed: 8 * MIB,
            ..Default::default()
        },
        bus,
    )
    .unwrap();
    job.start();
    let t0 = Instant::now();
    while stats.copied() < 2 * MIB {
        assert!(t0.elapsed() < Duration::from_secs(20), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    job.cancel().unwrap();
    assert_eq!(job.wait(), Outcome::Cancelled);
    assert!(t.elapsed() < Duration::from_secs(2), "cancel is prompt");
    job.join();
    let first = stats.copied();
    assert!(first > 0 && first < full, "partial copy: {first} of {full}");
    let names: Vec<_> = events.try_iter().map(|e| e.name()).collect();
    assert!(names.contains(&"BLOCK_JOB_CANCELLED"), "{names:?}");
    drop(job);
    drop(chain);
    d.check("top.qcow2").unwrap();
    d.compare("orig.raw", "top.qcow2").unwrap();
    assert_eq!(
        d.info("top.qcow2")["backing-filename"],
        Value::String("mid.qcow2".into()),
        "backing link kept"
    );
    for l in &layers[..2] {
        assert!(before[&l.name] == d.bytes(&l.name));
    }
    let p = pull(&d.path("top.qcow2"), None, StreamOptions::default(), 0);
    assert_eq!(p.outcome, Outcome::Completed);
    assert_eq!(
        first + p.stats.copied(),
        full,
        "resume copies only the rest"
    );
    d.check("top.qcow2").unwrap();
    d.compare("orig.raw", "top.qcow2").unwrap();
}

/// Pause stops copying; set-speed and resume take effect; the job
/// completes and the result is right.
#[test]
fn pause_resume_and_speed_changes_while_running() {
    let d = Dir::new();
    chain_for_cancel(&d);
    d.dump("top.qcow2", "orig.raw");
    let chain = open_rw(&d.path("top.qcow2"));
    let sj = StreamJob::new(chain.clone(), &StreamOptions::default()).unwrap();
    let stats = sj.stats();
    let job = Job::new(
        "pull0",
        Box::new(sj),
        JobOptions {
            speed: 4 * MIB,
            ..Default::default()
        },
        Arc::new(EventBus::new()),
    )
    .unwrap();
    job.start();
    let t0 = Instant::now();
    while stats.copied() < 256 * KIB {
        assert!(t0.elapsed() < Duration::from_secs(20), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    job.pause().unwrap();
    let t0 = Instant::now();
    while job.status() != JobStatus::Paused {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(2));
    }
    let at = stats.copied();
    let cur = job.progress().0;
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(stats.copied(), at, "paused: nothing copied");
    assert_eq!(job.progress().0, cur);
    job.set_speed(0).unwrap();
    job.resume().unwrap();
    assert_eq!(
        job.wait_timeout(Duration::from_secs(30)),
        Some(Outcome::Completed)
    );
    job.join();
    assert_eq!(chain.depth(), 1, "chain dropped its backing layers");
    drop(job);
    drop(chain);
    d.check("top.qcow2").unwrap();
    d.compare("orig.raw", "top.qcow2").unwrap();
}

/// Guest writes through the same open chain race with the job (the
/// daemon's case): the job never overwrites what the guest wrote.
#[test]
fn guest_writes_race_with_the_job() {
    for top_fmt in ["qcow2", "qed"] {
        let d = Dir::new();
        let layers = vec![
            Layer::new("base.raw", "raw", 8 * MIB).ops(["write -P 0x11 0 8M"]),
            Layer::new("mid.qcow2", "qcow2", 8 * MIB)
                .opts("cluster_size=4k")
                .ops(["write -P 0x21 1M 3M", "write -z 5M 1M"]),
            Layer::new("top", top_fmt, 8 * MIB),
        ];
        d.build(&layers);
        d.dump("top", "model.raw");
        let chain = open_rw(&d.path("top"));
        let sj = StreamJob::new(chain.clone(), &StreamOptions::default()).unwrap();
        let job = Job::new(
            "pull0",
            Box::new(sj),
            JobOptions {
                speed: 8 * MIB,
                ..Default::default()
            },
            Arc::new(EventBus::new()),
        )
        .unwrap();
        let mut model = std::fs::read(d.path("model.raw")).unwrap();
        job.start();
        let mut rng = Rng::new(7);
        let top = chain.top();
        for i in 0..60u64 {
            let off = rng.below(8 * MIB / 512) * 512;
            let len = ((1 + rng.below(16)) * 512).min(8 * MIB - off);
            let byte = 0x80 + (i as u8 % 64);
            let data = vec![byte; len as usize];
            top.write(off, &data, &chain.below(1)).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            std::thread::sleep(Duration::from_millis(3));
        }
        // Finish at full speed (the job may already be done).
        let _ = job.set_speed(0);
        assert_eq!(job.wait(), Outcome::Completed, "{top_fmt}");
        job.join();
        drop(top);
        drop(job);
        drop(chain);
        std::fs::write(d.path("model.raw"), &model).unwrap();
        d.check("top").unwrap();
        d.compare("model.raw", "top")
            .unwrap_or_else(|e| panic!("{top_fmt}: {e}"));
    }
}

/// Once the job has concluded the layers it dropped from the chain are
/// closed (their locks released) even while the job object lives on.
#[test]
fn dropped_layers_are_released_at_conclusion() {
    let d = Dir::new();
    let layers = chain_for_cancel(&d);
    let chain = open_rw(&d.path("top.qcow2"));
    let sj = StreamJob::new(
        chain.clone(),
        &StreamOptions {
            base: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    let job = Job::new(
        "pull0",
        Box::new(sj),
        JobOptions {
            auto_dismiss: false,
            ..Default::default()
        },
        Arc::new(EventBus::new()),
    )
    .unwrap();
    job.start();
    assert_eq!(job.wait(), Outcome::Completed);
    assert_eq!(job.status(), JobStatus::Concluded);
    assert_eq!(chain.depth(), 2, "top and the kept base");
    // mid.qcow2 is no longer open: a writer may take it.
    let mid = imgpull_image::Image::open(
        d.path(&layers[1].name),
        &imgpull_image::OpenOptions {
            writable: true,
            ..Default::default()
        },
    );
    assert!(mid.is_ok(), "{:?}", mid.err());
    job.dismiss().unwrap();
    job.join();
}
