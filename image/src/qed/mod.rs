//! QED, the QEMU enhanced disk format.
//!
//! A QED file is a sequence of clusters: the header cluster(s), an L1 table,
//! L2 tables and data clusters. A guest offset splits into an L1 index, an
//! L2 index and the byte offset in the cluster; L1 entries point to L2
//! tables, L2 entries to data clusters (0 = unallocated, 1 = zero cluster).
//! There are no reference counts: new clusters are appended at the end of
//! the file, so allocation is bookkeeping of the file's logical end.
//!
//! Crash safety follows QEMU: the `NEED_CHECK` feature bit is set (and made
//! durable) before the first allocating write after open or flush, and
//! cleared by [`Driver::flush`] once nothing is in flight; an image opened
//! writable with the bit set is checked and repaired first (invalid table
//! entries are cleared). When the image has a backing file, new data is
//! also made durable before the L2 entries that map it, so a crash can never
//! expose a cluster whose untouched part should have come from the backing.
//!
//! Module layout: [`header`] (fields, validation, geometry), [`table`]
//! (L1 table and bounded L2 slice cache), [`check`] (consistency check and
//! repair), [`create`](create()) (new images).

mod check;
mod create;
mod header;
mod table;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::driver::{BackingFile, Driver, Extent, Format, HostRun, LayerInfo, Status};
use crate::error::{Error, Result};
use crate::storage::Storage;

pub use create::create;
use header::{
    Geometry, Header, F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE, F_NEED_CHECK, HEADER_LEN,
    KNOWN_AUTOCLEAR, KNOWN_COMPAT, MAGIC, MAX_BACKING_NAME,
};
use table::{L2Cache, Tables};

/// Largest zero-filled buffer used for writing zeros.
const ZERO_CHUNK: u64 = 1 << 20;
/// Touched L2 entries closer than this are written back in one request.
const MERGE_GAP_ENTRIES: u64 = 512;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Header state and write bookkeeping, guarded by one mutex. Lock order:
/// the table lock may be held while taking this one, never the reverse.
#[derive(Debug)]
struct Meta {
    /// The header as on disk (the source of truth for feature bits).
    header: Header,
    /// The recorded backing file.
    backing: Option<BackingFile>,
    /// Fresh runs handed out by `prepare_write` and not yet committed:
    /// host offset → (guest offset, length).
    pending: HashMap<u64, (u64, u64)>,
    /// Zeroing operations updating tables right now.
    busy: usize,
    /// Whether the tables are known to be consistent, so that `NEED_CHECK`
    /// may be cleared: false while an image opened with the bit set has not
    /// passed the check.
    consistent: bool,
}

/// What one cluster (or a run of clusters) of the guest maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Unallocated: read from the backing file.
    Unalloc,
    /// A zero cluster.
    Zero,
    /// Data at this host offset (of the run's first cluster).
    Data(u64),
}

/// New L2 entries for `count` guest clusters from `cluster`: data clusters
/// contiguous from host offset `value`, or zero clusters when `value == 1`.
#[derive(Clone, Copy, Debug)]
struct Update {
    cluster: u64,
    count: u64,
    value: u64,
}

/// The part of an [`Update`] that falls into one L2 table.
#[derive(Clone, Copy, Debug)]
struct Piece {
    l1_index: u64,
    /// First entry index in the table.
    index: u64,
    count: u64,
    value: u64,
}

impl Piece {
    fn end(&self) -> u64 {
        self.index + self.count
    }

    /// The entry value this piece gives table index `i`.
    fn entry(&self, i: u64, cluster_bits: u32) -> u64 {
        if self.value == 1 {
            1
        } else {
            self.value + ((i - self.index) << cluster_bits)
        }
    }
}

/// An open QED image.
#[derive(Debug)]
pub struct Qed {
    storage: Box<dyn Storage>,
    writable: bool,
    geo: Geometry,
    image_size: u64,
    l1_offset: u64,
    /// Logical end of the file: where the next cluster is allocated.
    /// Starts at the file length rounded down to a cluster, as in QEMU.
    alloc_end: AtomicU64,
    meta: Mutex<Meta>,
    tables: Mutex<Tables>,
}

