//! Registered ("fixed") buffers: a [`FixedPool`] is one page-aligned memory
//! region cut into equal buffers. Every thread's ring registers the whole
//! region as one fixed buffer the first time a request uses memory inside
//! it, and from then on requests into that region are `READ_FIXED` /
//! `WRITE_FIXED`: the kernel skips mapping and pinning the user pages on
//! every request. Callers do nothing special: any [`IoReq`] whose buffer
//! lies in a live pool goes this way, on any storage of the io_uring
//! backend; where registration fails (old kernel, `RLIMIT_MEMLOCK`) the
//! request is a plain read or write.
//!
//! Each live pool owns one slot of every ring's buffer table (the same slot
//! in every ring), tagged with a generation; a ring re-registers a slot
//! whose generation it has not seen, and clears slots of dropped pools, so
//! a dropped pool's pages stay pinned only until its threads next do I/O.
//!
//! [`IoReq`]: crate::IoReq

use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

/// Slots in each ring's buffer table, so at most this many live pools.
pub(crate) const SLOTS: usize = 32;

/// The kernel's limit on one registered buffer.
const MAX_REGION: usize = 1 << 30;

/// A live region: where it is, and which slot and generation it has.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Region {
    pub start: usize,
    pub len: usize,
    pub slot: u16,
    pub gen: u64,
}

/// Live regions, by slot.
static REGIONS: RwLock<[Option<Region>; SLOTS]> = RwLock::new([None; SLOTS]);
/// Generation counter for new regions (0 means "none").
static NEXT_GEN: AtomicU64 = AtomicU64::new(1);
/// Bumped whenever a region is dropped, so rings know to clear slots.
pub(crate) static DROPS: AtomicU64 = AtomicU64::new(0);
/// Number of live regions (lookups are skipped while there are none).
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The live region containing `[ptr, ptr + len)`, if any.
pub(crate) fn lookup(ptr: *const u8, len: usize) -> Option<Region> {
    if LIVE.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let p = ptr as usize;
    let regions = REGIONS.read().unwrap_or_else(|e| e.into_inner());
    regions
        .iter()
        .flatten()
        .find(|r| p >= r.start && p + len <= r.start + r.len)
        .copied()
}

/// The current region of each slot (to find stale registrations).
pub(crate) fn snapshot() -> [Option<Region>; SLOTS] {
    *REGIONS.read().unwrap_or_else(|e| e.into_inner())
}

/// A region of page-aligned memory split into `count` buffers of `size`
/// bytes that io_uring uses as registered buffers (see the module docs).
///
/// Buffers are handed out with [`FixedPool::get`] and come back when the
/// [`FixedBuf`] drops; the region lives until the pool and all its
/// buffers are dropped.
#[derive(Clone, Debug)]
pub struct FixedPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    ptr: NonNull<u8>,
    map_len: usize,
    size: usize,
    slot: u16,
    free: Mutex<Vec<usize>>,
    returned: Condvar,
}

// SAFETY: the region is plain memory; each buffer of it is reachable only
// through the one `FixedBuf` that holds its index.
unsafe impl Send for PoolInner {}
unsafe impl Sync for PoolInner {}

impl FixedPool {
    /// Map `count` buffers of `size` bytes (page-aligned, at most 1 GiB in
    /// all). Fails if the sizes are out of range or all pool slots are
    /// taken.
    pub fn new(count: usize, size: usize) -> io::Result<FixedPool> {
        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
        if count == 0 || size == 0 {
            return Err(bad(
                "a fixed buffer pool needs at least one non-empty buffer",
            ));
        }
        let page = 4096usize;
        let size = size
            .checked_next_multiple_of(page)
            .ok_or_else(|| bad("fixed buffer size too large"))?;
        let map_len = size
            .checked_mul(count)
            .filter(|&l| l <= MAX_REGION)
            .ok_or_else(|| bad("a fixed buffer pool is limited to 1 GiB"))?;
        let mut regions = REGIONS.write().unwrap_or_else(|e| e.into_inner());
        let slot = regions
            .iter()
            .position(|r| r.is_none())
            .ok_or_else(|| io::Error::other(format!("more than {SLOTS} fixed buffer pools")))?;
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        regions[slot] = Some(Region {
            start: p as usize,
            len: map_len,
            slot: slot as u16,
            gen: NEXT_GEN.fetch_add(1, Ordering::Relaxed),
        });
        LIVE.fetch_add(1, Ordering::Relaxed);
        Ok(FixedPool {
            inner: Arc::new(PoolInner {
                ptr,
                map_len,
                size,
                slot: slot as u16,
                free: Mutex::new((0..count).rev().collect()),
                returned: Condvar::new(),
            }),
        })
    }

    /// Size of each buffer (the requested size rounded up to 4 KiB).
    pub fn buf_size(&self) -> usize {
        self.inner.size
    }

