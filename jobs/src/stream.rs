//! The stream job (libvirt's block pull, QEMU's `block-stream`): copy into
//! the top layer everything it reads from the layers above the base, then
//! point the top at the base (or at nothing).
//!
//! The loop follows QEMU's `block/stream.c`: walk the top's guest address
//! space; ranges allocated in the top are skipped (they still count as
//! progress); for a range unallocated in the top, ask where it lives above
//! the base and copy what is there:
//!
//! * data in a layer → read from that layer's file at its host offset and
//!   written into freshly prepared clusters of the top, then committed
//!   (data before mapping);
//! * compressed clusters → decompressed through the layer's driver;
//! * zero ranges (and ranges past the end of a shorter intermediate
//!   backing, which read as zeros but would uncover the kept base) → zero
//!   clusters in the top; where the format cannot say "zero" (qcow2 v2 over
//!   a backing file) zeros are written as data only where the base would
//!   otherwise show through;
//! * ranges unallocated all the way down to the base → left unallocated.
//!
//! The unit of copying is the top's granularity (cluster, or subcluster
//! with extended L2): a granule that must be allocated gets its whole
//! guest content, reading what lies below for the parts that are not
//! copied from an intermediate layer (copy-on-write).
//!
//! A dispatcher thread maps the image a window (64 MiB) at a time: the
//! top's unallocated ranges, then, layer by layer from the top's backing
//! down, where those ranges live (each layer is asked only about what the
//! layers above it left unallocated). It hands tasks to worker threads,
//! several in flight: at full speed a task holds about 8 MiB to copy
//! (spanning up to 8 times that of a sparse chain). A worker holds the
//! top's range lock for its task, re-checks what is still unallocated in
//! the top (guest writes may race with the job), plans its granules, makes
//! the zero ranges, then copies the data ranges in one pass: one
//! [`Driver::prepare_write_many`] (the task's new clusters in one
//! allocation, contiguous in the top), one copy of all its data pieces
//! file to file ([`uring::copy`]: 1 MiB chains through registered buffers
//! of io_uring, several in flight), the odd parts through a buffer, then
//! one commit. Under a speed limit, data is written range by range in small
//! pieces, each charged to the token bucket just before it is written;
//! only copied bytes are charged.
//!
//! [`Driver::prepare_write_many`]: imgpull_image::Driver::prepare_write_many
//!
//! At the end the top is flushed, then its backing file is rewritten to
//! the base (absolute path, or relative to the top's directory) or
//! removed, then the chain's layer list drops the streamed layers. A
//! cancel leaves the backing link and everything copied so far; a new
//! stream resumes where this one stopped.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use imgpull_chain::Chain;
use imgpull_image::uring::{self, CopyError, CopyReq, CopySrc};
use imgpull_image::{
    BackingFile, Error, ErrorKind, Extent, Format, GuestRead, HostRun, Image, IoReq, Result,
    ResultExt, Status, Zeros,
};

use crate::event::{ErrorAction, IoOperation};
use crate::job::{JobContext, JobDriver, RunError, Throttle};
use crate::ratelimit::piece_for;
use crate::status::JobType;

/// Bytes to copy handed to one worker when there is no speed limit.
pub const MAX_CHUNK: u64 = 8 << 20;
/// How many times `max_chunk` of the guest a full-speed task may span.
pub const TASK_SPAN: u64 = 8;
/// Default number of worker threads.
pub const DEFAULT_WORKERS: usize = 4;

/// How to stream.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Index (in the chain's layer list, 0 = top) of the base to keep;
    /// `None` pulls the whole chain and leaves the top without a backing
    /// file.
    pub base: Option<usize>,
    /// Record the base's path relative to the top's directory instead of
    /// its absolute path.
    pub keep_relative: bool,
    /// Record exactly this backing file name (QMP's `backing-file`; not
    /// validated) instead of a computed one.
    pub backing_file: Option<String>,
    /// Worker threads copying in parallel.
    pub workers: usize,
    /// Bytes to copy per worker request without a speed limit (a request
    /// spans at most [`TASK_SPAN`] times that of the guest).
    pub max_chunk: u64,
    /// How much of the image the dispatcher maps at once.
    pub window: u64,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            base: None,
            keep_relative: false,
            backing_file: None,
            workers: DEFAULT_WORKERS,
            max_chunk: MAX_CHUNK,
            window: WINDOW,
        }
    }
}

/// What a stream job did, for logs and tests (updated as it runs).
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Bytes written into the top as data (what the speed limit charges).
    pub copied: AtomicU64,
    /// Bytes made zero clusters in the top.
    pub zeroed: AtomicU64,
}

impl StreamStats {
    /// Bytes copied so far.
    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    /// Bytes zeroed so far.
    pub fn zeroed(&self) -> u64 {
        self.zeroed.load(Ordering::Relaxed)
    }
}

/// The stream job's driver: run it with [`crate::Job`].
pub struct StreamJob {
    chain: Arc<Chain>,
    layers: Arc<Vec<Arc<Image>>>,
    /// Virtual size of each layer.
    sizes: Vec<u64>,
    /// The top's allocation unit.
    granule: u64,
    base: Option<usize>,
    new_backing: Option<BackingFile>,
    workers: usize,
    max_chunk: u64,
    window: u64,
    stats: Arc<StreamStats>,
}

