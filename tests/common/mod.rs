//! Shared helpers for the imgpull integration tests.
//!
//! Everything here drives QEMU's own tools (the oracle) and imgpull (the
//! library crates in-process, the `imgpull` CLI as a child process) on
//! small images in a scratch directory, and records every external command
//! as a shell line so a failing test can print an exact reproducer.
//!
//! * [`Scratch`] — a temporary directory (under `/dev/shm` when it exists)
//!   in which all commands run with *relative* file names; its command log
//!   is a copy-pasteable reproducer.
//! * [`Layer`] / [`Scratch::build_chain`] — chains made with `qemu-img
//!   create` and `qemu-io` commands.
//! * [`Scratch::check_map`] — our map (library JSON, CLI JSON, CLI human)
//!   against `qemu-img map`.
//! * byte patch helpers ([`put_be32`], [`put_le64`], ...) for bad-input tests.
//! * [`imgpull_bin`] — the CLI binary, built once per test process with
//!   `cargo build -p imgpull-cli` (or taken from `$IMGPULL_BIN`).
#![allow(dead_code)]

pub mod cases;

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use imgpull_chain::{render_json, Chain, ChainOptions};

/// Default time limit for one external command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(120);

/// Address-space limit (bytes) under which bad-input CLI runs execute, so an
/// allocation of gigabytes driven by a header field fails loudly.
pub const CLI_MEMORY_LIMIT: u64 = 1 << 30;

/// What an external command did.
#[derive(Debug)]
pub struct Output {
    /// The shell form of the command (for reproducers).
    pub cmdline: String,
    /// Exit status; `None` when it was killed at the time limit.
    pub status: Option<ExitStatus>,
    /// Captured standard output.
    pub stdout: String,
    /// Captured standard error.
    pub stderr: String,
}

impl Output {
    /// Exit code (`None` when killed by a signal or the time limit).
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Whether the command exited 0.
    pub fn ok(&self) -> bool {
        self.code() == Some(0)
    }

    /// A description for failure messages.
    pub fn describe(&self) -> String {
        let st = match self.status {
            None => "KILLED AT TIME LIMIT (hang)".to_string(),
            Some(s) => format!("{s}"),
        };
        format!(
            "$ {}\n[{st}]\n--- stdout ---\n{}--- stderr ---\n{}",
            self.cmdline, self.stdout, self.stderr
        )
    }
}

/// Quote one shell word.
pub fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn shell_line(prog: &str, args: &[String]) -> String {
    let mut s = shell_word(prog);
    for a in args {
        s.push(' ');
        s.push_str(&shell_word(a));
    }
    s
}

/// Run `cmd` with a time limit, capturing its output.
pub fn run_timeout(cmd: &mut Command, cmdline: String, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot run `{cmdline}`: {e}"),
    };
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let mut sleep = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => {
                std::thread::sleep(sleep);
                sleep = (sleep * 2).min(Duration::from_millis(20));
            }
            Err(e) => panic!("waiting for `{cmdline}`: {e}"),
        }
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    Output {
        cmdline,
        status,
        stdout,
        stderr,
    }
}

/// Run `f` on another thread; panic if it takes longer than `limit`
/// (a hang in the library under test).
pub fn with_timeout<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no answer within {limit:?} (hang)")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => panic!("{what}: worker thread ended without a result"),
        },
    }
}

/// The `imgpull` CLI binary: `$IMGPULL_BIN`, or built once per test
/// process with `cargo build -p imgpull-cli` (its path taken from cargo's
/// JSON messages, so any target-dir configuration works).
pub fn imgpull_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("IMGPULL_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ has a parent")
            .to_path_buf();
        let out = Command::new(&cargo)
            .current_dir(&root)
            .args([
                "build",
                "-p",
                "imgpull-cli",
                "--bin",
                "imgpull",
                "--message-format=json",
            ])
            .stderr(Stdio::inherit())
            .output()
            .expect("running cargo build -p imgpull-cli");
        assert!(
            out.status.success(),
            "cargo build -p imgpull-cli failed ({})",
            out.status
        );
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["reason"] == "compiler-artifact" && v["target"]["name"] == "imgpull" {
                if let Some(exe) = v["executable"].as_str() {
                    return PathBuf::from(exe);
                }
            }
        }
        panic!("cargo build -p imgpull-cli reported no imgpull executable")
    })
}

