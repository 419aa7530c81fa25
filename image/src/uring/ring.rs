//! The per-thread ring and the loop that drives a batch of operations
//! through it (or, where no ring can be had, through `pread`/`pwrite`).
//!
//! An [`Op`] is one read or write of a caller's buffer. [`run`] puts as many
//! of a batch in flight as the ring holds, refills the ring as completions
//! arrive (so batches larger than the ring stream through it), resubmits
//! the rest of short transfers and interrupted requests, zero-fills reads
//! past the end of the file, and returns only when the kernel no longer
//! holds a pointer into any buffer of the batch.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use io_uring::{opcode, types, IoUring};

use super::fixed::{self, RingTable};

/// Submission-queue entries of each thread's ring (the completion queue is
/// twice as large, so completions can never overflow); larger batches
/// stream through it.
pub const RING_ENTRIES: u32 = 128;

/// Largest transfer put in one request; longer ones continue as short
/// transfers (Linux moves at most `0x7ffff000` bytes per call anyway).
const MAX_CHUNK: usize = 1 << 30;

/// Resubmissions after `EAGAIN` before the rest of a request is done with a
/// blocking system call instead.
const EAGAIN_RETRIES: u32 = 8;

/// Data bytes moved through io_uring, read and written.
pub(crate) static URING_READ: AtomicU64 = AtomicU64::new(0);
pub(crate) static URING_WRITTEN: AtomicU64 = AtomicU64::new(0);
/// Data bytes moved through `pread`/`pwrite` by the storages of this module.
pub(crate) static PREAD_READ: AtomicU64 = AtomicU64::new(0);
pub(crate) static PREAD_WRITTEN: AtomicU64 = AtomicU64::new(0);
/// Metadata bytes moved with `pread`/`pwrite` ([`run_meta`]).
pub(crate) static META_READ: AtomicU64 = AtomicU64::new(0);
pub(crate) static META_WRITTEN: AtomicU64 = AtomicU64::new(0);
/// The part of the io_uring bytes that moved through registered buffers.
pub(crate) static URING_FIXED: AtomicU64 = AtomicU64::new(0);
/// The part of the io_uring bytes that moved by splicing (counted once, as
/// written: the read half of a splice references pages instead of copying).
pub(crate) static URING_SPLICED: AtomicU64 = AtomicU64::new(0);

/// Direction of an [`Op`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
}

/// One read or write of a whole buffer at a file offset.
///
/// Holds a raw pointer into a buffer borrowed by the caller of [`run`] for
/// at least as long as the `Op` lives.
#[derive(Debug)]
pub(crate) struct Op {
    pub fd: RawFd,
    pub kind: Kind,
    ptr: *mut u8,
    pub len: usize,
    pub offset: u64,
    /// Bytes transferred so far.
    pub done: usize,
    /// O_DIRECT alignment of `offset`/`len` (1 for buffered files): a short
    /// transfer ending off this alignment is continued from the aligned
    /// position below it.
    align: usize,
    eagain: u32,
    /// Registered-buffer index, when the buffer lies in a [`FixedPool`]
    /// registered with the ring running the op.
    ///
    /// [`FixedPool`]: super::FixedPool
    buf_index: Option<u16>,
    finished: bool,
    err: Option<io::Error>,
}

impl Op {
    /// Read into `buf` at `offset`. The buffer must outlive the op.
    pub fn read(fd: RawFd, buf: &mut [u8], offset: u64, align: usize) -> Op {
        Op::new(fd, Kind::Read, buf.as_mut_ptr(), buf.len(), offset, align)
    }

    /// Write `buf` at `offset`. The buffer must outlive the op.
    pub fn write(fd: RawFd, buf: &[u8], offset: u64, align: usize) -> Op {
        // The pointer is only ever read through for a write.
        Op::new(
            fd,
            Kind::Write,
            buf.as_ptr() as *mut u8,
            buf.len(),
            offset,
            align,
        )
    }

    fn new(fd: RawFd, kind: Kind, ptr: *mut u8, len: usize, offset: u64, align: usize) -> Op {
        Op {
            fd,
            kind,
            ptr,
            len,
            offset,
            done: 0,
            align: align.max(1),
            eagain: 0,
            buf_index: None,
            finished: len == 0,
            err: None,
        }
    }

    fn pos(&self) -> u64 {
        self.offset + self.done as u64
    }

    fn chunk(&self) -> usize {
        (self.len - self.done).min(MAX_CHUNK)
    }

