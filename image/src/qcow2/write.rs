//! Allocating writes (`prepare_write` / `commit_write`) and zeroing.
//!
//! `prepare` maps a granule-aligned guest range: allocated data in place,
//! everything else into new host clusters (one contiguous allocation per
//! run of consecutive clusters, refcounts written at once) or, with
//! extended L2, into the host cluster an allocated cluster already has.
//! `commit` flushes pending refcount writes, then links the runs into the
//! L2 tables (allocating L2 tables where needed, each written and flushed
//! before its L1 entry), writing each touched L2 table span once, and only
//! then (after another flush) drops the references of replaced compressed
//! or preallocated clusters.

use std::collections::BTreeMap;

use super::l2::{self, Kind, ALL_ALLOC, ALL_ZERO, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use super::{io, lock, Mapping, Pending, Qcow2};
use crate::driver::HostRun;
use crate::error::{Error, Result};

/// One L2 entry to write: guest cluster index, entry, bitmap.
type Update = (u64, u64, u64);

/// The L2 entries `(entry, bitmap)` of a range's clusters and their plans.
type RangePlan = (Vec<(u64, u64)>, Vec<Plan>);

/// How `prepare` maps one guest cluster.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// Allocated data written in place (standard L2).
    InPlace(u64),
    /// A preallocated zero cluster reused in place (standard L2).
    Reuse(u64),
    /// An allocated cluster with subclusters (extended L2).
    Sub(u64),
    /// Needs a new host cluster (filled in once allocated).
    New(u64),
}

impl Qcow2 {
    fn check_aligned(&self, offset: u64, len: u64, what: &str) -> Result<()> {
        let g = 1u64 << self.geo.granule_bits;
        let end = offset.checked_add(len);
        if len == 0
            || !offset.is_multiple_of(g)
            || end.is_none_or(|e| e > self.geo.size || (!e.is_multiple_of(g) && e != self.geo.size))
        {
            return Err(Error::invalid_argument(format!(
                "{what} range {offset}+{len} is not aligned to {g} bytes or lies outside the image"
            )));
        }
        Ok(())
    }

    /// The subcluster mask of guest range `[ps, pe)` within the cluster at
    /// `cstart`; a range reaching the virtual end covers the rest.
    fn piece_mask(&self, cstart: u64, ps: u64, pe: u64) -> u64 {
        let gb = self.geo.granule_bits;
        let first = ((ps - cstart) >> gb) as u32;
        let last = if pe >= self.geo.size {
            l2::SUBCLUSTERS
        } else {
            ((pe - cstart).div_ceil(1 << gb)) as u32
        };
        l2::sub_mask(first, last - first)
    }

    /// [`crate::Driver::prepare_write`].
    pub(super) fn prepare(&self, offset: u64, len: u64) -> Result<Vec<HostRun>> {
        self.prepare_many(&[(offset, len)])
    }

    /// How `prepare` maps each guest cluster of `[offset, offset + len)`
    /// (new clusters still without a host offset), with the L2 entries.
    fn plan_range(&self, offset: u64, len: u64) -> Result<RangePlan> {
        let g = self.geo;
        let first = offset >> g.cluster_bits;
        let last = (offset + len - 1) >> g.cluster_bits;
        let entries = self.read_entries(first, last - first + 1)?;
        let mut plans = Vec::with_capacity(entries.len());
        for (k, &(e, _)) in entries.iter().enumerate() {
            let cstart = (first + k as u64) << g.cluster_bits;
            let plan = if g.extended {
                if e & COMPRESSED == 0 && e & OFFSET_MASK != 0 {
                    Plan::Sub(self.check_host(e & OFFSET_MASK, cstart)?)
                } else {
                    Plan::New(0)
                }
            } else {
                match l2::classify(e) {
                    Kind::Normal(h) => Plan::InPlace(self.check_host(h, cstart)?),
                    Kind::ZeroAlloc(h) if e & COPIED != 0 => {
                        Plan::Reuse(self.check_host(h, cstart)?)
                    }
                    _ => Plan::New(0),
                }
            };
            plans.push(plan);
        }
        Ok((entries, plans))
    }

