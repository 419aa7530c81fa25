//! qcow2, versions 2 (compat 0.10) and 3 (compat 1.1).
//!
//! Layout of this driver:
//! * [`header`] — header fields, extensions, backing name (parse/encode);
//! * [`l2`] — L1/L2 entry encodings (standard, extended, compressed);
//! * [`refcount`] — refcount entry widths and the host-cluster allocator;
//! * [`cache`] — the bounded LRU cache of L2 tables and refcount blocks;
//! * [`compressed`] — deflate/zstd decompression of compressed clusters;
//! * `map` — [`Driver::block_status`] and entry look-ups;
//! * `write` — allocating writes, commits and zeroing;
//! * `rebuild` — refcount repair of dirty images (lazy refcounts);
//! * `create` — [`create`] with qemu-img's options.
//!
//! Metadata is written through: every refcount, L2 and L1 change reaches
//! storage when it is made, in an order that keeps the image valid at every
//! point (refcounts are flushed before an L2 entry uses the cluster; an L2
//! table is written and flushed before the L1 entry points at it; an entry
//! is unlinked and flushed before the cluster's refcount drops). This driver
//! never uses lazy refcounts itself and never sets the dirty bit.
//!
//! Policies: encrypted images and external data files are refused; images
//! with internal snapshots, the corrupt bit, or unknown incompatible
//! features open read-only at most. A writable open clears all autoclear
//! bits (we maintain none), including bit 0: persistent bitmaps are left in
//! place but marked inconsistent, exactly what the spec asks of programs
//! that do not update them. A dirty image opened writable gets its refcounts
//! rebuilt (like `qemu-img check -r all`) and the dirty bit cleared. Zeroing
//! (v3) keeps allocated clusters as preallocated zero clusters, as
//! `qemu-io write -z` does.

pub mod cache;
pub mod compressed;
mod create;
pub mod header;
pub mod l2;
mod map;
mod rebuild;
pub mod refcount;
mod write;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use self::cache::TableCache;
use self::compressed::Compression;
use self::header::Header;
use self::l2::CompressedLayout;
use self::refcount::Refcounts;
use crate::driver::{BackingFile, Driver, Extent, Format, HostRun, InfoValue, LayerInfo};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

pub use self::create::create;

/// QEMU's limit on the active L1 table size.
const MAX_L1_BYTES: u64 = 32 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

/// Fixed facts about an open image.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    version: u32,
    cluster_bits: u32,
    size: u64,
    extended: bool,
    /// log2 of the entries per L2 table.
    l2_bits: u32,
    /// log2 of the write granularity (subcluster or cluster size).
    granule_bits: u32,
    l1_size: u64,
    l1_offset: u64,
    refcount_order: u32,
    compression: Compression,
    clayout: CompressedLayout,
}

impl Geometry {
    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of the guest bytes one L1 entry covers.
    fn l1_shift(&self) -> u32 {
        self.cluster_bits + self.l2_bits
    }

    /// Words of an L2 table per entry.
    fn words(&self) -> usize {
        if self.extended {
            2
        } else {
            1
        }
    }
}

/// The active L1 table and the L2 cache.
#[derive(Debug)]
struct Mapping {
    l1: Vec<u64>,
    tables: TableCache<Vec<u64>>,
}

/// A new host cluster handed out by `prepare_write` and not yet linked.
#[derive(Clone, Copy, Debug)]
struct Pending {
    host: u64,
    /// Prepared writes still to commit into it.
    users: u32,
    /// Subclusters already filled by the driver (extended L2 only).
    extra: u64,
}

/// The header as last written, and how many bytes of cluster 0 it uses.
#[derive(Debug)]
struct HeaderState {
    header: Header,
    area_len: usize,
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    storage: Box<dyn Storage>,
    geo: Geometry,
    writable: bool,
    header: Mutex<HeaderState>,
    map: Mutex<Mapping>,
    alloc: Mutex<Refcounts>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Refcount generation known durable.
    synced: AtomicU64,
    /// End of the host space in use: offsets past it are invalid.
    limit: AtomicU64,
    /// Whether the image looks metadata-preallocated (decided once, on
    /// first use, as QEMU does).
    prealloc: std::sync::OnceLock<bool>,
}

