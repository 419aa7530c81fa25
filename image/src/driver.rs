//! The format-driver interface: what one layer of a chain answers.
//!
//! A driver answers *where a guest range of this layer lives* ([`Driver::block_status`])
//! and *ensures a mapping* before a write ([`Driver::prepare_write`] /
//! [`Driver::commit_write`]); the bytes themselves move through the driver's
//! [`Storage`], so callers (the generic write path in [`crate::Image`], the
//! stream job, the vhost queues) can batch data I/O themselves.
//!
//! Every method takes `&self`: a driver is shared by several threads. Drivers
//! keep their metadata caches and allocator behind their own fine-grained
//! locks and never hold a lock across data I/O.

use std::fmt::Debug;

use crate::error::Result;
use crate::storage::Storage;

/// An image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// QEMU enhanced disk.
    Qed,
    /// A plain file: guest offset = file offset.
    Raw,
}

impl Format {
    /// The name qemu-img uses (`qcow2`, `qed`, `raw`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Qed => "qed",
            Format::Raw => "raw",
        }
    }

    /// Parse a qemu-img format name; `None` for formats we do not support.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "qcow2" => Some(Format::Qcow2),
            "qed" => Some(Format::Qed),
            "raw" => Some(Format::Raw),
            _ => None,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A backing-file reference as recorded in an image header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingFile {
    /// The file name exactly as recorded (relative names are relative to
    /// the directory of the image that records them).
    pub name: String,
    /// The recorded backing format name, if any (may name a format we do
    /// not support; the chain reports that).
    pub format: Option<String>,
}

/// Where one extent of a layer's guest address space lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Data stored by this layer, contiguous in its storage from `host`.
    Data {
        /// Host (file) offset of the extent's first byte.
        host: u64,
    },
    /// Reads as zeros and is allocated in this layer (masks the backing).
    /// `host` is the preallocated host offset, if there is one (qcow2
    /// zero clusters with an offset, holes of a raw file).
    Zero {
        /// Host offset of the extent's first byte, if preallocated.
        host: Option<u64>,
    },
    /// Compressed clusters: read through [`Driver::read_compressed`].
    Compressed,
    /// Not allocated in this layer: read from the backing (zeros if none).
    /// `host` is set where the range nevertheless has reserved host space
    /// (unallocated subclusters of an allocated qcow2 extended-L2 cluster),
    /// which `qemu-img map` shows as the entry's offset.
    Unallocated {
        /// Reserved host offset of the extent's first byte, if any.
        host: Option<u64>,
    },
}

impl Status {
    /// Whether this layer answers for the range (anything but unallocated).
    pub fn is_allocated(self) -> bool {
        !matches!(self, Status::Unallocated { .. })
    }
}

/// A guest range of one layer that shares one [`Status`]; for `Data` and
/// `Zero { host: Some(_) }` the host range is contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset of the first byte.
    pub offset: u64,
    /// Length in bytes (at least 1).
    pub len: u64,
    /// Where it lives.
    pub status: Status,
}

impl Extent {
    /// One past the last guest byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A guest range made writable by [`Driver::prepare_write`]: writing the
/// range's bytes at `host` in the driver's storage and then committing makes
/// them the layer's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRun {
    /// Guest offset.
    pub guest: u64,
    /// Host offset in the driver's storage.
    pub host: u64,
    /// Length in bytes.
    pub len: u64,
    /// `true` when the mapping is new (or replaces a zero/compressed
    /// mapping) and must be committed; `false` when the range was already
    /// allocated data written in place.
    pub fresh: bool,
}

/// A scalar shown in `imgpull info`'s format-specific section.
#[derive(Clone, Debug, PartialEq)]
pub enum InfoValue {
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(u64),
    /// A string.
    Str(String),
}