/// A scratch directory whose commands are logged as a reproducer.
pub struct Scratch {
    dir: tempfile::TempDir,
    log: Mutex<Vec<String>>,
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    /// A new scratch directory, in `/dev/shm` when available.
    pub fn new() -> Scratch {
        let shm = Path::new("/dev/shm");
        let mut b = tempfile::Builder::new();
        b.prefix("imgpull-test-");
        let dir = if shm.is_dir() {
            b.tempdir_in(shm).or_else(|_| b.tempdir())
        } else {
            b.tempdir()
        }
        .expect("creating a scratch directory");
        Scratch {
            dir,
            log: Mutex::new(Vec::new()),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Absolute path of a file in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Record a line in the reproducer log.
    pub fn note(&self, line: impl Into<String>) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line.into());
    }

    /// The reproducer: shell commands from an empty directory.
    pub fn reproducer(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = String::from("# reproducer (run in an empty directory):\n");
        for l in log.iter() {
            s += l;
            s.push('\n');
        }
        s
    }

    /// Run a program in the directory (relative names), with a time limit,
    /// logging it.
    pub fn run<S: AsRef<OsStr>>(&self, prog: &str, args: &[S]) -> Output {
        self.run_in(self.dir(), prog, args, CMD_TIMEOUT)
    }

    /// Run a program in `cwd` with a time limit, logging it.
    pub fn run_in<S: AsRef<OsStr>>(
        &self,
        cwd: &Path,
        prog: &str,
        args: &[S],
        limit: Duration,
    ) -> Output {
        let sargs: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        let mut line = shell_line(prog, &sargs);
        if cwd != self.dir() {
            let rel = cwd.strip_prefix(self.dir()).unwrap_or(cwd);
            line = format!("(cd {} && {line})", shell_word(&rel.display().to_string()));
        }
        self.note(line.clone());
        let mut cmd = Command::new(prog);
        cmd.args(args).current_dir(cwd);
        run_timeout(&mut cmd, line, limit)
    }

    /// Run a program and require success; its stdout.
    pub fn must<S: AsRef<OsStr>>(&self, prog: &str, args: &[S]) -> String {
        let o = self.run(prog, args);
        assert!(
            o.ok(),
            "command failed:\n{}\n{}",
            o.describe(),
            self.reproducer()
        );
        o.stdout
    }

    /// `qemu-img ARGS`, required to succeed.
    pub fn qemu_img(&self, args: &[&str]) -> String {
        self.must("qemu-img", args)
    }

    /// `qemu-io -f FMT -c CMD... FILE`, required to succeed (and every
    /// command in it: qemu-io exits 0 even when a command fails, so its
    /// output is checked for error lines too).
    pub fn qemu_io(&self, fmt: &str, file: &str, cmds: &[String]) {
        if cmds.is_empty() {
            return;
        }
        let mut args: Vec<String> = vec!["-f".into(), fmt.into()];
        for c in cmds {
            args.push("-c".into());
            args.push(c.clone());
        }
        args.push(file.into());
        let o = self.run("qemu-io", &args);
        let failed = !o.ok()
            || o.stderr.contains("failed")
            || o.stdout.contains("failed:")
            || o.stdout.contains("error");
        assert!(
            !failed,
            "qemu-io failed:\n{}\n{}",
            o.describe(),
            self.reproducer()
        );
    }

    /// Run `imgpull ARGS` in the directory under the time limit and the
    /// memory limit.
    pub fn imgpull(&self, args: &[&str]) -> Output {
        self.imgpull_in(self.dir(), args)
    }

    /// Run `imgpull ARGS` in `cwd` under the time and memory limits.
    pub fn imgpull_in(&self, cwd: &Path, args: &[&str]) -> Output {
        let bin = imgpull_bin();
        let sargs: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut line = shell_line("imgpull", &sargs);
        if cwd != self.dir() {
            let rel = cwd.strip_prefix(self.dir()).unwrap_or(cwd);
            line = format!("(cd {} && {line})", shell_word(&rel.display().to_string()));
        }
        self.note(line.clone());
        // `ulimit -v` (KiB) bounds the address space: a gigabyte-sized
        // allocation from a header field aborts instead of succeeding.
        let script = format!("ulimit -v {}; exec \"$0\" \"$@\"", CLI_MEMORY_LIMIT / 1024);
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg(bin)
            .args(args)
            .current_dir(cwd);
        run_timeout(&mut cmd, line, Duration::from_secs(60))
    }