    /// The submission entry for the rest of this op.
    fn entry(&self) -> io_uring::squeue::Entry {
        let fd = types::Fd(self.fd);
        let n = self.chunk() as u32;
        // SAFETY: `done < len`, so the pointer stays inside the buffer.
        let p = unsafe { self.ptr.add(self.done) };
        match (self.kind, self.buf_index) {
            (Kind::Read, None) => opcode::Read::new(fd, p, n).offset(self.pos()).build(),
            (Kind::Write, None) => opcode::Write::new(fd, p as *const u8, n)
                .offset(self.pos())
                .build(),
            (Kind::Read, Some(i)) => opcode::ReadFixed::new(fd, p, n, i)
                .offset(self.pos())
                .build(),
            (Kind::Write, Some(i)) => opcode::WriteFixed::new(fd, p as *const u8, n, i)
                .offset(self.pos())
                .build(),
        }
    }

    /// Zero the rest of a read that reached the end of the file.
    fn zero_rest(&mut self) {
        // SAFETY: `ptr..ptr+len` is the caller's live buffer, `done <= len`,
        // and the kernel holds no request on it (this op just completed).
        unsafe { std::ptr::write_bytes(self.ptr.add(self.done), 0, self.len - self.done) };
        self.done = self.len;
        self.finished = true;
    }

    fn fail(&mut self, e: io::Error) {
        self.err = Some(e);
        self.finished = true;
    }
}

/// What to do with an op after one of its transfers completed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Finished (successfully or with `err` set).
    Done,
    /// Submit the rest again.
    Again,
    /// A direct read stopped off the alignment: the end of the file, or a
    /// short transfer to continue from the aligned position below.
    CheckEof,
    /// Finish the rest with a blocking system call.
    Blocking,
}

/// Account for one completed transfer of `op` with result `res` (bytes, or
/// a negated errno), as io_uring reports it.
pub(crate) fn complete(op: &mut Op, res: i64, counters: [&AtomicU64; 2]) -> Next {
    if res < 0 {
        let errno = (-res) as i32;
        return match errno {
            libc::EINTR => Next::Again,
            libc::EAGAIN if op.eagain < EAGAIN_RETRIES => {
                op.eagain += 1;
                Next::Again
            }
            libc::EAGAIN => Next::Blocking,
            _ => {
                op.fail(io::Error::from_raw_os_error(errno));
                Next::Done
            }
        };
    }
    let n = (res as u64).min(op.chunk() as u64) as usize;
    match op.kind {
        Kind::Read => counters[0].fetch_add(n as u64, Ordering::Relaxed),
        Kind::Write => counters[1].fetch_add(n as u64, Ordering::Relaxed),
    };
    if op.buf_index.is_some() {
        URING_FIXED.fetch_add(n as u64, Ordering::Relaxed);
    }
    if n == 0 {
        match op.kind {
            Kind::Read => op.zero_rest(),
            Kind::Write => op.fail(io::Error::new(
                io::ErrorKind::WriteZero,
                "failed to write whole buffer",
            )),
        }
        return Next::Done;
    }
    op.done += n;
    if op.done == op.len {
        op.finished = true;
        return Next::Done;
    }
    if !op.done.is_multiple_of(op.align) {
        return match op.kind {
            Kind::Read => Next::CheckEof,
            Kind::Write => {
                // Rewrite the partial block from its aligned start.
                op.done -= op.done % op.align;
                Next::Again
            }
        };
    }
    Next::Again
}

/// A direct read stopped at an unaligned position: past the end of the
/// file the rest reads as zeros, otherwise continue from the aligned
/// position below (re-reading the same bytes into the same place).
fn check_eof(op: &mut Op) -> Next {
    match file_size(op.fd) {
        Ok(size) if op.pos() >= size => {
            op.zero_rest();
            Next::Done
        }
        Ok(_) => {
            op.done -= op.done % op.align;
            Next::Again
        }
        Err(e) => {
            op.fail(e);
            Next::Done
        }
    }
}

fn file_size(fd: RawFd) -> io::Result<u64> {
    // SAFETY: fstat into a zeroed stat struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_size as u64)
}

/// Finish `op` with blocking `pread`/`pwrite` calls.
fn run_blocking(op: &mut Op) {
    run_blocking_counted(op, [&PREAD_READ, &PREAD_WRITTEN])
}