impl Qed {
    /// Open a QED image over `storage`. Opening writable clears unknown
    /// autoclear feature bits and, when the image is marked as needing a
    /// check, checks and repairs it.
    pub fn open(storage: Box<dyn Storage>, writable: bool) -> Result<Qed> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading file size", e))?;
        let mut raw = [0u8; HEADER_LEN];
        storage
            .read_at(&mut raw, 0)
            .map_err(|e| Error::io("reading QED header", e))?;
        let header = Header::parse(&raw);
        if header.magic != MAGIC {
            return Err(Error::invalid("not a QED image (bad magic)"));
        }
        if file_len < HEADER_LEN as u64 {
            return Err(Error::invalid(format!(
                "truncated QED header: the file has {file_len} bytes, the header needs {HEADER_LEN}"
            )));
        }
        let geo = header.validate(file_len)?;
        let backing = read_backing(&*storage, &header)?;
        let l1_len = geo.l1_entries_for(header.image_size);
        let l1 = table::read_entries(&*storage, header.l1_table_offset, l1_len)?;
        let qed = Qed {
            writable,
            geo,
            image_size: header.image_size,
            l1_offset: header.l1_table_offset,
            alloc_end: AtomicU64::new(geo.round_down(file_len)),
            tables: Mutex::new(Tables {
                l1,
                cache: L2Cache::new(&geo),
            }),
            meta: Mutex::new(Meta {
                backing,
                pending: HashMap::new(),
                busy: 0,
                consistent: header.features & F_NEED_CHECK == 0,
                header,
            }),
            storage,
        };
        if writable {
            qed.clear_unknown_autoclear()?;
            let need_check = lock(&qed.meta).header.features & F_NEED_CHECK != 0;
            if need_check {
                check::repair(&qed)?;
            }
        }
        Ok(qed)
    }

    fn clear_unknown_autoclear(&self) -> Result<()> {
        let mut meta = lock(&self.meta);
        if meta.header.autoclear_features & !KNOWN_AUTOCLEAR == 0 {
            return Ok(());
        }
        let mut h = meta.header.clone();
        h.autoclear_features &= KNOWN_AUTOCLEAR;
        self.write_header(&h)?;
        self.flush_storage()?;
        meta.header = h;
        Ok(())
    }

    fn write_header(&self, h: &Header) -> Result<()> {
        self.storage
            .write_at(&h.encode(), 0)
            .map_err(|e| Error::io("writing QED header", e))
    }

    fn flush_storage(&self) -> Result<()> {
        self.storage.flush().map_err(|e| Error::io("flushing", e))
    }

    fn require_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::new(
                crate::ErrorKind::ReadOnly,
                "QED image is opened read-only",
            ))
        }
    }

    /// Set `NEED_CHECK` durably unless it is set already.
    fn ensure_need_check(&self, meta: &mut Meta) -> Result<()> {
        if meta.header.features & F_NEED_CHECK != 0 {
            return Ok(());
        }
        let mut h = meta.header.clone();
        h.features |= F_NEED_CHECK;
        self.write_header(&h)?;
        self.flush_storage()?;
        meta.header = h;
        Ok(())
    }

    /// Reserve `clusters` clusters at the logical end of the file.
    fn alloc(&self, clusters: u64) -> Result<u64> {
        let bytes = clusters
            .checked_mul(self.geo.cluster_size)
            .ok_or_else(|| Error::invalid_argument("allocation size overflows"))?;
        self.alloc_end
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |end| {
                end.checked_add(bytes)
            })
            .map_err(|_| Error::invalid("QED file would grow past the largest file offset"))
    }

    fn write_zeros(&self, at: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(ZERO_CHUNK) as usize;
            self.storage
                .write_at(&zeros[..n], at + pos)
                .map_err(|e| Error::io("writing zeros", e))?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Check that `[offset, offset + len)` is a non-empty, cluster-aligned
    /// range inside the image (it may end at the virtual size).
    fn check_aligned(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len);
        if len == 0 || end.is_none_or(|e| e > self.image_size) {
            return Err(Error::invalid_argument(format!(
                "range {offset}+{len} is empty or outside the image ({} bytes)",
                self.image_size
            )));
        }
        let end = offset + len;
        let c = self.geo.cluster_size;
        if !offset.is_multiple_of(c) || (!end.is_multiple_of(c) && end != self.image_size) {
            return Err(Error::invalid_argument(format!(
                "range {offset}+{len} is not aligned to the {c}-byte clusters"
            )));
        }
        Ok(())
    }

    /// The valid L2 table offset of L1 entry `l1_index`, `None` if the
    /// table is unallocated.
    fn l2_offset(&self, tables: &Tables, l1_index: u64) -> Result<Option<u64>> {
        let e = usize::try_from(l1_index)
            .ok()
            .and_then(|i| tables.l1.get(i).copied())
            .ok_or_else(|| {
                Error::invalid_argument(format!("L1 index {l1_index} is beyond the image"))
            })?;
        if e == 0 {
            return Ok(None);
        }
        let end = self.alloc_end.load(Ordering::SeqCst);
        if !self.geo.table_offset_valid(e, end) {
            return Err(Error::invalid(format!(
                "L1 entry {l1_index} points to an invalid L2 table offset 0x{e:x} ({})",
                self.geo.table_offset_problem(e, end)
            )));
        }
        Ok(Some(e))
    }

    /// Classify an L2 entry for guest cluster `cluster`.
    fn classify(&self, e: u64, cluster: u64) -> Result<Kind> {
        match e {
            0 => Ok(Kind::Unalloc),
            1 => Ok(Kind::Zero),
            _ => {
                let end = self.alloc_end.load(Ordering::SeqCst);
                if self.geo.data_offset_valid(e, end) {
                    Ok(Kind::Data(e))
                } else {
                    Err(Error::invalid(format!(
                        "L2 entry for guest offset 0x{:x} points to an invalid data cluster \
                         offset 0x{e:x} ({})",
                        cluster << self.geo.cluster_bits,
                        self.geo.data_offset_problem(e, end)
                    )))
                }
            }
        }
    }

    /// The mapping of guest cluster `start` and how many clusters after it
    /// (up to `end`) share it; data runs must be host-contiguous. Whole
    /// unallocated L2 tables are skipped at once. An invalid entry is an
    /// error when it is the first, and ends the run otherwise.
    fn scan(&self, start: u64, end: u64) -> Result<(Kind, u64)> {
        let geo = &self.geo;
        let mut guard = lock(&self.tables);
        let tables = &mut *guard;
        let mut kind: Option<Kind> = None;
        let mut count = 0u64;
        let mut cur = start;
        'outer: while cur < end {
            let l1_index = cur >> geo.l2_bits;
            let table_end = ((l1_index + 1) << geo.l2_bits).min(end);
            let l2 = match self.l2_offset(tables, l1_index) {
                Ok(l2) => l2,
                Err(e) if count == 0 => return Err(e),
                Err(_) => break,
            };
            let Some(l2) = l2 else {
                match kind {
                    None => kind = Some(Kind::Unalloc),
                    Some(Kind::Unalloc) => {}
                    Some(_) => break,
                }
                count += table_end - cur;
                cur = table_end;
                continue;
            };
            while cur < table_end {
                let index = cur & (geo.entries - 1);
                let slice_no = index / geo.slice_entries;
                let base = slice_no * geo.slice_entries;
                let slice = match tables.cache.get(&*self.storage, geo, l2, slice_no) {
                    Ok(s) => s,
                    Err(e) if count == 0 => return Err(e),
                    Err(_) => break 'outer,
                };
                let n = (table_end - cur).min(base + geo.slice_entries - index);
                for &e in &slice[(index - base) as usize..(index - base + n) as usize] {
                    let k = match self.classify(e, cur) {
                        Ok(k) => k,
                        Err(e) if count == 0 => return Err(e),
                        Err(_) => break 'outer,
                    };
                    match (kind, k) {
                        (None, _) => kind = Some(k),
                        (Some(Kind::Unalloc), Kind::Unalloc) | (Some(Kind::Zero), Kind::Zero) => {}
                        (Some(Kind::Data(h0)), Kind::Data(h))
                            if h0.checked_add(count << geo.cluster_bits) == Some(h) => {}
                        _ => break 'outer,
                    }
                    count += 1;
                    cur += 1;
                }
            }
        }
        Ok((kind.unwrap_or(Kind::Unalloc), count))
    }

    /// Split updates into per-table pieces, sorted by guest cluster.
    fn pieces(&self, updates: &[Update]) -> Vec<Piece> {
        let geo = &self.geo;
        let mut pieces = Vec::new();
        for u in updates {
            let (mut cluster, mut left, mut value) = (u.cluster, u.count, u.value);
            while left > 0 {
                let index = cluster & (geo.entries - 1);
                let n = left.min(geo.entries - index);
                pieces.push(Piece {
                    l1_index: cluster >> geo.l2_bits,
                    index,
                    count: n,
                    value,
                });
                if value != 1 {
                    value += n << geo.cluster_bits;
                }
                cluster += n;
                left -= n;
            }
        }
        pieces.sort_by_key(|p| (p.l1_index, p.index));
        pieces
    }

    /// Link updates into the tables: allocate and write new L2 tables (each
    /// before the L1 entry that points to it), and write every touched
    /// region of existing L2 tables once. Entries being replaced must not
    /// map data (the caller holds the guest range).
    fn apply(&self, updates: &[Update]) -> Result<()> {
        let geo = self.geo;
        let pieces = self.pieces(updates);
        let mut guard = lock(&self.tables);
        let tables = &mut *guard;
        // First make sure nothing we overwrite maps data.
        for p in &pieces {
            let Some(l2) = self.l2_offset(tables, p.l1_index)? else {
                continue;
            };
            let mut i = p.index;
            while i < p.end() {
                let slice_no = i / geo.slice_entries;
                let base = slice_no * geo.slice_entries;
                let n = (p.end() - i).min(base + geo.slice_entries - i);
                let slice = tables.cache.get(&*self.storage, &geo, l2, slice_no)?;
                let range = (i - base) as usize..(i - base + n) as usize;
                if let Some(pos) = slice[range.clone()].iter().position(|&e| e > 1) {
                    let cluster = (p.l1_index << geo.l2_bits) + i + pos as u64;
                    return Err(Error::invalid_argument(format!(
                        "guest cluster at 0x{:x} was allocated concurrently",
                        cluster << geo.cluster_bits
                    )));
                }
                i += n;
            }
        }
        let mut start = 0;
        while start < pieces.len() {
            let l1_index = pieces[start].l1_index;
            let end = pieces[start..]
                .iter()
                .position(|p| p.l1_index != l1_index)
                .map_or(pieces.len(), |n| start + n);
            let group = &pieces[start..end];
            match self.l2_offset(tables, l1_index)? {
                None => self.new_table(tables, l1_index, group)?,
                Some(l2) => self.update_table(tables, l2, group)?,
            }
            start = end;
        }
        Ok(())
    }

    /// Allocate an L2 table for `l1_index` holding `pieces`, write it whole,
    /// then point the L1 entry at it.
    fn new_table(&self, tables: &mut Tables, l1_index: u64, pieces: &[Piece]) -> Result<()> {
        let geo = self.geo;
        let l2 = self.alloc(geo.table_size)?;
        let mut touched = Vec::new();
        let mut zeros_from: Option<u64> = None;
        let slices = geo.entries / geo.slice_entries;
        for slice_no in 0..slices {
            let base = slice_no * geo.slice_entries;
            let end = base + geo.slice_entries;
            let at = l2 + base * 8;
            if !pieces.iter().any(|p| p.index < end && base < p.end()) {
                zeros_from.get_or_insert(at);
                continue;
            }
            if let Some(z) = zeros_from.take() {
                self.write_zeros(z, at - z)?;
            }
            let mut entries = vec![0u64; geo.slice_entries as usize];
            for p in pieces {
                for i in p.index.max(base)..p.end().min(end) {
                    entries[(i - base) as usize] = p.entry(i, geo.cluster_bits);
                }
            }
            self.storage
                .write_meta(&table::encode_entries(&entries), at)
                .map_err(|e| Error::io("writing new QED L2 table", e))?;
            touched.push((slice_no, entries));
        }
        if let Some(z) = zeros_from {
            self.write_zeros(z, l2 + geo.table_bytes - z)?;
        }
        self.storage
            .write_meta(&l2.to_le_bytes(), self.l1_offset + l1_index * 8)
            .map_err(|e| Error::io("writing QED L1 table", e))?;
        tables.l1[l1_index as usize] = l2;
        for (slice_no, entries) in touched {
            tables.cache.insert(l2, slice_no, entries);
        }
        Ok(())
    }

    /// Apply `pieces` to the existing L2 table at `l2`, writing each
    /// touched region (pieces closer than a few sectors merged) once.
    fn update_table(&self, tables: &mut Tables, l2: u64, pieces: &[Piece]) -> Result<()> {
        let geo = self.geo;
        let mut start = 0;
        while start < pieces.len() {
            let lo = pieces[start].index;
            let mut hi = pieces[start].end();
            let mut end = start + 1;
            while end < pieces.len() && pieces[end].index <= hi + MERGE_GAP_ENTRIES {
                hi = hi.max(pieces[end].end());
                end += 1;
            }
            let group = &pieces[start..end];
            let mut buf = Vec::with_capacity(((hi - lo) * 8) as usize);
            let mut pos = lo;
            while pos < hi {
                let slice_no = pos / geo.slice_entries;
                let base = slice_no * geo.slice_entries;
                let send = hi.min(base + geo.slice_entries);
                let slice = tables.cache.get(&*self.storage, &geo, l2, slice_no)?;
                for p in group {
                    for i in p.index.max(pos)..p.end().min(send) {
                        slice[(i - base) as usize] = p.entry(i, geo.cluster_bits);
                    }
                }
                buf.extend_from_slice(&table::encode_entries(
                    &slice[(pos - base) as usize..(send - base) as usize],
                ));
                pos = send;
            }
            if let Err(e) = self.storage.write_meta(&buf, l2 + lo * 8) {
                tables.cache.forget_table(l2);
                return Err(Error::io("writing QED L2 table", e));
            }
            start = end;
        }
        Ok(())
    }
}

