//! Copying file ranges into a file: [`copy`].
//!
//! [`copy`] fills contiguous ranges of one storage from sequences of
//! source ranges. Where every file involved is a buffered io_uring storage
//! the copy runs through the calling thread's ring in chains of at most
//! 1 MiB, several chains in flight:
//!
//! * by default through registered buffers: a chain's source ranges are
//!   read into one buffer of a shared [`FixedPool`](super::FixedPool)
//!   (`READ_FIXED`, all at once), then the buffer is written with one
//!   `WRITE_FIXED`, submitted on its own when the reads are done;
//! * with `IMGPULL_SPLICE=1`, by splicing: linked `SPLICE` requests move
//!   the source ranges into a pipe (the pipe takes references to the
//!   source's page-cache pages: no copy), then the pipe into the
//!   destination (the one copy of the bytes).
//!
//! Splicing copies the bytes once instead of twice, but the kernel runs
//! spliced writes into one file concurrently (they are not "hashed": the
//! worker pool does not serialise them as it does plain buffered writes,
//! see [`ring::join_anchor`]), and concurrent writers into one tmpfs file
//! spin on its lock. Measured on a 2-core virtual machine pulling a 1 GiB
//! chain into tmpfs (649 MiB copied): both took about 0.26 s on a quiet
//! machine, but with other work running spliced pulls spent up to a second
//! of CPU spinning and took 0.8 s (median of 7) where buffered ones took
//! 0.34 s with a third of the CPU time; copies through buffers also were
//! a little faster on a 16-layer chain of 4 KiB clusters. So buffers are
//! the default.
//!
//! A chain stops at its first short or failed request: a source ending
//! before the range (past the end of a file reads as zeros), or an error.
//! Such a chain's range, like every request whose files cannot take plain
//! ring requests (the `pread` backend, O_DIRECT files), is copied again
//! through a buffer with the storages' own reads and writes, which
//! zero-fill and report errors as usual.
//!
//! Each thread keeps its own pipes (like its ring), created on first use
//! and sized to [`PIPE_BYTES`] where the pipe limits allow.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use io_uring::{opcode, squeue, types, IoUring};

use super::ring::{self, InFlight, URING_READ, URING_SPLICED, URING_WRITTEN};
use crate::storage::{IoReq, Storage};

/// Environment variable: `1` to copy by splicing (default: through
/// registered buffers).
pub const ENV_SPLICE: &str = "IMGPULL_SPLICE";

/// Capacity asked for each pipe (Linux's default `pipe-max-size`).
pub const PIPE_BYTES: usize = 1 << 20;

/// Pipes (so chains in flight) per thread.
const PIPES: usize = 4;

/// Source ranges per chain: a chain must fit the submission queue whole
/// (a link chain ends with its submission), with room for another.
const MAX_SEGS: usize = 48;

/// Size of each buffer of the buffered path.
const BUF_BYTES: usize = 1 << 20;

/// Buffers of the buffered path, shared by all threads (a thread copying
/// waits for one when all are in use).
const BUF_COUNT: usize = 16;

/// Chains a thread keeps in flight through buffers.
const BUF_DEPTH: usize = 4;

/// The buffered path's buffers: registered ones (see [`super::FixedPool`]),
/// or `None` where the pool cannot be made.
fn buffer_pool() -> Option<&'static super::FixedPool> {
    static POOL: OnceLock<Option<super::FixedPool>> = OnceLock::new();
    POOL.get_or_init(|| super::FixedPool::new(BUF_COUNT, BUF_BYTES).ok())
        .as_ref()
}

/// A failed [`copy`]: the side that failed, and its error.
#[derive(Debug)]
pub enum CopyError {
    /// Reading a source failed.
    Read(io::Error),
    /// Writing the destination failed.
    Write(io::Error),
}

impl CopyError {
    /// The I/O error, whichever side failed.
    pub fn into_io(self) -> io::Error {
        match self {
            CopyError::Read(e) | CopyError::Write(e) => e,
        }
    }
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyError::Read(e) => write!(f, "reading a copy's source: {e}"),
            CopyError::Write(e) => write!(f, "writing a copy's destination: {e}"),
        }
    }
}

impl std::error::Error for CopyError {}

