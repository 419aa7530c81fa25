//! The raw format: guest offset equals file offset; holes read as zeros.

use crate::driver::{BackingFile, Driver, Extent, Format, HostRun, LayerInfo, Status};
use crate::error::{Error, Result};
use crate::storage::{Allocation, Storage};

/// A raw image file.
#[derive(Debug)]
pub struct Raw {
    storage: Box<dyn Storage>,
    size: u64,
}

impl Raw {
    /// Open a raw image over `storage`. Its size is the file's length
    /// rounded up to whole 512-byte sectors, as QEMU sees it; the tail past
    /// the end of the file reads as zeros.
    pub fn open(storage: Box<dyn Storage>) -> Result<Raw> {
        let len = storage
            .len()
            .map_err(|e| Error::io("reading file size", e))?;
        let size = len.div_ceil(512) * 512;
        Ok(Raw { storage, size })
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
        let (a, n) = self
            .storage
            .allocation(offset, len)
            .map_err(|e| Error::io("querying holes", e))?;
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
