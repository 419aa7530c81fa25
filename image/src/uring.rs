//! The io_uring I/O backend, and the choice between it and `pread`.
//!
//! # Backends
//!
//! * [`UringFile`] moves data through io_uring: a whole
//!   [`Storage::submit`] batch is in flight at once (streamed through the
//!   ring when it is larger), short transfers and interrupted requests are
//!   resubmitted, reads past the end of the file read as zeros.
//! * [`PreadFile`] is the portable fallback: `pread`/`pwrite`, as
//!   [`SyncFile`], plus the byte counters below.
//!
//! [`open`] picks one: io_uring when the kernel lets us use it (probed once
//! per process: create a ring, check the opcodes, run a NOP — seccomp'ed
//! containers and old kernels fail here), else `pread`. The environment
//! overrides it, which is how a whole test suite runs on either backend:
//!
//! | variable | values |
//! |---|---|
//! | `IMGPULL_IO_BACKEND` | `auto` (default), `uring`, `pread`; `uring` where io_uring is unavailable fails at open with the probe's reason |
//! | `IMGPULL_O_DIRECT` | `1` to open files with O_DIRECT where the file system supports it (io_uring backend only); default buffered |
//! | `IMGPULL_LOG` | set (not `0`) to log the backend choice to stderr, once |
//! | `IMGPULL_SPLICE` | `1` to copy by splicing instead of through registered buffers (see [`copy`]) |
//!
//! # Ring ownership
//!
//! Each thread that does I/O owns one ring, created on its first request
//! and kept in a thread-local; every file that thread touches shares it.
//! The calls are synchronous (submit, then wait for the whole batch), so a
//! ring is always empty between calls and needs no lock, no cross-thread
//! wake-ups and no completion routing: a ring is `SINGLE_ISSUER` with
//! `DEFER_TASKRUN` (completion work runs in the waiting thread, not as
//! interrupts into it) where the kernel has them. Threads never contend on
//! a ring, any number of threads can use one [`UringFile`] at once, and a
//! thread's batch that spans several files (see [`submit_many`]) is one
//! submission. A pool of rings shared between threads would add a lock or a
//! hand-off per batch for nothing: the engine's threads are few and
//! long-lived, and a ring costs a descriptor and a few pages. A thread
//! whose ring cannot be created (descriptor limit) falls back to blocking
//! calls, counted as `pread` bytes.
//!
//! # Metadata
//!
//! Format drivers read and write their tables with [`Storage::read_meta`]
//! and [`Storage::write_meta`]: one small request at a time, each waited
//! for. On tmpfs (which has no non-blocking buffered path) io_uring hands
//! every request to an `iou-wrk` worker thread and wakes the caller when it
//! is done: measured here, a 4 KiB read took 3-6 µs that way once the
//! machine was warm and 30-90 µs in the first few hundred milliseconds of a
//! process (thread wake-ups on an idle virtual CPU), against 1 µs for
//! `pread`. A pull of a 16-layer chain of 4 KiB clusters does thousands of
//! such table reads and writes, so the io_uring backend does metadata with
//! `pread`/`pwrite` (O_DIRECT files excepted: they keep the aligned path)
//! and counts those bytes apart ([`IoCounters::meta_read`]); data moves
//! through the ring in batches ([`Storage::submit`], [`submit_many`],
//! [`copy`]).
//!
//! # O_DIRECT
//!
//! With O_DIRECT the alignment comes from `statx(STATX_DIOALIGN)` (tmpfs
//! answers nothing and accepts anything; other silent file systems get
//! 4 KiB). Aligned requests go straight to the kernel; a read off the
//! alignment goes through an aligned bounce buffer covering its aligned
//! span; a write whose buffer alone is misaligned is copied into one; a
//! write whose offset or length is off the alignment is a read-modify-write
//! of its edge blocks, serialised against every other write of the file
//! (a per-file lock that aligned writes take shared), and keeps the file
//! length exact. On tmpfs O_DIRECT is no faster than buffered I/O (tmpfs
//! has nothing but its page cache; the two were within run-to-run noise),
//! and on disk file systems it loses the page cache for data read twice,
//! so buffered is the default.
//!
//! # Registered buffers and files
//!
//! Memory from a [`FixedPool`] is registered with each thread's ring on
//! first use and then read into / written from with `READ_FIXED` /
//! `WRITE_FIXED`; callers only have to take their buffers from the pool
//! (any other memory goes as a plain request). On tmpfs this made 1 MiB
//! reads about 30% and writes about 15% faster, 64 KiB reads about 20%:
//! page-cache requests on tmpfs run in io_uring's worker threads here (an
//! `iou-wrk` thread appears even in a read-only run), and with fixed
//! buffers they copy into pages pinned once instead of on every request.
//! Without them 64 KiB requests are ~25% slower than `pread`, 1 MiB ones
//! on par: use large requests and pool buffers on the data path. Registered
//! files are not used: no measurable gain (the descriptor lookup is an
//! atomic increment next to a 64 KiB copy).
//!
//! # Copies
//!
//! [`copy`] moves file ranges into another file through the ring, several
//! 1 MiB chains in flight: reads into registered buffers, then one write
//! per buffer (or, with `IMGPULL_SPLICE=1`, spliced through pipes; see the
//! `copy` module for why buffers are the default).
//!
//! # Counters
//!
//! [`io_counters`] reports the data bytes each backend moved, process-wide
//! and monotonic, so a benchmark can check which backend carried the data.