    /// Build a chain bottom-first; returns the top's file name. Layers
    /// above the first get `-b <previous> -F <previous format>`.
    pub fn build_chain(&self, layers: &[Layer]) -> String {
        let mut prev: Option<&Layer> = None;
        for l in layers {
            self.create_layer(l, prev);
            self.qemu_io(&l.fmt, &l.name, &l.ops);
            prev = Some(l);
        }
        layers.last().expect("at least one layer").name.clone()
    }

    /// `qemu-img create` one layer over `below`.
    pub fn create_layer(&self, l: &Layer, below: Option<&Layer>) {
        let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), l.fmt.clone()];
        if let Some(b) = below {
            args.extend(["-b".into(), b.name.clone(), "-F".into(), b.fmt.clone()]);
        }
        if !l.opts.is_empty() {
            args.extend(["-o".into(), l.opts.clone()]);
        }
        args.push(l.name.clone());
        args.push(l.size.to_string());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        self.qemu_img(&a);
    }

    /// `qemu-img map --output=json FILE` (must succeed).
    pub fn qemu_map_json(&self, file: &str) -> String {
        self.qemu_img(&["map", "--output=json", file])
    }

    /// Our map of `file` through the library, as qemu-img's JSON text.
    pub fn our_map_json(&self, file: &str) -> Result<String, String> {
        let p = self.path(file);
        with_timeout("Chain::open + map", Duration::from_secs(60), move || {
            let chain = Chain::open(&p, &ChainOptions::default()).map_err(|e| e.to_string())?;
            let m = chain.map().map_err(|e| e.to_string())?;
            Ok(render_json(&m))
        })
    }

    /// Compare our map of `file` with qemu-img's: library JSON, CLI JSON,
    /// and (unless the chain has compressed clusters, where both must
    /// fail) CLI human output. `Err` carries full diagnostics.
    pub fn check_map(&self, file: &str) -> Result<(), String> {
        let want = self.qemu_map_json(file);
        let mut problems = String::new();
        match self.our_map_json(file) {
            Ok(got) if got == want => {}
            Ok(got) => {
                let _ = write!(
                    problems,
                    "library map differs from qemu-img map --output=json {file}\n{}",
                    diff_text(&want, &got)
                );
            }
            Err(e) => {
                let _ = writeln!(problems, "library map of {file} failed: {e}");
            }
        }
        let cli = self.imgpull(&["map", "--output", "json", file]);
        if !cli.ok() || cli.stdout != want {
            let _ = write!(
                problems,
                "imgpull map --output json {file} differs from qemu-img:\n{}\n{}",
                cli.describe(),
                if cli.ok() {
                    diff_text(&want, &cli.stdout)
                } else {
                    String::new()
                }
            );
        }
        let q = self.run("qemu-img", &["map", file]);
        let ours = self.imgpull(&["map", file]);
        if want.contains("\"compressed\": true") {
            if q.ok() || ours.code() != Some(1) {
                let _ = write!(
                    problems,
                    "human map of a chain with compressed clusters: both must fail (exit 1)\n{}\n{}",
                    q.describe(),
                    ours.describe()
                );
            }
        } else if !q.ok() || !ours.ok() || q.stdout != ours.stdout {
            let _ = write!(
                problems,
                "human map differs:\n{}\n{}\n{}",
                q.describe(),
                ours.describe(),
                diff_text(&q.stdout, &ours.stdout)
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("{problems}\n{}", self.reproducer()))
        }
    }

    /// `qemu-img convert -O raw FILE OUT` and the bytes of OUT.
    pub fn qemu_raw_bytes(&self, file: &str) -> Vec<u8> {
        let out = format!("{file}.convert.raw");
        self.qemu_img(&["convert", "-O", "raw", file, &out]);
        let v = std::fs::read(self.path(&out)).expect("reading converted raw");
        let _ = std::fs::remove_file(self.path(&out));
        v
    }

    /// `qemu-img check FILE`: `Ok` when clean, `Err(diagnostics)` otherwise.
    pub fn qemu_check(&self, file: &str) -> Result<(), String> {
        let o = self.run("qemu-img", &["check", file]);
        if o.ok() && !o.stdout.contains("ERROR") && !o.stdout.contains("Leaked") {
            Ok(())
        } else {
            Err(format!(
                "qemu-img check {file} is not clean:\n{}",
                o.describe()
            ))
        }
    }

    /// `qemu-img info --output=json FILE` parsed.
    pub fn qemu_info(&self, file: &str, chain: bool) -> serde_json::Value {
        let mut args = vec!["info", "--output=json"];
        if chain {
            args.push("--backing-chain");
        }
        args.push(file);
        let s = self.qemu_img(&args);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("qemu-img info JSON: {e}\n{s}"))
    }
}