/// Static facts about one layer, as `qemu-img info` shows them.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerInfo {
    /// The format.
    pub format: Format,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Cluster size (none for raw).
    pub cluster_size: Option<u64>,
    /// The recorded backing file.
    pub backing: Option<BackingFile>,
    /// Whether the image is marked dirty (qcow2 dirty bit with lazy
    /// refcounts, QED NEED_CHECK) — qemu-img's `dirty-flag`.
    pub dirty: bool,
    /// Format-specific data in qemu-img's key names and order
    /// (e.g. `compat`, `lazy-refcounts`, `refcount-bits`, `corrupt`,
    /// `extended-l2`, `compression-type` for qcow2).
    pub format_specific: Vec<(String, InfoValue)>,
}

/// One image format's view of one layer file.
pub trait Driver: Send + Sync + Debug {
    /// Static facts (re-read after header edits).
    fn info(&self) -> LayerInfo;

    /// The storage that `Data` host offsets and [`HostRun`]s refer to.
    fn storage(&self) -> &dyn Storage;

    /// Where guest range `[offset, offset + len)` of this layer lives: the
    /// extent that starts at `offset`, at most `len` long, merged as far as
    /// the answer stays the same (and, for `Data`, host-contiguous).
    /// Requires `offset < virtual_size`, `len > 0`, `offset + len <= virtual_size`.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent>;

    /// Read guest bytes lying within `Compressed` extents.
    fn read_compressed(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// The allocation unit of writes: cluster size, subcluster size with
    /// extended L2, 1 for raw. Ranges given to [`Driver::prepare_write`] and
    /// [`Driver::zero_range`] start on this boundary and end on it or at
    /// the virtual size.
    fn granularity(&self) -> u64;

    /// Make the aligned guest range writable and say where its bytes go.
    /// Allocated data comes back in place (`fresh == false`); unallocated,
    /// zero and compressed ranges get new host space (`fresh == true`),
    /// whose allocation metadata (refcounts) is written before this returns
    /// but which stays invisible to readers until [`Driver::commit_write`].
    /// The caller writes every byte of every fresh run before committing.
    fn prepare_write(&self, offset: u64, len: u64) -> Result<Vec<HostRun>>;

    /// [`Driver::prepare_write`] for several disjoint aligned ranges at
    /// once, in the order given: the runs of all of them, committed
    /// together or separately. Drivers that can allocate the new space of
    /// all the ranges in one step (one metadata update, contiguous host
    /// space for data copied together) override it.
    fn prepare_write_many(&self, ranges: &[(u64, u64)]) -> Result<Vec<HostRun>> {
        let mut runs = Vec::new();
        for &(offset, len) in ranges {
            runs.extend(self.prepare_write(offset, len)?);
        }
        Ok(runs)
    }

    /// Link fresh runs returned by [`Driver::prepare_write`] into the
    /// mapping, once their data is written. Allocation metadata is made
    /// durable before the mapping that uses it.
    fn commit_write(&self, runs: &[HostRun]) -> Result<()>;

    /// Make the aligned guest range read as zeros in this layer, masking
    /// any backing, without writing data. Returns `false` (changing
    /// nothing) when the format cannot express that (qcow2 v2 over a
    /// backing file); the caller then writes zeros as data.
    fn zero_range(&self, offset: u64, len: u64) -> Result<bool>;

    /// Whether the host ranges of `Data` extents may be holes in the file
    /// that `qemu-img map` reports as zero (QEMU's `BDRV_BLOCK_RECURSE`: a
    /// qcow2 image that looks metadata-preallocated). Callers then refine
    /// data extents with [`Storage::allocation`]. Default: no.
    fn data_may_be_holes(&self) -> Result<bool> {
        Ok(false)
    }

    /// Write back cached metadata, then `fdatasync`.
    fn flush(&self) -> Result<()>;

    /// Rewrite the backing-file reference (name and format), or remove it.
    fn set_backing(&self, backing: Option<&BackingFile>) -> Result<()>;
}