mod copy;
mod direct;
mod fixed;
mod ring;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Once, OnceLock, RwLock};

use io_uring::{opcode, IoUring};

use crate::error::{Error, Result};
use crate::storage::{IoReq, Storage, SyncFile};
use direct::{Align, AlignedBuf};
use ring::{
    Op, META_READ, META_WRITTEN, PREAD_READ, PREAD_WRITTEN, URING_FIXED, URING_READ, URING_SPLICED,
    URING_WRITTEN,
};

pub use copy::{copy, CopyError, CopyReq, CopySrc, ENV_SPLICE, PIPE_BYTES};
pub use fixed::{FixedBuf, FixedPool};
pub use ring::RING_ENTRIES;

/// [`Storage::backend_name`] of [`UringFile`].
pub const URING_NAME: &str = "io_uring";
/// [`Storage::backend_name`] of [`PreadFile`] (and [`SyncFile`]).
pub const PREAD_NAME: &str = "pread";

/// Environment variable choosing the backend.
pub const ENV_BACKEND: &str = "IMGPULL_IO_BACKEND";
/// Environment variable asking for O_DIRECT.
pub const ENV_DIRECT: &str = "IMGPULL_O_DIRECT";
/// Environment variable enabling log lines on stderr.
pub const ENV_LOG: &str = "IMGPULL_LOG";

/// Data bytes moved by each backend since the process started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounters {
    /// Bytes read through io_uring.
    pub uring_read: u64,
    /// Bytes written through io_uring.
    pub uring_written: u64,
    /// Bytes read with `pread` (by [`PreadFile`], or a thread without a ring).
    pub pread_read: u64,
    /// Bytes written with `pwrite`.
    pub pread_written: u64,
    /// The part of the io_uring bytes that moved through registered
    /// buffers ([`FixedPool`]).
    pub uring_fixed: u64,
    /// Bytes [`copy`] spliced into their destination through io_uring
    /// (each is also counted once in `uring_read` and in `uring_written`).
    pub uring_spliced: u64,
    /// Metadata bytes read with `pread` ([`Storage::read_meta`] of the
    /// io_uring and `pread` backends; not counted above).
    pub meta_read: u64,
    /// Metadata bytes written with `pwrite` ([`Storage::write_meta`]).
    pub meta_written: u64,
}