/// One source range of a [`CopyReq`].
#[derive(Clone, Copy, Debug)]
pub struct CopySrc<'a> {
    /// The file to read.
    pub storage: &'a dyn Storage,
    /// Byte offset in it.
    pub offset: u64,
    /// Length in bytes; bytes past the end of the file read as zeros.
    pub len: u64,
}

/// Fill `[dst_offset, dst_offset + total)` of the destination with the
/// concatenation of `srcs`.
#[derive(Clone, Debug)]
pub struct CopyReq<'a> {
    /// Where the first byte goes in the destination.
    pub dst_offset: u64,
    /// The source ranges, in order.
    pub srcs: Vec<CopySrc<'a>>,
}

impl CopyReq<'_> {
    /// Bytes the request writes.
    pub fn len(&self) -> u64 {
        self.srcs.iter().map(|s| s.len).sum()
    }

    /// Whether the request writes nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    // SAFETY: sysconf has no memory effects.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    })
}

/// Whether splicing is asked for (`IMGPULL_SPLICE=1`) and the kernel's
/// io_uring has SPLICE.
fn splice_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        if !std::env::var(ENV_SPLICE).is_ok_and(|v| v.trim() == "1") {
            return false;
        }
        let ok = kernel_splices();
        super::log(format_args!(
            "{ENV_SPLICE}=1: {}",
            if ok {
                "copies are spliced"
            } else {
                "the kernel's io_uring lacks IORING_OP_SPLICE; copies go through buffers"
            }
        ));
        ok
    })
}

/// Whether the kernel's io_uring has SPLICE (probed once).
pub(crate) fn kernel_splices() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if super::uring_available().is_err() {
            return false;
        }
        ring::join_anchor();
        let Ok(ring) = IoUring::new(2) else {
            return false;
        };
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::Splice::CODE)
    })
}

/// One pipe: read end, write end, capacity in bytes.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: u64,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors that nothing else owns.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Ask for the full size, then smaller ones (per-user pipe limits).
        for size in [PIPE_BYTES, PIPE_BYTES / 4, PIPE_BYTES / 16] {
            // SAFETY: fcntl on our own descriptor.
            if unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) } >= 0 {
                break;
            }
        }
        // SAFETY: as above.
        let cap = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if cap <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe {
            r,
            w,
            cap: cap as u64,
        })
    }
}

thread_local! {
    static THREAD_PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// One chain: source segments into a pipe, then the pipe into `dst_offset`.
struct Chain<'a> {
    dst_offset: u64,
    segs: Vec<(CopySrc<'a>, RawFd)>,
    total: u64,
}

impl Chain<'_> {
    fn entries(&self) -> usize {
        self.segs.len() + 1
    }
}

/// Cut the requests into chains of at most `cap` bytes and [`MAX_SEGS`]
/// source ranges; for a `pipe`, also of at most `cap / page` pipe slots (a
/// range takes a slot per page it touches).
fn build_chains<'a>(
    reqs: &[&CopyReq<'a>],
    fds: &[Vec<RawFd>],
    cap: u64,
    pipe: bool,
) -> Vec<Chain<'a>> {
    let page = page_size();
    // A buffer has no slots: only its bytes count.
    let slots = if pipe {
        (cap / page).max(1)
    } else {
        cap / page + MAX_SEGS as u64 + 1
    };
    let mut chains = Vec::new();
    for (req, fds) in reqs.iter().zip(fds) {
        let mut cur = Chain {
            dst_offset: req.dst_offset,
            segs: Vec::new(),
            total: 0,
        };
        let mut used = 0u64;
        for (src, &fd) in req.srcs.iter().zip(fds) {
            let (mut off, mut left) = (src.offset, src.len);
            while left > 0 {
                let skew = off % page;
                let room_slots = (slots - used) * page;
                let take = left
                    .min(cap - cur.total)
                    .min(room_slots.saturating_sub(skew));
                if take == 0 || cur.segs.len() == MAX_SEGS {
                    let next = cur.dst_offset + cur.total;
                    chains.push(std::mem::replace(
                        &mut cur,
                        Chain {
                            dst_offset: next,
                            segs: Vec::new(),
                            total: 0,
                        },
                    ));
                    used = 0;
                    continue;
                }
                cur.segs.push((
                    CopySrc {
                        storage: src.storage,
                        offset: off,
                        len: take,
                    },
                    fd,
                ));
                used += (skew + take).div_ceil(page);
                cur.total += take;
                off += take;
                left -= take;
            }
        }
        if cur.total > 0 {
            chains.push(cur);
        }
    }
    chains
}

