//! The catalogue of chains the map and read tests build with QEMU's tools.
//!
//! Each [`Case`] is a list of layers, bottom first, with qemu-io operations
//! generated from a fixed seed (so a failure is reproducible from the
//! printed command log). Groups are returned by separate functions so a
//! test binary can run them as separate `#[test]`s in parallel.

use super::{gen_ops, Layer, OpKinds, Rng, KIB, MIB};

/// One chain to build.
#[derive(Clone, Debug)]
pub struct Case {
    /// Human-readable name.
    pub name: String,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
}

/// A layer format configuration.
#[derive(Clone, Debug)]
pub struct Fmt {
    /// `qcow2`, `qed` or `raw`.
    pub fmt: &'static str,
    /// `-o` options.
    pub opts: String,
    /// Allocation unit for generated operations.
    pub cluster: u64,
    /// Which operations the layer supports.
    pub kinds: OpKinds,
}

impl Fmt {
    /// qcow2 with the given `-o` options (cluster size taken from them).
    pub fn qcow2(opts: &str) -> Fmt {
        let cluster = opt_size(opts, "cluster_size").unwrap_or(64 * KIB);
        let mut kinds = OpKinds::QCOW2;
        // Preallocated clusters are allocated: QEMU cannot compress into them.
        kinds.compressed = !opts.contains("preallocation");
        Fmt {
            fmt: "qcow2",
            opts: opts.to_string(),
            cluster,
            kinds,
        }
    }

    /// QED with the given `-o` options.
    pub fn qed(opts: &str) -> Fmt {
        let cluster = opt_size(opts, "cluster_size").unwrap_or(64 * KIB);
        Fmt {
            fmt: "qed",
            opts: opts.to_string(),
            cluster,
            kinds: OpKinds::QED,
        }
    }

    /// A raw file.
    pub fn raw() -> Fmt {
        Fmt {
            fmt: "raw",
            opts: String::new(),
            cluster: 4 * KIB,
            kinds: OpKinds::RAW,
        }
    }

    /// A layer of this format named `name` with `n` generated operations.
    pub fn layer(&self, name: &str, size: u64, rng: &mut Rng, n: usize) -> Layer {
        let ops = gen_ops(rng, size, self.cluster, n, self.kinds);
        Layer::new(name, self.fmt, size).opts(&self.opts).ops(ops)
    }

    /// File-name extension.
    pub fn ext(&self) -> &'static str {
        self.fmt
    }
}

/// Parse `key=N[k|M]` out of a qemu-img option list.
pub fn opt_size(opts: &str, key: &str) -> Option<u64> {
    opts.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        if k != key {
            return None;
        }
        let (num, mul) = match v.chars().last()? {
            'k' | 'K' => (&v[..v.len() - 1], KIB),
            'M' => (&v[..v.len() - 1], MIB),
            _ => (v, 1),
        };
        num.parse::<u64>().ok().map(|n| n * mul)
    })
}

/// A chain of `fmts` (bottom first) of equal `size`, `n` ops per layer.
pub fn uniform(name: &str, fmts: &[Fmt], size: u64, seed: u64, n: usize) -> Case {
    let mut rng = Rng::new(seed);
    let layers = fmts
        .iter()
        .enumerate()
        .map(|(i, f)| f.layer(&format!("l{i}.{}", f.ext()), size, &mut rng, n))
        .collect();
    Case {
        name: name.to_string(),
        layers,
    }
}

/// A virtual size with a few clusters' worth of room for `cluster`.
fn size_for(cluster: u64) -> u64 {
    match cluster {
        c if c <= 4 * KIB => 4 * MIB,
        c if c <= 64 * KIB => 16 * MIB,
        _ => 32 * MIB,
    }
}

/// qcow2 v3 at every cluster size, depth 1 and 3.
pub fn qcow2_cluster_sizes() -> Vec<Case> {
    let mut v = Vec::new();
    for (i, cs) in ["512", "4k", "64k", "2M"].iter().enumerate() {
        let f = Fmt::qcow2(&format!("cluster_size={cs}"));
        let size = size_for(f.cluster);
        for depth in [1usize, 3] {
            let fmts = vec![f.clone(); depth];
            v.push(uniform(
                &format!("qcow2 v3 cluster {cs} depth {depth}"),
                &fmts,
                size,
                100 + i as u64 * 10 + depth as u64,
                12,
            ));
        }
    }
    v
}