/// Finish `op` with blocking `pread`/`pwrite` calls, counting its bytes
/// in `counters` (read, written).
fn run_blocking_counted(op: &mut Op, counters: [&AtomicU64; 2]) {
    while !op.finished {
        let n = op.chunk();
        // SAFETY: the pointer range is inside the caller's live buffer.
        let r = unsafe {
            let p = op.ptr.add(op.done);
            match op.kind {
                Kind::Read => libc::pread(op.fd, p.cast(), n, op.pos() as libc::off_t),
                Kind::Write => libc::pwrite(op.fd, p.cast(), n, op.pos() as libc::off_t),
            }
        };
        let res = if r < 0 {
            -(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO) as i64)
        } else {
            r as i64
        };
        let mut next = complete(op, res, counters);
        if next == Next::CheckEof {
            next = check_eof(op);
        }
        if next == Next::Blocking {
            // A blocking call returned EAGAIN: a non-blocking descriptor.
            op.fail(io::Error::from_raw_os_error(libc::EAGAIN));
        }
    }
}

/// The first error of a finished batch.
fn first_error(ops: &mut [Op]) -> io::Result<()> {
    match ops.iter_mut().find_map(|o| o.err.take()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Run a batch without a ring.
pub(crate) fn run_sync(ops: &mut [Op]) -> io::Result<()> {
    for op in ops.iter_mut() {
        run_blocking(op);
        if op.err.is_some() {
            break;
        }
    }
    first_error(ops)
}

/// Run metadata requests with blocking calls, counted as metadata.
pub(crate) fn run_meta(ops: &mut [Op]) -> io::Result<()> {
    for op in ops.iter_mut() {
        run_blocking_counted(op, [&META_READ, &META_WRITTEN]);
        if op.err.is_some() {
            break;
        }
    }
    first_error(ops)
}

/// A thread's ring and its registered-buffer table.
pub(crate) struct Ring {
    pub ring: IoUring,
    table: RingTable,
}

impl Ring {
    /// The registered-buffer index of memory `[ptr, ptr + len)` on this
    /// ring, when it lies in a live [`FixedPool`] (registered with the
    /// ring first if needed).
    ///
    /// [`FixedPool`]: super::FixedPool
    pub fn fixed_index(&mut self, ptr: *const u8, len: usize) -> Option<u16> {
        fixed::lookup(ptr, len).and_then(|reg| self.table.index(&self.ring, &reg))
    }
}

enum Slot {
    Uninit,
    Ready(Box<Ring>),
    Failed,
}

thread_local! {
    static RING: RefCell<Slot> = const { RefCell::new(Slot::Uninit) };
}

/// A ring that every thread enters once before it creates a ring of its
/// own (see [`join_anchor`]).
static ANCHOR: std::sync::OnceLock<Option<std::sync::Mutex<IoUring>>> = std::sync::OnceLock::new();

thread_local! {
    static JOINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Make the calling thread's io_uring worker pool share one hash map with
/// every other thread's, by entering one process-wide ring (a NOP) before
/// any ring of its own. The kernel gives a thread its worker pool
/// (`io-wq`) when the thread first creates or enters a ring, with that
/// ring's hash map, and runs the buffered writes to one file ("hashed"
/// work) that share a hash map one at a time. With a map per thread, the
/// job's worker threads write into the top at once and spin on its lock:
/// measured here, a fifth of a pull's CPU time went to
/// `rwsem_spin_on_owner`. A failure here only loses the sharing.
pub(crate) fn join_anchor() {
    if JOINED.with(|j| j.replace(true)) {
        return;
    }
    let anchor = ANCHOR.get_or_init(|| {
        IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 2)
            .build(RING_ENTRIES)
            .ok()
            .map(std::sync::Mutex::new)
    });
    let Some(anchor) = anchor else { return };
    let mut ring = anchor.lock().unwrap_or_else(|p| p.into_inner());
    let nop = opcode::Nop::new().build().user_data(0);
    // SAFETY: a NOP references no memory.
    if unsafe { ring.submission().push(&nop) }.is_err() {
        return;
    }
    loop {
        match ring.submit_and_wait(1) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            _ => break,
        }
    }
    ring.completion().for_each(drop);
}

/// Build a ring for the calling thread: single-issuer with deferred task
/// work where the kernel has it (6.1+), a plain ring otherwise.
fn new_ring() -> io::Result<IoUring> {
    join_anchor();
    let tuned = IoUring::builder()
        .setup_cqsize(RING_ENTRIES * 2)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES);
    match tuned {
        Ok(r) => Ok(r),
        Err(_) => IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 2)
            .build(RING_ENTRIES),
    }
}

