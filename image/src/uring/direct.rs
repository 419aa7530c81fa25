//! O_DIRECT support: finding a file's alignment rules, switching the
//! descriptor to direct I/O, and aligned bounce buffers.

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// Alignment a file's direct I/O needs: of buffer addresses (`mem`) and of
/// file offsets and lengths (`offset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Align {
    pub mem: usize,
    pub offset: usize,
}

/// Used when the file system reports nothing: safe on every device.
const FALLBACK: Align = Align {
    mem: 4096,
    offset: 4096,
};

impl Align {
    /// Whether a request at `offset` of `len` bytes needs no read-modify-write.
    pub fn offset_ok(&self, offset: u64, len: usize) -> bool {
        offset.is_multiple_of(self.offset as u64) && len.is_multiple_of(self.offset)
    }

    /// Whether a buffer can be handed to the kernel as it is.
    pub fn mem_ok(&self, ptr: *const u8) -> bool {
        (ptr as usize).is_multiple_of(self.mem)
    }

    /// Alignment of bounce buffers.
    pub fn buf_align(&self) -> usize {
        self.mem.max(self.offset).max(16)
    }

    /// `[start, end)`: the aligned span covering `offset..offset + len`.
    pub fn span(&self, offset: u64, len: usize) -> (u64, u64) {
        let a = self.offset as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        (start, end)
    }
}

/// The direct-I/O alignment of `file`, or `None` if its file system
/// reports that it cannot do direct I/O.
///
/// `statx(STATX_DIOALIGN)` (Linux 6.1+) answers for most block file
/// systems; tmpfs does not answer but takes any alignment; anything else
/// gets the conservative 4 KiB.
pub(crate) fn alignment(file: &File) -> Option<Align> {
    let fd = file.as_raw_fd();
    // SAFETY: statx into a zeroed struct we own, on a valid descriptor.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        if stx.stx_dio_offset_align == 0 {
            return None;
        }
        return Some(Align {
            mem: (stx.stx_dio_mem_align as usize).max(1),
            offset: stx.stx_dio_offset_align as usize,
        });
    }
    // SAFETY: fstatfs into a zeroed struct we own.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(fd, &mut sfs) } == 0 && sfs.f_type == libc::TMPFS_MAGIC {
        return Some(Align { mem: 1, offset: 1 });
    }
    Some(FALLBACK)
}

/// Switch `file` to O_DIRECT if its file system supports it; returns the
/// alignment to honour, or `None` (file left buffered) if not supported.
pub(crate) fn enable(file: &File) -> io::Result<Option<Align>> {
    let Some(al) = alignment(file) else {
        return Ok(None);
    };
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a valid descriptor; no memory involved.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 {
        return Err(io::Error::last_os_error());
    }
    if unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_DIRECT) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(al))
}

/// Whether the descriptor has O_DIRECT set.
pub(crate) fn is_direct(file: &File) -> io::Result<bool> {
    // SAFETY: fcntl on a valid descriptor; no memory involved.
    let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl & libc::O_DIRECT != 0)
}

/// A zeroed heap buffer with a chosen alignment.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    /// `len` zero bytes aligned to `align` (a power of two).
    pub fn zeroed(len: usize, align: usize) -> io::Result<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(1), align)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad bounce buffer size"))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate a {len}-byte bounce buffer"),
            )
        })?;
        Ok(AlignedBuf { ptr, layout })
    }

    /// The whole buffer.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: we own `layout.size()` initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_the_request() {
        let a = Align {
            mem: 512,
            offset: 512,
        };
        assert_eq!(a.span(0, 512), (0, 512));
        assert_eq!(a.span(3, 10), (0, 512));
        assert_eq!(a.span(500, 20), (0, 1024));
        assert_eq!(a.span(1024, 0), (1024, 1024));
        assert!(a.offset_ok(1024, 2048));
        assert!(!a.offset_ok(1024, 100));
        let mut b = AlignedBuf::zeroed(1000, a.buf_align()).unwrap();
        assert!(a.mem_ok(b.as_mut_slice().as_ptr()));
        assert!(b.as_mut_slice().iter().all(|&x| x == 0));
    }

    #[test]
    fn tmpfs_takes_any_alignment() {
        let Ok(f) = tempfile::tempfile_in("/dev/shm") else {
            return; // no tmpfs here
        };
        assert_eq!(alignment(&f), Some(Align { mem: 1, offset: 1 }));
    }
}