/// qcow2 v2 (compat=0.10), where zero writes over a backing are data.
pub fn qcow2_v2() -> Vec<Case> {
    let mut v = Vec::new();
    for (i, cs) in ["4k", "64k"].iter().enumerate() {
        let f = Fmt::qcow2(&format!("compat=0.10,cluster_size={cs}"));
        for depth in [1usize, 2, 3] {
            v.push(uniform(
                &format!("qcow2 v2 cluster {cs} depth {depth}"),
                &vec![f.clone(); depth],
                size_for(f.cluster),
                200 + i as u64 * 10 + depth as u64,
                12,
            ));
        }
    }
    // v2 over v3 and v3 over v2.
    let v2 = Fmt::qcow2("compat=0.10,cluster_size=4k");
    let v3 = Fmt::qcow2("cluster_size=4k");
    v.push(uniform(
        "qcow2 v2 over v3",
        &[v3.clone(), v2.clone()],
        4 * MIB,
        231,
        12,
    ));
    v.push(uniform("qcow2 v3 over v2", &[v2, v3], 4 * MIB, 232, 12));
    v
}

/// Every refcount width.
pub fn qcow2_refcount_bits() -> Vec<Case> {
    [1u64, 2, 4, 8, 16, 32, 64]
        .iter()
        .map(|&bits| {
            let f = Fmt::qcow2(&format!("cluster_size=4k,refcount_bits={bits}"));
            uniform(
                &format!("qcow2 refcount_bits={bits} depth 2"),
                &[f.clone(), f],
                4 * MIB,
                300 + bits,
                12,
            )
        })
        .collect()
}

/// Subcluster writes and zeroes at subcluster granularity.
fn subcluster_ops(rng: &mut Rng, size: u64, cluster: u64, n: usize) -> Vec<String> {
    let sub = cluster / 32;
    let subs = size / sub;
    let mut ops = Vec::new();
    for _ in 0..n {
        let s0 = rng.below(subs);
        let k = 1 + rng.below(6.min(subs - s0));
        let (off, len) = (s0 * sub, k * sub);
        let pat = 1 + rng.below(250);
        ops.push(match rng.below(6) {
            0 | 1 => format!("write -P {pat} {off} {len}"),
            2 => format!("write -z {off} {len}"),
            3 => format!("discard {off} {len}"),
            4 => {
                // Unaligned inside a subcluster.
                let start = off + rng.below(sub);
                let l = (1 + rng.below(sub)).min(size - start);
                format!("write -P {pat} {start} {l}")
            }
            _ => format!(
                "write -P {pat} {} {}",
                off / cluster * cluster,
                cluster.min(size - off / cluster * cluster)
            ),
        });
    }
    ops
}

/// extended_l2=on at 64k and 32k clusters, subcluster operations.
pub fn qcow2_extended_l2() -> Vec<Case> {
    let mut v = Vec::new();
    for (i, cs) in [64 * KIB, 32 * KIB].iter().enumerate() {
        for depth in [1usize, 2, 3] {
            let mut rng = Rng::new(400 + i as u64 * 10 + depth as u64);
            let size = 8 * MIB;
            let layers = (0..depth)
                .map(|d| {
                    Layer::new(&format!("l{d}.qcow2"), "qcow2", size)
                        .opts(&format!("extended_l2=on,cluster_size={}", cs))
                        .ops(subcluster_ops(&mut rng, size, *cs, 14))
                })
                .collect();
            v.push(Case {
                name: format!("qcow2 extended_l2 cluster {cs} depth {depth}"),
                layers,
            });
        }
    }
    // An extended-L2 overlay over a plain qcow2 base and vice versa.
    let mut rng = Rng::new(450);
    let size = 4 * MIB;
    let plain = Fmt::qcow2("cluster_size=4k");
    let base = plain.layer("base.qcow2", size, &mut rng, 10);
    let top = Layer::new("top.qcow2", "qcow2", size)
        .opts("extended_l2=on,cluster_size=64k")
        .ops(subcluster_ops(&mut rng, size, 64 * KIB, 14));
    v.push(Case {
        name: "qcow2 extended_l2 over plain qcow2".into(),
        layers: vec![base, top],
    });
    let base = Layer::new("base.qcow2", "qcow2", size)
        .opts("extended_l2=on,cluster_size=32k")
        .ops(subcluster_ops(&mut rng, size, 32 * KIB, 14));
    let top = plain.layer("top.qcow2", size, &mut rng, 10);
    v.push(Case {
        name: "qcow2 plain over extended_l2".into(),
        layers: vec![base, top],
    });
    v
}

