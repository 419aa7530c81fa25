//! Reference counts: the entry encodings of every width (1 to 64 bits,
//! sub-byte widths least-significant-bit first), and [`Refcounts`], the
//! host-cluster allocator built on the refcount table and blocks.
//!
//! Every change is written through to storage at once (the block cache only
//! saves reads). Newly allocated refcount blocks and moved refcount tables
//! are flushed before anything points at them, so the image stays valid at
//! every step; callers flush pending refcount writes before they link a new
//! cluster into an L2 table (see [`Refcounts::generation`]).

use super::cache::TableCache;
use super::l2::{words_from_be, words_to_be};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// QEMU's limit on the refcount table size.
pub const MAX_TABLE_BYTES: u64 = 8 << 20;

/// Read entry `idx` of a refcount block with `1 << order`-bit entries.
pub fn get_entry(block: &[u8], idx: u64, order: u32) -> u64 {
    let bits = 1u32 << order;
    if bits < 8 {
        let per_byte = 8 >> order;
        let byte = block[(idx / per_byte) as usize];
        let shift = (idx % per_byte) as u32 * bits;
        ((byte >> shift) as u64) & ((1u64 << bits) - 1)
    } else {
        let n = (bits / 8) as usize;
        let start = idx as usize * n;
        block[start..start + n]
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | *b as u64)
    }
}

/// Write entry `idx` of a refcount block (`value` must fit the width).
pub fn set_entry(block: &mut [u8], idx: u64, order: u32, value: u64) {
    let bits = 1u32 << order;
    if bits < 8 {
        let per_byte = 8 >> order;
        let b = &mut block[(idx / per_byte) as usize];
        let shift = (idx % per_byte) as u32 * bits;
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        *b = (*b & !mask) | (((value as u8) << shift) & mask);
    } else {
        let n = (bits / 8) as usize;
        let start = idx as usize * n;
        let be = value.to_be_bytes();
        block[start..start + n].copy_from_slice(&be[8 - n..]);
    }
}

/// The byte range of a refcount block holding entries `[first, last]`.
pub fn entry_bytes(first: u64, last: u64, order: u32) -> (usize, usize) {
    let bits = 1u64 << order;
    let start = (first * bits / 8) as usize;
    let end = ((last + 1) * bits).div_ceil(8) as usize;
    (start, end)
}

/// The largest refcount of a width.
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Write a refcount table at `table_off` and make it durable, then switch
/// the header to it (`clusters` clusters long) with one 12-byte write and
/// make that durable: the image is valid before, between and after.
pub fn install_table(
    storage: &dyn Storage,
    table: &[u64],
    table_off: u64,
    clusters: u64,
) -> Result<()> {
    storage
        .write_at(&words_to_be(table), table_off)
        .map_err(io("writing the refcount table"))?;
    storage.flush().map_err(io("flushing"))?;
    let mut hdr = [0u8; 12];
    hdr[..8].copy_from_slice(&table_off.to_be_bytes());
    hdr[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
    storage
        .write_at(&hdr, 48)
        .map_err(io("updating the header"))?;
    storage.flush().map_err(io("flushing"))
}

fn io(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(what.to_string(), e)
}

/// The host-cluster allocator: the refcount table and a cache of blocks.
#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// log2 of the number of entries per refcount block.
    eb: u32,
    table_offset: u64,
    table: Vec<u64>,
    blocks: TableCache<Vec<u8>>,
    /// Lowest cluster index that may be free.
    cursor: u64,
    /// Counts every refcount write; see [`Refcounts::generation`].
    generation: u64,
    /// End of the host space known to be in use or allocated (bytes).
    limit: u64,
    /// Host ranges never to be handed out (header cluster, L1 table).
    protected: Vec<(u64, u64)>,
}