impl std::fmt::Debug for StreamJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamJob")
            .field("top", &self.layers[0].path())
            .field("depth", &self.layers.len())
            .field("base", &self.base)
            .field("new_backing", &self.new_backing)
            .finish()
    }
}

/// Where the bytes of one piece of a range come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    /// Data of the layer at `depth`, at host offset `host` (of the piece's
    /// first byte).
    Data { depth: usize, host: u64 },
    /// Compressed clusters of the layer at `depth`.
    Compressed { depth: usize },
    /// Reads as zeros and must keep doing so.
    Zero,
    /// Unallocated above the base: whatever the base shows, now and after.
    Base,
}

#[derive(Clone, Copy, Debug)]
struct Piece {
    off: u64,
    len: u64,
    src: Src,
}

impl Piece {
    fn end(&self) -> u64 {
        self.off + self.len
    }
}

/// What to do with one granule of the top.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// Leave unallocated.
    Leave,
    /// Make a zero cluster (with a fallback when the format cannot).
    Zero,
    /// Allocate and write the granule's whole content.
    Write,
}

/// A range for a worker, with where its bytes live below the top (the
/// layers below the top do not change while the job runs, so this is
/// computed once per window by the dispatcher).
#[derive(Clone, Debug)]
struct Task {
    off: u64,
    len: u64,
    pieces: Arc<Vec<Piece>>,
}

/// Largest part of a run filled through a buffer at once.
const BUFFERED_PART: u64 = 1 << 20;

/// How the bytes of prepared runs of the top get there: file-to-file
/// copies of data pieces, and guest ranges (with their host offset in the
/// top) to fill through a buffer.
struct CopyPlan<'a> {
    copies: Vec<CopyReq<'a>>,
    buffered: Vec<(u64, u64, u64)>,
}

impl<'a> CopyPlan<'a> {
    fn new(layers: &'a [Arc<Image>], pieces: &[Piece], runs: &[HostRun]) -> CopyPlan<'a> {
        let mut copies: Vec<CopyReq<'a>> = Vec::new();
        let mut copy_end = 0u64;
        let mut buffered: Vec<(u64, u64, u64)> = Vec::new();
        for r in runs {
            for p in StreamJob::parts(pieces, r.guest, r.guest + r.len) {
                let host = r.host + (p.off - r.guest);
                match p.src {
                    Src::Data { depth, host: from } => {
                        let seg = CopySrc {
                            storage: layers[depth].storage(),
                            offset: from,
                            len: p.len,
                        };
                        match copies.last_mut() {
                            Some(c) if copy_end == host => c.srcs.push(seg),
                            _ => copies.push(CopyReq {
                                dst_offset: host,
                                srcs: vec![seg],
                            }),
                        }
                        copy_end = host + p.len;
                    }
                    _ => {
                        let mut off = p.off;
                        while off < p.end() {
                            let host = r.host + (off - r.guest);
                            match buffered.last_mut() {
                                Some(x)
                                    if x.1 == off
                                        && x.2 + (x.1 - x.0) == host
                                        && x.1 - x.0 < BUFFERED_PART =>
                                {
                                    let e = p.end().min(x.0 + BUFFERED_PART);
                                    x.1 = e;
                                    off = e;
                                }
                                _ => {
                                    let e = p.end().min(off + BUFFERED_PART);
                                    buffered.push((off, e, host));
                                    off = e;
                                }
                            }
                        }
                    }
                }
            }
        }
        CopyPlan { copies, buffered }
    }
}

/// A mapped window of the top: `Ok(Err(len))` when the top holds all its
/// `len` bytes, else the end of the window and where the bytes the top
/// lacks live.
type Mapped = Result<std::result::Result<(u64, Arc<Vec<Piece>>), u64>>;

/// How much of the guest address space the dispatcher maps at once.
pub const WINDOW: u64 = 64 << 20;

/// A failed task.
struct Failure {
    err: Error,
    op: IoOperation,
}

type TaskResult = std::result::Result<(), Failure>;

fn read_err(e: Error) -> Failure {
    Failure {
        err: e,
        op: IoOperation::Read,
    }
}

fn write_err(e: Error) -> Failure {
    Failure {
        err: e,
        op: IoOperation::Write,
    }
}

/// `(dev, inode)` of an open image's file.
fn image_id(img: &Image) -> Option<(u64, u64)> {
    let m = img.storage().file().metadata().ok()?;
    Some((m.dev(), m.ino()))
}

fn path_id(p: &Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.dev(), m.ino()))
}