/// How a chain in flight is doing.
#[derive(Clone, Copy, Default)]
struct Flight {
    pipe: usize,
    waiting: usize,
    failed: bool,
}

/// Run `chains` into `dst` through `ring` with `pipes`; returns the
/// indexes of the chains that did not complete in full, and of the pipes
/// that must be replaced (they may hold bytes of a chain that stopped).
fn run_chains(
    ring: &mut IoUring,
    pipes: &[Pipe],
    dst: RawFd,
    chains: &[Chain<'_>],
) -> (Vec<usize>, Vec<usize>) {
    let sq_cap = ring.params().sq_entries() as usize;
    let cq_cap = ring.params().cq_entries() as usize;
    let mut flight = InFlight { ring, count: 0 };
    let mut free: Vec<usize> = (0..pipes.len()).rev().collect();
    let mut state: Vec<Flight> = vec![Flight::default(); chains.len()];
    let mut failed = Vec::new();
    let mut stale = Vec::new();
    let mut next = 0usize;
    loop {
        {
            let mut sq = flight.ring.submission();
            while next < chains.len() && !free.is_empty() {
                let c = &chains[next];
                let n = c.entries();
                if sq.capacity() - sq.len() < n || flight.count + n > cq_cap.min(sq_cap * 2) {
                    break;
                }
                let pi = free.pop().unwrap_or_default();
                let p = &pipes[pi];
                let mut entries = Vec::with_capacity(n);
                for (k, (seg, fd)) in c.segs.iter().enumerate() {
                    entries.push(
                        opcode::Splice::new(
                            types::Fd(*fd),
                            seg.offset as i64,
                            types::Fd(p.w.as_raw_fd()),
                            -1,
                            seg.len as u32,
                        )
                        .build()
                        .flags(squeue::Flags::IO_LINK)
                        .user_data(((next as u64) << 16) | k as u64),
                    );
                }
                entries.push(
                    opcode::Splice::new(
                        types::Fd(p.r.as_raw_fd()),
                        -1,
                        types::Fd(dst),
                        c.dst_offset as i64,
                        c.total as u32,
                    )
                    .build()
                    .user_data(((next as u64) << 16) | c.segs.len() as u64),
                );
                // SAFETY: the entries reference no memory (only descriptors
                // that outlive this call), and `flight` waits for them.
                if unsafe { sq.push_multiple(&entries) }.is_err() {
                    free.push(pi);
                    break;
                }
                flight.count += n;
                state[next] = Flight {
                    pipe: pi,
                    waiting: n,
                    failed: false,
                };
                next += 1;
            }
        }
        if flight.count == 0 {
            break;
        }
        // Sleep until the chain nearest to completion can have finished
        // (one wake-up per chain, not one per request).
        let want = state[..next]
            .iter()
            .filter(|f| f.waiting > 0)
            .map(|f| f.waiting)
            .min()
            .unwrap_or(1);
        flight.wait_for(want);
        for cqe in flight.ring.completion() {
            flight.count -= 1;
            let ci = (cqe.user_data() >> 16) as usize;
            let k = (cqe.user_data() & 0xffff) as usize;
            let Some(c) = chains.get(ci) else { continue };
            let want = if k < c.segs.len() {
                c.segs[k].0.len
            } else {
                c.total
            };
            let st = &mut state[ci];
            if cqe.result() < 0 || cqe.result() as u64 != want {
                st.failed = true;
            }
            st.waiting -= 1;
            if st.waiting == 0 {
                if st.failed {
                    failed.push(ci);
                    stale.push(st.pipe);
                } else {
                    URING_READ.fetch_add(c.total, Ordering::Relaxed);
                    URING_WRITTEN.fetch_add(c.total, Ordering::Relaxed);
                    URING_SPLICED.fetch_add(c.total, Ordering::Relaxed);
                    free.push(st.pipe);
                }
            }
        }
    }
    (failed, stale)
}

/// How a chain copied through a buffer is doing.
#[derive(Default)]
struct BufFlight {
    buf: Option<super::FixedBuf>,
    /// Completions still expected for its reads, then for its write.
    waiting: usize,
    writing: bool,
    failed: bool,
}

/// Run `chains` into `dst` through registered buffers of `pool` and the
/// thread's ring: each chain's source ranges are read into one buffer
/// (`READ_FIXED`, all in flight at once), then the buffer is written with
/// one `WRITE_FIXED`, up to [`BUF_DEPTH`] chains at a time. The write is
/// submitted on its own, not linked to the reads: the kernel serialises a
/// ring's buffered writes to one file in its worker pool only for requests
/// it sees at submission, and concurrent writers into one tmpfs file spin
/// on its lock. Returns the chains that did not complete in full.
fn run_buffered_chains(
    r: &mut ring::Ring,
    pool: &super::FixedPool,
    dst: RawFd,
    chains: &[Chain<'_>],
) -> Vec<usize> {
    let mut failed = Vec::new();
    let mut state: Vec<BufFlight> = (0..chains.len()).map(|_| BufFlight::default()).collect();
    // All buffers of the pool share one registration.
    let mut spare = Some(pool.get());
    let index = spare
        .as_ref()
        .and_then(|b| r.fixed_index(b.as_ptr(), b.len()));
    let cq_cap = r.ring.params().cq_entries() as usize;
    let mut writes: std::collections::VecDeque<usize> = Default::default();
    let mut flight = InFlight {
        ring: &mut r.ring,
        count: 0,
    };
    let (mut next, mut active) = (0usize, 0usize);
    loop {
        {
            let mut sq = flight.ring.submission();
            // Writes of chains whose reads are done.
            while let Some(&ci) = writes.front() {
                if sq.is_full() || flight.count + 1 > cq_cap {
                    break;
                }
                let (c, st) = (&chains[ci], &mut state[ci]);
                let Some(buf) = st.buf.as_ref() else {
                    writes.pop_front();
                    continue;
                };
                let fd = types::Fd(dst);
                let n = c.total as u32;
                let e = match index {
                    Some(i) => opcode::WriteFixed::new(fd, buf.as_ptr(), n, i)
                        .offset(c.dst_offset)
                        .build(),
                    None => opcode::Write::new(fd, buf.as_ptr(), n)
                        .offset(c.dst_offset)
                        .build(),
                };
                let e = e.user_data(((ci as u64) << 16) | 0xffff);
                // SAFETY: the buffer lives in `state` until `flight` has
                // waited for every request.
                if unsafe { sq.push(&e) }.is_err() {
                    break;
                }
                writes.pop_front();
                st.writing = true;
                st.waiting = 1;
                flight.count += 1;
            }
            // New chains while buffers are free.
            while next < chains.len() && active < BUF_DEPTH {
                let c = &chains[next];
                let n = c.segs.len();
                if sq.capacity() - sq.len() < n || flight.count + n + BUF_DEPTH > cq_cap {
                    break;
                }
                let mut buf = match spare.take().or_else(|| pool.try_get()) {
                    Some(b) => b,
                    None if active == 0 => pool.get(),
                    None => break,
                };
                let mut entries = Vec::with_capacity(n);
                let mut pos = 0usize;
                for (k, (seg, fd)) in c.segs.iter().enumerate() {
                    // SAFETY: `pos + len <= total <= BUF_BYTES`, inside the buffer.
                    let p = unsafe { buf.as_mut_ptr().add(pos) };
                    let (fd, len) = (types::Fd(*fd), seg.len as u32);
                    let e = match index {
                        Some(i) => opcode::ReadFixed::new(fd, p, len, i)
                            .offset(seg.offset)
                            .build(),
                        None => opcode::Read::new(fd, p, len).offset(seg.offset).build(),
                    };
                    entries.push(e.user_data(((next as u64) << 16) | k as u64));
                    pos += seg.len as usize;
                }
                // SAFETY: as above.
                if unsafe { sq.push_multiple(&entries) }.is_err() {
                    spare = Some(buf);
                    break;
                }
                flight.count += n;
                state[next] = BufFlight {
                    buf: Some(buf),
                    waiting: n,
                    writing: false,
                    failed: false,
                };
                active += 1;
                next += 1;
            }
        }
        if flight.count == 0 {
            break;
        }
        let want = state[..next]
            .iter()
            .filter(|f| f.waiting > 0)
            .map(|f| f.waiting)
            .min()
            .unwrap_or(1);
        flight.wait_for(want);
        let done: Vec<(u64, i32)> = flight
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in done {
            flight.count -= 1;
            let (ci, k) = ((ud >> 16) as usize, (ud & 0xffff) as usize);
            let (Some(c), Some(st)) = (chains.get(ci), state.get_mut(ci)) else {
                continue;
            };
            let want = if st.writing { c.total } else { c.segs[k].0.len };
            if res < 0 || res as u64 != want {
                st.failed = true;
            }
            st.waiting -= 1;
            if st.waiting > 0 {
                continue;
            }
            if !st.writing && !st.failed {
                writes.push_back(ci);
                continue;
            }
            if st.failed {
                failed.push(ci);
            } else {
                URING_READ.fetch_add(c.total, Ordering::Relaxed);
                URING_WRITTEN.fetch_add(c.total, Ordering::Relaxed);
                if index.is_some() {
                    ring::URING_FIXED.fetch_add(2 * c.total, Ordering::Relaxed);
                }
            }
            spare = spare.or(st.buf.take());
            active -= 1;
        }
    }
    drop(flight);
    failed
}

/// Copy the requests through a buffer with the storages' own reads and
/// writes (at most [`BUF_BYTES`] at a time, in a registered buffer where
/// the pool could be made).
fn copy_buffered(
    dst: &dyn Storage,
    dst_offset: u64,
    srcs: &[CopySrc<'_>],
) -> Result<(), CopyError> {
    let total: u64 = srcs.iter().map(|s| s.len).sum();
    if total == 0 {
        return Ok(());
    }
    let want = total.min(BUF_BYTES as u64) as usize;
    let (mut fixed, mut plain);
    let buf: &mut [u8] = match buffer_pool() {
        Some(pool) => {
            fixed = pool.get();
            &mut fixed[..want]
        }
        None => {
            plain = vec![0u8; want];
            &mut plain[..]
        }
    };
    let mut done = 0u64;
    let mut si = 0usize;
    let mut s_done = 0u64;
    while done < total {
        let n = (total - done).min(buf.len() as u64) as usize;
        let mut reqs: Vec<(&dyn Storage, IoReq<'_>)> = Vec::new();
        let mut rest: &mut [u8] = &mut buf[..n];
        while !rest.is_empty() {
            let s = &srcs[si];
            let take = (s.len - s_done).min(rest.len() as u64) as usize;
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(take);
            rest = tail;
            if take > 0 {
                reqs.push((
                    s.storage,
                    IoReq::Read {
                        offset: s.offset + s_done,
                        buf: chunk,
                    },
                ));
            }
            s_done += take as u64;
            if s_done == s.len {
                si += 1;
                s_done = 0;
            }
        }
        super::submit_many(&mut reqs).map_err(CopyError::Read)?;
        drop(reqs);
        dst.write_at(&buf[..n], dst_offset + done)
            .map_err(CopyError::Write)?;
        done += n as u64;
    }
    Ok(())
}

/// Splice `reqs` into `dst` through the thread's pipes; the chains that
/// did not complete, or `None` without pipes or ring.
fn splice_chains<'a>(
    dst: RawFd,
    reqs: &[&CopyReq<'a>],
    fds: &[Vec<RawFd>],
) -> Option<Vec<Chain<'a>>> {
    THREAD_PIPES
        .try_with(|tp| {
            let mut pipes = tp.try_borrow_mut().ok()?;
            while pipes.len() < PIPES {
                match Pipe::new() {
                    Ok(p) => pipes.push(p),
                    Err(e) => {
                        if pipes.is_empty() {
                            super::log(format_args!(
                                "cannot create a pipe for splicing ({e}); copying through buffers"
                            ));
                        }
                        break;
                    }
                }
            }
            let cap = pipes.iter().map(|p| p.cap).min()?;
            let chains = build_chains(reqs, fds, cap, true);
            let (failed, mut stale) =
                ring::with_ring(|ring| run_chains(ring, &pipes, dst, &chains))?;
            // Pipes of stopped chains may still hold bytes: replace them.
            stale.sort_unstable();
            for pi in stale.into_iter().rev() {
                match Pipe::new() {
                    Ok(p) => pipes[pi] = p,
                    Err(_) => {
                        pipes.remove(pi);
                    }
                }
            }
            Some(take_chains(chains, failed))
        })
        .ok()
        .flatten()
}

/// Copy `reqs` into `dst` through registered buffers and the thread's
/// ring; the chains that did not complete, or `None` without buffers or
/// ring.
fn buffer_chains<'a>(
    dst: RawFd,
    reqs: &[&CopyReq<'a>],
    fds: &[Vec<RawFd>],
) -> Option<Vec<Chain<'a>>> {
    let pool = buffer_pool()?;
    let chains = build_chains(reqs, fds, BUF_BYTES as u64, false);
    let failed = ring::with_ring_buffers(|r| run_buffered_chains(r, pool, dst, &chains))?;
    Some(take_chains(chains, failed))
}

/// The chains at `failed`.
fn take_chains<'a>(chains: Vec<Chain<'a>>, failed: Vec<usize>) -> Vec<Chain<'a>> {
    let mut chains: Vec<Option<Chain<'a>>> = chains.into_iter().map(Some).collect();
    failed
        .into_iter()
        .filter_map(|i| chains.get_mut(i).and_then(Option::take))
        .collect()
}