    /// [`crate::Driver::prepare_write_many`]: the new clusters of all the
    /// ranges come from one allocation, handed out in the order of the
    /// ranges (one refcount update; host space contiguous across ranges).
    pub(super) fn prepare_many(&self, ranges: &[(u64, u64)]) -> Result<Vec<HostRun>> {
        self.require_writable()?;
        for &(offset, len) in ranges {
            self.check_aligned(offset, len, "write")?;
        }
        let g = self.geo;
        let cs = g.cs();
        // Prepares are serialised (lock order: pending, map, alloc), so that
        // writers into different subclusters of one cluster agree on its
        // host cluster.
        let mut pend = lock(&self.pending);
        let mut planned = Vec::with_capacity(ranges.len());
        for &(offset, len) in ranges {
            planned.push(self.plan_range(offset, len)?);
        }
        // One new host cluster per new guest cluster, except that with
        // subclusters a cluster already pending (or claimed by an earlier
        // range of this call) is shared.
        let mut claimed = std::collections::HashSet::new();
        let mut need = 0u64;
        for (&(offset, _), (_, plans)) in ranges.iter().zip(&planned) {
            let first = offset >> g.cluster_bits;
            for (k, p) in plans.iter().enumerate() {
                let ci = first + k as u64;
                let shared = g.extended && (pend.contains_key(&ci) || !claimed.insert(ci));
                if matches!(p, Plan::New(_)) && !shared {
                    need += 1;
                }
            }
        }
        let extents = if need > 0 {
            self.alloc_clusters(need)?
        } else {
            Vec::new()
        };
        let mut hosts = extents
            .iter()
            .flat_map(|&(off, n)| (0..n).map(move |x| off + x * cs));
        for (&(offset, len), (entries, plans)) in ranges.iter().zip(planned.iter_mut()) {
            let first = offset >> g.cluster_bits;
            let end = offset + len;
            for k in 0..plans.len() {
                if !matches!(plans[k], Plan::New(_)) {
                    continue;
                }
                let ci = first + k as u64;
                if g.extended {
                    if let Some(p) = pend.get_mut(&ci) {
                        p.users += 1;
                        plans[k] = Plan::New(p.host);
                        continue;
                    }
                }
                let host = hosts.next().ok_or_else(|| {
                    Error::invalid("the allocator returned fewer clusters than asked for")
                })?;
                plans[k] = Plan::New(host);
                let cstart = ci << g.cluster_bits;
                let (ps, pe) = (offset.max(cstart), end.min(cstart + cs));
                let mut extra = 0;
                let (e, _) = entries[k];
                if g.extended && e & COMPRESSED != 0 {
                    let keep = !self.piece_mask(cstart, ps, pe) & ALL_ALLOC;
                    if keep != 0 {
                        self.fill_from_compressed(ci, e, host, keep)?;
                        extra = keep;
                    }
                }
                pend.insert(
                    ci,
                    Pending {
                        host,
                        users: 1,
                        extra,
                    },
                );
            }
        }
        drop(pend);
        // Build the runs.
        let mut runs: Vec<HostRun> = Vec::new();
        let mut add = |guest: u64, host: u64, len: u64, fresh: bool| {
            if let Some(r) = runs.last_mut() {
                if r.fresh == fresh && r.guest + r.len == guest && r.host + r.len == host {
                    r.len += len;
                    return;
                }
            }
            runs.push(HostRun {
                guest,
                host,
                len,
                fresh,
            });
        };
        for (&(offset, len), (entries, plans)) in ranges.iter().zip(&planned) {
            let first = offset >> g.cluster_bits;
            let end = offset + len;
            for (k, plan) in plans.iter().enumerate() {
                let ci = first + k as u64;
                let cstart = ci << g.cluster_bits;
                let (ps, pe) = (offset.max(cstart), end.min(cstart + cs));
                match *plan {
                    Plan::InPlace(h) => add(ps, h + (ps - cstart), pe - ps, false),
                    Plan::Reuse(h) | Plan::New(h) => add(ps, h + (ps - cstart), pe - ps, true),
                    Plan::Sub(h) => {
                        let (e, bm) = entries[k];
                        let mut pos = ps;
                        while pos < pe {
                            let sc = ((pos - cstart) >> g.granule_bits) as u32;
                            let send = (cstart + ((sc as u64 + 1) << g.granule_bits)).min(pe);
                            let fresh = !matches!(l2::classify_sub(e, bm, sc)?, Kind::Normal(_));
                            add(pos, h + (pos - cstart), send - pos, fresh);
                            pos = send;
                        }
                    }
                }
            }
        }
        Ok(runs)
    }