    /// A free buffer, waiting for one to be returned if none is free.
    pub fn get(&self) -> FixedBuf {
        let mut free = self.inner.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(idx) = free.pop() {
                return FixedBuf {
                    pool: Arc::clone(&self.inner),
                    idx,
                };
            }
            free = self
                .inner
                .returned
                .wait(free)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A free buffer, if there is one.
    pub fn try_get(&self) -> Option<FixedBuf> {
        let mut free = self.inner.free.lock().unwrap_or_else(|e| e.into_inner());
        free.pop().map(|idx| FixedBuf {
            pool: Arc::clone(&self.inner),
            idx,
        })
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        {
            let mut regions = REGIONS.write().unwrap_or_else(|e| e.into_inner());
            regions[self.slot as usize] = None;
        }
        LIVE.fetch_sub(1, Ordering::Relaxed);
        DROPS.fetch_add(1, Ordering::Relaxed);
        // Rings that registered the region keep its pages pinned until they
        // clear the slot; unmapping our view of it is still sound.
        // SAFETY: our own mapping, no buffer of it is borrowed any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

/// One buffer of a [`FixedPool`]; returns to the pool when dropped.
#[derive(Debug)]
pub struct FixedBuf {
    pool: Arc<PoolInner>,
    idx: usize,
}

impl Deref for FixedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: buffer `idx` lies inside the live mapping and only this
        // `FixedBuf` refers to it.
        unsafe {
            std::slice::from_raw_parts(
                self.pool.ptr.as_ptr().add(self.idx * self.pool.size),
                self.pool.size,
            )
        }
    }
}

impl DerefMut for FixedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.pool.ptr.as_ptr().add(self.idx * self.pool.size),
                self.pool.size,
            )
        }
    }
}

impl Drop for FixedBuf {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(self.idx);
        drop(free);
        self.pool.returned.notify_one();
    }
}

/// A ring's view of the buffer table: which generation each slot holds.
#[derive(Debug)]
pub(crate) struct RingTable {
    /// `None`: fixed buffers unusable on this ring.
    held: Option<[u64; SLOTS]>,
    drops_seen: u64,
}

impl RingTable {
    /// Set up the sparse table on a new ring.
    pub fn new(ring: &io_uring::IoUring) -> RingTable {
        let ok = ring
            .submitter()
            .register_buffers_sparse(SLOTS as u32)
            .is_ok();
        RingTable {
            held: ok.then_some([0; SLOTS]),
            drops_seen: DROPS.load(Ordering::Relaxed),
        }
    }

    /// The buffer index to use for a request inside `region`, registering
    /// the region with this ring first if needed; `None` if unusable.
    pub fn index(&mut self, ring: &io_uring::IoUring, region: &Region) -> Option<u16> {
        let held = self.held.as_mut()?;
        let s = region.slot as usize;
        if held[s] == region.gen {
            return Some(region.slot);
        }
        let iov = libc::iovec {
            iov_base: region.start as *mut libc::c_void,
            iov_len: region.len,
        };
        // SAFETY: the region is live (a buffer inside it is borrowed by the
        // caller); when it is dropped its slot is cleared or re-registered
        // before any later use, and no request refers to a stale slot.
        match unsafe {
            ring.submitter()
                .register_buffers_update(region.slot as u32, &[iov], None)
        } {
            Ok(()) => {
                held[s] = region.gen;
                Some(region.slot)
            }
            Err(e) => {
                super::log(format_args!(
                    "cannot register fixed buffers ({e}); using plain reads and writes"
                ));
                self.held = None;
                None
            }
        }
    }

    /// Unregister slots whose pool was dropped (cheap when none was).
    pub fn clear_dropped(&mut self, ring: &io_uring::IoUring) {
        let drops = DROPS.load(Ordering::Relaxed);
        if drops == self.drops_seen {
            return;
        }
        self.drops_seen = drops;
        let Some(held) = self.held.as_mut() else {
            return;
        };
        let live = snapshot();
        for (s, g) in held.iter_mut().enumerate() {
            if *g != 0 && live[s].is_none_or(|r| r.gen != *g) {
                let empty = libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                // SAFETY: clearing a slot references no memory.
                if unsafe {
                    ring.submitter()
                        .register_buffers_update(s as u32, &[empty], None)
                }
                .is_ok()
                {
                    *g = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_disjoint_page_aligned_buffers() {
        let pool = FixedPool::new(3, 5000).unwrap();
        assert_eq!(pool.buf_size(), 8192);
        let mut a = pool.get();
        let mut b = pool.get();
        let c = pool.get();
        assert!(pool.try_get().is_none());
        a.fill(1);
        b.fill(2);
        assert!(a.iter().all(|&x| x == 1) && b.iter().all(|&x| x == 2));
        assert_eq!(a.as_ptr() as usize % 4096, 0);
        let r = lookup(c.as_ptr(), c.len()).unwrap();
        assert!(lookup(c.as_ptr(), c.len() + 1).is_none(), "past the region");
        drop(c);
        assert!(pool.try_get().is_some());
        drop((a, b));
        drop(pool);
        assert!(snapshot()[r.slot as usize].is_none_or(|x| x.gen != r.gen));
        assert!(FixedPool::new(0, 10).is_err());
        assert!(FixedPool::new(2048, 1 << 20).is_err(), "over 1 GiB");
    }
}