/// Compressed clusters (zlib, zstd), also under partially written overlays.
pub fn qcow2_compression() -> Vec<Case> {
    let mut v = Vec::new();
    for (i, ct) in ["zlib", "zstd"].iter().enumerate() {
        for cs in ["4k", "64k"] {
            let f = Fmt::qcow2(&format!("compression_type={ct},cluster_size={cs}"));
            let size = size_for(f.cluster);
            let mut rng = Rng::new(500 + i as u64);
            let mut base = f.layer("base.qcow2", size, &mut rng, 4);
            // Guaranteed compressed clusters, some adjacent, written first
            // (QEMU cannot compress into allocated clusters); the random
            // ops after them partly overwrite them.
            let c = f.cluster;
            let fixed = [
                format!("write -c -P 7 0 {}", 4 * c),
                format!("write -c -P 9 {} {}", 8 * c, c),
                format!("write -c -P 11 {} {}", 16 * c, 2 * c),
            ];
            base.ops.splice(0..0, fixed);
            v.push(Case {
                name: format!("qcow2 compression {ct} cluster {cs} depth 1"),
                layers: vec![base.clone()],
            });
            let mut top = f.layer("top.qcow2", size, &mut rng, 6);
            // Partial writes over compressed clusters (COW from compressed).
            top.ops.push(format!("write -P 3 {} 512", c + 512));
            top.ops.push(format!("write -P 4 {} 100", 8 * c + 7));
            v.push(Case {
                name: format!("qcow2 compression {ct} cluster {cs} depth 2"),
                layers: vec![base, top],
            });
        }
    }
    // Compressed clusters in a compat=0.10 image (deflate only).
    let f = Fmt::qcow2("compat=0.10,cluster_size=4k");
    let mut rng = Rng::new(520);
    let mut l = f.layer("v2c.qcow2", 4 * MIB, &mut rng, 8);
    l.ops.insert(0, "write -c -P 5 65536 16384".into());
    v.push(Case {
        name: "qcow2 v2 compressed".into(),
        layers: vec![l],
    });
    v
}

/// lazy_refcounts=on images.
pub fn qcow2_lazy_refcounts() -> Vec<Case> {
    let f = Fmt::qcow2("lazy_refcounts=on,cluster_size=4k");
    vec![
        uniform(
            "qcow2 lazy_refcounts depth 1",
            std::slice::from_ref(&f),
            4 * MIB,
            600,
            12,
        ),
        uniform(
            "qcow2 lazy_refcounts depth 2",
            &[f.clone(), f],
            4 * MIB,
            601,
            12,
        ),
    ]
}

/// Preallocated qcow2 (zero clusters with host offsets, data extents).
pub fn qcow2_preallocation() -> Vec<Case> {
    let mut v = Vec::new();
    for (i, p) in ["metadata", "falloc", "full"].iter().enumerate() {
        let f = Fmt::qcow2(&format!("preallocation={p},cluster_size=4k"));
        v.push(uniform(
            &format!("qcow2 preallocation={p}"),
            &[f],
            2 * MIB,
            700 + i as u64,
            6,
        ));
    }
    let base = Fmt::qcow2("cluster_size=64k");
    // QEMU allows preallocation over a backing file only with extended L2.
    let top = Fmt::qcow2("preallocation=metadata,cluster_size=64k,extended_l2=on");
    v.push(uniform(
        "qcow2 preallocation=metadata over qcow2",
        &[base, top],
        4 * MIB,
        710,
        6,
    ));
    v
}

/// QED cluster sizes × table sizes. (table_size=1 is left out: QEMU
/// 10.0.2 cannot open the images its own `qemu-img create` makes with it.)
pub fn qed_matrix() -> Vec<Case> {
    let mut v = Vec::new();
    for (i, cs) in ["4k", "64k", "1M"].iter().enumerate() {
        for (j, ts) in [2u64, 4, 16].iter().enumerate() {
            let f = Fmt::qed(&format!("cluster_size={cs},table_size={ts}"));
            let size = match f.cluster {
                c if c <= 4 * KIB => 8 * MIB,
                c if c <= 64 * KIB => 16 * MIB,
                _ => 32 * MIB,
            };
            let depth = 1 + (i + j) % 2;
            v.push(uniform(
                &format!("qed cluster {cs} table_size {ts} depth {depth}"),
                &vec![f; depth],
                size,
                800 + (i * 3 + j) as u64,
                12,
            ));
        }
    }
    v
}