impl IoCounters {
    /// Counts moved since `earlier` (a previous snapshot).
    pub fn since(&self, earlier: &IoCounters) -> IoCounters {
        IoCounters {
            uring_read: self.uring_read.saturating_sub(earlier.uring_read),
            uring_written: self.uring_written.saturating_sub(earlier.uring_written),
            pread_read: self.pread_read.saturating_sub(earlier.pread_read),
            pread_written: self.pread_written.saturating_sub(earlier.pread_written),
            uring_fixed: self.uring_fixed.saturating_sub(earlier.uring_fixed),
            uring_spliced: self.uring_spliced.saturating_sub(earlier.uring_spliced),
            meta_read: self.meta_read.saturating_sub(earlier.meta_read),
            meta_written: self.meta_written.saturating_sub(earlier.meta_written),
        }
    }

    /// All bytes moved through io_uring.
    pub fn uring_bytes(&self) -> u64 {
        self.uring_read + self.uring_written
    }

    /// All bytes moved through `pread`/`pwrite`.
    pub fn pread_bytes(&self) -> u64 {
        self.pread_read + self.pread_written
    }

    /// Share of the bytes that went through io_uring (1.0 when nothing moved).
    pub fn uring_fraction(&self) -> f64 {
        let total = self.uring_bytes() + self.pread_bytes();
        if total == 0 {
            1.0
        } else {
            self.uring_bytes() as f64 / total as f64
        }
    }
}

/// A snapshot of the process-wide data-byte counters.
pub fn io_counters() -> IoCounters {
    IoCounters {
        uring_read: URING_READ.load(Ordering::Relaxed),
        uring_written: URING_WRITTEN.load(Ordering::Relaxed),
        pread_read: PREAD_READ.load(Ordering::Relaxed),
        pread_written: PREAD_WRITTEN.load(Ordering::Relaxed),
        uring_fixed: URING_FIXED.load(Ordering::Relaxed),
        uring_spliced: URING_SPLICED.load(Ordering::Relaxed),
        meta_read: META_READ.load(Ordering::Relaxed),
        meta_written: META_WRITTEN.load(Ordering::Relaxed),
    }
}

fn log_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os(ENV_LOG).is_some_and(|v| !v.is_empty() && v != "0"))
}

/// Write a log line to stderr when `IMGPULL_LOG` is set.
pub(crate) fn log(args: std::fmt::Arguments<'_>) {
    if log_enabled() {
        eprintln!("imgpull: {args}");
    }
}

/// An I/O backend to open storage with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// io_uring when available, else `pread`.
    #[default]
    Auto,
    /// io_uring; opening fails where it is unavailable.
    Uring,
    /// `pread`/`pwrite`.
    Pread,
}

impl Backend {
    /// Parse `auto`, `uring` (also `io_uring`, `io-uring`) or `pread`.
    pub fn parse(s: &str) -> Option<Backend> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Some(Backend::Auto),
            "uring" | "io_uring" | "io-uring" => Some(Backend::Uring),
            "pread" | "sync" => Some(Backend::Pread),
            _ => None,
        }
    }
}

/// How [`open`] opens storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StorageOptions {
    /// Which backend.
    pub backend: Backend,
    /// Use O_DIRECT where the file system supports it (io_uring only).
    pub direct: bool,
}

impl StorageOptions {
    /// The options given by `IMGPULL_IO_BACKEND` and `IMGPULL_O_DIRECT`.
    pub fn from_env() -> Result<StorageOptions> {
        let var = |name: &str| -> Result<Option<String>> {
            match std::env::var_os(name) {
                None => Ok(None),
                Some(v) => v
                    .into_string()
                    .map(Some)
                    .map_err(|_| Error::invalid_argument(format!("{name} is not valid UTF-8"))),
            }
        };
        StorageOptions::from_values(var(ENV_BACKEND)?.as_deref(), var(ENV_DIRECT)?.as_deref())
    }

