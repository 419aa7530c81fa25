//! Helpers for the stream-job tests: chains made by qemu-img / qemu-io in a
//! scratch directory, pulls through the library, and QEMU's verdicts
//! (`qemu-img compare`, `check`, `info`, `map`) on the result.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use imgpull_chain::{Chain, ChainOptions};
use imgpull_jobs::{EventBus, Job, JobOptions, Outcome, StreamJob, StreamOptions, StreamStats};
use serde_json::Value;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// A scratch directory (under /dev/shm when possible) where every command
/// runs with relative file names.
pub struct Dir {
    tmp: tempfile::TempDir,
}

impl Default for Dir {
    fn default() -> Self {
        Self::new()
    }
}

impl Dir {
    pub fn new() -> Dir {
        let shm = Path::new("/dev/shm");
        let tmp = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("imgpull-jobs-")
                .tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("imgpull-jobs-").tempdir()
        }
        .expect("scratch dir");
        Dir { tmp }
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Run a command in the directory; (exit code, stdout, stderr).
    pub fn run(&self, prog: &str, args: &[&str]) -> (Option<i32>, String, String) {
        let out = Command::new(prog)
            .args(args)
            .current_dir(self.root())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Run a command that must succeed; its stdout.
    pub fn must(&self, prog: &str, args: &[&str]) -> String {
        let (code, out, err) = self.run(prog, args);
        assert_eq!(
            code,
            Some(0),
            "{prog} {} failed:\n{out}\n{err}",
            args.join(" ")
        );
        out
    }

    pub fn qemu_io(&self, fmt: &str, file: &str, cmds: &[String]) {
        if cmds.is_empty() {
            return;
        }
        let mut args = vec!["-f", fmt];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(file);
        let out = self.must("qemu-io", &args);
        assert!(
            !out.contains("error") && !out.contains("failed"),
            "qemu-io {args:?}: {out}"
        );
    }

    /// Make the layers, bottom first, each backed by the previous one
    /// (named relative to its own directory).
    pub fn build(&self, layers: &[Layer]) {
        for (i, l) in layers.iter().enumerate() {
            if let Some(parent) = Path::new(&l.name).parent() {
                std::fs::create_dir_all(self.path(&parent.to_string_lossy())).unwrap();
            }
            if l.fmt == "raw" {
                assert_eq!(i, 0, "raw only at the bottom");
                self.must(
                    "qemu-img",
                    &["create", "-q", "-f", "raw", &l.name, &l.size.to_string()],
                );
            } else {
                let mut args: Vec<String> =
                    vec!["create".into(), "-q".into(), "-f".into(), l.fmt.clone()];
                if i > 0 {
                    let below = &layers[i - 1];
                    let name = relative_name(&l.name, &below.name);
                    args.extend(["-b".into(), name, "-F".into(), below.fmt.clone()]);
                }
                if !l.opts.is_empty() {
                    args.extend(["-o".into(), l.opts.clone()]);
                }
                args.push(l.name.clone());
                args.push(l.size.to_string());
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                self.must("qemu-img", &a);
            }
            self.qemu_io(&l.fmt, &l.name, &l.ops);
        }
    }

    /// The guest content of `file` as a raw file next to it.
    pub fn dump(&self, file: &str, raw: &str) {
        self.must("qemu-img", &["convert", "-U", "-O", "raw", file, raw]);
    }

    pub fn compare(&self, raw: &str, file: &str) -> Result<(), String> {
        let (code, out, err) = self.run("qemu-img", &["compare", "-U", "-f", "raw", raw, file]);
        if code == Some(0) {
            Ok(())
        } else {
            Err(format!("qemu-img compare {raw} {file}: {out}{err}"))
        }
    }

    pub fn check(&self, file: &str) -> Result<(), String> {
        let (code, out, err) = self.run("qemu-img", &["check", "-U", file]);
        if code == Some(0) {
            Ok(())
        } else {
            Err(format!("qemu-img check {file}: exit {code:?}\n{out}{err}"))
        }
    }

    /// `qemu-img check` passing or reporting only leaks (exit 3).
    pub fn check_leaks_ok(&self, file: &str) -> Result<(), String> {
        let (code, out, err) = self.run("qemu-img", &["check", "-U", file]);
        if matches!(code, Some(0) | Some(3)) && !out.contains("ERROR") {
            Ok(())
        } else {
            Err(format!("qemu-img check {file}: exit {code:?}\n{out}{err}"))
        }
    }

    pub fn info(&self, file: &str) -> Value {
        serde_json::from_str(&self.must("qemu-img", &["info", "-U", "--output=json", file]))
            .unwrap()
    }

    pub fn map(&self, file: &str) -> Vec<Value> {
        let v: Value =
            serde_json::from_str(&self.must("qemu-img", &["map", "-U", "--output=json", file]))
                .unwrap();
        v.as_array().unwrap().clone()
    }

    pub fn bytes(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }
}

/// The backing name `from` records for `to` (both relative to the
/// scratch root): relative to `from`'s directory.
pub fn relative_name(from: &str, to: &str) -> String {
    let fd: Vec<&str> = Path::new(from)
        .parent()
        .map(|p| p.iter().map(|c| c.to_str().unwrap()).collect())
        .unwrap_or_default();
    let tp: Vec<&str> = Path::new(to).iter().map(|c| c.to_str().unwrap()).collect();
    let common = fd.iter().zip(&tp).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<&str> = vec![".."; fd.len() - common];
    parts.extend(&tp[common..]);
    parts.join("/")
}

/// One layer: qemu-img create options and qemu-io commands.
#[derive(Clone, Debug)]
pub struct Layer {
    pub name: String,
    pub fmt: String,
    pub size: u64,
    pub opts: String,
    pub ops: Vec<String>,
}

impl Layer {
    pub fn new(name: &str, fmt: &str, size: u64) -> Layer {
        Layer {
            name: name.into(),
            fmt: fmt.into(),
            size,
            opts: String::new(),
            ops: vec![],
        }
    }