    /// Write the decompressed subclusters `keep` of compressed guest
    /// cluster `ci` into the new host cluster `host`.
    fn fill_from_compressed(&self, ci: u64, e: u64, host: u64, keep: u64) -> Result<()> {
        let g = self.geo;
        let mut data = vec![0u8; g.cs() as usize];
        self.decompress_cluster(ci, e, &mut data)?;
        let sc = 1usize << g.granule_bits;
        let mut i = 0;
        while i < 32 {
            if keep >> i & 1 == 0 {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < 32 && keep >> j & 1 != 0 {
                j += 1;
            }
            self.storage
                .write_at(&data[i * sc..j * sc], host + (i * sc) as u64)
                .map_err(io("writing decompressed data"))?;
            i = j;
        }
        Ok(())
    }

    /// The host byte ranges whose references an entry holds.
    fn entry_refs(&self, e: u64) -> Option<(u64, u64)> {
        if e & COMPRESSED != 0 {
            Some(self.geo.clayout.host_range(e))
        } else if e & OFFSET_MASK != 0 {
            Some((e & OFFSET_MASK, self.geo.cs()))
        } else {
            None
        }
    }

    /// [`crate::Driver::commit_write`].
    pub(super) fn commit(&self, runs: &[HostRun]) -> Result<()> {
        let g = self.geo;
        let cs = g.cs();
        // Guest cluster -> (host cluster, subcluster mask).
        let mut clusters: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for r in runs.iter().filter(|r| r.fresh && r.len > 0) {
            self.require_writable()?;
            let mut pos = r.guest;
            let end = r.guest + r.len;
            while pos < end {
                let ci = pos >> g.cluster_bits;
                let cstart = ci << g.cluster_bits;
                let pe = end.min(cstart + cs);
                // Host offset of the cluster start.
                let hc = (r.host + (pos - r.guest)).checked_sub(pos - cstart);
                let hc = hc.filter(|h| h.is_multiple_of(cs)).ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "commit of run {:?} does not match a prepared write",
                        r
                    ))
                })?;
                let mask = if g.extended {
                    self.piece_mask(cstart, pos, pe)
                } else {
                    ALL_ALLOC
                };
                let slot = clusters.entry(ci).or_insert((hc, 0));
                if slot.0 != hc {
                    return Err(Error::invalid_argument(
                        "commit maps one guest cluster to two host clusters",
                    ));
                }
                slot.1 |= mask;
                pos = pe;
            }
        }
        if clusters.is_empty() {
            return Ok(());
        }
        self.sync_refcounts()?;
        let mut frees = Vec::new();
        {
            // Lock order: pending, map, alloc.
            let mut pend = lock(&self.pending);
            let first = *clusters.keys().next().unwrap_or(&0);
            let last = *clusters.keys().next_back().unwrap_or(&0);
            let cur = self.read_entries(first, last - first + 1)?;
            let mut m = lock(&self.map);
            let mut updates: Vec<Update> = Vec::with_capacity(clusters.len());
            for (&ci, &(hc, mask)) in &clusters {
                let (e, bm) = cur[(ci - first) as usize];
                let p = pend.get(&ci).copied().filter(|p| p.host == hc);
                let bad = || {
                    Error::invalid_argument(format!(
                        "commit for guest offset {:#x} does not match a prepared write",
                        ci << g.cluster_bits
                    ))
                };
                let off = e & OFFSET_MASK;
                let linking = e & COMPRESSED != 0 || off != hc;
                if linking {
                    let p = p.ok_or_else(bad)?;
                    if e & COMPRESSED == 0 && off != 0 && g.extended {
                        return Err(bad());
                    }
                    if let Some(r) = self.entry_refs(e) {
                        frees.push(r);
                    }
                    let nbm = if g.extended {
                        let base = if e & COMPRESSED != 0 {
                            0
                        } else {
                            bm & ALL_ZERO
                        };
                        let set = mask | p.extra;
                        (base | set) & !(set << 32)
                    } else {
                        0
                    };
                    updates.push((ci, hc | COPIED, nbm));
                } else if g.extended {
                    updates.push((ci, e, (bm | mask) & !(mask << 32)));
                } else {
                    // Reused preallocated zero cluster.
                    updates.push((ci, (e & !ZERO) | COPIED, 0));
                }
                if let Some(pp) = pend.get_mut(&ci) {
                    if pp.host == hc {
                        pp.users = pp.users.saturating_sub(1);
                        if pp.users == 0 {
                            pend.remove(&ci);
                        }
                    }
                }
            }
            drop(pend);
            self.apply_updates(&mut m, &updates, true)?;
        }
        self.free_ranges(&frees)
    }

    /// Write L2 entries, grouped per L2 table: each touched span of a table
    /// is written once. Missing L2 tables are allocated when `allocate` is
    /// set, otherwise updates falling into them are dropped.
    fn apply_updates(&self, m: &mut Mapping, updates: &[Update], allocate: bool) -> Result<()> {
        let g = self.geo;
        let w = g.words();
        let per = 1u64 << g.l2_bits;
        let mut i = 0;
        while i < updates.len() {
            let l1i = updates[i].0 >> g.l2_bits;
            let mut j = i;
            while j < updates.len() && updates[j].0 >> g.l2_bits == l1i {
                j += 1;
            }
            let group = &updates[i..j];
            i = j;
            let set = |t: &mut [u64]| -> (usize, usize) {
                let (mut lo, mut hi) = (usize::MAX, 0);
                for &(ci, e, bm) in group {
                    let k = ((ci & (per - 1)) as usize) * w;
                    t[k] = e;
                    if w == 2 {
                        t[k + 1] = bm;
                    }
                    lo = lo.min(k);
                    hi = hi.max(k + w);
                }
                (lo, hi)
            };
            match self.l2_offset(m, l1i)? {
                Some(off) => {
                    let t = self.load_l2(m, off)?;
                    let (lo, hi) = set(t);
                    let bytes = l2::words_to_be(&t[lo..hi]);
                    self.storage
                        .write_meta(&bytes, off + lo as u64 * 8)
                        .map_err(io("writing an L2 table"))?;
                }
                None if !allocate => {}
                None => {
                    let off = self.alloc_clusters(1)?[0].0;
                    let mut t = vec![0u64; (g.cs() / 8) as usize];
                    set(&mut t);
                    self.storage
                        .write_meta(&l2::words_to_be(&t), off)
                        .map_err(io("writing a new L2 table"))?;
                    self.sync_refcounts_with_flush()?;
                    m.tables.insert(off, t);
                    let entry = off | COPIED;
                    self.storage
                        .write_meta(&entry.to_be_bytes(), g.l1_offset + l1i * 8)
                        .map_err(io("writing the L1 table"))?;
                    m.l1[l1i as usize] = entry;
                }
            }
        }
        Ok(())
    }

    /// Flush unconditionally (new L2 table contents and their refcounts
    /// must be durable before the L1 entry is written).
    fn sync_refcounts_with_flush(&self) -> Result<()> {
        let gen = lock(&self.alloc).generation();
        self.storage.flush().map_err(io("flushing"))?;
        self.synced
            .fetch_max(gen, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    /// [`crate::Driver::zero_range`].
    pub(super) fn zero(&self, offset: u64, len: u64) -> Result<bool> {
        self.require_writable()?;
        self.check_aligned(offset, len, "zero")?;
        let g = self.geo;
        let cs = g.cs();
        let end = offset + len;
        let has_backing = lock(&self.header).header.backing.is_some();
        if g.version < 3 && has_backing {
            return Ok(false);
        }
        let first = offset >> g.cluster_bits;
        let last = (end - 1) >> g.cluster_bits;
        let n = last - first + 1;
        let mut entries = self.read_entries(first, n)?;
        if g.extended {
            // Partially zeroed compressed clusters first become ordinary
            // clusters (the zeroed part written as zero data).
            let mut converted = false;
            for (k, &(e, _)) in entries.iter().enumerate() {
                let cstart = (first + k as u64) << g.cluster_bits;
                let (ps, pe) = (offset.max(cstart), end.min(cstart + cs));
                if e & COMPRESSED != 0 && self.piece_mask(cstart, ps, pe) != ALL_ALLOC {
                    let runs = self.prepare(ps, pe - ps)?;
                    let zeros = vec![0u8; (pe - ps) as usize];
                    for r in &runs {
                        let s = (r.guest - ps) as usize;
                        self.storage
                            .write_at(&zeros[s..s + r.len as usize], r.host)
                            .map_err(io("writing zeros"))?;
                    }
                    self.commit(&runs)?;
                    converted = true;
                }
            }
            if converted {
                entries = self.read_entries(first, n)?;
            }
        }
        let mut updates: Vec<Update> = Vec::new();
        let mut frees = Vec::new();
        for (k, &(e, bm)) in entries.iter().enumerate() {
            let ci = first + k as u64;
            let cstart = ci << g.cluster_bits;
            let (ps, pe) = (offset.max(cstart), end.min(cstart + cs));
            let new = if g.version < 3 {
                // No zero flag: unallocate (reads as zeros without backing).
                if let Some(r) = self.entry_refs(e) {
                    frees.push(r);
                }
                (0, 0)
            } else if g.extended {
                let mask = self.piece_mask(cstart, ps, pe);
                if e & COMPRESSED != 0 {
                    frees.push(self.geo.clayout.host_range(e));
                    (0, ALL_ZERO)
                } else {
                    (e, (bm & !mask) | (mask << 32))
                }
            } else {
                match l2::classify(e) {
                    Kind::Normal(_) | Kind::ZeroAlloc(_) => {
                        ((e & (OFFSET_MASK | COPIED)) | ZERO, 0)
                    }
                    Kind::Compressed => {
                        frees.push(self.geo.clayout.host_range(e));
                        (ZERO, 0)
                    }
                    Kind::Unallocated | Kind::ZeroPlain => (ZERO, 0),
                }
            };
            if new != (e, bm) {
                updates.push((ci, new.0, new.1));
            }
        }
        {
            let mut m = lock(&self.map);
            self.apply_updates(&mut m, &updates, has_backing)?;
        }
        self.free_ranges(&frees)?;
        Ok(true)
    }
}