    /// The options given by the values of `IMGPULL_IO_BACKEND` and
    /// `IMGPULL_O_DIRECT` (`None`: unset).
    pub fn from_values(backend: Option<&str>, direct: Option<&str>) -> Result<StorageOptions> {
        let backend = match backend {
            None => Backend::Auto,
            Some(v) => Backend::parse(v).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "invalid {ENV_BACKEND} value '{v}' (expected uring, pread or auto)"
                ))
            })?,
        };
        let direct = match direct.map(|v| (v, v.trim().to_ascii_lowercase())) {
            None => false,
            Some((_, l)) if ["", "0", "off", "false", "no"].contains(&l.as_str()) => false,
            Some((_, l)) if ["1", "on", "true", "yes"].contains(&l.as_str()) => true,
            Some((v, _)) => {
                return Err(Error::invalid_argument(format!(
                    "invalid {ENV_DIRECT} value '{v}' (expected 1 or 0)"
                )))
            }
        };
        Ok(StorageOptions { backend, direct })
    }
}

/// Whether io_uring can be used by this process: `Err` says why not.
/// Probed once (ring creation, the opcodes we use, a NOP round trip).
pub fn uring_available() -> std::result::Result<(), String> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(probe_uring).clone()
}

fn probe_uring() -> std::result::Result<(), String> {
    ring::join_anchor();
    let mut ring = IoUring::new(4).map_err(|e| format!("cannot create an io_uring: {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("cannot probe io_uring opcodes: {e}"))?;
    for (name, code) in [
        ("READ", opcode::Read::CODE),
        ("WRITE", opcode::Write::CODE),
        ("NOP", opcode::Nop::CODE),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("the kernel's io_uring lacks IORING_OP_{name}"));
        }
    }
    let nop = opcode::Nop::new().build().user_data(0x6e6f70);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }.map_err(|_| "cannot queue a NOP".to_string())?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(format!("io_uring_enter failed: {e}")),
        }
    }
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| "an io_uring NOP did not complete".to_string())?;
    if cqe.result() < 0 {
        let e = io::Error::from_raw_os_error(-cqe.result());
        return Err(format!("an io_uring NOP failed: {e}"));
    }
    Ok(())
}

/// Resolve a requested backend against the probe's answer.
fn resolve(
    requested: Backend,
    available: std::result::Result<(), String>,
) -> Result<(Backend, String)> {
    match (requested, available) {
        (Backend::Pread, _) => Ok((Backend::Pread, format!("forced by {ENV_BACKEND}"))),
        (Backend::Uring, Ok(())) => Ok((Backend::Uring, format!("forced by {ENV_BACKEND}"))),
        (Backend::Uring, Err(why)) => Err(Error::unsupported(format!(
            "the io_uring I/O backend ({ENV_BACKEND}=uring) is unavailable: {why}"
        ))),
        (Backend::Auto, Ok(())) => Ok((Backend::Uring, "auto".into())),
        (Backend::Auto, Err(why)) => Ok((Backend::Pread, format!("auto; {why}"))),
    }
}

/// Open the storage of `file` with the backend of `opts` (see the module
/// documentation). The choice is logged once per process.
pub fn open(file: File, opts: &StorageOptions) -> Result<Box<dyn Storage>> {
    let (backend, why) = resolve(opts.backend, uring_available())?;
    static LOGGED: Once = Once::new();
    LOGGED.call_once(|| {
        let name = if backend == Backend::Uring {
            URING_NAME
        } else {
            PREAD_NAME
        };
        let direct = if opts.direct && backend == Backend::Uring {
            "; O_DIRECT where supported"
        } else {
            ""
        };
        log(format_args!("I/O backend: {name} ({why}{direct})"));
    });
    match backend {
        Backend::Pread => {
            if opts.direct {
                static ONCE: Once = Once::new();
                ONCE.call_once(|| log(format_args!("O_DIRECT is only used with io_uring")));
            }
            Ok(Box::new(PreadFile::new(file)))
        }
        _ => {
            let f = UringFile::with_direct(file, opts.direct)
                .map_err(|e| Error::io("cannot set up io_uring I/O", e))?;
            Ok(Box::new(f))
        }
    }
}

/// [`open`] with the options from the environment
/// ([`StorageOptions::from_env`]).
pub fn open_from_env(file: File) -> Result<Box<dyn Storage>> {
    open(file, &StorageOptions::from_env()?)
}

/// The `pread`/`pwrite` backend, counting its bytes in [`io_counters`].
#[derive(Debug)]
pub struct PreadFile {
    inner: SyncFile,
}