impl Refcounts {
    /// Load the refcount table of an image. `file_len` bounds the table;
    /// `protected` lists fixed metadata ranges (header, L1) that a corrupt
    /// refcount must never let us allocate.
    pub fn open(
        storage: &dyn Storage,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u64,
        file_len: u64,
        protected: Vec<(u64, u64)>,
    ) -> Result<Refcounts> {
        let cs = 1u64 << cluster_bits;
        let bytes = table_clusters
            .checked_mul(cs)
            .filter(|b| *b <= MAX_TABLE_BYTES)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "refcount table of {table_clusters} clusters is too large (limit 8 MiB)"
                ))
            })?;
        if !table_offset.is_multiple_of(cs) || table_offset == 0 {
            return Err(Error::invalid(format!(
                "refcount table offset {table_offset:#x} is not a valid cluster offset"
            )));
        }
        if table_offset.checked_add(bytes).is_none_or(|e| e > file_len) {
            return Err(Error::invalid(format!(
                "refcount table at {table_offset:#x} ({bytes} bytes) lies past the end of the file ({file_len} bytes)"
            )));
        }
        let mut buf = vec![0u8; bytes as usize];
        storage
            .read_at(&mut buf, table_offset)
            .map_err(io("reading the refcount table"))?;
        let table = words_from_be(&buf);
        let cache = TableCache::with_budget(cs, 2 << 20, 4, 1024);
        Ok(Refcounts {
            cluster_bits,
            order,
            eb: cluster_bits + 3 - order,
            table_offset,
            table,
            blocks: cache,
            cursor: 0,
            generation: 0,
            limit: file_len.div_ceil(cs) * cs,
            protected,
        })
    }

    fn cs(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Number of refcount writes so far. A caller that saw generation `g`
    /// after allocating has durable refcounts once a `storage.flush()`
    /// started after that point has completed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// End (bytes) of the host space that is in use or allocated: host
    /// offsets at or past it are outside the image.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The refcount table's offset and size in clusters.
    pub fn table_location(&self) -> (u64, u64) {
        (
            self.table_offset,
            (self.table.len() as u64 * 8).div_ceil(self.cs()),
        )
    }

    fn is_protected(&self, cluster: u64) -> bool {
        let off = cluster << self.cluster_bits;
        let (to, tc) = self.table_location();
        off < self.cs()
            || (off >= to && off < to + tc * self.cs())
            || self
                .protected
                .iter()
                .any(|&(s, l)| off < s + l && s < off + self.cs())
    }

    /// The block for index `idx`, loading it; `None` if not allocated.
    fn block(&mut self, storage: &dyn Storage, idx: u64) -> Result<Option<&mut Vec<u8>>> {
        let Some(&entry) = self.table.get(idx as usize) else {
            return Ok(None);
        };
        let off = entry & !511;
        if off == 0 {
            return Ok(None);
        }
        if !self.blocks.contains(off) {
            if !off.is_multiple_of(self.cs()) || off >= self.limit {
                return Err(Error::invalid(format!(
                    "refcount block {idx} at {off:#x} is unaligned or outside the file"
                )));
            }
            let mut buf = vec![0u8; self.cs() as usize];
            storage
                .read_meta(&mut buf, off)
                .map_err(io("reading a refcount block"))?;
            self.blocks.insert(off, buf);
        }
        Ok(self.blocks.get_mut(off))
    }

    /// The refcount of host cluster `cluster` (0 past the table).
    pub fn get(&mut self, storage: &dyn Storage, cluster: u64) -> Result<u64> {
        let (idx, pos, order) = (
            cluster >> self.eb,
            cluster & ((1 << self.eb) - 1),
            self.order,
        );
        Ok(match self.block(storage, idx)? {
            Some(b) => get_entry(b, pos, order),
            None => 0,
        })
    }

    fn present(&self, idx: u64) -> bool {
        self.table.get(idx as usize).is_some_and(|t| t & !511 != 0)
    }

    /// The first free cluster at or after the cursor and the length of the
    /// free run starting there (at most `max`, within allocated refcount
    /// blocks; 1 if its block is missing).
    fn find_run(&mut self, storage: &dyn Storage, max: u64) -> Result<(u64, u64)> {
        let mut c = self.cursor;
        while self.present(c >> self.eb) && self.get(storage, c)? != 0 {
            c += 1;
        }
        if self.is_protected(c) {
            return Err(self.protected_error(c));
        }
        self.cursor = c;
        let mut end = c + 1;
        if self.present(c >> self.eb) {
            while end - c < max
                && self.present(end >> self.eb)
                && self.get(storage, end)? == 0
                && !self.is_protected(end)
            {
                end += 1;
            }
        }
        Ok((c, end - c))
    }

    fn protected_error(&self, cluster: u64) -> Error {
        Error::invalid(format!(
            "host cluster {cluster} holds image metadata but has refcount 0: the image is corrupt (run qemu-img check -r all)"
        ))
    }

    /// Allocate `n` host clusters (refcount 1, written through), as few
    /// contiguous extents as the free space allows: `(byte offset, clusters)`.
    pub fn alloc(&mut self, storage: &dyn Storage, n: u64) -> Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut left = n;
        while left > 0 {
            let (c, r) = self.find_run(storage, left)?;
            let idx = c >> self.eb;
            if !self.present(idx) {
                self.new_block(storage, idx)?;
                if !self.present(idx) {
                    return Err(Error::invalid(
                        "cannot create a refcount block (refcount structure inconsistent)",
                    ));
                }
                continue;
            }
            self.adjust_range(storage, c, r, 1)?;
            self.cursor = c + r;
            self.limit = self.limit.max((c + r) << self.cluster_bits);
            match out.last_mut() {
                Some(last) if last.0 + (last.1 << self.cluster_bits) == c << self.cluster_bits => {
                    last.1 += r
                }
                _ => out.push((c << self.cluster_bits, r)),
            }
            left -= r;
        }
        Ok(out)
    }

    /// Add `delta` (+1 or -1) to the refcounts of clusters `[c, c + n)`,
    /// writing each touched block range once.
    fn adjust_range(&mut self, storage: &dyn Storage, c: u64, n: u64, delta: i64) -> Result<()> {
        let e = 1u64 << self.eb;
        let order = self.order;
        let max = max_refcount(order);
        let mut cur = c;
        while cur < c + n {
            let idx = cur >> self.eb;
            let stop = (c + n).min((idx + 1) * e);
            let off = self.table.get(idx as usize).map_or(0, |t| t & !511);
            let block = self.block(storage, idx)?.ok_or_else(|| {
                Error::invalid(format!("refcount block for host cluster {cur} is missing"))
            })?;
            for k in cur..stop {
                let pos = k & (e - 1);
                let v = get_entry(block, pos, order);
                let nv = if delta > 0 {
                    v.checked_add(1).filter(|x| *x <= max).ok_or_else(|| {
                        Error::invalid(format!("refcount of host cluster {k} would overflow"))
                    })?
                } else {
                    v.checked_sub(1).ok_or_else(|| {
                        Error::invalid(format!("refcount of host cluster {k} is already 0"))
                    })?
                };
                set_entry(block, pos, order, nv);
            }
            let (bs, be) = entry_bytes(cur & (e - 1), (stop - 1) & (e - 1), order);
            let bytes = block[bs..be].to_vec();
            storage
                .write_meta(&bytes, off + bs as u64)
                .map_err(io("writing a refcount block"))?;
            self.generation += 1;
            cur = stop;
        }
        Ok(())
    }

    /// Drop one reference from every host cluster overlapping the byte
    /// ranges `(start, len)`; clusters reaching 0 become free.
    pub fn free(&mut self, storage: &dyn Storage, ranges: &[(u64, u64)]) -> Result<()> {
        for &(start, len) in ranges {
            if len == 0 {
                continue;
            }
            let c = start >> self.cluster_bits;
            let last = (start + len - 1) >> self.cluster_bits;
            self.adjust_range(storage, c, last - c + 1, -1)?;
            // Any of them may have become free.
            self.cursor = self.cursor.min(c);
        }
        Ok(())
    }

    /// Create refcount block `idx`, placed inside the range it describes
    /// (all free, since its block is missing) and counting itself.
    fn new_block(&mut self, storage: &dyn Storage, idx: u64) -> Result<()> {
        if idx as usize >= self.table.len() {
            return self.grow(storage, idx);
        }
        let c = idx << self.eb;
        if self.is_protected(c) {
            return Err(self.protected_error(c));
        }
        let mut block = vec![0u8; self.cs() as usize];
        set_entry(&mut block, 0, self.order, 1);
        let off = c << self.cluster_bits;
        storage
            .write_meta(&block, off)
            .map_err(io("writing a new refcount block"))?;
        storage.flush().map_err(io("flushing"))?;
        self.table[idx as usize] = off;
        storage
            .write_meta(&off.to_be_bytes(), self.table_offset + idx * 8)
            .map_err(io("writing the refcount table"))?;
        self.generation += 1;
        self.blocks.insert(off, block);
        self.limit = self.limit.max(off + self.cs());
        Ok(())
    }

    /// Replace the full refcount table by a bigger one able to index block
    /// `need_idx`. The new blocks and table are placed at the start of the
    /// range no current block can describe (all free), the table and blocks
    /// are written and flushed, then the header is switched with one write,
    /// then the old table is freed.
    fn grow(&mut self, storage: &dyn Storage, need_idx: u64) -> Result<()> {
        let cs = self.cs();
        let e = 1u64 << self.eb;
        let old = self.table.len() as u64;
        let area = old << self.eb; // first cluster index of the new area
        let per_cluster = cs / 8;
        let mut k = 1u64;
        let (mut t, mut entries);
        loop {
            entries = (need_idx + 1).max(old + k).max(old + old / 2 + 1);
            t = entries.div_ceil(per_cluster);
            entries = t * per_cluster;
            let need = (k + t).div_ceil(e);
            if need <= k {
                break;
            }
            k = need;
        }
        if t * cs > MAX_TABLE_BYTES {
            return Err(Error::unsupported(
                "the refcount table would exceed QEMU's 8 MiB limit; the image cannot grow further",
            ));
        }
        let used = k + t;
        let mut new_table = self.table.clone();
        new_table.resize(entries as usize, 0);
        for j in 0..k {
            let idx = old + j;
            let block_off = (area + j) << self.cluster_bits;
            let mut block = vec![0u8; cs as usize];
            let first = area + j * e;
            for c in first..(first + e).min(area + used) {
                set_entry(&mut block, c - first, self.order, 1);
            }
            storage
                .write_at(&block, block_off)
                .map_err(io("writing a new refcount block"))?;
            new_table[idx as usize] = block_off;
            self.blocks.insert(block_off, block);
        }
        let table_off = (area + k) << self.cluster_bits;
        install_table(storage, &new_table, table_off, t)?;
        let (old_off, old_clusters) = self.table_location();
        self.table = new_table;
        self.table_offset = table_off;
        self.limit = self.limit.max((area + used) << self.cluster_bits);
        self.generation += 1;
        self.free(storage, &[(old_off, old_clusters * cs)])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = max_refcount(order);
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as u64;
            for i in 0..n {
                set_entry(&mut block, i, order, (i * 2654435761) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&block, i, order),
                    (i * 2654435761) & max,
                    "order {order}"
                );
            }
        }
    }

    #[test]
    fn sub_byte_widths_are_lsb_first() {
        let mut b = [0u8; 2];
        set_entry(&mut b, 0, 0, 1);
        set_entry(&mut b, 3, 0, 1);
        assert_eq!(b[0], 0b1001);
        let mut b = [0u8; 2];
        set_entry(&mut b, 1, 1, 3);
        set_entry(&mut b, 2, 1, 1);
        assert_eq!(b[0], 0b0001_1100);
        let mut b = [0u8; 2];
        set_entry(&mut b, 1, 2, 0xa);
        set_entry(&mut b, 2, 2, 0x5);
        assert_eq!(b, [0xa0, 0x05]);
        // 16-bit and wider: big endian.
        let mut b = [0u8; 8];
        set_entry(&mut b, 1, 4, 0x1234);
        assert_eq!(&b[2..4], &[0x12, 0x34]);
        set_entry(&mut b, 0, 6, 0x0102_0304_0506_0708);
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(entry_bytes(3, 9, 0), (0, 2));
        assert_eq!(entry_bytes(2, 2, 4), (4, 6));
        assert_eq!(max_refcount(0), 1);
        assert_eq!(max_refcount(4), 65535);
    }
}