impl Scratch {
    /// Overwrite bytes of a file in the directory, logging an equivalent
    /// shell command for the reproducer.
    pub fn patch(&self, file: &str, offset: u64, bytes: &[u8]) {
        let esc: String = bytes.iter().map(|b| format!("\\x{b:02x}")).collect();
        self.note(format!(
            "printf '{esc}' | dd of={} bs=1 seek={offset} conv=notrunc status=none",
            shell_word(file)
        ));
        patch(&self.path(file), offset, bytes);
    }

    /// Big-endian u32 at `offset` (qcow2 header fields).
    pub fn be32(&self, file: &str, offset: u64, v: u32) {
        self.patch(file, offset, &v.to_be_bytes());
    }

    /// Big-endian u64 at `offset`.
    pub fn be64(&self, file: &str, offset: u64, v: u64) {
        self.patch(file, offset, &v.to_be_bytes());
    }

    /// Little-endian u32 at `offset` (QED header fields).
    pub fn le32(&self, file: &str, offset: u64, v: u32) {
        self.patch(file, offset, &v.to_le_bytes());
    }

    /// Little-endian u64 at `offset`.
    pub fn le64(&self, file: &str, offset: u64, v: u64) {
        self.patch(file, offset, &v.to_le_bytes());
    }

    /// Cut a file to `len` bytes, logged.
    pub fn truncate(&self, file: &str, len: u64) {
        self.note(format!("truncate -s {len} {}", shell_word(file)));
        truncate(&self.path(file), len);
    }
}

/// The `qemu-img info` keys imgpull must reproduce.
pub const INFO_KEYS: &[&str] = &[
    "filename",
    "format",
    "virtual-size",
    "cluster-size",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "dirty-flag",
    "format-specific",
];

/// Differences between qemu-img's and our info object in [`INFO_KEYS`]
/// (empty when equal).
pub fn info_diff(what: &str, q: &serde_json::Value, o: &serde_json::Value) -> String {
    let mut diffs = String::new();
    for k in INFO_KEYS {
        if q.get(k) != o.get(k) {
            let _ = writeln!(
                diffs,
                "  {what}: key {k:?}: qemu-img {}, imgpull {}",
                q.get(k).map_or("(absent)".into(), |v| v.to_string()),
                o.get(k).map_or("(absent)".into(), |v| v.to_string())
            );
        }
    }
    diffs
}

/// Known kinds of map difference, named in failure messages so a reader
/// can tell one root cause from another.
pub fn map_hints(want: &str, got: &str) -> String {
    let mut h = String::new();
    let data_zero = "\"zero\": true, \"data\": true";
    if want.contains(data_zero) && !got.contains(data_zero) {
        h += "hint: qemu-img reports allocated data over a hole in the image file as \
              \"zero\": true, \"data\": true (it asks the file's block status, SEEK_DATA); ours does not\n";
    }
    let unalloc_offset = want
        .lines()
        .any(|l| l.contains("\"present\": false") && l.contains("\"offset\""));
    if unalloc_offset
        && !got
            .lines()
            .any(|l| l.contains("\"present\": false") && l.contains("\"offset\""))
    {
        h += "hint: qemu-img reports unallocated subclusters of an allocated extended-L2 cluster \
              with the cluster's host \"offset\"; ours gives none\n";
    }
    if want.contains("\"length\": 0,") && got.trim() == "[]" {
        h +=
            "hint: for a zero-length image qemu-img prints one entry of length 0; ours prints []\n";
    }
    if !h.is_empty() {
        match (normalize_known(want), parse_map(got)) {
            (Some(w), Some(g)) if w == g => {
                h += "hint: apart from the differences hinted above, the maps agree\n"
            }
            (Some(_), Some(_)) => {
                h += "hint: the maps differ in more than the differences hinted above\n"
            }
            _ => {}
        }
    }
    h
}

