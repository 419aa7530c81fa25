//! A small bounded least-recently-used cache of metadata tables (L2 tables,
//! refcount blocks), keyed by host offset. Caches are write-through: every
//! change is written to storage by the owner when made, so evicting is free.

use std::collections::HashMap;

/// A bounded LRU map from host offset to a loaded table.
#[derive(Debug)]
pub struct TableCache<T> {
    capacity: usize,
    tick: u64,
    map: HashMap<u64, (u64, T)>,
}

impl<T> TableCache<T> {
    /// A cache holding at most `capacity` tables (at least 1).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            capacity: capacity.max(1),
            tick: 0,
            map: HashMap::new(),
        }
    }

    /// A cache sized for tables of `table_bytes` within `budget` bytes,
    /// holding between `min` and `max` tables.
    pub fn with_budget(table_bytes: u64, budget: u64, min: usize, max: usize) -> Self {
        let n = (budget / table_bytes.max(1)) as usize;
        Self::new(n.clamp(min, max))
    }

    /// The table at `offset`, if cached (marks it recently used).
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut T> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(&offset).map(|(t, v)| {
            *t = tick;
            v
        })
    }

    /// Whether `offset` is cached.
    pub fn contains(&self, offset: u64) -> bool {
        self.map.contains_key(&offset)
    }

    /// Insert a table, evicting the least recently used one if full.
    pub fn insert(&mut self, offset: u64, table: T) -> &mut T {
        if !self.map.contains_key(&offset) && self.map.len() >= self.capacity {
            if let Some(victim) = self
                .map
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| *k)
            {
                self.map.remove(&victim);
            }
        }
        self.tick += 1;
        let tick = self.tick;
        self.map.insert(offset, (tick, table));
        match self.map.get_mut(&offset) {
            Some(slot) => &mut slot.1,
            None => unreachable!("entry inserted just above"),
        }
    }

    /// Drop a table (after its cluster is freed or moved).
    pub fn remove(&mut self, offset: u64) {
        self.map.remove(&offset);
    }

    /// Drop everything.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Number of cached tables.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut c = TableCache::new(2);
        c.insert(1, "a");
        c.insert(2, "b");
        assert!(c.get_mut(1).is_some());
        c.insert(3, "c");
        assert!(c.contains(1) && c.contains(3) && !c.contains(2));
        assert_eq!(c.len(), 2);
        c.remove(1);
        assert!(!c.contains(1));
        assert_eq!(
            TableCache::<()>::with_budget(1 << 21, 8 << 20, 8, 4096).capacity,
            8
        );
        assert_eq!(
            TableCache::<()>::with_budget(512, 8 << 20, 8, 4096).capacity,
            4096
        );
    }
}