impl PreadFile {
    /// Wrap an open file.
    pub fn new(file: File) -> Self {
        PreadFile {
            inner: SyncFile::new(file),
        }
    }

    fn fd(&self) -> RawFd {
        self.inner.file().as_raw_fd()
    }
}

impl Storage for PreadFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        ring::run_sync(&mut [Op::read(self.fd(), buf, offset, 1)])
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        ring::run_sync(&mut [Op::write(self.fd(), buf, offset, 1)])
    }

    fn read_meta(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        ring::run_meta(&mut [Op::read(self.fd(), buf, offset, 1)])
    }

    fn write_meta(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        ring::run_meta(&mut [Op::write(self.fd(), buf, offset, 1)])
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn backend_name(&self) -> &'static str {
        PREAD_NAME
    }

    fn file(&self) -> &File {
        self.inner.file()
    }
}

/// The io_uring backend (see the module documentation).
#[derive(Debug)]
pub struct UringFile {
    file: File,
    /// Alignment to honour when the descriptor is O_DIRECT.
    direct: Option<Align>,
    /// O_DIRECT only: read-modify-writes hold it exclusively, every other
    /// write shared.
    rmw: RwLock<()>,
}

impl UringFile {
    /// Wrap an open file (buffered I/O). Fails if io_uring is unavailable.
    pub fn new(file: File) -> io::Result<UringFile> {
        UringFile::with_direct(file, false)
    }

