//! The in-memory L1 table and a bounded cache of L2 table slices.
//!
//! L2 tables can be large (up to 16 clusters of 64 MiB), so they are cached
//! in slices of at most 64 KiB; the cache holds a bounded number of slices
//! and evicts the least recently used. The cache is write-through: every
//! change is written to the file by the caller while it holds the table
//! lock, so cached slices never differ from the file.

use std::collections::{BTreeMap, HashMap};

use super::header::Geometry;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// Upper bound on the memory of the L2 cache.
const CACHE_BYTES: u64 = 16 << 20;

/// Decode little-endian table entries.
pub(crate) fn decode_entries(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect()
}

/// Encode table entries as little-endian bytes.
pub(crate) fn encode_entries(entries: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        out.extend_from_slice(&e.to_le_bytes());
    }
    out
}

/// Read `n` table entries at byte offset `at` of `storage`.
pub(crate) fn read_entries(storage: &dyn Storage, at: u64, n: u64) -> Result<Vec<u64>> {
    let len = usize::try_from(n * 8)
        .map_err(|_| Error::invalid(format!("table of {n} entries is too large")))?;
    let mut buf = vec![0u8; len];
    storage
        .read_meta(&mut buf, at)
        .map_err(|e| Error::io(format!("reading QED table at 0x{at:x}"), e))?;
    Ok(decode_entries(&buf))
}

/// A cached slice of an L2 table.
#[derive(Debug)]
struct Slice {
    entries: Vec<u64>,
    stamp: u64,
}

/// A bounded LRU cache of L2 table slices, keyed by
/// (table offset, slice index).
#[derive(Debug)]
pub(crate) struct L2Cache {
    slices: HashMap<(u64, u64), Slice>,
    lru: BTreeMap<u64, (u64, u64)>,
    clock: u64,
    capacity: usize,
}

impl L2Cache {
    /// An empty cache sized for `geo`'s slices.
    pub fn new(geo: &Geometry) -> L2Cache {
        let slice_bytes = geo.slice_entries * 8;
        L2Cache {
            slices: HashMap::new(),
            lru: BTreeMap::new(),
            clock: 0,
            capacity: (CACHE_BYTES / slice_bytes).max(8) as usize,
        }
    }

    /// Number of cached slices.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slices.len()
    }

    fn touch(&mut self, key: (u64, u64)) {
        self.clock += 1;
        let stamp = self.clock;
        if let Some(s) = self.slices.get_mut(&key) {
            self.lru.remove(&s.stamp);
            s.stamp = stamp;
            self.lru.insert(stamp, key);
        }
    }

    /// Insert (or replace) a slice, evicting the least recently used ones
    /// beyond the capacity.
    pub fn insert(&mut self, table: u64, slice: u64, entries: Vec<u64>) {
        let key = (table, slice);
        if let Some(old) = self.slices.remove(&key) {
            self.lru.remove(&old.stamp);
        }
        while self.slices.len() >= self.capacity {
            let Some((_, victim)) = self.lru.pop_first() else {
                break;
            };
            self.slices.remove(&victim);
        }
        self.clock += 1;
        self.lru.insert(self.clock, key);
        self.slices.insert(
            key,
            Slice {
                entries,
                stamp: self.clock,
            },
        );
    }

    /// The cached slice `slice` of the table at `table`, read from
    /// `storage` on a miss. The table offset must have been validated.
    pub fn get(
        &mut self,
        storage: &dyn Storage,
        geo: &Geometry,
        table: u64,
        slice: u64,
    ) -> Result<&mut Vec<u64>> {
        let key = (table, slice);
        if self.slices.contains_key(&key) {
            self.touch(key);
        } else {
            let at = table + slice * geo.slice_entries * 8;
            let entries = read_entries(storage, at, geo.slice_entries)?;
            self.insert(table, slice, entries);
        }
        match self.slices.get_mut(&key) {
            Some(s) => Ok(&mut s.entries),
            None => Err(Error::invalid("L2 cache lost a slice it just loaded")),
        }
    }

    /// Forget every slice of the table at `table` (after a failed write).
    pub fn forget_table(&mut self, table: u64) {
        let keys: Vec<(u64, u64)> = self
            .slices
            .keys()
            .filter(|k| k.0 == table)
            .copied()
            .collect();
        for k in keys {
            if let Some(s) = self.slices.remove(&k) {
                self.lru.remove(&s.stamp);
            }
        }
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.slices.clear();
        self.lru.clear();
    }
}

/// The L1 table (the part that maps the image) and the L2 cache, guarded
/// together by one mutex.
#[derive(Debug)]
pub(crate) struct Tables {
    /// L1 entries covering the virtual size.
    pub l1: Vec<u64>,
    /// Cached L2 slices.
    pub cache: L2Cache,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let e = vec![0, 1, 0x1234_5678_9abc_def0, u64::MAX];
        assert_eq!(decode_entries(&encode_entries(&e)), e);
    }

    #[test]
    fn cache_is_bounded_and_lru() {
        let geo = Geometry::new(4096, 1).unwrap();
        let mut c = L2Cache::new(&geo);
        let cap = c.capacity;
        for i in 0..(cap as u64 + 10) {
            c.insert(i * 4096, 0, vec![i; 4]);
        }
        assert_eq!(c.len(), cap);
        // The oldest ten were evicted.
        assert!(!c.slices.contains_key(&(0, 0)));
        assert!(c.slices.contains_key(&(10 * 4096, 0)));
        // Touching keeps an entry alive across further inserts.
        c.touch((10 * 4096, 0));
        c.insert(1 << 40, 0, vec![]);
        assert!(c.slices.contains_key(&(10 * 4096, 0)));
        assert!(!c.slices.contains_key(&(11 * 4096, 0)));
        c.forget_table(10 * 4096);
        assert!(!c.slices.contains_key(&(10 * 4096, 0)));
        assert_eq!(c.lru.len(), c.slices.len());
    }
}