/// Read the backing file name recorded in the header, if any.
fn read_backing(storage: &dyn Storage, h: &Header) -> Result<Option<BackingFile>> {
    if h.features & F_BACKING_FILE == 0 {
        return Ok(None);
    }
    // `validate` bounded the size by MAX_BACKING_NAME.
    let mut name = vec![0u8; h.backing_filename_size as usize];
    storage
        .read_at(&mut name, u64::from(h.backing_filename_offset))
        .map_err(|e| Error::io("reading QED backing file name", e))?;
    // QEMU reads the name as a C string.
    if let Some(nul) = name.iter().position(|&b| b == 0) {
        name.truncate(nul);
    }
    if name.is_empty() {
        return Ok(None);
    }
    let name = String::from_utf8(name)
        .map_err(|_| Error::invalid("QED backing file name is not valid UTF-8"))?;
    let format = (h.features & F_BACKING_FORMAT_NO_PROBE != 0).then(|| "raw".to_string());
    Ok(Some(BackingFile { name, format }))
}

impl Driver for Qed {
    fn info(&self) -> LayerInfo {
        let meta = lock(&self.meta);
        LayerInfo {
            format: Format::Qed,
            virtual_size: self.image_size,
            cluster_size: Some(self.geo.cluster_size),
            backing: meta.backing.clone(),
            // qemu-img 10 reports `dirty-flag: false` for QED whatever the
            // NEED_CHECK bit says (that bit is handled on open instead);
            // we give qemu-img's answer.
            dirty: false,
            format_specific: Vec::new(),
        }
    }

    fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let end = offset.checked_add(len);
        if len == 0 || end.is_none_or(|e| e > self.image_size) {
            return Err(Error::invalid_argument(format!(
                "block status at {offset}+{len} outside the image ({} bytes)",
                self.image_size
            )));
        }
        let end = offset + len;
        let bits = self.geo.cluster_bits;
        let first = offset >> bits;
        let (kind, n) = self.scan(first, self.geo.clusters(end))?;
        let ext_end = ((first + n) << bits).min(end);
        let status = match kind {
            Kind::Unalloc => Status::Unallocated { host: None },
            Kind::Zero => Status::Zero { host: None },
            Kind::Data(h) => Status::Data {
                host: h + (offset - (first << bits)),
            },
        };
        Ok(Extent {
            offset,
            len: ext_end - offset,
            status,
        })
    }

    fn read_compressed(&self, offset: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Error::invalid(format!(
            "QED images have no compressed clusters (read at guest offset {offset})"
        )))
    }

    fn granularity(&self) -> u64 {
        self.geo.cluster_size
    }

    fn prepare_write(&self, offset: u64, len: u64) -> Result<Vec<HostRun>> {
        self.prepare_write_many(&[(offset, len)])
    }

    /// All fresh runs of the ranges get consecutive clusters from one
    /// allocation, in the order of the ranges.
    fn prepare_write_many(&self, ranges: &[(u64, u64)]) -> Result<Vec<HostRun>> {
        self.require_writable()?;
        let bits = self.geo.cluster_bits;
        let mut runs: Vec<HostRun> = Vec::new();
        for &(offset, len) in ranges {
            self.check_aligned(offset, len)?;
            let end = offset + len;
            let end_cluster = self.geo.clusters(end);
            let mut cur = offset >> bits;
            while cur < end_cluster {
                let (kind, n) = self.scan(cur, end_cluster)?;
                let g = cur << bits;
                let gend = ((cur + n) << bits).min(end);
                match (kind, runs.last_mut()) {
                    (Kind::Data(h), _) => runs.push(HostRun {
                        guest: g,
                        host: h,
                        len: gend - g,
                        fresh: false,
                    }),
                    (_, Some(r)) if r.fresh && r.guest + r.len == g => r.len += gend - g,
                    _ => runs.push(HostRun {
                        guest: g,
                        host: 0,
                        len: gend - g,
                        fresh: true,
                    }),
                }
                cur += n;
            }
        }
        let need: u64 = runs
            .iter()
            .filter(|r| r.fresh)
            .map(|r| self.geo.clusters(r.len))
            .sum();
        if need > 0 {
            let mut meta = lock(&self.meta);
            self.ensure_need_check(&mut meta)?;
            let mut host = self.alloc(need)?;
            for r in runs.iter_mut().filter(|r| r.fresh) {
                r.host = host;
                host += self.geo.clusters(r.len) << bits;
                meta.pending.insert(r.host, (r.guest, r.len));
            }
        }
        Ok(runs)
    }

    fn commit_write(&self, runs: &[HostRun]) -> Result<()> {
        let fresh: Vec<HostRun> = runs.iter().filter(|r| r.fresh).copied().collect();
        if fresh.is_empty() {
            return Ok(());
        }
        self.require_writable()?;
        let has_backing = {
            let meta = lock(&self.meta);
            for r in &fresh {
                if meta.pending.get(&r.host) != Some(&(r.guest, r.len)) {
                    return Err(Error::invalid_argument(format!(
                        "commit of a run that was not prepared (guest 0x{:x}, host 0x{:x}, \
                         {} bytes)",
                        r.guest, r.host, r.len
                    )));
                }
            }
            meta.header.features & F_BACKING_FILE != 0
        };
        // The last cluster of an image whose size is not a cluster multiple
        // is written only up to the virtual size: complete it, so the file
        // keeps whole clusters (QEMU ignores a partial last cluster).
        for r in &fresh {
            let full = self.geo.clusters(r.len) << self.geo.cluster_bits;
            if full > r.len {
                self.write_zeros(r.host + r.len, full - r.len)?;
            }
        }
        // With a backing file, a crash must not leave an L2 entry pointing
        // at a cluster whose backing-filled part never reached the disk.
        if has_backing {
            self.flush_storage()?;
        }
        let updates: Vec<Update> = fresh
            .iter()
            .map(|r| Update {
                cluster: r.guest >> self.geo.cluster_bits,
                count: self.geo.clusters(r.len),
                value: r.host,
            })
            .collect();
        self.apply(&updates)?;
        let mut meta = lock(&self.meta);
        for r in &fresh {
            meta.pending.remove(&r.host);
        }
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<bool> {
        self.require_writable()?;
        self.check_aligned(offset, len)?;
        let bits = self.geo.cluster_bits;
        let end = offset + len;
        let end_cluster = self.geo.clusters(end);
        let mut updates = Vec::new();
        let mut cur = offset >> bits;
        while cur < end_cluster {
            let (kind, n) = self.scan(cur, end_cluster)?;
            match kind {
                // QED cannot free clusters: like QEMU, zero allocated data
                // in place rather than leak it.
                Kind::Data(h) => {
                    let g = cur << bits;
                    let gend = ((cur + n) << bits).min(end);
                    self.write_zeros(h, gend - g)?;
                }
                Kind::Unalloc => updates.push(Update {
                    cluster: cur,
                    count: n,
                    value: 1,
                }),
                Kind::Zero => {}
            }
            cur += n;
        }
        if !updates.is_empty() {
            {
                let mut meta = lock(&self.meta);
                self.ensure_need_check(&mut meta)?;
                meta.busy += 1;
            }
            // On failure the image stays marked as needing a check.
            self.apply(&updates)?;
            lock(&self.meta).busy -= 1;
        }
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        // Tables are written through; only the data must reach the disk.
        let mut meta = lock(&self.meta);
        self.flush_storage()?;
        if self.writable
            && meta.consistent
            && meta.header.features & F_NEED_CHECK != 0
            && meta.pending.is_empty()
            && meta.busy == 0
        {
            let mut h = meta.header.clone();
            h.features &= !F_NEED_CHECK;
            self.write_header(&h)?;
            meta.header = h;
            self.flush_storage()?;
        }
        Ok(())
    }

    fn set_backing(&self, backing: Option<&BackingFile>) -> Result<()> {
        self.require_writable()?;
        let mut meta = lock(&self.meta);
        let mut h = meta.header.clone();
        h.features &= !(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
        let mut buf = Vec::new();
        match backing {
            Some(b) => {
                if h.compat_features & !KNOWN_COMPAT != 0 {
                    return Err(Error::unsupported(format!(
                        "cannot record a backing file: the QED header uses unknown compat \
                         feature bits 0x{:x}",
                        h.compat_features & !KNOWN_COMPAT
                    )));
                }
                let name = b.name.as_bytes();
                if name.is_empty() || name.contains(&0) {
                    return Err(Error::invalid_argument(
                        "backing file name is empty or contains a NUL byte",
                    ));
                }
                let room = self.geo.header_bytes - HEADER_LEN as u64;
                if name.len() as u64 > room.min(MAX_BACKING_NAME) {
                    return Err(Error::invalid_argument(format!(
                        "backing file name of {} bytes does not fit in the QED header \
                         (at most {} bytes)",
                        name.len(),
                        room.min(MAX_BACKING_NAME)
                    )));
                }
                h.features |= F_BACKING_FILE;
                if b.format.as_deref() == Some("raw") {
                    h.features |= F_BACKING_FORMAT_NO_PROBE;
                }
                h.backing_filename_offset = HEADER_LEN as u32;
                h.backing_filename_size = name.len() as u32;
                buf.extend_from_slice(&h.encode());
                buf.extend_from_slice(name);
            }
            None => {
                h.backing_filename_offset = 0;
                h.backing_filename_size = 0;
                buf.extend_from_slice(&h.encode());
            }
        }
        self.storage
            .write_at(&buf, 0)
            .map_err(|e| Error::io("writing QED header", e))?;
        self.flush_storage()?;
        meta.backing = backing.map(|b| BackingFile {
            name: b.name.clone(),
            format: (h.features & F_BACKING_FORMAT_NO_PROBE != 0).then(|| "raw".to_string()),
        });
        meta.header = h;
        Ok(())
    }
}

impl Drop for Qed {
    /// Like QEMU's close: an image left marked as needing a check is
    /// flushed, which clears the mark when no write is in flight.
    fn drop(&mut self) {
        if self.writable && lock(&self.meta).header.features & F_NEED_CHECK != 0 {
            let _ = Driver::flush(self);
        }
    }
}