/// Call `f` with the calling thread's ring, creating it on first use;
/// `None` where the thread has no ring (creation failed, the thread is
/// exiting, or the ring is already borrowed further up the stack).
fn with_thread_ring<R>(f: impl FnOnce(&mut Ring) -> R) -> Option<R> {
    RING.try_with(|slot| {
        let Ok(mut slot) = slot.try_borrow_mut() else {
            return None;
        };
        if let Slot::Uninit = *slot {
            *slot = match new_ring() {
                Ok(ring) => {
                    let table = RingTable::new(&ring);
                    Slot::Ready(Box::new(Ring { ring, table }))
                }
                Err(e) => {
                    super::log(format_args!(
                        "cannot create an io_uring for this thread ({e}); using pread/pwrite"
                    ));
                    Slot::Failed
                }
            };
        }
        match &mut *slot {
            Slot::Ready(ring) => Some(f(ring)),
            _ => None,
        }
    })
    .ok()
    .flatten()
}

/// Call `f` with the calling thread's io_uring (see [`run`] for when there
/// is none). `f` must leave no request in flight when it returns.
pub(crate) fn with_ring<R>(f: impl FnOnce(&mut IoUring) -> R) -> Option<R> {
    with_thread_ring(|r| f(&mut r.ring))
}

/// [`with_ring`], with the ring's registered-buffer table.
pub(crate) fn with_ring_buffers<R>(f: impl FnOnce(&mut Ring) -> R) -> Option<R> {
    with_thread_ring(|r| {
        r.table.clear_dropped(&r.ring);
        f(r)
    })
}

/// Run a batch through the calling thread's ring, creating it on first
/// use; without a ring (creation failed, or the thread is exiting) through
/// blocking system calls.
pub(crate) fn run(ops: &mut [Op]) -> io::Result<()> {
    if ops.iter().all(|o| o.finished) {
        return first_error(ops);
    }
    if with_thread_ring(|ring| run_ring(ring, ops, [&URING_READ, &URING_WRITTEN])).is_none() {
        return run_sync(ops);
    }
    first_error(ops)
}

/// Waits for every request still in flight when dropped, so that no early
/// return (or unwinding) frees a buffer the kernel still writes to.
pub(crate) struct InFlight<'r> {
    pub ring: &'r mut IoUring,
    pub count: usize,
}

impl InFlight<'_> {
    /// Submit what is queued and wait for at least one completion.
    pub fn wait(&mut self) {
        self.wait_for(1)
    }

    /// Submit what is queued and wait until `want` completions (at most
    /// the number in flight, at least one) are ready, or the wait is
    /// interrupted: the caller is woken once for them, not once each.
    pub fn wait_for(&mut self, want: usize) {
        let want = want.clamp(1, self.count.max(1));
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {
                        if self.ring.completion().is_empty() {
                            std::thread::yield_now();
                            continue;
                        }
                        return;
                    }
                    _ => {
                        // The kernel may still hold pointers into buffers we
                        // would hand back: continuing is not memory-safe.
                        eprintln!(
                            "imgpull: io_uring_enter failed with {} requests in flight: {e}; aborting",
                            self.count
                        );
                        std::process::abort();
                    }
                },
            }
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        while self.count > 0 {
            self.wait();
            let n = self.ring.completion().count();
            self.count = self.count.saturating_sub(n);
        }
    }
}

