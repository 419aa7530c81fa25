//! [`Image`]: one open layer file — its driver, its path, and the generic
//! read/write paths built on the driver interface.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use crate::driver::{BackingFile, Driver, Extent, Format, LayerInfo, Status};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::storage::Storage;
use crate::{lock, qcow2, qed, raw};

/// Reads guest data from whatever lies below a layer (its backing chain).
/// Implementations read zeros past their own end.
pub trait GuestRead: Send + Sync {
    /// Fill `buf` with guest bytes starting at `offset`.
    fn read_guest(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// The backing of a layer that has none: all zeros.
#[derive(Debug, Clone, Copy, Default)]
pub struct Zeros;

impl GuestRead for Zeros {
    fn read_guest(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
}

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Open for writing.
    pub writable: bool,
    /// The format, or `None` to probe it from the header.
    pub format: Option<Format>,
    /// Take no locks and ignore other processes' locks (qemu-img's `-U`,
    /// `--force-share`); only for reading.
    pub force_share: bool,
}

/// Options for creating an image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Format to create (qcow2 or QED; raw creates a sparse file).
    pub format: Format,
    /// Virtual size in bytes.
    pub size: u64,
    /// Backing file to record.
    pub backing: Option<BackingFile>,
    /// qemu-img style `-o key=value` options, in the order given.
    pub options: Vec<(String, String)>,
}

/// Serialises overlapping allocating writes to one layer, so two writers
/// (guest queues, a job) never allocate the same cluster twice, without
/// holding a mutex across data I/O.
#[derive(Debug, Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

/// A held range of a [`RangeLocks`]; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    /// Wait until no held range overlaps `[start, end)`, then hold it.
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while held.iter().any(|&(s, e)| s < end && start < e) {
            held = self.released.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        held.push((start, end));
        RangeGuard {
            locks: self,
            range: (start, end),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.iter().position(|r| *r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_all();
    }
}

/// One open layer file.
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    driver: Box<dyn Driver>,
    writable: bool,
    locks: RangeLocks,
}

/// Probe the format of an image from its first bytes, as QEMU does.
pub fn probe(storage: &dyn Storage) -> Result<Format> {
    let mut magic = [0u8; 4];
    storage
        .read_at(&mut magic, 0)
        .map_err(|e| Error::io("reading header", e))?;
    Ok(match &magic {
        b"QFI\xfb" => Format::Qcow2,
        b"QED\0" => Format::Qed,
        _ => Format::Raw,
    })
}

fn open_file(path: &Path, writable: bool, create: bool) -> Result<File> {
    FsOpenOptions::new()
        .read(true)
        .write(writable || create)
        .create(create)
        .truncate(create)
        .open(path)
        .map_err(|e| {
            let what = if create {
                "cannot create"
            } else {
                "cannot open"
            };
            Error::io(what, e).with_path(path)
        })
}

/// Open the byte storage of a file with the configured I/O backend:
/// io_uring when available, else pread, unless `IMGPULL_IO_BACKEND` /
/// `IMGPULL_O_DIRECT` say otherwise (see [`crate::uring`]).
pub fn open_storage(file: File) -> Result<Box<dyn Storage>> {
    crate::uring::open_from_env(file)
}

impl Image {
    /// Open the image at `path`.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        let file = open_file(path, opts.writable, false)?;
        if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(Error::invalid_argument("is a directory").with_path(path));
        }
        if opts.force_share && opts.writable {
            return Err(
                Error::invalid_argument("force-share is only allowed for read-only opens")
                    .with_path(path),
            );
        }
        if !opts.force_share {
            lock::lock_image(&file, opts.writable).at(path)?;
        }
        let storage = open_storage(file).at(path)?;
        let format = match opts.format {
            Some(f) => f,
            None => probe(&*storage).at(path)?,
        };
        let driver: Box<dyn Driver> = match format {
            Format::Qcow2 => Box::new(qcow2::Qcow2::open(storage, opts.writable).at(path)?),
            Format::Qed => Box::new(qed::Qed::open(storage, opts.writable).at(path)?),
            Format::Raw => Box::new(raw::Raw::open(storage, opts.writable).at(path)?),
        };
        Ok(Image {
            path: path.to_path_buf(),
            driver,
            writable: opts.writable,
            locks: RangeLocks::default(),
        })
    }

    /// Create a new image file at `path` (truncating an existing one).
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
        let path = path.as_ref();
        let file = open_file(path, true, true)?;
        let storage = match open_storage(file) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e.with_path(path));
            }
        };
        let r = match opts.format {
            Format::Qcow2 => {
                qcow2::create(&*storage, opts.size, opts.backing.as_ref(), &opts.options)
            }
            Format::Qed => qed::create(&*storage, opts.size, opts.backing.as_ref(), &opts.options),
            Format::Raw => {
                if opts.backing.is_some() {
                    Err(Error::unsupported("raw images cannot have a backing file"))
                } else if let Some((k, _)) = opts.options.first() {
                    Err(Error::invalid_argument(format!(
                        "invalid option '{k}' for format 'raw'"
                    )))
                } else {
                    raw::Raw::create(&*storage, opts.size)
                }
            }
        };
        let r = r.and_then(|()| storage.flush().map_err(|e| Error::io("flushing", e)));
        if r.is_err() {
            // Leave no half-made image behind.
            let _ = std::fs::remove_file(path);
        }
        r.at(path)
    }

    /// The path the image was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The format driver.
    pub fn driver(&self) -> &dyn Driver {
        &*self.driver
    }

    /// The data storage.
    pub fn storage(&self) -> &dyn Storage {
        self.driver.storage()
    }

    /// Static facts about the layer.
    pub fn info(&self) -> LayerInfo {
        self.driver.info()
    }

    /// The format.
    pub fn format(&self) -> Format {
        self.info().format
    }

    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.info().virtual_size
    }

    /// The per-layer range locks used by allocating writes; a job copying
    /// into this layer holds them across its check-and-copy.
    pub fn range_locks(&self) -> &RangeLocks {
        &self.locks
    }

    /// Where `[offset, offset + len)` of this layer lives (first extent).
    /// The range is clipped to the virtual size; `len == 0` or an offset at
    /// or past the end is an error.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let size = self.virtual_size();
        if len == 0 || offset >= size {
            return Err(Error::invalid_argument(format!(
                "block status at {offset}+{len} outside the image ({size} bytes)"
            ))
            .with_path(&self.path));
        }
        let len = len.min(size - offset);
        self.driver.block_status(offset, len).at(&self.path)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.virtual_size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::invalid_argument(format!(
                "request at {offset}+{len} beyond the end of the image ({size} bytes)"
            ))
            .with_path(&self.path));
        }
        Ok(())
    }

    /// Read this layer's view of `[offset, offset + buf.len())`, taking
    /// unallocated ranges from `below`.
    pub fn read(&self, offset: u64, buf: &mut [u8], below: &dyn GuestRead) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let ext = self.block_status(pos, (buf.len() - done) as u64)?;
            let n = ext.len as usize;
            let chunk = &mut buf[done..done + n];
            self.read_extent(&ext, chunk, below)?;
            done += n;
        }
        Ok(())
    }

    /// Read the bytes of one extent returned by [`Image::block_status`].
    pub fn read_extent(&self, ext: &Extent, buf: &mut [u8], below: &dyn GuestRead) -> Result<()> {
        match ext.status {
            Status::Data { host } => self
                .storage()
                .read_at(buf, host)
                .map_err(|e| Error::io("reading data", e).with_path(&self.path)),
            Status::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Status::Compressed => self.driver.read_compressed(ext.offset, buf).at(&self.path),
            Status::Unallocated { .. } => below.read_guest(ext.offset, buf),
        }
    }

    fn require_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(
                Error::new(ErrorKind::ReadOnly, "image is opened read-only").with_path(&self.path)
            );
        }
        Ok(())
    }

    /// The granule-aligned range covering `[offset, end)`.
    fn granule_span(&self, offset: u64, end: u64) -> (u64, u64) {
        let g = self.driver.granularity().max(1);
        let start = offset / g * g;
        let aligned_end = end.div_ceil(g).saturating_mul(g);
        (start, aligned_end.min(self.virtual_size()))
    }

    /// Write `data` at `offset`. Partial granules of newly allocated ranges
    /// are completed from the old content: `below` for unallocated ranges,
    /// zeros for zero ranges, the decompressed data for compressed ones.
    pub fn write(&self, offset: u64, data: &[u8], below: &dyn GuestRead) -> Result<()> {
        self.require_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let (start, span_end) = self.granule_span(offset, end);
        let _guard = self.locks.lock(start, span_end);
        let mut pos = start;
        while pos < span_end {
            let ext = self.block_status(pos, span_end - pos)?;
            self.write_piece(&ext, offset, data, below)?;
            pos = ext.end();
        }
        Ok(())
    }

    /// Write the part of `data` (placed at guest `offset`) that falls into
    /// `ext`, allocating and filling as needed.
    fn write_piece(
        &self,
        ext: &Extent,
        offset: u64,
        data: &[u8],
        below: &dyn GuestRead,
    ) -> Result<()> {
        let end = offset + data.len() as u64;
        let (a, b) = (ext.offset, ext.end());
        let (wa, wb) = (a.max(offset), b.min(end));
        let src = &data[(wa - offset) as usize..(wb - offset) as usize];
        let io_err = |e| Error::io("writing data", e).with_path(&self.path);
        if let Status::Data { host } = ext.status {
            return self
                .storage()
                .write_at(src, host + (wa - a))
                .map_err(io_err);
        }
        let runs = self.driver.prepare_write(a, b - a).at(&self.path)?;
        let full = wa == a && wb == b;
        let mut filled;
        let bytes: &[u8] = if full {
            src
        } else {
            filled = vec![0u8; (b - a) as usize];
            match ext.status {
                Status::Unallocated { .. } => below.read_guest(a, &mut filled)?,
                Status::Compressed => self.driver.read_compressed(a, &mut filled).at(&self.path)?,
                _ => {}
            }
            filled[(wa - a) as usize..(wb - a) as usize].copy_from_slice(src);
            &filled
        };
        for r in &runs {
            let s = (r.guest - a) as usize;
            self.storage()
                .write_at(&bytes[s..s + r.len as usize], r.host)
                .map_err(io_err)?;
        }
        self.driver.commit_write(&runs).at(&self.path)
    }

    /// Make `[offset, offset + len)` read as zeros. Whole granules become
    /// zero clusters where the format can express it; the rest is written
    /// as zero data.
    pub fn write_zeroes(&self, offset: u64, len: u64, below: &dyn GuestRead) -> Result<()> {
        self.require_writable()?;
        self.check_range(offset, len)?;
        let end = offset + len;
        let g = self.driver.granularity().max(1);
        let size = self.virtual_size();
        let mid_start = offset.div_ceil(g) * g;
        let mid_end = if end == size { end } else { end / g * g };
        if mid_start < mid_end {
            let zeroed = {
                let _guard = self.locks.lock(mid_start, mid_end);
                self.driver
                    .zero_range(mid_start, mid_end - mid_start)
                    .at(&self.path)?
            };
            if !zeroed {
                return self.write_zero_data(offset, len, below);
            }
            if offset < mid_start {
                self.write_zero_data(offset, mid_start - offset, below)?;
            }
            if mid_end < end {
                self.write_zero_data(mid_end, end - mid_end, below)?;
            }
            Ok(())
        } else {
            self.write_zero_data(offset, len, below)
        }
    }

    fn write_zero_data(&self, offset: u64, len: u64, below: &dyn GuestRead) -> Result<()> {
        const CHUNK: u64 = 4 << 20;
        let zeros = vec![0u8; len.min(CHUNK) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(CHUNK);
            self.write(pos, &zeros[..n as usize], below)?;
            pos += n;
        }
        Ok(())
    }

    /// Write back metadata and make everything durable.
    pub fn flush(&self) -> Result<()> {
        self.driver.flush().at(&self.path)
    }

    /// Rewrite (or remove) the recorded backing file.
    pub fn set_backing(&self, backing: Option<&BackingFile>) -> Result<()> {
        self.require_writable()?;
        self.driver.set_backing(backing).at(&self.path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // Make everything durable, then let other processes in at once.
        if self.writable {
            let _ = self.driver.flush();
        }
        lock::unlock(self.storage().file());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn range_locks_exclude_overlaps_only() {
        let locks = Arc::new(RangeLocks::default());
        let g = locks.lock(0, 100);
        // Disjoint range: immediate.
        drop(locks.lock(100, 200));
        let l2 = locks.clone();
        let t = thread::spawn(move || {
            let _g = l2.lock(50, 60);
        });
        thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished());
        drop(g);
        t.join().unwrap();
    }

    #[test]
    fn raw_write_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        Image::create(
            &p,
            &CreateOptions {
                format: Format::Raw,
                size: 1 << 20,
                backing: None,
                options: vec![],
            },
        )
        .unwrap();
        let img = Image::open(
            &p,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(img.format(), Format::Raw);
        img.write(4095, b"hello", &Zeros).unwrap();
        let mut buf = [0u8; 7];
        img.read(4094, &mut buf, &Zeros).unwrap();
        assert_eq!(&buf, b"\0hello\0");
        let e = img.write((1 << 20) - 2, b"abc", &Zeros).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("r.raw"));
    }
}