fn feature_list(h: &Header, kind: u8, bits: u64) -> String {
    (0..64)
        .filter(|b| bits >> b & 1 != 0)
        .map(|b| match h.feature_name(kind, b) {
            Some(n) => format!("'{n}' (bit {b})"),
            None => format!("bit {b}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Qcow2 {
    /// Open a qcow2 image over `storage`.
    pub fn open(storage: Box<dyn Storage>, writable: bool) -> Result<Qcow2> {
        use self::header::*;
        let file_len = storage.len().map_err(io("reading file size"))?;
        let mut first = vec![0u8; 104.min(file_len) as usize];
        storage
            .read_at(&mut first, 0)
            .map_err(io("reading the header"))?;
        let h = Header::parse(&first, |cs| {
            let mut b = vec![0u8; cs.min(file_len) as usize];
            storage
                .read_at(&mut b, 0)
                .map_err(io("reading the header"))?;
            Ok(b)
        })?;
        let cs = h.cluster_size();
        if h.crypt_method != 0 {
            return Err(Error::unsupported("encrypted images are not supported"));
        }
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "unsupported incompatible feature(s): {}",
                feature_list(&h, 0, unknown)
            )));
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::unsupported(
                "images with an external data file are not supported",
            ));
        }
        let compression = match (
            h.incompatible & INCOMPAT_COMPRESSION != 0,
            h.compression_type(),
        ) {
            (false, 0) => Compression::Zlib,
            (false, t) => {
                return Err(Error::invalid(format!(
                    "compression type {t} set without the compression type feature bit"
                )))
            }
            (true, 1) => Compression::Zstd,
            (true, 0) => return Err(Error::invalid(
                "compression type feature bit set but the compression type field is 0 or missing",
            )),
            (true, t) => return Err(Error::unsupported(format!("unknown compression type {t}"))),
        };
        let extended = h.incompatible & INCOMPAT_EXTL2 != 0;
        if extended && h.cluster_bits < 14 {
            return Err(Error::invalid(
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        let l2_bits = h.cluster_bits - 3 - extended as u32;
        let l1_shift = h.cluster_bits + l2_bits;
        let need_l1 = (h.size as u128).div_ceil(1u128 << l1_shift);
        let l1_bytes = h.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::invalid(format!(
                "L1 table of {} entries is too large (limit 32 MiB)",
                h.l1_size
            )));
        }
        if (h.l1_size as u128) < need_l1 {
            return Err(Error::invalid(format!(
                "L1 table of {} entries is too small for the virtual size {}",
                h.l1_size, h.size
            )));
        }
        if h.l1_size > 0
            && (!h.l1_offset.is_multiple_of(cs)
                || h.l1_offset == 0
                || h.l1_offset
                    .checked_add(l1_bytes)
                    .is_none_or(|e| e > file_len))
        {
            return Err(Error::invalid(format!(
                "L1 table at {:#x} ({} bytes) is unaligned or lies past the end of the file ({} bytes)",
                h.l1_offset, l1_bytes, file_len
            )));
        }
        if h.nb_snapshots > 0 && (!h.snapshots_offset.is_multiple_of(cs) || h.nb_snapshots > 65536)
        {
            return Err(Error::invalid("invalid snapshot table"));
        }
        if writable {
            if h.incompatible & INCOMPAT_CORRUPT != 0 {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    "image is marked corrupt and can only be opened read-only (repair it with qemu-img check -r all)",
                ));
            }
            if h.nb_snapshots > 0 {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    "images with internal snapshots can only be opened read-only",
                ));
            }
        }
        let mut l1buf = vec![0u8; l1_bytes as usize];
        storage
            .read_at(&mut l1buf, h.l1_offset)
            .map_err(io("reading the L1 table"))?;
        let l1 = l2::words_from_be(&l1buf);
        let geo = Geometry {
            version: h.version,
            cluster_bits: h.cluster_bits,
            size: h.size,
            extended,
            l2_bits,
            granule_bits: h.cluster_bits - if extended { 5 } else { 0 },
            l1_size: h.l1_size as u64,
            l1_offset: h.l1_offset,
            refcount_order: h.refcount_order,
            compression,
            clayout: CompressedLayout::new(h.cluster_bits),
        };
        if h.rt_clusters == 0 {
            return Err(Error::invalid(
                "image does not contain a reference count table",
            ));
        }
        let protected = vec![(h.l1_offset, l1_bytes)];
        let mut rc = Refcounts::open(
            &*storage,
            h.cluster_bits,
            h.refcount_order,
            h.rt_offset,
            h.rt_clusters as u64,
            file_len,
            protected.clone(),
        )?;
        let area_len = h.encode().map(|b| b.len()).unwrap_or(cs as usize).max(
            h.backing.as_ref().map_or(0, |b| {
                (u64::from_be_bytes(first_bytes(&first, 8)) as usize).saturating_add(b.len())
            }),
        );
        let mut h = h;
        if writable {
            if h.incompatible & INCOMPAT_DIRTY != 0 {
                if h.extension(EXT_BITMAPS).is_some() {
                    return Err(Error::unsupported(
                        "dirty image with persistent bitmaps: repair it with qemu-img check -r all first",
                    ));
                }
                let (off, clusters) = rebuild::rebuild(&*storage, &geo)?;
                h.rt_offset = off;
                h.rt_clusters = clusters as u32;
                let new_len = storage.len().map_err(io("reading file size"))?;
                rc = Refcounts::open(
                    &*storage,
                    h.cluster_bits,
                    h.refcount_order,
                    off,
                    clusters,
                    new_len,
                    protected,
                )?;
                h.incompatible &= !INCOMPAT_DIRTY;
                storage
                    .write_at(&h.incompatible.to_be_bytes(), OFF_INCOMPATIBLE)
                    .map_err(io("clearing the dirty bit"))?;
                storage.flush().map_err(io("flushing"))?;
            }
            if h.autoclear != 0 {
                h.autoclear = 0;
                storage
                    .write_at(&0u64.to_be_bytes(), OFF_AUTOCLEAR)
                    .map_err(io("clearing autoclear bits"))?;
                storage.flush().map_err(io("flushing"))?;
            }
        }
        let l1_cache = TableCache::with_budget(cs, 8 << 20, 4, 4096);
        let limit = rc.limit();
        Ok(Qcow2 {
            storage,
            geo,
            writable,
            header: Mutex::new(HeaderState {
                header: h,
                area_len,
            }),
            map: Mutex::new(Mapping {
                l1,
                tables: l1_cache,
            }),
            alloc: Mutex::new(rc),
            pending: Mutex::new(HashMap::new()),
            synced: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
            prealloc: std::sync::OnceLock::new(),
        })
    }

    /// QEMU's `qcow2_detect_metadata_preallocation`: the image counts as
    /// metadata-preallocated when clusters in use (nonzero refcount) reach
    /// `max(real * 10 / 9, real + 2)`, where `real` is the number of
    /// clusters the file system actually allocated for the file.
    fn detect_metadata_preallocation(&self) -> Result<bool> {
        let cs = self.geo.cs();
        let file_len = self.storage.len().map_err(io("reading file size"))?;
        let real = self
            .storage
            .allocated_bytes()
            .map_err(io("reading file allocation"))?
            / cs;
        let threshold = (real * 10 / 9).max(real + 2);
        let end = file_len.div_ceil(cs);
        let mut rc = lock(&self.alloc);
        let mut count = 0;
        let mut i = 0;
        while i < end && count < threshold {
            if rc.get(&*self.storage, i)? != 0 {
                count += 1;
            }
            i += 1;
        }
        Ok(count >= threshold)
    }

    fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    /// Make every refcount write so far durable (one flush, if any are
    /// pending).
    fn sync_refcounts(&self) -> Result<()> {
        let gen = lock(&self.alloc).generation();
        if self.synced.load(Ordering::Acquire) >= gen {
            return Ok(());
        }
        self.storage.flush().map_err(io("flushing"))?;
        self.synced.fetch_max(gen, Ordering::AcqRel);
        Ok(())
    }

    /// Allocate `n` host clusters, as contiguous extents
    /// `(byte offset, clusters)` in order.
    fn alloc_clusters(&self, n: u64) -> Result<Vec<(u64, u64)>> {
        let mut a = lock(&self.alloc);
        let off = a.alloc(&*self.storage, n)?;
        self.limit.fetch_max(a.limit(), Ordering::AcqRel);
        Ok(off)
    }

    /// Drop a reference from the clusters of the given host byte ranges,
    /// after flushing so that the unlinking entries are durable first.
    fn free_ranges(&self, ranges: &[(u64, u64)]) -> Result<()> {
        if ranges.is_empty() {
            return Ok(());
        }
        self.storage.flush().map_err(io("flushing"))?;
        lock(&self.alloc).free(&*self.storage, ranges)
    }

    fn require_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only"))
        }
    }
}