/// Fill each request's destination range of `dst` with its sources (see
/// the module documentation). Requests must not overlap in `dst`, and no
/// source may overlap a destination range. Returns when everything has
/// completed; on error some of it may have been written.
pub fn copy(dst: &dyn Storage, reqs: &[CopyReq<'_>]) -> Result<(), CopyError> {
    copy_as(dst, reqs, splice_enabled())
}

/// [`copy`], splicing where `splice` (and the kernel can) instead of
/// going through registered buffers.
pub(crate) fn copy_as(
    dst: &dyn Storage,
    reqs: &[CopyReq<'_>],
    splice: bool,
) -> Result<(), CopyError> {
    // The requests whose files all take plain ring requests (buffered
    // io_uring storages), with their source descriptors.
    let mut ringable: Vec<&CopyReq<'_>> = Vec::new();
    let mut fds: Vec<Vec<RawFd>> = Vec::new();
    let mut buffered: Vec<(u64, &[CopySrc<'_>])> = Vec::new();
    let dst_fd = super::ring_fd(dst).map_err(CopyError::Write)?;
    for r in reqs {
        let src_fds = match dst_fd {
            Some(_) => r
                .srcs
                .iter()
                .map(|s| super::ring_fd(s.storage))
                .collect::<io::Result<Option<Vec<RawFd>>>>()
                .map_err(CopyError::Read)?,
            None => None,
        };
        match src_fds {
            Some(f) => {
                ringable.push(r);
                fds.push(f);
            }
            None => buffered.push((r.dst_offset, &r.srcs)),
        }
    }
    let mut redo: Vec<Chain<'_>> = Vec::new();
    let ran = match (dst_fd, ringable.is_empty()) {
        (Some(dst_fd), false) if splice && kernel_splices() => {
            splice_chains(dst_fd, &ringable, &fds)
        }
        (Some(dst_fd), false) => buffer_chains(dst_fd, &ringable, &fds),
        _ => Some(Vec::new()),
    };
    match ran {
        Some(failed) => redo = failed,
        // No pipes, buffers or ring on this thread: the storages' own path.
        None => buffered.extend(ringable.iter().map(|r| (r.dst_offset, &r.srcs[..]))),
    }
    for c in &redo {
        let srcs: Vec<CopySrc<'_>> = c.segs.iter().map(|(s, _)| *s).collect();
        copy_buffered(dst, c.dst_offset, &srcs)?;
    }
    for (off, srcs) in buffered {
        copy_buffered(dst, off, srcs)?;
    }
    Ok(())
}
