//! `imgpull pull` and `imgpull demo` as a user runs them: JSON progress and
//! events, exit codes, bad input that must change nothing, SIGINT/SIGTERM
//! (clean cancel, exit 130) and kill -9 at random moments (every image
//! still passes `qemu-img check`, the guest content is unchanged, a rerun
//! completes and copies nothing twice). `IMGPULL_KILL_LOOPS=N` runs N
//! kill -9 rounds for each of four kinds of top instead of 3.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const MIB: u64 = 1 << 20;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_imgpull")
}

struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Self::in_dir(Path::new("/dev/shm"))
    }

    /// A scratch dir on a disk file system (for chattr), or /dev/shm.
    fn in_dir(parent: &Path) -> Dir {
        let b = || tempfile::Builder::new().prefix("imgpull-cli-").clone();
        let tmp = if parent.is_dir() {
            b().tempdir_in(parent)
        } else {
            b().tempdir()
        }
        .unwrap();
        Dir { tmp }
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    fn path(&self, n: &str) -> PathBuf {
        self.root().join(n)
    }

    fn cmd(&self, prog: &str, args: &[&str]) -> Output {
        Command::new(prog)
            .args(args)
            .current_dir(self.root())
            .output()
            .unwrap()
    }

    fn must(&self, prog: &str, args: &[&str]) -> String {
        let o = self.cmd(prog, args);
        assert!(
            o.status.success(),
            "{prog} {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn imgpull(&self, args: &[&str]) -> Output {
        self.cmd(bin(), args)
    }

    fn qemu_io(&self, fmt: &str, file: &str, cmds: &[&str]) {
        let mut a = vec!["-f", fmt];
        for c in cmds {
            a.extend(["-c", c]);
        }
        a.push(file);
        self.must("qemu-io", &a);
    }

    /// raw base (data, holes) ← qcow2 mid (data, zeros) ← `top_fmt` top.
    fn chain(&self, top_fmt: &str, size: u64) {
        self.chain_with(top_fmt, "", size);
    }

    /// Like [`Dir::chain`], with `-o` options for the top.
    fn chain_with(&self, top_fmt: &str, top_opts: &str, size: u64) {
        let s = size.to_string();
        self.must("qemu-img", &["create", "-q", "-f", "raw", "base.raw", &s]);
        let half = (size / 2).to_string();
        self.qemu_io("raw", "base.raw", &[&format!("write -P 0x11 0 {half}")]);
        self.must(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.raw",
                "-F",
                "raw",
                "mid.qcow2",
                &s,
            ],
        );
        let q = size / 4;
        self.qemu_io(
            "qcow2",
            "mid.qcow2",
            &[
                &format!("write -P 0x22 {q} {q}"),
                &format!("write -z {} {}", 3 * q, q / 2),
                "write -P 0x23 12345 777",
            ],
        );
        self.new_top(top_fmt, top_opts, size);
        self.must("qemu-img", &["convert", "-O", "raw", "top", "orig.raw"]);
    }

    /// (Re)create the top over mid.qcow2, with a little data of its own.
    fn new_top(&self, fmt: &str, opts: &str, size: u64) {
        let s = size.to_string();
        let mut a = vec!["create", "-q", "-f", fmt, "-b", "mid.qcow2", "-F", "qcow2"];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.extend(["top", &s]);
        self.must("qemu-img", &a);
        self.qemu_io(fmt, "top", &["write -P 0x33 64k 4k"]);
    }

    /// Wait until no process holds `f`'s locks: after kill -9 the kernel
    /// releases them when the dead process's io_uring is torn down, which
    /// may be a moment after `wait` returns.
    fn wait_unlocked(&self, f: &str) {
        let t0 = Instant::now();
        loop {
            let o = self.cmd("qemu-img", &["info", f]);
            if o.status.success() || !String::from_utf8_lossy(&o.stderr).contains("lock") {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "{f} stays locked");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn check(&self, f: &str) {
        self.wait_unlocked(f);
        let o = self.cmd("qemu-img", &["check", f]);
        let out = String::from_utf8_lossy(&o.stdout);
        // Exit 3: leaked clusters only (acceptable after kill -9).
        assert!(
            matches!(o.status.code(), Some(0) | Some(3)) && !out.contains("ERROR"),
            "qemu-img check {f}: {:?}\n{out}{}",
            o.status.code(),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn compare(&self, f: &str) {
        let o = self.cmd("qemu-img", &["compare", "orig.raw", f]);
        assert!(
            o.status.success(),
            "qemu-img compare orig.raw {f}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn backing(&self, f: &str) -> Option<String> {
        let v: Value =
            serde_json::from_str(&self.must("qemu-img", &["info", "--output=json", f])).unwrap();
        v["backing-filename"].as_str().map(String::from)
    }

    /// The top's own data: (guest start, length, host offset) per extent.
    fn own_data(&self, f: &str) -> Vec<(u64, u64, u64)> {
        let v: Value =
            serde_json::from_str(&self.must("qemu-img", &["map", "--output=json", f])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["depth"] == 0 && e["data"] == true)
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["offset"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    fn bytes(&self, f: &str) -> Vec<u8> {
        std::fs::read(self.path(f)).unwrap()
    }
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The JSON lines of `--json`: progress objects then one final event.
fn json_lines(stdout: &str) -> (Vec<Value>, Value) {
    let mut v: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let ev = v.pop().expect("a final event");
    assert!(ev.get("event").is_some(), "last line is the event: {ev}");
    (v, ev)
}

fn check_progress(lines: &[Value], size: u64) {
    assert!(!lines.is_empty(), "at least one progress line");
    let mut last = 0;
    for l in lines {
        assert_eq!(l["type"], "pull", "{l}");
        assert_eq!(l["end"], size, "{l}");
        let cur = l["cur"].as_u64().unwrap();
        assert!(cur >= last, "cur never decreases: {l}");
        last = cur;
        assert!(l["bandwidth"].is_u64(), "{l}");
    }
}

#[test]
fn pull_with_json_progress_and_events() {
    for fmt in ["qcow2", "qed"] {
        let d = Dir::new();
        d.chain(fmt, 8 * MIB);
        let o = d.imgpull(&["pull", "--json", "--speed", "16M", "top"]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{out}{err}");
        assert!(
            err.is_empty(),
            "no bar when stderr is not a terminal: {err}"
        );
        let (lines, ev) = json_lines(&out);
        check_progress(&lines, 8 * MIB);
        assert_eq!(lines.last().unwrap()["cur"], 8 * MIB);
        assert_eq!(lines[0]["bandwidth"], 16 * MIB);
        assert_eq!(ev["event"], "COMPLETED");
        assert_eq!(ev["cur"], 8 * MIB);
        d.check("top");
        d.compare("top");
        assert_eq!(d.backing("top"), None);
    }
}

#[test]
fn pull_keeping_a_base_absolute_and_relative() {
    let d = Dir::new();
    d.chain("qcow2", 4 * MIB);
    let mid_before = d.bytes("mid.qcow2");
    // Run from another directory with relative arguments.
    let sub = d.path("elsewhere");
    std::fs::create_dir(&sub).unwrap();
    let o = Command::new(bin())
        .args([
            "pull",
            "--no-progress",
            "--base",
            "../base.raw",
            "--keep-relative",
            "../top",
        ])
        .current_dir(&sub)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    d.check("top");
    d.compare("top");
    assert_eq!(d.backing("top").as_deref(), Some("base.raw"));
    assert!(mid_before == d.bytes("mid.qcow2"));

    let d = Dir::new();
    d.chain("qed", 4 * MIB);
    let o = d.imgpull(&["pull", "--base", "base.raw", "top"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    d.check("top");
    d.compare("top");
    let want = std::fs::canonicalize(d.path("base.raw")).unwrap();
    assert_eq!(d.backing("top").map(PathBuf::from), Some(want));
    let v: Value =
        serde_json::from_str(&d.must("qemu-img", &["info", "--output=json", "top"])).unwrap();
    assert_eq!(v["backing-filename-format"], "raw");
}

#[test]
fn standalone_image_is_a_no_op() {
    let d = Dir::new();
    d.must("qemu-img", &["create", "-q", "-f", "qcow2", "top", "3M"]);
    d.qemu_io("qcow2", "top", &["write -P 1 0 1M"]);
    let before = d.bytes("top");
    let o = d.imgpull(&["pull", "--json", "--no-progress", "top"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    let (lines, ev) = json_lines(&out);
    check_progress(&lines, 3 * MIB);
    assert_eq!(ev["event"], "COMPLETED");
    assert!(before == d.bytes("top"), "no byte changed");
}

/// Run `args`, expect exit `code` and a message naming `names`; every
/// file in the directory must be unchanged.
fn refused(d: &Dir, args: &[&str], code: i32, names: &str) {
    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(d.root())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let b = d.bytes(&n);
            (n, b)
        })
        .collect();
    let o = d.imgpull(args);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {out}{err}");
    assert!(
        err.contains(names),
        "{args:?}: message names {names}: {err}"
    );
    for (n, b) in files {
        assert!(b == d.bytes(&n), "{args:?} modified {n}");
    }
}

#[test]
fn bad_input_changes_nothing() {
    let d = Dir::new();
    d.chain("qcow2", 2 * MIB);
    d.must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "other.qcow2", "2M"],
    );
    // Usage errors: exit 2.
    for rate in ["12x", "-5", "", "1.5.5M", "99999999999E"] {
        refused(&d, &["pull", "--speed", rate, "top"], 2, "speed");
    }
    refused(&d, &["pull"], 2, "IMAGE");
    refused(&d, &["pull", "--bogus", "top"], 2, "bogus");
    // Other errors: exit 1, the message names the file.
    refused(&d, &["pull", "missing.qcow2"], 1, "missing.qcow2");
    refused(&d, &["pull", "base.raw"], 1, "base.raw");
    refused(
        &d,
        &["pull", "--base", "other.qcow2", "top"],
        1,
        "other.qcow2",
    );
    refused(
        &d,
        &["pull", "--base", "nothere.raw", "top"],
        1,
        "nothere.raw",
    );
    refused(&d, &["pull", "--base", "top", "top"], 1, "top");
    // A standalone image with a base that cannot be in its chain.
    refused(
        &d,
        &["pull", "--base", "base.raw", "other.qcow2"],
        1,
        "base.raw",
    );

    // A backing file that is missing.
    let d2 = Dir::new();
    d2.chain("qed", 2 * MIB);
    std::fs::rename(d2.path("base.raw"), d2.path("moved.raw")).unwrap();
    refused(&d2, &["pull", "top"], 1, "base.raw");

    // A read-only top (also for root, who could write it).
    let d3 = Dir::new();
    d3.chain("qcow2", 2 * MIB);
    let top = d3.path("top");
    std::fs::set_permissions(&top, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    refused(&d3, &["pull", "top"], 1, "top");
    let err = text(&d3.imgpull(&["pull", "top"])).1;
    assert!(err.contains("read-only"), "{err}");
}

#[test]
fn immutable_top_is_refused() {
    // chattr needs a disk file system (not tmpfs) and root.
    let d = Dir::in_dir(&std::env::temp_dir());
    d.chain("qcow2", 2 * MIB);
    let ok = Command::new("chattr")
        .args(["+i", "top"])
        .current_dir(d.root())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipped: chattr +i not possible here");
        return;
    }
    let r = std::panic::catch_unwind(|| refused(&d, &["pull", "top"], 1, "top"));
    let err = text(&d.imgpull(&["pull", "top"])).1;
    let _ = Command::new("chattr")
        .args(["-i", "top"])
        .current_dir(d.root())
        .status();
    r.unwrap();
    assert!(
        err.contains("immutable") || err.contains("read-only"),
        "{err}"
    );
}

#[test]
fn image_held_by_qemu_io_is_refused() {
    let d = Dir::new();
    d.chain("qcow2", 2 * MIB);
    // qemu-io keeps the image open read-write while it waits for commands.
    let mut q = Command::new("qemu-io")
        .args(["-f", "qcow2", "top"])
        .current_dir(d.root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it has the image open: its first command answers.
    {
        let stdin = q.stdin.as_mut().unwrap();
        writeln!(stdin, "read 0 512").unwrap();
        stdin.flush().unwrap();
    }
    let mut reader = std::io::BufReader::new(q.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert!(n > 0, "qemu-io exited: {:?}", q.wait_with_output());
        if line.contains("read 512/512") {
            break;
        }
    }
    let r = std::panic::catch_unwind(|| refused(&d, &["pull", "top"], 1, "top"));
    let err = text(&d.imgpull(&["pull", "top"])).1;
    drop(q.stdin.take());
    let _ = q.wait();
    r.unwrap();
    assert!(err.contains("lock"), "{err}");
    // Once qemu-io is gone the pull works.
    let o = d.imgpull(&["pull", "top"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    d.compare("top");
}

fn spawn_pull(d: &Dir, args: &[&str]) -> Child {
    Command::new(bin())
        .args(args)
        .current_dir(d.root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn sigint_and_sigterm_cancel_cleanly() {
    for (sig, fmt) in [(libc::SIGINT, "qcow2"), (libc::SIGTERM, "qed")] {
        let d = Dir::new();
        d.chain(fmt, 32 * MIB);
        let mut child = spawn_pull(&d, &["pull", "--json", "--speed", "8M", "top"]);
        // Signal once the pull has copied something (mid-pull).
        let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut out = String::new();
        loop {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
            assert!(n > 0, "pull ended early: {out}");
            out.push_str(&line);
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["cur"].as_u64().unwrap_or(0) > 0 {
                break;
            }
        }
        // SAFETY: sends a signal to our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let t0 = Instant::now();
        std::io::Read::read_to_string(&mut reader, &mut out).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5), "prompt cancel");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(130), "{out}{err}");
        let (lines, ev) = json_lines(&out);
        check_progress(&lines, 32 * MIB);
        assert_eq!(ev["event"], "CANCELED", "{ev}");
        let cur = ev["cur"].as_u64().unwrap();
        assert!(cur > 0 && cur < 32 * MIB, "{ev}");
        d.check("top");
        d.compare("top");
        assert_eq!(d.backing("top").as_deref(), Some("mid.qcow2"));
        let o = d.imgpull(&["pull", "top"]);
        assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
        d.check("top");
        d.compare("top");
        assert_eq!(d.backing("top"), None);
    }
}

/// A tiny deterministic generator for kill moments.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Whether every guest byte the top held in `before` is still held by it
/// at the same host offset in `after` (not copied a second time).
fn kept(before: &[(u64, u64, u64)], after: &[(u64, u64, u64)]) -> Result<(), String> {
    for &(s, l, h) in before {
        let mut pos = s;
        while pos < s + l {
            let Some(&(s2, l2, h2)) = after
                .iter()
                .find(|&&(s2, l2, _)| s2 <= pos && pos < s2 + l2)
            else {
                return Err(format!("guest {pos:#x} no longer in the top"));
            };
            if h2 + (pos - s2) != h + (pos - s) {
                return Err(format!("guest {pos:#x} was copied again"));
            }
            pos = (s2 + l2).min(s + l);
        }
    }
    Ok(())
}

#[test]
fn kill_9_at_random_moments() {
    let rounds: u64 = std::env::var("IMGPULL_KILL_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let tops = [
        ("qcow2", ""),
        ("qed", ""),
        ("qcow2", "extended_l2=on,cluster_size=128k"),
        ("qcow2", "compat=0.10,cluster_size=4k"),
    ];
    for (fmt, opts) in tops {
        let d = Dir::new();
        d.chain_with(fmt, opts, 16 * MIB);
        let others: Vec<Vec<u8>> = ["base.raw", "mid.qcow2"]
            .iter()
            .map(|f| d.bytes(f))
            .collect();
        let mut done = false;
        let (mut mid_pull, mut finished) = (0, 0);
        // The top's own data after the last kill that left work to do.
        let mut held: Option<Vec<(u64, u64, u64)>> = None;
        for round in 0..rounds {
            if done {
                // Start over with a fresh chain so every round kills a pull.
                std::fs::remove_file(d.path("top")).unwrap();
                d.new_top(fmt, opts, 16 * MIB);
            }
            // Half the rounds rate-limited (kill mid-copy), half at full
            // speed with short delays (kill near the header rewrite).
            let (args, delay): (Vec<&str>, u64) = if round % 2 == 0 {
                (vec!["pull", "--speed", "24M", "top"], 20 + rng.below(500))
            } else {
                (vec!["pull", "top"], rng.below(25))
            };
            let mut child = spawn_pull(&d, &args);
            std::thread::sleep(Duration::from_millis(delay));
            let _ = child.kill();
            let st = child.wait().unwrap();
            d.check("top");
            d.compare("top");
            for (f, b) in ["base.raw", "mid.qcow2"].iter().zip(&others) {
                assert!(*b == d.bytes(f), "round {round}: {f} modified");
            }
            let now = d.own_data("top");
            if let Some(before) = held.take() {
                if let Err(e) = kept(&before, &now) {
                    panic!("round {round}: {e}");
                }
            }
            done = st.success() || d.backing("top").is_none();
            if done {
                finished += 1;
            } else {
                mid_pull += 1;
                held = Some(now);
            }
        }
        eprintln!(
            "{fmt} {opts}: {mid_pull} kills mid-pull, {finished} after the backing was dropped"
        );
        assert!(mid_pull > 0, "some kills must land mid-pull");
        // A rerun completes, without copying again what was copied.
        let o = d.imgpull(&["pull", "top"]);
        assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
        d.check("top");
        d.compare("top");
        assert_eq!(d.backing("top"), None);
        if let Some(before) = held {
            kept(&before, &d.own_data("top")).unwrap();
        }
    }
}

#[test]
fn demo_verifies_and_leaves_nothing() {
    let o = Command::new(bin()).arg("demo").output().unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.contains("verified"), "{out}");
    let dir = out
        .lines()
        .find_map(|l| l.strip_prefix("removed "))
        .expect("names the directory it removed");
    assert!(!Path::new(dir.trim()).exists(), "{dir} left behind");
}

/// Unmounts a small tmpfs on drop.
struct SmallFs(PathBuf);

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A write error mid-pull (the top's file system fills up): exit 1, a
/// FAILED event with the error, the chain valid and unchanged for the
/// guest, the backing file kept.
#[test]
fn a_full_file_system_fails_the_pull_cleanly() {
    let d = Dir::new();
    d.must(
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "16M"],
    );
    d.qemu_io("raw", "base.raw", &["write -P 5 0 16M"]);
    d.must(
        "qemu-img",
        &["convert", "-O", "raw", "base.raw", "orig.raw"],
    );
    let mnt = d.path("small");
    std::fs::create_dir(&mnt).unwrap();
    // Needs root (or a user namespace) to mount; skip elsewhere.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3M", "tmpfs"])
        .arg(&mnt)
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipped: cannot mount a small tmpfs here");
        return;
    }
    let _guard = SmallFs(mnt.clone());
    let base = d.path("base.raw");
    let base = base.to_str().unwrap();
    d.must(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base,
            "-F",
            "raw",
            "small/top.qcow2",
        ],
    );
    let o = d.imgpull(&["pull", "--json", "small/top.qcow2"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("small/top.qcow2") && err.contains("No space left"),
        "{err}"
    );
    let (lines, ev) = json_lines(&out);
    check_progress(&lines, 16 * MIB);
    assert_eq!(ev["event"], "FAILED", "{ev}");
    assert!(
        ev["error"].as_str().unwrap().contains("No space left"),
        "{ev}"
    );
    d.check("small/top.qcow2");
    d.compare("small/top.qcow2");
    assert_eq!(d.backing("small/top.qcow2").as_deref(), Some(base));
}
