//! Advisory image locks compatible with QEMU's.
//!
//! QEMU's file driver expresses block-layer permissions as open file
//! description (OFD) byte-range locks: a shared lock on byte
//! `100 + bit` means "I use permission `bit`", on byte `200 + bit` "I do not
//! let others use permission `bit`". Before taking its locks an opener tests
//! for conflicting locks held by others. Taking the same locks makes a
//! running pull and a qemu-img / qemu-io / QEMU writer refuse each other.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::error::{Error, ErrorKind, Result};

/// Permission bits of QEMU's block layer (`BLK_PERM_*`).
pub mod perm {
    /// Reads return consistent data.
    pub const CONSISTENT_READ: u32 = 0x01;
    /// Writes that change the data.
    pub const WRITE: u32 = 0x02;
    /// Writes that do not change the guest-visible data.
    pub const WRITE_UNCHANGED: u32 = 0x04;
    /// Changing the file size.
    pub const RESIZE: u32 = 0x08;
    /// All permissions.
    pub const ALL: u32 = 0x0f;
}

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

fn flock(kind: i16, start: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

fn set_lock(file: &File, start: i64, kind: i16) -> io::Result<()> {
    let mut fl = flock(kind, start);
    // SAFETY: valid descriptor and a properly initialised flock struct.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on byte `start`.
fn held_by_other(file: &File, start: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as i16, start);
    // SAFETY: valid descriptor and a properly initialised flock struct.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as i16)
}

fn lock_error(what: String) -> Error {
    Error::new(
        ErrorKind::Locked,
        format!("failed to get {what} lock: is another process using the image?"),
    )
}

/// Take QEMU-compatible locks for using `perms` while sharing only
/// `shared` with others; fails with [`ErrorKind::Locked`] if another
/// process holds a conflicting lock. Locks live as long as the file is open.
pub fn lock(file: &File, perms: u32, shared: u32) -> Result<()> {
    let unshared = !shared & perm::ALL;
    for (i, name) in NAMES.iter().enumerate() {
        let bit = 1u32 << i;
        let io = |e| Error::io("testing image locks", e);
        if perms & bit != 0 && held_by_other(file, SHARED_BASE + i as i64).map_err(io)? {
            return Err(lock_error(format!("\"{name}\"")));
        }
        if unshared & bit != 0 && held_by_other(file, PERM_BASE + i as i64).map_err(io)? {
            return Err(lock_error(format!("shared \"{name}\"")));
        }
    }
    for (i, name) in NAMES.iter().enumerate() {
        let bit = 1u32 << i;
        let take = |start: i64| {
            set_lock(file, start, libc::F_RDLCK as i16).map_err(|e| {
                if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                    lock_error(format!("\"{name}\""))
                } else {
                    Error::io("taking image locks", e)
                }
            })
        };
        if perms & bit != 0 {
            take(PERM_BASE + i as i64)?;
        }
        if unshared & bit != 0 {
            take(SHARED_BASE + i as i64)?;
        }
    }
    Ok(())
}

/// Release every lock [`lock`] may have taken on `file`. Closing the file
/// releases them too, but only once the kernel drops its last reference
/// to the open file description, which io_uring may hold a little longer.
pub fn unlock(file: &File) {
    let mut fl = flock(libc::F_UNLCK as i16, PERM_BASE);
    fl.l_len = SHARED_BASE + NAMES.len() as i64 - PERM_BASE;
    // SAFETY: valid descriptor and a properly initialised flock struct.
    // Failure leaves the locks to be released at close.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
}

/// The locks QEMU takes on an image file opened read-only (uses consistent
/// reads; lets nobody write or resize) or read-write (also writes and
/// resizes).
pub fn lock_image(file: &File, writable: bool) -> Result<()> {
    let perms = if writable {
        perm::CONSISTENT_READ | perm::WRITE | perm::RESIZE
    } else {
        perm::CONSISTENT_READ
    };
    lock(file, perms, perm::CONSISTENT_READ | perm::WRITE_UNCHANGED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    #[test]
    fn writer_and_reader_refuse_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .unwrap()
        };
        let w = open();
        lock_image(&w, true).unwrap();
        let r = open();
        let e = lock_image(&r, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked);
        assert!(e.to_string().contains("\"write\""), "{e}");
        drop(w);
        lock_image(&r, false).unwrap();
        // Two readers coexist; a writer does not.
        let r2 = open();
        lock_image(&r2, false).unwrap();
        let w2 = open();
        assert_eq!(lock_image(&w2, true).unwrap_err().kind(), ErrorKind::Locked);
    }
}
