//! Refcount rebuild for dirty images (lazy refcounts), as
//! `qemu-img check -r all` does it: count every reference reachable from
//! the header (cluster 0, L1 table, L2 tables, data and compressed
//! clusters), fix the COPIED flags of L1/L2 entries, write a fresh refcount
//! table and blocks past the end of the file, flush, and switch the header
//! to them with one write. The old refcount structures become free space.

use super::l2::{words_from_be, words_to_be, COMPRESSED, COPIED, OFFSET_MASK};
use super::refcount::{max_refcount, set_entry, MAX_TABLE_BYTES};
use super::{io, Geometry};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// Most clusters we count in memory (2 bytes each).
const MAX_CLUSTERS: u64 = 1 << 27;

struct Counter {
    counts: Vec<u16>,
    cluster_bits: u32,
}

impl Counter {
    fn add(&mut self, start: u64, len: u64, what: &str) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = start >> self.cluster_bits;
        let last = (start + len - 1) >> self.cluster_bits;
        if last >= self.counts.len() as u64 {
            return Err(Error::invalid(format!(
                "{what} at {start:#x} lies past the end of the file: cannot rebuild refcounts"
            )));
        }
        for c in first..=last {
            let v = &mut self.counts[c as usize];
            *v = v.checked_add(1).ok_or_else(|| {
                Error::invalid(format!("host cluster {c} is referenced too often"))
            })?;
        }
        Ok(())
    }
}

/// Rebuild the refcounts; returns the new refcount table's offset and size
/// in clusters (already written to the header).
pub fn rebuild(storage: &dyn Storage, geo: &Geometry) -> Result<(u64, u64)> {
    let cs = geo.cs();
    let file_len = storage.len().map_err(io("reading file size"))?;
    let nclusters = file_len.div_ceil(cs);
    if nclusters > MAX_CLUSTERS {
        return Err(Error::unsupported(
            "image too large to rebuild its refcounts here; use qemu-img check -r all",
        ));
    }
    let mut cnt = Counter {
        counts: vec![0u16; nclusters as usize],
        cluster_bits: geo.cluster_bits,
    };
    cnt.add(0, cs, "header")?;
    let l1_bytes = geo.l1_size * 8;
    cnt.add(geo.l1_offset, l1_bytes, "L1 table")?;
    let mut l1buf = vec![0u8; l1_bytes as usize];
    storage
        .read_at(&mut l1buf, geo.l1_offset)
        .map_err(io("reading the L1 table"))?;
    let mut l1 = words_from_be(&l1buf);
    let w = geo.words();
    let mut tables = Vec::new();
    for (i, &e) in l1.iter().enumerate() {
        let off = e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) {
            return Err(Error::invalid(format!("L1 entry {i} is unaligned")));
        }
        cnt.add(off, cs, "L2 table")?;
        let mut buf = vec![0u8; cs as usize];
        storage
            .read_at(&mut buf, off)
            .map_err(io("reading an L2 table"))?;
        let t = words_from_be(&buf);
        for k in (0..t.len()).step_by(w) {
            let e = t[k];
            if e & COMPRESSED != 0 {
                let (s, n) = geo.clayout.host_range(e);
                cnt.add(s, n, "compressed cluster")?;
            } else if e & OFFSET_MASK != 0 {
                if !(e & OFFSET_MASK).is_multiple_of(cs) {
                    return Err(Error::invalid(format!(
                        "unaligned data cluster offset {:#x}",
                        e & OFFSET_MASK
                    )));
                }
                cnt.add(e & OFFSET_MASK, cs, "data cluster")?;
            }
        }
        tables.push((i, off, t));
    }
    // Fix COPIED flags.
    for (i, off, mut t) in tables {
        let mut changed = false;
        for k in (0..t.len()).step_by(w) {
            let e = t[k];
            let want = if e & COMPRESSED != 0 || e & OFFSET_MASK == 0 {
                e & !COPIED
            } else if cnt.counts[((e & OFFSET_MASK) / cs) as usize] == 1 {
                e | COPIED
            } else {
                e & !COPIED
            };
            if want != e {
                t[k] = want;
                changed = true;
            }
        }
        if changed {
            storage
                .write_at(&words_to_be(&t), off)
                .map_err(io("writing an L2 table"))?;
        }
        let want = if cnt.counts[(off / cs) as usize] == 1 {
            l1[i] | COPIED
        } else {
            l1[i] & !COPIED
        };
        if want != l1[i] {
            l1[i] = want;
            storage
                .write_at(&want.to_be_bytes(), geo.l1_offset + i as u64 * 8)
                .map_err(io("writing the L1 table"))?;
        }
    }
    // Lay out the new table (t clusters) and blocks (k clusters) at the end.
    let eb = geo.cluster_bits + 3 - geo.refcount_order;
    let e = 1u64 << eb;
    let n = nclusters;
    let (mut k, mut t) = (0u64, 0u64);
    let mut needed: Vec<u64>;
    loop {
        let total = n + k + t;
        let nidx = total.div_ceil(e);
        needed = (0..nidx)
            .filter(|&idx| {
                let (a, b) = (idx * e, ((idx + 1) * e).min(total));
                b > n || cnt.counts[a as usize..b as usize].iter().any(|&c| c != 0)
            })
            .collect();
        let nt = (nidx * 8).div_ceil(cs).max(1);
        if needed.len() as u64 == k && nt == t {
            break;
        }
        k = needed.len() as u64;
        t = nt;
    }
    if t * cs > MAX_TABLE_BYTES {
        return Err(Error::unsupported(
            "rebuilt refcount table would exceed 8 MiB",
        ));
    }
    cnt.counts.resize((n + t + k) as usize, 1);
    let table_off = n * cs;
    let mut table = vec![0u64; (t * cs / 8) as usize];
    let max = max_refcount(geo.refcount_order);
    for (j, &idx) in needed.iter().enumerate() {
        let block_off = (n + t + j as u64) * cs;
        table[idx as usize] = block_off;
        let mut block = vec![0u8; cs as usize];
        let a = idx * e;
        let b = ((idx + 1) * e).min(cnt.counts.len() as u64);
        for c in a..b {
            let v = cnt.counts[c as usize] as u64;
            if v > max {
                return Err(Error::invalid(format!(
                    "host cluster {c} has {v} references, more than {}-bit refcounts hold",
                    1u32 << geo.refcount_order
                )));
            }
            set_entry(&mut block, c - a, geo.refcount_order, v);
        }
        storage
            .write_at(&block, block_off)
            .map_err(io("writing a refcount block"))?;
    }
    super::refcount::install_table(storage, &table, table_off, t)?;
    Ok((table_off, t))
}