/// One parsed map entry: start, length, depth, present, zero, data,
/// compressed, offset.
type Entry = (u64, u64, u64, bool, bool, bool, bool, Option<u64>);

fn parse_map(text: &str) -> Option<Vec<Entry>> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v.as_array()?
        .iter()
        .map(|e| {
            Some((
                e["start"].as_u64()?,
                e["length"].as_u64()?,
                e["depth"].as_u64()?,
                e["present"].as_bool()?,
                e["zero"].as_bool()?,
                e["data"].as_bool()?,
                e["compressed"].as_bool()?,
                e.get("offset").and_then(|o| o.as_u64()),
            ))
        })
        .collect()
}

/// qemu's map with the hinted differences taken out (data over file holes
/// reported as plain data, no offsets on unallocated ranges), re-merged
/// with qemu-img's rule.
fn normalize_known(text: &str) -> Option<Vec<Entry>> {
    let mut out: Vec<Entry> = Vec::new();
    for mut e in parse_map(text)? {
        if e.4 && e.5 {
            e.4 = false;
        }
        if !e.3 {
            e.7 = None;
        }
        if let Some(l) = out.last_mut() {
            let same = l.2 == e.2 && l.3 == e.3 && l.4 == e.4 && l.5 == e.5 && l.6 == e.6;
            let contiguous = match (l.7, e.7) {
                (None, None) => true,
                (Some(a), Some(b)) => a + l.1 == b,
                _ => false,
            };
            if same && contiguous && l.1 > 0 {
                l.1 += e.1;
                continue;
            }
        }
        out.push(e);
    }
    Some(out)
}

/// A unified-ish line diff of two texts (for failure messages).
pub fn diff_text(want: &str, got: &str) -> String {
    let w: Vec<&str> = want.lines().collect();
    let g: Vec<&str> = got.lines().collect();
    let mut s = map_hints(want, got);
    s += "--- qemu (expected)\n+++ imgpull (got)\n";
    let n = w.len().max(g.len());
    let mut shown = 0;
    for i in 0..n {
        let (a, b) = (w.get(i), g.get(i));
        if a == b {
            continue;
        }
        if let Some(a) = a {
            let _ = writeln!(s, "-{i:4}: {a}");
        }
        if let Some(b) = b {
            let _ = writeln!(s, "+{i:4}: {b}");
        }
        shown += 1;
        if shown >= 20 {
            s += "... (more differences)\n";
            break;
        }
    }
    if want.ends_with('\n') != got.ends_with('\n') {
        s += "(trailing newline differs)\n";
    }
    s
}

/// One layer of a chain to build with qemu-img / qemu-io.
#[derive(Clone, Debug)]
pub struct Layer {
    /// File name (relative to the scratch directory).
    pub name: String,
    /// `qcow2`, `qed` or `raw`.
    pub fmt: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// `-o` options for qemu-img create (may be empty).
    pub opts: String,
    /// qemu-io commands run on the layer after creating it.
    pub ops: Vec<String>,
}

impl Layer {
    /// A layer without options or operations.
    pub fn new(name: &str, fmt: &str, size: u64) -> Layer {
        Layer {
            name: name.into(),
            fmt: fmt.into(),
            size,
            opts: String::new(),
            ops: Vec::new(),
        }
    }

    /// With `-o` options.
    pub fn opts(mut self, o: &str) -> Layer {
        self.opts = o.into();
        self
    }

    /// With qemu-io commands.
    pub fn ops(mut self, ops: Vec<String>) -> Layer {
        self.ops = ops;
        self
    }
}