fn run_ring(r: &mut Ring, ops: &mut [Op], counters: [&AtomicU64; 2]) {
    r.table.clear_dropped(&r.ring);
    for op in ops.iter_mut().filter(|o| !o.finished) {
        op.buf_index = fixed::lookup(op.ptr, op.len).and_then(|reg| r.table.index(&r.ring, &reg));
    }
    let ring = &mut r.ring;
    let cap = (ring.params().sq_entries() as usize).min(ring.params().cq_entries() as usize);
    let mut flight = InFlight { ring, count: 0 };
    let mut next = 0usize;
    let mut again: Vec<usize> = Vec::new();
    let mut failed = false;
    loop {
        {
            let mut sq = flight.ring.submission();
            while flight.count < cap && !sq.is_full() {
                let idx = if let Some(i) = again.pop() {
                    i
                } else {
                    while next < ops.len() && ops[next].finished {
                        next += 1;
                    }
                    if next == ops.len() || failed {
                        break;
                    }
                    next += 1;
                    next - 1
                };
                let entry = ops[idx].entry().user_data(idx as u64);
                // SAFETY: the entry points into a buffer that outlives this
                // call, and `flight` waits for its completion before return.
                if unsafe { sq.push(&entry) }.is_err() {
                    again.push(idx);
                    break;
                }
                flight.count += 1;
            }
        }
        if flight.count == 0 {
            break;
        }
        flight.wait();
        for cqe in flight.ring.completion() {
            flight.count -= 1;
            let idx = cqe.user_data();
            let Some(op) = ops.get_mut(idx as usize) else {
                continue;
            };
            let mut step = complete(op, cqe.result() as i64, counters);
            if step == Next::CheckEof {
                step = check_eof(op);
            }
            match step {
                Next::Done | Next::CheckEof => {}
                Next::Again => again.push(idx as usize),
                Next::Blocking => run_blocking(op),
            }
            failed |= op.err.is_some();
        }
        if failed {
            // Stop resubmitting; only wait for what is in flight.
            again.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> [&'static AtomicU64; 2] {
        static R: AtomicU64 = AtomicU64::new(0);
        static W: AtomicU64 = AtomicU64::new(0);
        [&R, &W]
    }

    #[test]
    fn short_transfers_continue_and_errors_stop() {
        let mut buf = [7u8; 10];
        let mut op = Op::read(-1, &mut buf, 100, 1);
        assert_eq!(complete(&mut op, 4, counters()), Next::Again);
        assert_eq!(op.pos(), 104);
        assert_eq!(
            complete(&mut op, -(libc::EINTR as i64), counters()),
            Next::Again
        );
        assert_eq!(complete(&mut op, 0, counters()), Next::Done);
        assert!(op.finished && op.err.is_none());
        drop(op);
        assert_eq!(buf, [7, 7, 7, 7, 0, 0, 0, 0, 0, 0]);

        let data = [1u8; 8];
        let mut w = Op::write(-1, &data, 0, 1);
        assert_eq!(complete(&mut w, 3, counters()), Next::Again);
        assert_eq!(complete(&mut w, 0, counters()), Next::Done);
        assert_eq!(
            w.err.as_ref().map(|e| e.kind()),
            Some(io::ErrorKind::WriteZero)
        );
        let mut w = Op::write(-1, &data, 0, 1);
        assert_eq!(
            complete(&mut w, -(libc::EIO as i64), counters()),
            Next::Done
        );
        assert_eq!(
            w.err.as_ref().and_then(|e| e.raw_os_error()),
            Some(libc::EIO)
        );
    }

    #[test]
    fn eagain_is_retried_then_done_blocking() {
        let data = [1u8; 8];
        let mut w = Op::write(-1, &data, 0, 1);
        for _ in 0..EAGAIN_RETRIES {
            assert_eq!(
                complete(&mut w, -(libc::EAGAIN as i64), counters()),
                Next::Again
            );
        }
        assert_eq!(
            complete(&mut w, -(libc::EAGAIN as i64), counters()),
            Next::Blocking
        );
    }

    #[test]
    fn unaligned_short_direct_transfers() {
        let data = [1u8; 1024];
        let mut w = Op::write(-1, &data, 0, 512);
        // 600 bytes written: continue by rewriting from 512.
        assert_eq!(complete(&mut w, 600, counters()), Next::Again);
        assert_eq!(w.done, 512);
        let mut buf = [0u8; 1024];
        let mut r = Op::read(-1, &mut buf, 0, 512);
        assert_eq!(complete(&mut r, 600, counters()), Next::CheckEof);
    }

    #[test]
    fn a_batch_larger_than_the_ring_streams_through_it() {
        use std::os::fd::AsRawFd;
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_raw_fd();
        let n = RING_ENTRIES as usize * 3 + 5;
        let bufs: Vec<Vec<u8>> = (0..n).map(|i| vec![(i % 251) as u8; 100]).collect();
        let mut ops: Vec<Op> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| Op::write(fd, b, i as u64 * 100, 1))
            .collect();
        run(&mut ops).unwrap();
        drop(ops);
        let mut back = vec![vec![0xffu8; 100]; n + 1];
        let mut ops: Vec<Op> = back
            .iter_mut()
            .enumerate()
            .map(|(i, b)| Op::read(fd, b, i as u64 * 100, 1))
            .collect();
        run(&mut ops).unwrap();
        drop(ops);
        for (i, b) in back.iter().take(n).enumerate() {
            assert!(b.iter().all(|&x| x == (i % 251) as u8), "request {i}");
        }
        assert!(back[n].iter().all(|&x| x == 0), "past EOF reads zeros");
    }
}