    pub fn opts(mut self, o: &str) -> Layer {
        self.opts = o.into();
        self
    }

    pub fn ops<S: Into<String>>(mut self, ops: impl IntoIterator<Item = S>) -> Layer {
        self.ops.extend(ops.into_iter().map(Into::into));
        self
    }

    /// The cluster size from `cluster_size=` (format defaults otherwise).
    pub fn cluster(&self) -> u64 {
        for o in self.opts.split(',') {
            if let Some(v) = o.strip_prefix("cluster_size=") {
                return parse_size(v);
            }
        }
        match self.fmt.as_str() {
            "raw" => 512,
            _ => 64 * KIB,
        }
    }
}

pub fn parse_size(v: &str) -> u64 {
    let (num, mul) = match v.chars().last() {
        Some('k') | Some('K') => (&v[..v.len() - 1], KIB),
        Some('M') => (&v[..v.len() - 1], MIB),
        _ => (v, 1),
    };
    num.parse::<u64>().unwrap() * mul
}

/// A tiny deterministic generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Random qemu-io commands for a layer of `size` bytes: data writes at
/// 512-byte granularity (partial clusters), zero writes, and (where
/// `compressed`) compressed whole clusters.
pub fn random_ops(
    rng: &mut Rng,
    size: u64,
    cluster: u64,
    n: usize,
    compressed: bool,
) -> Vec<String> {
    // Compressed writes go first, on clusters nothing wrote yet (QEMU
    // refuses compressed writes over allocated clusters).
    let mut comp = Vec::new();
    let mut ops = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    let sectors = size / 512;
    for _ in 0..n {
        let kind = rng.below(10);
        let pat = 1 + rng.below(254);
        if compressed && kind < 2 && size >= cluster {
            let clusters = size / cluster;
            let c = rng.below(clusters);
            let k = 1 + rng.below(3.min(clusters - c));
            if (c..c + k).all(|x| used.insert(x)) {
                comp.push(format!("write -c -P {pat} {} {}", c * cluster, k * cluster));
            }
            continue;
        }
        let off = rng.below(sectors) * 512;
        let max = (size - off).min(4 * cluster.max(64 * KIB));
        let len = (1 + rng.below(max / 512)) * 512;
        if kind < 4 {
            ops.push(format!("write -z {off} {len}"));
        } else {
            ops.push(format!("write -P {pat} {off} {len}"));
        }
    }
    comp.extend(ops);
    comp
}

/// What a pull did.
pub struct Pulled {
    pub outcome: Outcome,
    pub stats: Arc<StreamStats>,
    pub progress: (u64, u64),
}

/// Pull `top` (path) keeping `base` (path) through the library.
pub fn pull(top: &Path, base: Option<&Path>, opts: StreamOptions, speed: u64) -> Pulled {
    let chain = Arc::new(
        Chain::open(
            top,
            &ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("open {}: {e}", top.display())),
    );
    let base_index = base.map(|b| base_index(&chain, b));
    let opts = StreamOptions {
        base: base_index,
        ..opts
    };
    let sj = StreamJob::new(chain.clone(), &opts).unwrap();
    let stats = sj.stats();
    let job = Job::new(
        "pull0",
        Box::new(sj),
        JobOptions {
            speed,
            ..Default::default()
        },
        Arc::new(EventBus::new()),
    )
    .unwrap();
    job.start();
    let outcome = job.wait();
    job.join();
    let progress = job.progress();
    Pulled {
        outcome,
        stats,
        progress,
    }
}

/// The chain index of the layer that is file `base`.
pub fn base_index(chain: &Chain, base: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(base).unwrap();
    chain
        .layers()
        .iter()
        .position(|l| {
            let lm = l.storage().file().metadata().unwrap();
            (lm.dev(), lm.ino()) == (m.dev(), m.ino())
        })
        .expect("base in chain")
}

/// Guest ranges `[start, end)` that no layer of the chain holds
/// (`present: false` in qemu-img map).
pub fn unallocated_ranges(map: &[Value]) -> Vec<(u64, u64)> {
    map.iter()
        .filter(|e| e["present"] == Value::Bool(false))
        .map(|e| {
            let s = e["start"].as_u64().unwrap();
            (s, s + e["length"].as_u64().unwrap())
        })
        .collect()
}

/// Guest ranges held by the top layer (depth 0) itself.
pub fn top_ranges(map: &[Value]) -> Vec<(u64, u64)> {
    map.iter()
        .filter(|e| e["present"] == Value::Bool(true) && e["depth"].as_u64() == Some(0))
        .map(|e| {
            let s = e["start"].as_u64().unwrap();
            (s, s + e["length"].as_u64().unwrap())
        })
        .collect()
}

/// Whether two sorted range lists intersect; the first intersection.
pub fn overlap(a: &[(u64, u64)], b: &[(u64, u64)]) -> Option<(u64, u64)> {
    for &(s1, e1) in a {
        for &(s2, e2) in b {
            if s1 < e2 && s2 < e1 {
                return Some((s1.max(s2), e1.min(e2)));
            }
        }
    }
    None
}

/// File bytes of every layer, to prove the others were not touched.
pub fn snapshot(dir: &Dir, layers: &[Layer]) -> BTreeMap<String, Vec<u8>> {
    layers
        .iter()
        .map(|l| (l.name.clone(), dir.bytes(&l.name)))
        .collect()
}