/// A small deterministic PRNG (splitmix64) for reproducible image contents.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// Next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `p` percent.
    pub fn chance(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

/// Which kinds of qemu-io operations [`gen_ops`] may emit.
#[derive(Clone, Copy, Debug)]
pub struct OpKinds {
    /// `write -z` (zero writes).
    pub zero: bool,
    /// `write -c` (compressed; qcow2 only).
    pub compressed: bool,
    /// `discard`.
    pub discard: bool,
    /// Writes not aligned to the cluster (copy-on-write of partial clusters).
    pub partial: bool,
}

impl OpKinds {
    /// Everything a qcow2 layer supports.
    pub const QCOW2: OpKinds = OpKinds {
        zero: true,
        compressed: true,
        discard: true,
        partial: true,
    };
    /// Everything a QED layer supports (no compression).
    pub const QED: OpKinds = OpKinds {
        zero: true,
        compressed: false,
        discard: true,
        partial: true,
    };
    /// For raw files.
    pub const RAW: OpKinds = OpKinds {
        zero: true,
        compressed: false,
        discard: false,
        partial: true,
    };
}

/// `n` random qemu-io commands on a layer of `size` bytes with cluster
/// size `cluster`: cluster-aligned and partial writes with patterns,
/// zero writes, compressed writes and discards, as `kinds` allows.
pub fn gen_ops(rng: &mut Rng, size: u64, cluster: u64, n: usize, kinds: OpKinds) -> Vec<String> {
    let clusters = (size / cluster).max(1);
    // Clusters any earlier op touched: QEMU's compressed writes fail with
    // EIO on clusters that are already allocated, so `write -c` only goes
    // to untouched ones.
    let mut touched = std::collections::HashSet::new();
    let mut ops: Vec<String> = Vec::new();
    while ops.len() < n {
        if let Some(last) = ops.last() {
            let mut it = last.split_whitespace().rev();
            let l: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let o: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if l > 0 {
                for c in o / cluster..=(o + l - 1) / cluster {
                    touched.insert(c);
                }
            }
        }
        let pat = 1 + rng.below(250);
        let c0 = rng.below(clusters);
        let nclu = 1 + rng.below(4.min(clusters - c0));
        let off = c0 * cluster;
        let len = (nclu * cluster).min(size - off);
        if len == 0 {
            continue;
        }
        match rng.below(10) {
            0..=3 => ops.push(format!("write -P {pat} {off} {len}")),
            4 | 5 if kinds.partial => {
                // Partial cluster: a sub-cluster piece, possibly crossing
                // a cluster boundary, 512-aligned or byte-granular.
                let unit = if rng.chance(50) { 512 } else { 1 };
                let start = off + rng.below(cluster) / unit * unit;
                let max = (size - start).min(2 * cluster);
                let l = (1 + rng.below(max.max(1))).div_ceil(unit) * unit;
                let l = l.min(size - start);
                if l > 0 {
                    ops.push(format!("write -P {pat} {start} {l}"));
                }
            }
            6 if kinds.zero => ops.push(format!("write -z {off} {len}")),
            7 if kinds.compressed
                && len.checked_rem(cluster) == Some(0)
                && (c0..c0 + len / cluster).all(|c| !touched.contains(&c)) =>
            {
                ops.push(format!("write -c -P {pat} {off} {len}"))
            }
            8 if kinds.discard => ops.push(format!("discard {off} {len}")),
            9 if kinds.zero && kinds.partial => {
                let start = off + rng.below(cluster) / 512 * 512;
                let l = (512 * (1 + rng.below(8))).min(size - start);
                if l > 0 {
                    ops.push(format!("write -z {start} {l}"));
                }
            }
            _ => ops.push(format!("write -P {pat} {off} {len}")),
        }
    }
    ops
}

/// Collects failures of a test matrix so every case runs, then reports all.
#[derive(Default)]
pub struct Failures {
    list: Vec<String>,
    total: usize,
}

impl Failures {
    /// New, empty.
    pub fn new() -> Failures {
        Failures::default()
    }

    /// Record the outcome of one case.
    pub fn check(&mut self, case: &str, r: Result<(), String>) {
        self.total += 1;
        if let Err(e) = r {
            self.list.push(format!("=== CASE {case} FAILED ===\n{e}\n"));
        }
    }

    /// Panic with every failure, if any.
    pub fn finish(self) {
        if !self.list.is_empty() {
            panic!(
                "{} of {} cases failed:\n\n{}",
                self.list.len(),
                self.total,
                self.list.join("\n")
            );
        }
    }
}

/// Run `f` catching panics, turning them into `Err` (so a matrix goes on).
pub fn catch<F: FnOnce() -> Result<(), String>>(f: F) -> Result<(), String> {
    // Test closures own their data; a panic abandons it, so unwind safety
    // is not a concern here.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(if let Some(s) = p.downcast_ref::<String>() {
            format!("panicked: {s}")
        } else if let Some(s) = p.downcast_ref::<&str>() {
            format!("panicked: {s}")
        } else {
            "panicked".to_string()
        }),
    }
}