/// Raw bases with holes under qcow2 and QED overlays.
pub fn raw_bases() -> Vec<Case> {
    let raw = Fmt::raw();
    let mut v = vec![uniform(
        "raw alone",
        std::slice::from_ref(&raw),
        4 * MIB,
        900,
        10,
    )];
    for (i, top) in [
        Fmt::qcow2("cluster_size=64k"),
        Fmt::qcow2("cluster_size=4k,compat=0.10"),
        Fmt::qed("cluster_size=64k"),
        Fmt::qcow2("cluster_size=64k,extended_l2=on"),
    ]
    .iter()
    .enumerate()
    {
        v.push(uniform(
            &format!("{} {} over raw", top.fmt, top.opts),
            &[raw.clone(), top.clone()],
            4 * MIB,
            910 + i as u64,
            10,
        ));
    }
    // A raw file that is all hole, and one with an unaligned size.
    v.push(Case {
        name: "qcow2 over an all-hole raw".into(),
        layers: vec![
            Layer::new("hole.raw", "raw", 3 * MIB),
            Fmt::qcow2("cluster_size=4k").layer("top.qcow2", 3 * MIB, &mut Rng::new(920), 6),
        ],
    });
    v
}

/// Mixed-format chains of depth 1 to 5.
pub fn mixed_depths() -> Vec<Case> {
    let palette = [
        Fmt::qcow2("cluster_size=64k"),
        Fmt::qcow2("cluster_size=4k,compat=0.10"),
        Fmt::qed("cluster_size=64k"),
        Fmt::qcow2("cluster_size=32k,extended_l2=on"),
        Fmt::qed("cluster_size=4k,table_size=4"),
        Fmt::qcow2("cluster_size=512,refcount_bits=1"),
    ];
    let mut v = Vec::new();
    for depth in 1..=5usize {
        for variant in 0..2u64 {
            let seed = 1000 + depth as u64 * 10 + variant;
            let mut rng = Rng::new(seed);
            let mut fmts = Vec::new();
            for d in 0..depth {
                if d == 0 && variant == 1 {
                    fmts.push(Fmt::raw());
                } else {
                    fmts.push(palette[rng.below(palette.len() as u64) as usize].clone());
                }
            }
            let names: Vec<String> = fmts
                .iter()
                .map(|f| format!("{}[{}]", f.fmt, f.opts))
                .collect();
            v.push(uniform(
                &format!("mixed depth {depth}: {}", names.join(" <- ")),
                &fmts,
                4 * MIB,
                seed,
                8,
            ));
        }
    }
    v
}

/// Backings shorter and longer than the layers above them, and sizes that
/// are not cluster multiples.
pub fn backing_sizes() -> Vec<Case> {
    let mut v = Vec::new();
    let combos: &[(&str, &[u64])] = &[
        ("shorter backing", &[MIB, 3 * MIB]),
        ("longer backing", &[4 * MIB, MIB]),
        ("unaligned sizes", &[MIB + 512, 2 * MIB + 1536]),
        (
            "longer then shorter",
            &[2 * MIB, 5 * MIB + 512, MIB + 4096 * 3],
        ),
        ("shrinking chain", &[4 * MIB, 3 * MIB, 2 * MIB, MIB]),
        ("growing chain", &[512 * KIB, MIB, 3 * MIB + 512, 8 * MIB]),
    ];
    let fmts = [
        Fmt::qcow2("cluster_size=64k"),
        Fmt::qcow2("cluster_size=4k"),
        Fmt::qed("cluster_size=4k,table_size=2"),
        Fmt::qcow2("cluster_size=32k,extended_l2=on"),
        Fmt::qcow2("compat=0.10,cluster_size=64k"),
    ];
    for (i, (name, sizes)) in combos.iter().enumerate() {
        for (k, f) in fmts.iter().enumerate() {
            if (i + k) % 2 == 1 {
                continue; // half the product keeps the runtime down
            }
            let mut rng = Rng::new(1100 + (i * 10 + k) as u64);
            let layers = sizes
                .iter()
                .enumerate()
                .map(|(d, &s)| {
                    let g = if d == 0 && k == 4 {
                        Fmt::raw()
                    } else {
                        f.clone()
                    };
                    g.layer(&format!("l{d}.{}", g.ext()), s, &mut rng, 8)
                })
                .collect();
            v.push(Case {
                name: format!("{name} {} [{}]", f.fmt, f.opts),
                layers,
            });
        }
    }
    v
}