/// `p` with `.` removed and `..` applied to the preceding component,
/// without asking the file system (like Python's `os.path.normpath`).
fn lexical_normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() && !out.has_root() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The relative path leading from directory `dir` to `target`; both must
/// be absolute and normalized.
fn relative_path(dir: &Path, target: &Path) -> PathBuf {
    let d: Vec<_> = dir.components().collect();
    let t: Vec<_> = target.components().collect();
    let common = d.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..d.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// The name a top should record for `base`: its absolute path (tidied
/// when that still names the same file), or with `relative` its path
/// relative to the top's directory. Fails when no name that resolves to
/// the base can be found.
pub fn backing_name(top: &Image, base: &Image, relative: bool) -> Result<String> {
    let want = image_id(base);
    let abs = std::path::absolute(base.path())
        .map_err(|e| Error::io("resolving the base's path", e).with_path(base.path()))?;
    let canonical = std::fs::canonicalize(base.path()).ok();
    let mut candidates = vec![lexical_normalize(&abs), abs.clone()];
    candidates.extend(canonical.clone());
    if !relative {
        for c in candidates {
            if want.is_some() && path_id(&c) == want {
                return Ok(c.to_string_lossy().into_owned());
            }
        }
        return Ok(abs.to_string_lossy().into_owned());
    }
    let top_dir_as_named = top
        .path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let top_abs = std::path::absolute(top.path())
        .map_err(|e| Error::io("resolving the image's path", e).with_path(top.path()))?;
    let mut dirs = Vec::new();
    if let Some(d) = top_abs.parent() {
        dirs.push(lexical_normalize(d));
    }
    if let Some(d) = std::fs::canonicalize(top.path())
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push(d);
    }
    for dir in &dirs {
        for target in &candidates {
            let rel = relative_path(dir, &lexical_normalize(target));
            if rel.as_os_str().is_empty() {
                continue;
            }
            let resolved = if top_dir_as_named.as_os_str().is_empty() {
                rel.clone()
            } else {
                top_dir_as_named.join(&rel)
            };
            if want.is_some() && path_id(&resolved) == want {
                return Ok(rel.to_string_lossy().into_owned());
            }
        }
    }
    Err(Error::invalid_argument(format!(
        "cannot name the base '{}' relative to the directory of the image",
        base.path().display()
    ))
    .with_path(top.path()))
}

/// The backing format a top of format `top` records for a base of format
/// `base`: the base's format name, except that QED can only record "raw"
/// (any other base is recorded without a format and probed).
pub fn backing_format(top: Format, base: Format) -> Option<String> {
    match top {
        Format::Qed => (base == Format::Raw).then(|| "raw".to_string()),
        _ => Some(base.name().to_string()),
    }
}

fn align_down(v: u64, g: u64) -> u64 {
    v / g * g
}

impl StreamJob {
    /// A stream of `chain` (whose top must be open for writing and be
    /// qcow2 or QED) into its top, keeping the layer at `opts.base`.
    pub fn new(chain: Arc<Chain>, opts: &StreamOptions) -> Result<StreamJob> {
        let layers = chain.layers();
        let top = &layers[0];
        if top.format() == Format::Raw {
            return Err(Error::unsupported(
                "a raw image has no backing file and nothing to pull into",
            )
            .with_path(top.path()));
        }
        if !top.is_writable() {
            return Err(
                Error::new(ErrorKind::ReadOnly, "image is opened read-only").with_path(top.path())
            );
        }
        let base = match opts.base {
            Some(0) => {
                return Err(Error::invalid_argument(
                    "the base must be below the image, not the image itself",
                )
                .with_path(top.path()))
            }
            Some(b) if b >= layers.len() => {
                return Err(Error::invalid_argument(format!(
                    "base index {b} is outside the backing chain ({} layers)",
                    layers.len()
                ))
                .with_path(top.path()))
            }
            b => b,
        };
        let new_backing = match base {
            None => None,
            Some(b) => {
                let base_img = &layers[b];
                let name = match &opts.backing_file {
                    Some(n) => n.clone(),
                    None => backing_name(top, base_img, opts.keep_relative)?,
                };
                Some(BackingFile {
                    name,
                    format: backing_format(top.format(), base_img.format()),
                })
            }
        };
        let sizes = layers.iter().map(|l| l.virtual_size()).collect();
        let granule = top.driver().granularity().max(1);
        Ok(StreamJob {
            chain,
            layers,
            sizes,
            granule,
            base,
            new_backing,
            workers: opts.workers.max(1),
            max_chunk: opts.max_chunk.max(1),
            window: opts.window.max(1),
            stats: Arc::default(),
        })
    }

    /// The job's counters (shared: keep a clone to watch a running job).
    pub fn stats(&self) -> Arc<StreamStats> {
        self.stats.clone()
    }

    /// The backing file the top will record when the job completes
    /// (`None`: no backing file).
    pub fn new_backing(&self) -> Option<&BackingFile> {
        self.new_backing.as_ref()
    }

    /// Whether there is anything to stream (the top has a backing file and
    /// the base is not its immediate backing).
    pub fn has_work(&self) -> bool {
        self.layers.len() > 1 && self.base != Some(1)
    }

    fn top(&self) -> &Image {
        &self.layers[0]
    }

    /// The granule-aligned length of the range a worker gets at `speed`.
    fn chunk_len(&self, speed: u64, g: u64) -> u64 {
        let want = if speed == 0 {
            self.max_chunk
        } else {
            // About 20 ms of data: small enough that a guest write waiting
            // for the range lock is not held up long.
            (speed / 50).clamp(piece_for(speed), 2 << 20)
        };
        align_down(want, g).max(g)
    }

    /// How far a full-speed task from `offset` reaches (granule-aligned,
    /// within the window): until it holds about `max_chunk` bytes of data
    /// to copy, or spans [`TASK_SPAN`] times that (mostly unallocated
    /// chains, where the bytes to copy are sparse).
    fn task_len(&self, pieces: &[Piece], offset: u64, win_end: u64) -> u64 {
        let g = self.granule;
        let chunk = align_down(self.max_chunk, g).max(g);
        let cap = offset.saturating_add(chunk.saturating_mul(TASK_SPAN));
        let mut end = cap.min(win_end);
        let mut data = 0u64;
        let first = pieces.partition_point(|p| p.end() <= offset);
        for p in pieces[first..].iter().take_while(|p| p.off < end) {
            if p.src == Src::Base {
                continue;
            }
            let (s, e) = (p.off.max(offset), p.end().min(end));
            if data + (e - s) >= chunk {
                let at = s + (chunk - data);
                end = at.div_ceil(g).saturating_mul(g).min(end);
                break;
            }
            data += e - s;
        }
        (end - offset).max(g.min(win_end - offset))
    }