/// Overwrite bytes of `path` at `offset`.
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {} to patch: {e}", path.display()));
    f.write_all_at(bytes, offset)
        .unwrap_or_else(|e| panic!("patching {}: {e}", path.display()));
}

/// Write a big-endian u16 at `offset`.
pub fn put_be16(path: &Path, offset: u64, v: u16) {
    patch(path, offset, &v.to_be_bytes());
}

/// Write a big-endian u32 at `offset`.
pub fn put_be32(path: &Path, offset: u64, v: u32) {
    patch(path, offset, &v.to_be_bytes());
}

/// Write a big-endian u64 at `offset`.
pub fn put_be64(path: &Path, offset: u64, v: u64) {
    patch(path, offset, &v.to_be_bytes());
}

/// Write a little-endian u32 at `offset`.
pub fn put_le32(path: &Path, offset: u64, v: u32) {
    patch(path, offset, &v.to_le_bytes());
}

/// Write a little-endian u64 at `offset`.
pub fn put_le64(path: &Path, offset: u64, v: u64) {
    patch(path, offset, &v.to_le_bytes());
}

/// Read `n` bytes of `path` at `offset`.
pub fn read_bytes(path: &Path, offset: u64, n: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).expect("opening file to read");
    let mut v = vec![0u8; n];
    f.read_exact_at(&mut v, offset).expect("reading bytes");
    v
}

/// Read a big-endian u32 at `offset`.
pub fn get_be32(path: &Path, offset: u64) -> u32 {
    u32::from_be_bytes(read_bytes(path, offset, 4).try_into().expect("4 bytes"))
}

/// Read a big-endian u64 at `offset`.
pub fn get_be64(path: &Path, offset: u64) -> u64 {
    u64::from_be_bytes(read_bytes(path, offset, 8).try_into().expect("8 bytes"))
}

/// Read a little-endian u32 at `offset`.
pub fn get_le32(path: &Path, offset: u64) -> u32 {
    u32::from_le_bytes(read_bytes(path, offset, 4).try_into().expect("4 bytes"))
}

/// Read a little-endian u64 at `offset`.
pub fn get_le64(path: &Path, offset: u64) -> u64 {
    u64::from_le_bytes(read_bytes(path, offset, 8).try_into().expect("8 bytes"))
}

/// Offset of the qcow2 header extension of type `ty` in `path`, if
/// present (`ty == 0` finds the end-of-extensions marker).
pub fn qcow2_extension(path: &Path, ty: u32) -> Option<u64> {
    let version = get_be32(path, 4);
    let mut off = if version >= 3 {
        get_be32(path, 100) as u64
    } else {
        72
    };
    let cluster = 1u64 << get_be32(path, 20);
    while off + 8 <= cluster {
        let t = get_be32(path, off);
        let len = get_be32(path, off + 4) as u64;
        if t == ty {
            return Some(off);
        }
        if t == 0 {
            return None;
        }
        off += 8 + len.div_ceil(8) * 8;
    }
    None
}

/// Cut `path` to `len` bytes.
pub fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("truncating {}: {e}", path.display()));
}

/// Read the whole guest view of `file` through [`Chain::read`] in chunks
/// of `chunk` bytes starting at `first` (bytes before `first` are read in
/// one piece), so unaligned request boundaries get exercised.
pub fn read_through_chain(path: &Path, chunk: usize, first: usize) -> Result<Vec<u8>, String> {
    let chain = Chain::open(path, &ChainOptions::default()).map_err(|e| e.to_string())?;
    let size = chain.virtual_size() as usize;
    let mut out = vec![0u8; size];
    let mut pos = 0usize;
    if first > 0 && first < size {
        chain
            .read(0, &mut out[..first])
            .map_err(|e| e.to_string())?;
        pos = first;
    }
    while pos < size {
        let n = chunk.min(size - pos);
        chain
            .read(pos as u64, &mut out[pos..pos + n])
            .map_err(|e| e.to_string())?;
        pos += n;
    }
    Ok(out)
}

/// First differing offset of two byte strings, for messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Size constants.
pub const KIB: u64 = 1024;
/// One MiB.
pub const MIB: u64 = 1024 * 1024;
/// One GiB.
pub const GIB: u64 = 1024 * MIB;
