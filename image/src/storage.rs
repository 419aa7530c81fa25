//! Byte storage under a format driver: the file an image lives in.
//!
//! A format driver answers *where* guest data lives; the bytes then move
//! through a [`Storage`]. All methods take `&self` and are positional, so one
//! storage is shared by every thread using the image. [`Storage::submit`]
//! takes a batch of requests so that a backend such as io_uring can keep many
//! in flight; the default implementation runs them one after another.

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// One request of a batch given to [`Storage::submit`].
#[derive(Debug)]
pub enum IoReq<'a> {
    /// Read `buf.len()` bytes at `offset`; bytes past the end of the file
    /// read as zeros.
    Read {
        /// Byte offset in the file.
        offset: u64,
        /// Destination.
        buf: &'a mut [u8],
    },
    /// Write `buf` at `offset`, extending the file if needed.
    Write {
        /// Byte offset in the file.
        offset: u64,
        /// Source.
        buf: &'a [u8],
    },
}

/// Whether a byte range of a file holds data or is a hole
/// (as told by `SEEK_DATA` / `SEEK_HOLE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// The range holds data (or the file system cannot tell).
    Data,
    /// The range is a hole and reads as zeros.
    Hole,
}

/// A file holding an image's bytes, shared by all users of the image.
pub trait Storage: Send + Sync + Debug {
    /// Read exactly `buf.len()` bytes at `offset`; bytes past the end of the
    /// file read as zeros (as QEMU's file driver does).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Write all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Read format metadata (tables, headers): [`Storage::read_at`], except
    /// where a backend has a cheaper path for one small synchronous
    /// request than for data (the io_uring backend uses `pread`).
    fn read_meta(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset)
    }

    /// Write format metadata: [`Storage::write_at`], or a backend's cheaper
    /// path for one small synchronous request (see [`Storage::read_meta`]).
    fn write_meta(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }

    /// Run a batch of requests. Returns when all have completed; on error
    /// some of them may have completed.
    fn submit(&self, reqs: &mut [IoReq<'_>]) -> io::Result<()> {
        for r in reqs.iter_mut() {
            match r {
                IoReq::Read { offset, buf } => self.read_at(buf, *offset)?,
                IoReq::Write { offset, buf } => self.write_at(buf, *offset)?,
            }
        }
        Ok(())
    }

    /// Make all completed writes durable (`fdatasync`).
    fn flush(&self) -> io::Result<()>;

    /// Current length of the file in bytes.
    fn len(&self) -> io::Result<u64> {
        Ok(self.file().metadata()?.len())
    }

    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncate or extend the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Whether `[offset, offset + len)` starts with data or a hole, and how
    /// many bytes from `offset` share that answer (at least 1, at most `len`).
    /// Offsets at or past the end of the file are a hole.
    fn allocation(&self, offset: u64, len: u64) -> io::Result<(Allocation, u64)> {
        file_allocation(self.file(), offset, len)
    }

    /// Bytes of the file actually allocated on disk (`st_blocks * 512`).
    fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file().metadata()?.blocks() * 512)
    }

    /// Short name of the I/O backend, shown by `imgpull info` and in logs.
    fn backend_name(&self) -> &'static str;

    /// The underlying open file (for locking and for backends that need
    /// the descriptor).
    fn file(&self) -> &File;
}

/// The portable backend: `pread`/`pwrite` on a plain file descriptor.
#[derive(Debug)]
pub struct SyncFile {
    file: File,
}

impl SyncFile {
    /// Wrap an open file.
    pub fn new(file: File) -> Self {
        SyncFile { file }
    }
}

fn seek(fd: i32, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a valid descriptor owned by `File`; no memory involved.
    let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// `SEEK_DATA`/`SEEK_HOLE` probe shared by the backends.
pub fn file_allocation(file: &File, offset: u64, len: u64) -> io::Result<(Allocation, u64)> {
    let size = file.metadata()?.len();
    if offset >= size {
        return Ok((Allocation::Hole, len.max(1)));
    }
    let fd = file.as_raw_fd();
    let end = offset.saturating_add(len);
    match seek(fd, offset, libc::SEEK_DATA) {
        Ok(None) => {
            // No data from offset to EOF: all hole.
            Ok((Allocation::Hole, len.max(1)))
        }
        Ok(Some(data)) if data > offset => Ok((Allocation::Hole, (data.min(end) - offset).max(1))),
        Ok(Some(_)) => {
            let hole = seek(fd, offset, libc::SEEK_HOLE)?.unwrap_or(size);
            Ok((Allocation::Data, (hole.min(end) - offset).max(1)))
        }
        // File systems without SEEK_DATA: everything is data.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((Allocation::Data, len.max(1))),
        Err(e) => Err(e),
    }
}

/// Read with zero fill past EOF, shared by the backends.
pub fn pread_full(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Storage for SyncFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        pread_full(&self.file, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn backend_name(&self) -> &'static str {
        "pread"
    }

    fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_eof_are_zero() {
        let f = tempfile::tempfile().unwrap();
        let s = SyncFile::new(f);
        s.write_at(b"abc", 0).unwrap();
        let mut buf = [0xffu8; 8];
        s.read_at(&mut buf, 1).unwrap();
        assert_eq!(&buf, b"bc\0\0\0\0\0\0");
    }

    #[test]
    fn holes_and_data() {
        let f = tempfile::tempfile().unwrap();
        let s = SyncFile::new(f);
        s.set_len(1 << 20).unwrap();
        s.write_at(&[1u8; 4096], 512 * 1024).unwrap();
        let (a, n) = s.allocation(0, 1 << 20).unwrap();
        // Some file systems report everything as data; accept both.
        if a == Allocation::Hole {
            assert_eq!(n, 512 * 1024);
            let (a2, _) = s.allocation(512 * 1024, 4096).unwrap();
            assert_eq!(a2, Allocation::Data);
        }
        let (a3, _) = s.allocation(2 << 20, 10).unwrap();
        assert_eq!(a3, Allocation::Hole);
    }
}
