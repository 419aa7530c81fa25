//! The raw format: guest offset equals file offset; holes read as zeros.

use std::sync::Mutex;

use crate::driver::{BackingFile, Driver, Extent, Format, HostRun, LayerInfo, Status};
use crate::error::{Error, Result};
use crate::storage::{Allocation, Storage};

/// A raw image file.
#[derive(Debug)]
pub struct Raw {
    storage: Box<dyn Storage>,
    size: u64,
    /// The last data/hole extent learned from `SEEK_DATA`/`SEEK_HOLE`, not
    /// clipped to the request: on tmpfs a seek costs time proportional to
    /// the distance it travels, so sequential queries reuse the answer.
    /// Only read-only opens keep it (other processes cannot write while we
    /// hold the image lock); a writable raw image asks every time, so a
    /// concurrent write can never leave a stale "hole" behind.
    known: Option<Mutex<Option<(u64, u64, Allocation)>>>,
}

impl Raw {
    /// Open a raw image over `storage`. Its size is the file's length
    /// rounded up to whole 512-byte sectors, as QEMU sees it; the tail past
    /// the end of the file reads as zeros.
    pub fn open(storage: Box<dyn Storage>, writable: bool) -> Result<Raw> {
        let len = storage
            .len()
            .map_err(|e| Error::io("reading file size", e))?;
        let size = len.div_ceil(512) * 512;
        Ok(Raw {
            storage,
            size,
            known: (!writable).then(|| Mutex::new(None)),
        })
    }

    /// Create a raw image of `size` bytes (a sparse file).
    pub fn create(storage: &dyn Storage, size: u64) -> Result<()> {
        storage
            .set_len(size)
            .map_err(|e| Error::io("setting file size", e))
    }
}

impl Driver for Raw {
    fn info(&self) -> LayerInfo {
        LayerInfo {
            format: Format::Raw,
            virtual_size: self.size,
            cluster_size: None,
            backing: None,
            dirty: false,
            format_specific: Vec::new(),
        }
    }

    fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let ask = || -> Result<(Allocation, u64)> {
            let (a, n) = self
                .storage
                .allocation(offset, self.size - offset)
                .map_err(|e| Error::io("querying holes", e))?;
            Ok((a, offset + n.min(self.size - offset)))
        };
        let (a, end) = match &self.known {
            None => ask()?,
            Some(known) => {
                let mut known = known.lock().unwrap_or_else(|p| p.into_inner());
                match *known {
                    Some((s, e, a)) if s <= offset && offset < e => (a, e),
                    _ => {
                        let (a, end) = ask()?;
                        *known = Some((offset, end, a));
                        (a, end)
                    }
                }
            }
        };
        let n = end.min(offset + len) - offset;
        let status = match a {
            Allocation::Data => Status::Data { host: offset },
            Allocation::Hole => Status::Zero { host: Some(offset) },
        };
        Ok(Extent {
            offset,
            len: n.min(len),
            status,
        })
    }

    fn read_compressed(&self, _offset: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Error::invalid("raw images have no compressed data"))
    }

    fn granularity(&self) -> u64 {
        1
    }

    fn prepare_write(&self, offset: u64, len: u64) -> Result<Vec<HostRun>> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::invalid_argument(format!(
                "write at {offset}+{len} beyond the end of the raw image ({} bytes)",
                self.size
            )));
        }
        Ok(vec![HostRun {
            guest: offset,
            host: offset,
            len,
            fresh: false,
        }])
    }

    fn commit_write(&self, _runs: &[HostRun]) -> Result<()> {
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<bool> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.storage
                .write_at(&zeros[..n], pos)
                .map_err(|e| Error::io("writing zeros", e))?;
            pos += n as u64;
        }
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush().map_err(|e| Error::io("flushing", e))
    }

    fn set_backing(&self, backing: Option<&BackingFile>) -> Result<()> {
        match backing {
            None => Ok(()),
            Some(_) => Err(Error::unsupported("raw images cannot have a backing file")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SyncFile;

    /// Read-only opens answer from the remembered extent; the answers are
    /// the same as a writable open's, which asks every time.
    #[test]
    fn remembered_extents_answer_like_fresh_seeks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[7u8; 1 << 20], 1 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 5 << 20).unwrap();
        let open = |w| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(w)
                .open(&p)
                .unwrap();
            Raw::open(Box::new(SyncFile::new(file)), w).unwrap()
        };
        let (ro, rw) = (open(false), open(true));
        for step in [4096u64, 65536, 300_000] {
            let mut off = 0;
            while off < 8 << 20 {
                let len = step.min((8 << 20) - off);
                let a = ro.block_status(off, len).unwrap();
                assert_eq!(a, rw.block_status(off, len).unwrap(), "at {off}+{len}");
                off += a.len;
            }
        }
    }
}