    /// Where `[off, end)` of layer `d` lives (the first extent; the range
    /// lies within the layer). Asks the driver directly: the job knows the
    /// layers' sizes.
    fn layer_status(&self, d: usize, off: u64, len: u64) -> Result<Extent> {
        let l = &self.layers[d];
        l.driver().block_status(off, len).at(l.path())
    }

    /// Where the ranges `todo` (sorted, unallocated in the top) live above
    /// the base, as sorted pieces covering them. Each layer, from the top's
    /// backing down, is asked only about what the layers above it left
    /// unallocated, so a deep chain costs one walk per layer, not one
    /// descent per piece.
    fn sources(&self, mut todo: Vec<(u64, u64)>) -> Result<Vec<Piece>> {
        let above_base = self.base.unwrap_or(self.layers.len());
        let mut pieces = Vec::new();
        for d in 1..above_base {
            let size = self.sizes[d];
            let mut next: Vec<(u64, u64)> = Vec::new();
            for (s, e) in todo {
                if e > size {
                    // Past the end of a shorter layer: reads zeros now.
                    self.past_end_pieces(s.max(size), e, &mut pieces)?;
                }
                let e = e.min(size);
                let mut p = s;
                while p < e {
                    let ext = self.layer_status(d, p, e - p)?;
                    let src = match ext.status {
                        Status::Data { host } => Src::Data { depth: d, host },
                        Status::Compressed => Src::Compressed { depth: d },
                        Status::Zero { .. } => Src::Zero,
                        Status::Unallocated { .. } => {
                            match next.last_mut() {
                                Some(r) if r.1 == p => r.1 = ext.end(),
                                _ => next.push((p, ext.end())),
                            }
                            p = ext.end();
                            continue;
                        }
                    };
                    pieces.push(Piece {
                        off: p,
                        len: ext.len,
                        src,
                    });
                    p = ext.end();
                }
            }
            todo = next;
            if todo.is_empty() {
                break;
            }
        }
        pieces.extend(todo.into_iter().map(|(s, e)| Piece {
            off: s,
            len: e - s,
            src: Src::Base,
        }));
        pieces.sort_unstable_by_key(|p| p.off);
        // Merge neighbours that continue each other (host-contiguous data
        // of one layer, or the same kind).
        let mut merged: Vec<Piece> = Vec::with_capacity(pieces.len());
        for p in pieces {
            if let Some(l) = merged.last_mut() {
                let continues = match (l.src, p.src) {
                    (Src::Data { depth: a, host: h }, Src::Data { depth: b, host: k }) => {
                        a == b && h + l.len == k
                    }
                    (a, b) => a == b,
                };
                if continues && l.end() == p.off {
                    l.len += p.len;
                    continue;
                }
            }
            merged.push(p);
        }
        Ok(merged)
    }

    /// Pieces for `[off, end)`, which lies past the end of a shorter
    /// intermediate layer and reads zeros: where the base's view reads
    /// zeros too (always, with no base) nothing needs doing (`Base`);
    /// where the base has data, zeros must mask it (`Zero`).
    fn past_end_pieces(&self, off: u64, end: u64, out: &mut Vec<Piece>) -> Result<()> {
        let mut push = |off: u64, len: u64, src: Src| match out.last_mut() {
            Some(l) if l.src == src && l.end() == off => l.len += len,
            _ => out.push(Piece { off, len, src }),
        };
        let Some(b) = self.base else {
            push(off, end - off, Src::Base);
            return Ok(());
        };
        let size = self.layers[b].virtual_size();
        let mut p = off;
        while p < end.min(size) {
            let cx = self.chain.block_status(p, end.min(size) - p, b, None)?;
            let src = match cx.status {
                Status::Unallocated { .. } | Status::Zero { .. } => Src::Base,
                _ => Src::Zero,
            };
            push(p, cx.len, src);
            p += cx.len;
        }
        if p < end {
            push(p, end - p, Src::Base);
        }
        Ok(())
    }

