//! Chains for the benchmarks, built with qemu-img / qemu-io on tmpfs.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use imgpull_chain::{Chain, ChainOptions};
use imgpull_jobs::{EventBus, Job, JobOptions, Outcome, StreamJob, StreamOptions};

/// Where benchmark images live: tmpfs when there is one.
pub fn bench_dir(name: &str) -> PathBuf {
    let root = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = root.join(format!("imgpull-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("bench dir");
    d
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run qemu tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Feed a qemu-io script on stdin.
fn qemu_io(fmt: &str, img: &Path, script: &str) {
    let mut c = Command::new("qemu-io")
        .args(["-f", fmt])
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-io");
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success());
}

/// A small deterministic PRNG (SplitMix64).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Build `layers` images of `fmt` (base first, top last) of `size` bytes
/// with `cluster` clusters. The base gets `base_fill` of its clusters as
/// data runs, every overlay a scattered `overlay_fill` (with some zero
/// clusters). Returns the paths, base first.
pub fn build_chain(
    dir: &Path,
    fmt: &str,
    size: u64,
    cluster: u64,
    layers: usize,
    base_fill: f64,
    overlay_fill: f64,
) -> Vec<PathBuf> {
    let n = size / cluster;
    let mut paths = Vec::new();
    for l in 0..layers {
        let p = dir.join(format!("l{l}.{fmt}"));
        let mut c = Command::new("qemu-img");
        c.args(["create", "-q", "-f", fmt, "-o"])
            .arg(format!("cluster_size={cluster}"));
        if let Some(prev) = paths.last() {
            c.arg("-b").arg(prev).args(["-F", fmt]);
        }
        c.arg(&p).arg(size.to_string());
        run(&mut c);
        let mut rng = Rng(0x5eed + l as u64);
        let mut script = String::new();
        if l == 0 {
            let mut c0 = 0;
            while c0 < n {
                let run_len = (1 + rng.below(32)).min(n - c0);
                if (rng.below(1000) as f64) < base_fill * 1000.0 {
                    script += &format!(
                        "write -P {} {} {}\n",
                        1 + rng.below(250),
                        c0 * cluster,
                        run_len * cluster
                    );
                }
                c0 += run_len;
            }
        } else {
            let target = (n as f64 * overlay_fill) as u64;
            let mut done = 0;
            while done < target {
                let c0 = rng.below(n);
                let len = (1 + rng.below(8)).min(n - c0);
                if rng.below(10) == 0 {
                    script += &format!("write -z {} {}\n", c0 * cluster, len * cluster);
                } else {
                    script += &format!(
                        "write -P {} {} {}\n",
                        1 + rng.below(250),
                        c0 * cluster,
                        len * cluster
                    );
                }
                done += len;
            }
        }
        qemu_io(fmt, &p, &script);
        paths.push(p);
    }
    paths
}

/// Copy the top into `work` as a fresh file (the backing names are
/// absolute, so the copy still points at the same backing chain).
pub fn fresh_top(top: &Path, work: &Path) -> PathBuf {
    let dst = work.join(top.file_name().unwrap());
    let _ = std::fs::remove_file(&dst);
    run(Command::new("cp").arg("--sparse=always").arg(top).arg(&dst));
    dst
}

/// Pull the whole chain into `top` with the stream job; returns bytes copied.
pub fn pull(top: &Path, opts: StreamOptions) -> u64 {
    let chain = Arc::new(
        Chain::open(
            top,
            &ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .expect("open chain"),
    );
    let sj = StreamJob::new(chain, &opts).expect("stream job");
    let stats = sj.stats();
    let job = Job::new(
        "bench",
        Box::new(sj),
        JobOptions::default(),
        Arc::new(EventBus::new()),
    )
    .expect("job");
    job.start();
    let outcome = job.wait();
    job.join();
    assert!(
        matches!(outcome, Outcome::Completed),
        "pull failed: {outcome:?}"
    );
    stats.copied()
}
