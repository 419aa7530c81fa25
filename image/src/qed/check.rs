//! Consistency check and repair of an image marked `NEED_CHECK`.
//!
//! As in QEMU's QED check: every L2 table offset must be cluster-aligned,
//! past the header and leave room for the whole table before the end of the
//! file; every data cluster offset must be aligned, past the header and
//! before the end of the file (rounded down to a cluster). Invalid entries
//! are cleared (they can only come from writes cut short by a crash). No
//! cluster may be referenced twice (by the L1 table, L2 tables or data);
//! that cannot be repaired, and the image is then refused for writing.
//! Leaked clusters (allocated but unreferenced) are harmless and ignored.
//! When the check passes, `NEED_CHECK` is cleared after the repairs are
//! durable.

use super::header::{Geometry, F_NEED_CHECK};
use super::table;
use super::{lock, Qed};
use crate::error::{Error, Result};

/// Largest number of clusters the check tracks (a 128 MiB bitmap).
const MAX_CHECK_CLUSTERS: u64 = 1 << 30;

/// What a check found and fixed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CheckResult {
    /// Invalid table entries cleared.
    pub fixed: u64,
    /// Clusters referenced more than once.
    pub duplicates: u64,
}

/// One bit per cluster of the file: referenced or not.
struct Used {
    bits: Vec<u64>,
    clusters: u64,
}

impl Used {
    fn new(clusters: u64) -> Used {
        Used {
            bits: vec![0; clusters.div_ceil(64) as usize],
            clusters,
        }
    }

    /// Mark `n` clusters from `first` referenced; returns how many were
    /// referenced already.
    fn mark(&mut self, first: u64, n: u64) -> u64 {
        let mut dups = 0;
        for c in first..first + n {
            if c >= self.clusters {
                continue;
            }
            let (w, b) = ((c / 64) as usize, c % 64);
            if self.bits[w] & (1 << b) != 0 {
                dups += 1;
            }
            self.bits[w] |= 1 << b;
        }
        dups
    }
}

/// Check the tables of `q`, clearing invalid entries; then, if no cluster
/// is referenced twice, clear `NEED_CHECK`.
pub(crate) fn repair(q: &Qed) -> Result<CheckResult> {
    let geo: Geometry = q.geo;
    let file_len = q
        .storage
        .len()
        .map_err(|e| Error::io("reading file size", e))?;
    let file_size = geo.round_down(file_len);
    let clusters = file_size >> geo.cluster_bits;
    if clusters > MAX_CHECK_CLUSTERS {
        return Err(Error::unsupported(format!(
            "QED image needs a consistency check but its file of {file_len} bytes has too \
             many clusters to check; open it read-only"
        )));
    }
    let mut used = Used::new(clusters);
    used.mark(q.l1_offset >> geo.cluster_bits, geo.table_size);
    let mut result = CheckResult::default();
    {
        let mut tables = lock(&q.tables);
        tables.cache.clear();
        for i in 0..tables.l1.len() {
            let l2 = tables.l1[i];
            if l2 == 0 {
                continue;
            }
            if !geo.table_offset_valid(l2, file_size) {
                q.storage
                    .write_at(&0u64.to_le_bytes(), q.l1_offset + i as u64 * 8)
                    .map_err(|e| Error::io("repairing QED L1 table", e))?;
                tables.l1[i] = 0;
                result.fixed += 1;
                continue;
            }
            let dups = used.mark(l2 >> geo.cluster_bits, geo.table_size);
            if dups > 0 {
                result.duplicates += dups;
                continue;
            }
            for slice in 0..geo.entries / geo.slice_entries {
                let at = l2 + slice * geo.slice_entries * 8;
                let mut entries = table::read_entries(&*q.storage, at, geo.slice_entries)?;
                let mut dirty = false;
                for e in entries.iter_mut().filter(|e| **e > 1) {
                    if geo.data_offset_valid(*e, file_size) {
                        result.duplicates += used.mark(*e >> geo.cluster_bits, 1);
                    } else {
                        *e = 0;
                        dirty = true;
                        result.fixed += 1;
                    }
                }
                if dirty {
                    q.storage
                        .write_at(&table::encode_entries(&entries), at)
                        .map_err(|e| Error::io("repairing QED L2 table", e))?;
                }
            }
        }
    }
    if result.duplicates > 0 {
        return Err(Error::invalid(format!(
            "QED image is corrupt: {} cluster references overlap other tables or data; \
             it can only be opened read-only",
            result.duplicates
        )));
    }
    q.flush_storage()?;
    let mut meta = lock(&q.meta);
    let mut h = meta.header.clone();
    h.features &= !F_NEED_CHECK;
    q.write_header(&h)?;
    q.flush_storage()?;
    meta.header = h;
    meta.consistent = true;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_counts_duplicates_and_ignores_out_of_range() {
        let mut u = Used::new(100);
        assert_eq!(u.mark(10, 4), 0);
        assert_eq!(u.mark(12, 4), 2);
        assert_eq!(u.mark(99, 5), 0);
        assert_eq!(u.mark(99, 1), 1);
    }
}