    /// Wrap an open file, switching it to O_DIRECT if `direct` and its file
    /// system supports that (otherwise it stays buffered; see
    /// [`UringFile::is_direct`]). Fails if io_uring is unavailable.
    pub fn with_direct(file: File, direct: bool) -> io::Result<UringFile> {
        uring_available().map_err(|why| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring is unavailable: {why}"),
            )
        })?;
        let mut align = None;
        if direct {
            align = direct::enable(&file)?;
            if align.is_none() {
                static ONCE: Once = Once::new();
                ONCE.call_once(|| {
                    log(format_args!(
                        "O_DIRECT is not supported by a file system; using the page cache"
                    ))
                });
            }
        } else if direct::is_direct(&file)? {
            // Opened with O_DIRECT by the caller: honour its alignment.
            align = direct::alignment(&file);
        }
        Ok(UringFile {
            file,
            direct: align,
            rmw: RwLock::new(()),
        })
    }

    /// A buffered file treated as if it needed `align` (exercises the
    /// bounce and read-modify-write paths on any file system).
    #[cfg(test)]
    fn with_alignment(file: File, align: Align) -> UringFile {
        UringFile {
            file,
            direct: Some(align),
            rmw: RwLock::new(()),
        }
    }

    /// Whether the file does direct I/O (O_DIRECT).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// O_DIRECT alignment of (buffer addresses, file offsets and lengths),
    /// if the file does direct I/O.
    pub fn direct_alignment(&self) -> Option<(usize, usize)> {
        self.direct.map(|a| (a.mem, a.offset))
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// A batch on an O_DIRECT file: aligned requests as they are, the rest
    /// through bounce buffers, unaligned writes as read-modify-writes after
    /// the rest.
    fn submit_direct(&self, al: Align, reqs: &mut [IoReq<'_>]) -> io::Result<()> {
        let fd = self.fd();
        let mut ops = Vec::with_capacity(reqs.len());
        let mut bounced_reads: Vec<(AlignedBuf, usize, &mut [u8])> = Vec::new();
        let mut bounced_writes: Vec<AlignedBuf> = Vec::new();
        let mut rmw: Vec<(u64, &[u8])> = Vec::new();
        for r in reqs.iter_mut() {
            match r {
                IoReq::Read { offset, buf } => {
                    if buf.is_empty() {
                        continue;
                    }
                    if al.offset_ok(*offset, buf.len()) && al.mem_ok(buf.as_ptr()) {
                        ops.push(Op::read(fd, buf, *offset, al.offset));
                    } else {
                        let (start, end) = al.span(*offset, buf.len());
                        let mut b = AlignedBuf::zeroed((end - start) as usize, al.buf_align())?;
                        ops.push(Op::read(fd, b.as_mut_slice(), start, al.offset));
                        bounced_reads.push((b, (*offset - start) as usize, &mut **buf));
                    }
                }
                IoReq::Write { offset, buf } => {
                    if buf.is_empty() {
                        continue;
                    }
                    if !al.offset_ok(*offset, buf.len()) {
                        rmw.push((*offset, &**buf));
                    } else if al.mem_ok(buf.as_ptr()) {
                        ops.push(Op::write(fd, buf, *offset, al.offset));
                    } else {
                        let mut b = AlignedBuf::zeroed(buf.len(), al.buf_align())?;
                        b.as_mut_slice().copy_from_slice(buf);
                        ops.push(Op::write(fd, b.as_mut_slice(), *offset, al.offset));
                        bounced_writes.push(b);
                    }
                }
            }
        }
        {
            let _shared = self.rmw.read().unwrap_or_else(|p| p.into_inner());
            ring::run(&mut ops)?;
        }
        drop(ops);
        for (mut b, skip, dst) in bounced_reads {
            let n = dst.len();
            dst.copy_from_slice(&b.as_mut_slice()[skip..skip + n]);
        }
        for (offset, data) in rmw {
            self.read_modify_write(al, offset, data)?;
        }
        Ok(())
    }

    /// Write `data` at an offset or of a length off the O_DIRECT alignment:
    /// read the partial edge blocks, patch them, write the aligned span,
    /// and trim the file back if that extended it past the write.
    fn read_modify_write(&self, al: Align, offset: u64, data: &[u8]) -> io::Result<()> {
        let _excl = self.rmw.write().unwrap_or_else(|p| p.into_inner());
        let fd = self.fd();
        let size = self.file.metadata()?.len();
        let (start, end) = al.span(offset, data.len());
        let blen = (end - start) as usize;
        let a = al.offset;
        let mut b = AlignedBuf::zeroed(blen, al.buf_align())?;
        {
            let whole = b.as_mut_slice();
            let head = offset != start && start < size;
            let tail_start = end - a as u64;
            let tail = offset + data.len() as u64 != end && tail_start < size;
            let mut ops = Vec::with_capacity(2);
            if blen == a {
                if head || tail {
                    ops.push(Op::read(fd, whole, start, a));
                }
            } else {
                let (h, rest) = whole.split_at_mut(a);
                let t = &mut rest[blen - 2 * a..];
                if head {
                    ops.push(Op::read(fd, h, start, a));
                }
                if tail {
                    ops.push(Op::read(fd, t, tail_start, a));
                }
            }
            ring::run(&mut ops)?;
        }
        let skip = (offset - start) as usize;
        b.as_mut_slice()[skip..skip + data.len()].copy_from_slice(data);
        ring::run(&mut [Op::write(fd, b.as_mut_slice(), start, a)])?;
        let want = offset + data.len() as u64;
        if end > size && want < end {
            self.file.set_len(size.max(want))?;
        }
        Ok(())
    }
}

impl Storage for UringFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.direct {
            Some(al) => self.submit_direct(al, &mut [IoReq::Read { offset, buf }]),
            None => ring::run(&mut [Op::read(self.fd(), buf, offset, 1)]),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.direct {
            Some(al) => self.submit_direct(al, &mut [IoReq::Write { offset, buf }]),
            None => ring::run(&mut [Op::write(self.fd(), buf, offset, 1)]),
        }
    }

    /// Metadata is one small synchronous request at a time: `pread` (see
    /// the module documentation; O_DIRECT files keep the aligned path).
    fn read_meta(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.direct {
            Some(al) => self.submit_direct(al, &mut [IoReq::Read { offset, buf }]),
            None => ring::run_meta(&mut [Op::read(self.fd(), buf, offset, 1)]),
        }
    }

    /// Metadata write with `pwrite` (see [`Storage::read_meta`]).
    fn write_meta(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.direct {
            Some(al) => self.submit_direct(al, &mut [IoReq::Write { offset, buf }]),
            None => ring::run_meta(&mut [Op::write(self.fd(), buf, offset, 1)]),
        }
    }

    /// Runs the whole batch concurrently: requests of one batch must not
    /// overlap if one of them writes.
    fn submit(&self, reqs: &mut [IoReq<'_>]) -> io::Result<()> {
        if let Some(al) = self.direct {
            return self.submit_direct(al, reqs);
        }
        let fd = self.fd();
        let mut ops: Vec<Op> = reqs.iter_mut().map(|r| req_op(fd, r)).collect();
        ring::run(&mut ops)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _excl = self
            .direct
            .map(|_| self.rmw.write().unwrap_or_else(|p| p.into_inner()));
        self.file.set_len(len)
    }

    fn backend_name(&self) -> &'static str {
        URING_NAME
    }

    fn file(&self) -> &File {
        &self.file
    }
}