fn first_bytes(b: &[u8], at: usize) -> [u8; 8] {
    let mut out = [0u8; 8];
    if b.len() >= at + 8 {
        out.copy_from_slice(&b[at..at + 8]);
    }
    out
}

impl Driver for Qcow2 {
    fn data_may_be_holes(&self) -> Result<bool> {
        if let Some(v) = self.prealloc.get() {
            return Ok(*v);
        }
        let v = self.detect_metadata_preallocation()?;
        Ok(*self.prealloc.get_or_init(|| v))
    }

    fn info(&self) -> LayerInfo {
        let hs = lock(&self.header);
        let h = &hs.header;
        let mut fs = Vec::new();
        if h.version >= 3 {
            fs.push(("compat".to_string(), InfoValue::Str("1.1".into())));
            fs.push((
                "compression-type".to_string(),
                InfoValue::Str(self.geo.compression.name().into()),
            ));
            fs.push((
                "lazy-refcounts".to_string(),
                InfoValue::Bool(h.compatible & header::COMPAT_LAZY != 0),
            ));
            fs.push((
                "refcount-bits".to_string(),
                InfoValue::Int(1 << h.refcount_order),
            ));
            fs.push((
                "corrupt".to_string(),
                InfoValue::Bool(h.incompatible & header::INCOMPAT_CORRUPT != 0),
            ));
            fs.push((
                "extended-l2".to_string(),
                InfoValue::Bool(self.geo.extended),
            ));
        } else {
            fs.push(("compat".to_string(), InfoValue::Str("0.10".into())));
            fs.push((
                "compression-type".to_string(),
                InfoValue::Str("zlib".into()),
            ));
            fs.push(("refcount-bits".to_string(), InfoValue::Int(16)));
        }
        LayerInfo {
            format: Format::Qcow2,
            // QEMU counts whole sectors: a size that is not a multiple of
            // 512 is cut down to one.
            virtual_size: self.geo.size / 512 * 512,
            cluster_size: Some(self.geo.cs()),
            backing: h.backing.as_ref().map(|n| BackingFile {
                name: n.clone(),
                format: h.backing_format(),
            }),
            dirty: h.incompatible & header::INCOMPAT_DIRTY != 0,
            format_specific: fs,
        }
    }

    fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.map_extent(offset, len)
    }

    fn read_compressed(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_compressed_range(offset, buf)
    }

    fn granularity(&self) -> u64 {
        1 << self.geo.granule_bits
    }

    fn prepare_write(&self, offset: u64, len: u64) -> Result<Vec<HostRun>> {
        self.prepare(offset, len)
    }

    fn prepare_write_many(&self, ranges: &[(u64, u64)]) -> Result<Vec<HostRun>> {
        self.prepare_many(ranges)
    }

    fn commit_write(&self, runs: &[HostRun]) -> Result<()> {
        self.commit(runs)
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<bool> {
        self.zero(offset, len)
    }

    fn flush(&self) -> Result<()> {
        let gen = lock(&self.alloc).generation();
        self.storage.flush().map_err(io("flushing"))?;
        self.synced.fetch_max(gen, Ordering::AcqRel);
        Ok(())
    }

    fn set_backing(&self, backing: Option<&BackingFile>) -> Result<()> {
        self.require_writable()?;
        let alloc = lock(&self.alloc);
        let mut hs = lock(&self.header);
        let mut h = hs.header.clone();
        h.backing = backing.map(|b| b.name.clone());
        h.set_backing_format(backing.and_then(|b| b.format.as_deref()));
        let (rt_off, rt_clusters) = alloc.table_location();
        h.rt_offset = rt_off;
        h.rt_clusters = rt_clusters as u32;
        let mut bytes = h.encode()?;
        let new_len = bytes.len();
        if bytes.len() < hs.area_len {
            bytes.resize(hs.area_len.min(self.geo.cs() as usize), 0);
        }
        self.storage
            .write_at(&bytes, 0)
            .map_err(io("writing the header"))?;
        self.storage.flush().map_err(io("flushing"))?;
        hs.header = h;
        hs.area_len = new_len;
        Ok(())
    }
}