    /// Whether the base's guest view over `[off, end)` is known to read
    /// zeros from metadata alone (unallocated, zero clusters, past its
    /// end; trivially so with no base).
    fn base_reads_zero(&self, off: u64, end: u64) -> Result<bool> {
        let Some(b) = self.base else {
            return Ok(true);
        };
        let size = self.layers[b].virtual_size();
        let mut p = off;
        while p < end.min(size) {
            let cx = self.chain.block_status(p, end.min(size) - p, b, None)?;
            match cx.status {
                Status::Unallocated { .. } | Status::Zero { .. } => p += cx.len,
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// The parts of `pieces` (sorted, contiguous) within `[a, b)`.
    fn parts(pieces: &[Piece], a: u64, b: u64) -> impl Iterator<Item = Piece> + '_ {
        let first = pieces.partition_point(|p| p.end() <= a);
        pieces[first..]
            .iter()
            .take_while(move |p| p.off < b)
            .map(move |p| {
                let s = p.off.max(a);
                let e = p.end().min(b);
                let src = match p.src {
                    Src::Data { depth, host } => Src::Data {
                        depth,
                        host: host + (s - p.off),
                    },
                    other => other,
                };
                Piece {
                    off: s,
                    len: e - s,
                    src,
                }
            })
    }

    /// Whether granule `[a, b)` must be written as data to keep reading
    /// zeros where it has zero pieces (once the base shows through).
    fn zero_needs_mask(&self, pieces: &[Piece], a: u64, b: u64) -> Result<bool> {
        for p in Self::parts(pieces, a, b) {
            if p.src == Src::Zero && !self.base_reads_zero(p.off, p.end())? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn classify(&self, pieces: &[Piece], a: u64, b: u64) -> Result<Action> {
        let (mut copy, mut zero, mut base) = (false, false, false);
        for p in Self::parts(pieces, a, b) {
            match p.src {
                Src::Data { .. } | Src::Compressed { .. } => copy = true,
                Src::Zero => zero = true,
                Src::Base => base = true,
            }
        }
        if copy {
            return Ok(Action::Write);
        }
        if !zero {
            return Ok(Action::Leave);
        }
        let mut base_parts_zero = true;
        if base {
            for p in Self::parts(pieces, a, b).filter(|p| p.src == Src::Base) {
                if !self.base_reads_zero(p.off, p.end())? {
                    base_parts_zero = false;
                    break;
                }
            }
        }
        if base_parts_zero {
            Ok(Action::Zero)
        } else if self.zero_needs_mask(pieces, a, b)? {
            Ok(Action::Write)
        } else {
            Ok(Action::Leave)
        }
    }

    /// Copy `[off, off + len)` of a task: lock it in the top, plan what is
    /// (still) unallocated there, make the zero runs, then copy the data
    /// runs (at full speed all at once, under a speed limit run by run).
    fn do_task(&self, ctx: &JobContext<'_>, task: &Task) -> TaskResult {
        let end = task.off + task.len;
        let _guard = self.top().range_locks().lock(task.off, end);
        let mut writes: Vec<(u64, u64)> = Vec::new();
        let mut p = task.off;
        while p < end {
            let ext = self.layer_status(0, p, end - p).map_err(read_err)?;
            if !ext.status.is_allocated() {
                for (a, b, act) in self.plan(&task.pieces, p, ext.end()).map_err(read_err)? {
                    match act {
                        Action::Leave => {}
                        Action::Write => writes.push((a, b)),
                        Action::Zero => self.zero(&task.pieces, a, b, &mut writes)?,
                    }
                }
            }
            p = ext.end();
        }
        if ctx.speed() == 0 {
            self.copy_runs(&task.pieces, &writes)
        } else {
            writes
                .iter()
                .try_for_each(|&(a, b)| self.write_range(ctx, &task.pieces, a, b))
        }
    }

    /// The granules of `[a, b)` (unallocated in the top) as runs of one
    /// action each. A piece covering whole granules decides them at once;
    /// a granule shared by several pieces is classified on its own.
    fn plan(&self, pieces: &[Piece], a: u64, b: u64) -> Result<Vec<(u64, u64, Action)>> {
        let g = self.granule;
        let mut runs: Vec<(u64, u64, Action)> = Vec::new();
        let mut s = a;
        while s < b {
            let i = pieces.partition_point(|p| p.end() <= s);
            let whole = pieces.get(i).and_then(|p| {
                let e = if p.end() >= b {
                    b
                } else {
                    align_down(p.end(), g)
                };
                (p.off <= s && e > s).then_some((e, p.src))
            });
            let (e, act) = match whole {
                Some((e, Src::Data { .. } | Src::Compressed { .. })) => (e, Action::Write),
                Some((e, Src::Zero)) => (e, Action::Zero),
                Some((e, Src::Base)) => (e, Action::Leave),
                None => {
                    let e = (align_down(s, g) + g).min(b);
                    (e, self.classify(pieces, s, e)?)
                }
            };
            match runs.last_mut() {
                Some(r) if r.2 == act && r.1 == s => r.1 = e,
                _ => runs.push((s, e, act)),
            }
            s = e;
        }
        Ok(runs)
    }

    /// Make `[a, b)` read as zeros in the top: zero clusters, or where the
    /// format cannot say "zero" (qcow2 v2 over a backing file), data runs
    /// (added to `writes`) only where the base would otherwise show
    /// through.
    fn zero(&self, pieces: &[Piece], a: u64, b: u64, writes: &mut Vec<(u64, u64)>) -> TaskResult {
        let top = self.top();
        let done = top
            .driver()
            .zero_range(a, b - a)
            .at(top.path())
            .map_err(write_err)?;
        if done {
            self.stats.zeroed.fetch_add(b - a, Ordering::Relaxed);
            return Ok(());
        }
        let g = self.granule;
        let mut x = a;
        let mut run: Option<u64> = None;
        while x < b {
            let y = (align_down(x, g) + g).min(b);
            if self.zero_needs_mask(pieces, x, y).map_err(read_err)? {
                run.get_or_insert(x);
            } else if let Some(start) = run.take() {
                writes.push((start, x));
            }
            x = y;
        }
        if let Some(start) = run {
            writes.push((start, b));
        }
        Ok(())
    }

    /// Allocate the data runs `writes` in the top (in one step, so their
    /// host space is contiguous), fill them and link them in with one
    /// commit. Data pieces are copied file to file ([`uring::copy`]); the
    /// rest of a run (zeros and the base's view in part of a granule,
    /// compressed clusters) goes through a buffer.
    fn copy_runs(&self, pieces: &[Piece], writes: &[(u64, u64)]) -> TaskResult {
        if writes.is_empty() {
            return Ok(());
        }
        let top = self.top();
        let ranges: Vec<(u64, u64)> = writes.iter().map(|&(a, b)| (a, b - a)).collect();
        let runs = top
            .driver()
            .prepare_write_many(&ranges)
            .at(top.path())
            .map_err(write_err)?;
        let plan = CopyPlan::new(&self.layers, pieces, &runs);
        uring::copy(top.storage(), &plan.copies).map_err(|e| match e {
            CopyError::Read(e) => read_err(Error::io("reading data from the backing chain", e)),
            CopyError::Write(e) => write_err(Error::io("writing data", e).with_path(top.path())),
        })?;
        for &(a, b, host) in &plan.buffered {
            let mut buf = vec![0u8; (b - a) as usize];
            self.read_sources(pieces, a, b, &mut buf)?;
            top.storage()
                .write_at(&buf, host)
                .map_err(|e| write_err(Error::io("writing data", e).with_path(top.path())))?;
        }
        let total: u64 = writes.iter().map(|(a, b)| b - a).sum();
        self.stats.copied.fetch_add(total, Ordering::Relaxed);
        top.driver()
            .commit_write(&runs)
            .at(top.path())
            .map_err(write_err)
    }

    /// Read the guest content of `[a, b)` from its sources into `buf`:
    /// data in batches per layer, the rest piece by piece.
    fn read_sources(&self, pieces: &[Piece], a: u64, b: u64, buf: &mut [u8]) -> TaskResult {
        let mut batches: Vec<(usize, Vec<IoReq<'_>>)> = Vec::new();
        let mut rest: &mut [u8] = buf;
        for p in Self::parts(pieces, a, b) {
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(p.len as usize);
            rest = tail;
            match p.src {
                Src::Data { depth, host } => {
                    let req = IoReq::Read {
                        offset: host,
                        buf: chunk,
                    };
                    match batches.iter_mut().find(|(d, _)| *d == depth) {
                        Some((_, v)) => v.push(req),
                        None => batches.push((depth, vec![req])),
                    }
                }
                Src::Compressed { depth } => {
                    let ext = Extent {
                        offset: p.off,
                        len: p.len,
                        status: Status::Compressed,
                    };
                    self.layers[depth]
                        .read_extent(&ext, chunk, &Zeros)
                        .map_err(read_err)?;
                }
                Src::Zero => chunk.fill(0),
                Src::Base => match self.base {
                    None => chunk.fill(0),
                    Some(bi) => self
                        .chain
                        .below(bi)
                        .read_guest(p.off, chunk)
                        .map_err(read_err)?,
                },
            }
        }
        for (depth, mut reqs) in batches {
            let layer = &self.layers[depth];
            layer
                .storage()
                .submit(&mut reqs)
                .map_err(|e| read_err(Error::io("reading data", e).with_path(layer.path())))?;
        }
        Ok(())
    }

    /// Allocate `[a, b)` in the top and write its whole content there,
    /// rate-limited, then link it in.
    fn write_range(&self, ctx: &JobContext<'_>, pieces: &[Piece], a: u64, b: u64) -> TaskResult {
        let top = self.top();
        let mut buf = vec![0u8; (b - a) as usize];
        self.read_sources(pieces, a, b, &mut buf)?;
        let runs = top
            .driver()
            .prepare_write(a, b - a)
            .at(top.path())
            .map_err(write_err)?;
        let mut unthrottled = false;
        let mut pos = a;
        while pos < b {
            let speed = ctx.speed();
            let step = if speed == 0 || unthrottled {
                b - pos
            } else {
                ctx.piece().min(b - pos)
            };
            if !unthrottled && ctx.throttle(step) == Throttle::Cancelled {
                // Finish this range at full speed: it is already
                // allocated, and a cancel must not wait for the limiter.
                unthrottled = true;
            }
            let step = if unthrottled { b - pos } else { step };
            self.write_part(top, &runs, &buf, a, pos, pos + step)?;
            self.stats.copied.fetch_add(step, Ordering::Relaxed);
            pos += step;
        }
        top.driver()
            .commit_write(&runs)
            .at(top.path())
            .map_err(write_err)
    }

    /// Write guest bytes `[s, e)` of `buf` (which starts at guest `a`) to
    /// their places in `runs`, in one batch.
    fn write_part(
        &self,
        top: &Image,
        runs: &[HostRun],
        buf: &[u8],
        a: u64,
        s: u64,
        e: u64,
    ) -> TaskResult {
        let mut reqs = Vec::new();
        for r in runs {
            let (rs, re) = (r.guest.max(s), (r.guest + r.len).min(e));
            if rs >= re {
                continue;
            }
            reqs.push(IoReq::Write {
                offset: r.host + (rs - r.guest),
                buf: &buf[(rs - a) as usize..(re - a) as usize],
            });
        }
        top.storage()
            .submit(&mut reqs)
            .map_err(|err| write_err(Error::io("writing data", err).with_path(top.path())))
    }

    /// With `IMGPULL_LOG` set, one line on stderr: what the run copied,
    /// and how much of the data went through io_uring (the process-wide
    /// counters since the run started).
    fn log_summary(&self, (t0, before): (Instant, uring::IoCounters)) {
        if !std::env::var_os(uring::ENV_LOG).is_some_and(|v| !v.is_empty() && v != "0") {
            return;
        }
        let d = uring::io_counters().since(&before);
        eprintln!(
            "imgpull: stream: copied {} bytes, zeroed {} bytes in {:.3} s; data bytes through \
             io_uring {:.1}% (read {}, written {}, spliced {}, registered buffers {}; \
             pread/pwrite {}); metadata {} read, {} written",
            self.stats.copied(),
            self.stats.zeroed(),
            t0.elapsed().as_secs_f64(),
            d.uring_fraction() * 100.0,
            d.uring_read,
            d.uring_written,
            d.uring_spliced,
            d.uring_fixed,
            d.pread_bytes(),
            d.meta_read,
            d.meta_written,
        );
    }

    /// The dispatcher: walk the top, skip what needs nothing, hand the
    /// rest to the workers, obey pause and cancel, apply the error policy.
    fn dispatch(
        &self,
        ctx: &JobContext<'_>,
        tasks: &Sender<Task>,
        done: &Receiver<(Task, TaskResult)>,
    ) -> std::result::Result<(), RunError> {
        let size = self.sizes[0];
        let g = self.granule;
        let mut offset = 0u64;
        // The mapped window `[offset, win_end)`: unallocated in the top
        // when mapped, with its sources.
        let mut window: Option<(u64, Arc<Vec<Piece>>)> = None;
        let mut in_flight = 0usize;
        let mut retry: Vec<Task> = Vec::new();
        let mut failed: Option<String> = None;
        // Map the range from `at`.
        let map_at = |at: u64| -> Mapped {
            // Windows end on a granule boundary (or at the end), so every
            // task is granule-aligned; ranges the top holds inside a window
            // get no pieces (and are skipped again by the tasks).
            let end = size.min(align_down(at.saturating_add(self.window), g).max(at + g));
            let mut holes: Vec<(u64, u64)> = Vec::new();
            let mut p = at;
            while p < end {
                let ext = self.layer_status(0, p, end - p)?;
                if !ext.status.is_allocated() {
                    match holes.last_mut() {
                        Some(h) if h.1 == p => h.1 = ext.end(),
                        _ => holes.push((p, ext.end())),
                    }
                }
                p = ext.end();
            }
            if holes.is_empty() {
                return Ok(Err(end - at));
            }
            Ok(Ok((end, Arc::new(self.sources(holes)?))))
        };
        // A mapping made ahead of time, and where it starts.
        let mut ahead: Option<(u64, Mapped)> = None;

        // Account for one finished task; `Some(message)` ends the job.
        let settle = |t: Task, r: TaskResult, retry: &mut Vec<Task>| -> Option<String> {
            match r {
                Ok(()) => {
                    ctx.add_progress(t.len);
                    None
                }
                Err(f) => {
                    let nospace = f
                        .err
                        .io_error()
                        .and_then(|e| e.raw_os_error())
                        .is_some_and(|c| c == libc::ENOSPC);
                    let msg = f.err.to_string();
                    match ctx.error_action(&msg, f.op, nospace) {
                        ErrorAction::Report => Some(msg),
                        ErrorAction::Ignore => {
                            ctx.add_progress(t.len);
                            None
                        }
                        ErrorAction::Stop => {
                            retry.push(t);
                            None
                        }
                    }
                }
            }
        };
        // Wait for one task to finish.
        let wait_one =
            |in_flight: &mut usize, retry: &mut Vec<Task>, failed: &mut Option<String>| {
                ctx.idle();
                let got = done.recv();
                ctx.busy();
                match got {
                    Ok((t, r)) => {
                        *in_flight -= 1;
                        if let Some(m) = settle(t, r, retry) {
                            failed.get_or_insert(m);
                        }
                    }
                    // All workers gone (cannot happen while we hold tasks).
                    Err(_) => *in_flight = 0,
                }
            };

        loop {
            while let Ok((t, r)) = done.try_recv() {
                in_flight -= 1;
                if let Some(m) = settle(t, r, &mut retry) {
                    failed.get_or_insert(m);
                }
            }
            if failed.is_some() || ctx.is_cancelled() {
                break;
            }
            if ctx.pause_requested() {
                // A pause point with no I/O of the job in flight.
                while in_flight > 0 {
                    wait_one(&mut in_flight, &mut retry, &mut failed);
                }
                if failed.is_some() {
                    break;
                }
                ctx.pause_point();
                continue;
            }
            let speed = ctx.speed();
            // Under a speed limit, no more in flight than about 100 ms of
            // copying, so that a pause (which waits for them) comes soon.
            let max_in_flight = if speed == 0 {
                self.workers
            } else {
                let chunk = self.chunk_len(speed, g);
                ((speed / 10) / chunk).clamp(1, self.workers as u64) as usize
            };
            if in_flight >= max_in_flight {
                // While the workers are busy, map the next window (finding
                // sources can be slow: SEEK_HOLE on a large raw file), so
                // they do not wait for it when this one runs out.
                if ahead.is_none() {
                    if let Some((win_end, _)) = &window {
                        if *win_end < size {
                            ahead = Some((*win_end, map_at(*win_end)));
                            continue;
                        }
                    }
                }
                wait_one(&mut in_flight, &mut retry, &mut failed);
                continue;
            }
            if let Some(t) = retry.pop() {
                if tasks.send(t).is_err() {
                    failed.get_or_insert_with(|| "the stream job's workers stopped".into());
                    break;
                }
                in_flight += 1;
                continue;
            }
            let Some((win_end, pieces)) = window.clone() else {
                if offset >= size {
                    if in_flight == 0 {
                        break;
                    }
                    wait_one(&mut in_flight, &mut retry, &mut failed);
                    continue;
                }
                let mapped = match ahead.take() {
                    Some((at, m)) if at == offset => m,
                    _ => map_at(offset),
                };
                match mapped {
                    Ok(Err(allocated)) => {
                        ctx.add_progress(allocated);
                        offset += allocated;
                    }
                    Ok(Ok(w)) => window = Some(w),
                    Err(e) => {
                        let msg = e.to_string();
                        match ctx.error_action(&msg, IoOperation::Read, false) {
                            ErrorAction::Report => {
                                failed = Some(msg);
                                break;
                            }
                            // An unknown range cannot be copied: give up
                            // on the rest, the job ends with the error.
                            ErrorAction::Ignore => {
                                ctx.add_progress(size - offset);
                                offset = size;
                            }
                            // Paused now; retried after resume.
                            ErrorAction::Stop => {}
                        }
                    }
                }
                continue;
            };
            if offset >= win_end {
                window = None;
                continue;
            }
            // Skip whole granules that the top holds or that are
            // unallocated down to the base.
            let first = pieces.partition_point(|p| p.end() <= offset);
            let skip = match pieces[first..].iter().find(|p| p.src != Src::Base) {
                None => win_end - offset,
                Some(p) => align_down(p.off.max(offset), g) - offset,
            };
            if skip > 0 {
                ctx.add_progress(skip);
                offset += skip;
                continue;
            }
            let len = if speed == 0 {
                self.task_len(&pieces, offset, win_end)
            } else {
                self.chunk_len(speed, g).min(win_end - offset)
            };
            let t = Task {
                off: offset,
                len,
                pieces,
            };
            offset += len;
            if tasks.send(t).is_err() {
                failed.get_or_insert_with(|| "the stream job's workers stopped".into());
                break;
            }
            in_flight += 1;
        }
        // Drain what is still in flight (its work is valid and kept).
        while in_flight > 0 {
            wait_one(&mut in_flight, &mut retry, &mut failed);
        }
        if let Some(m) = failed {
            return Err(RunError::Failed(m));
        }
        if ctx.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        Ok(())
    }
}

impl JobDriver for StreamJob {
    fn job_type(&self) -> JobType {
        JobType::Stream
    }

    fn expected_len(&self) -> u64 {
        self.top().virtual_size()
    }

    fn run(&self, ctx: &JobContext<'_>) -> std::result::Result<(), RunError> {
        let size = self.top().virtual_size();
        ctx.set_progress_end(size);
        if !self.has_work() {
            ctx.pause_point();
            if ctx.is_cancelled() {
                return Err(RunError::Cancelled);
            }
            ctx.add_progress(size);
            return Ok(());
        }
        let (task_tx, task_rx) = channel::<Task>();
        let (done_tx, done_rx) = channel::<(Task, TaskResult)>();
        let task_rx = Mutex::new(task_rx);
        let started = (Instant::now(), uring::io_counters());
        let r = std::thread::scope(|s| {
            for _ in 0..self.workers {
                let done_tx = done_tx.clone();
                let task_rx = &task_rx;
                s.spawn(move || loop {
                    let next = task_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(task) = next else { break };
                    ctx.busy();
                    let r = self.do_task(ctx, &task);
                    ctx.idle();
                    if done_tx.send((task, r)).is_err() {
                        break;
                    }
                });
            }
            drop(done_tx);
            let r = self.dispatch(ctx, &task_tx, &done_rx);
            drop(task_tx);
            r
        });
        self.log_summary(started);
        r
    }

    fn prepare(&self) -> std::result::Result<(), String> {
        let top = self.top();
        // Everything copied must be durable before the header stops
        // pointing at the layers it came from.
        top.flush().map_err(|e| e.to_string())?;
        if self.layers.len() > 1 {
            top.set_backing(self.new_backing.as_ref())
                .map_err(|e| e.to_string())?;
            top.flush().map_err(|e| e.to_string())?;
            let mut kept = vec![self.layers[0].clone()];
            if let Some(b) = self.base {
                kept.extend(self.layers[b..].iter().cloned());
            }
            self.chain.set_layers(kept);
        }
        Ok(())
    }

    fn abort(&self) {
        // Keep what was copied: make it durable (best effort; the chain is
        // valid either way).
        let _ = self.top().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            lexical_normalize(Path::new("/a/./b/../c//d")),
            PathBuf::from("/a/c/d")
        );
        assert_eq!(lexical_normalize(Path::new("/..")), PathBuf::from("/"));
        assert_eq!(
            relative_path(Path::new("/x/top"), Path::new("/x/base/b.raw")),
            PathBuf::from("../base/b.raw")
        );
        assert_eq!(
            relative_path(Path::new("/x"), Path::new("/x/b.raw")),
            PathBuf::from("b.raw")
        );
        assert_eq!(
            relative_path(Path::new("/a/b/c"), Path::new("/d")),
            PathBuf::from("../../../d")
        );
    }

    #[test]
    fn backing_formats() {
        assert_eq!(
            backing_format(Format::Qed, Format::Raw).as_deref(),
            Some("raw")
        );
        assert_eq!(backing_format(Format::Qed, Format::Qcow2), None);
        assert_eq!(
            backing_format(Format::Qcow2, Format::Qed).as_deref(),
            Some("qed")
        );
    }
}