/// The buffered-I/O op of a request.
fn req_op(fd: RawFd, r: &mut IoReq<'_>) -> Op {
    match r {
        IoReq::Read { offset, buf } => Op::read(fd, buf, *offset, 1),
        IoReq::Write { offset, buf } => Op::write(fd, buf, *offset, 1),
    }
}

/// Run requests on several storages as one batch.
///
/// Requests on buffered io_uring storages (whatever their file) go into
/// the calling thread's ring together, all in flight at once; requests on
/// other storages (the `pread` backend, O_DIRECT files, which need their
/// own alignment handling) run through each storage's own
/// [`Storage::submit`], grouped per storage in their original order.
/// Returns when everything has completed; on error some requests may have
/// completed. As with [`Storage::submit`], requests that overlap must not
/// include a write.
pub fn submit_many(reqs: &mut [(&dyn Storage, IoReq<'_>)]) -> io::Result<()> {
    // Per distinct storage (by address): its descriptor when its requests
    // can join the shared ring batch.
    let mut seen: Vec<(*const (), Option<RawFd>)> = Vec::new();
    let mut ops = Vec::with_capacity(reqs.len());
    let mut rest: Vec<(*const (), usize)> = Vec::new();
    let mut first_err: Option<io::Error> = None;
    for (i, (s, r)) in reqs.iter_mut().enumerate() {
        let key = *s as *const dyn Storage as *const ();
        let fd = match seen.iter().find(|(k, _)| *k == key) {
            Some(&(_, fd)) => fd,
            None => {
                let fd = match ring_fd(*s) {
                    Ok(fd) => fd,
                    Err(e) => {
                        first_err.get_or_insert(e);
                        None
                    }
                };
                seen.push((key, fd));
                fd
            }
        };
        match fd {
            Some(fd) => ops.push(req_op(fd, r)),
            None => rest.push((key, i)),
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    ring::run(&mut ops)?;
    drop(ops);
    // The others: one submit per storage, in first-seen order.
    let mut groups: Vec<(*const (), Vec<usize>)> = Vec::new();
    for (key, i) in rest {
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => g.1.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    for (_, idx) in groups {
        let storage = reqs[idx[0]].0;
        let mut batch: Vec<IoReq<'_>> = Vec::with_capacity(idx.len());
        let mut it = idx.iter().peekable();
        for (i, (_, r)) in reqs.iter_mut().enumerate() {
            if it.peek() != Some(&&i) {
                continue;
            }
            it.next();
            batch.push(match r {
                IoReq::Read { offset, buf } => IoReq::Read {
                    offset: *offset,
                    buf,
                },
                IoReq::Write { offset, buf } => IoReq::Write {
                    offset: *offset,
                    buf,
                },
            });
        }
        storage.submit(&mut batch)?;
    }
    Ok(())
}

/// The descriptor of an io_uring storage whose requests can go into a
/// shared batch as plain reads and writes (buffered, no alignment rules).
fn ring_fd(s: &dyn Storage) -> io::Result<Option<RawFd>> {
    if s.backend_name() != URING_NAME || direct::is_direct(s.file())? {
        return Ok(None);
    }
    Ok(Some(s.file().as_raw_fd()))
}

#[cfg(test)]
mod tests;
