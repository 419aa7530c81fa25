//! Reading the mapping: L2 table loading, entry look-ups, block status
//! (walking L2 tables in bulk, skipping unallocated L1 entries whole) and
//! reading compressed clusters.

use super::l2::{self, Kind, OFFSET_MASK};
use super::{compressed, io, lock, Mapping, Qcow2};
use crate::driver::{Extent, Status};
use crate::error::{Error, Result};

/// Extend `acc` by `n` bytes of `st` if they merge; `false` ends the extent.
fn push(acc: &mut Option<(Status, u64)>, st: Status, n: u64) -> bool {
    let Some((a, len)) = acc else {
        *acc = Some((st, n));
        return true;
    };
    let merges = match (*a, st) {
        (Status::Data { host: h1 }, Status::Data { host: h2 }) => h2 == h1 + *len,
        (Status::Zero { host: Some(h1) }, Status::Zero { host: Some(h2) }) => h2 == h1 + *len,
        (Status::Zero { host: None }, Status::Zero { host: None }) => true,
        (Status::Compressed, Status::Compressed) => true,
        (Status::Unallocated { host: None }, Status::Unallocated { host: None }) => true,
        (Status::Unallocated { host: Some(h1) }, Status::Unallocated { host: Some(h2) }) => {
            h2 == h1 + *len
        }
        _ => false,
    };
    if merges {
        *len += n;
    }
    merges
}

impl Qcow2 {
    /// The L2 table offset of L1 entry `l1i`, validated; `None` if the
    /// entry is unallocated.
    pub(super) fn l2_offset(&self, m: &Mapping, l1i: u64) -> Result<Option<u64>> {
        let e = *m.l1.get(l1i as usize).ok_or_else(|| {
            Error::invalid(format!("guest offset beyond the L1 table (index {l1i})"))
        })?;
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.geo.cs()) || off >= self.limit() {
            return Err(Error::invalid(format!(
                "L1 entry {l1i} points to an invalid L2 table offset {off:#x} (unaligned or outside the file)"
            )));
        }
        Ok(Some(off))
    }

    /// The L2 table at `off`, through the cache.
    pub(super) fn load_l2<'a>(&self, m: &'a mut Mapping, off: u64) -> Result<&'a mut Vec<u64>> {
        if !m.tables.contains(off) {
            let mut buf = vec![0u8; self.geo.cs() as usize];
            self.storage
                .read_meta(&mut buf, off)
                .map_err(io("reading an L2 table"))?;
            m.tables.insert(off, l2::words_from_be(&buf));
        }
        m.tables
            .get_mut(off)
            .ok_or_else(|| Error::invalid("L2 cache lost a table"))
    }

    /// The `(entry, bitmap)` of guest clusters `[first, first + n)`
    /// (zeros where no L2 table exists).
    pub(super) fn read_entries(&self, first: u64, n: u64) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::with_capacity(n as usize);
        let mut m = lock(&self.map);
        let per = 1u64 << self.geo.l2_bits;
        let w = self.geo.words();
        let mut ci = first;
        while ci < first + n {
            let l1i = ci >> self.geo.l2_bits;
            let stop = (first + n).min((l1i + 1) * per);
            match self.l2_offset(&m, l1i)? {
                None => out.extend((ci..stop).map(|_| (0, 0))),
                Some(off) => {
                    let t = self.load_l2(&mut m, off)?;
                    for c in ci..stop {
                        let i = ((c & (per - 1)) as usize) * w;
                        out.push((t[i], if w == 2 { t[i + 1] } else { 0 }));
                    }
                }
            }
            ci = stop;
        }
        Ok(out)
    }

    /// Check a host cluster offset taken from an L2 entry.
    pub(super) fn check_host(&self, host: u64, guest: u64) -> Result<u64> {
        if !host.is_multiple_of(self.geo.cs()) || host >= self.limit() {
            return Err(Error::invalid(format!(
                "L2 entry for guest offset {guest:#x} points to host offset {host:#x}, unaligned or outside the image file"
            )));
        }
        Ok(host)
    }

    /// The status of guest byte `pos` of a cluster starting at `cstart`.
    fn status_of(&self, kind: Kind, cstart: u64, pos: u64) -> Result<Status> {
        Ok(match kind {
            Kind::Unallocated => Status::Unallocated { host: None },
            Kind::ZeroPlain => Status::Zero { host: None },
            Kind::ZeroAlloc(h) => Status::Zero {
                host: Some(self.check_host(h, cstart)? + (pos - cstart)),
            },
            Kind::Normal(h) => Status::Data {
                host: self.check_host(h, cstart)? + (pos - cstart),
            },
            Kind::Compressed => Status::Compressed,
        })
    }

    /// [`crate::Driver::block_status`].
    pub(super) fn map_extent(&self, offset: u64, len: u64) -> Result<Extent> {
        let g = self.geo;
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > g.size) {
            return Err(Error::invalid_argument(format!(
                "block status at {offset}+{len} outside the image ({} bytes)",
                g.size
            )));
        }
        let end = offset + len;
        let cs = g.cs();
        let w = g.words();
        let per = 1u64 << g.l2_bits;
        let mut acc = None;
        let mut pos = offset;
        let mut m = lock(&self.map);
        'outer: while pos < end {
            let l1i = pos >> g.l1_shift();
            let l1_end = ((l1i + 1) << g.l1_shift()).min(end);
            let Some(off) = self.l2_offset(&m, l1i)? else {
                if !push(&mut acc, Status::Unallocated { host: None }, l1_end - pos) {
                    break;
                }
                pos = l1_end;
                continue;
            };
            let table = self.load_l2(&mut m, off)?;
            while pos < l1_end {
                let ci = pos >> g.cluster_bits;
                let cstart = ci << g.cluster_bits;
                let cend = (cstart + cs).min(l1_end);
                let i = ((ci & (per - 1)) as usize) * w;
                let e = table[i];
                if !g.extended {
                    let st = self.status_of(l2::classify(e), cstart, pos)?;
                    if !push(&mut acc, st, cend - pos) {
                        break 'outer;
                    }
                    pos = cend;
                } else {
                    let bm = table[i + 1];
                    while pos < cend {
                        let sc = ((pos - cstart) >> g.granule_bits) as u32;
                        let send = (cstart + ((sc as u64 + 1) << g.granule_bits)).min(cend);
                        let kind = l2::classify_sub(e, bm, sc).map_err(|e| {
                            Error::invalid(format!("guest offset {pos:#x}: {}", e.message()))
                        })?;
                        let mut st = self.status_of(kind, cstart, pos)?;
                        let host = e & OFFSET_MASK;
                        if kind == Kind::Unallocated && host != 0 {
                            // Unallocated subcluster of an allocated cluster:
                            // qemu-img map shows the reserved host offset.
                            st = Status::Unallocated {
                                host: Some(self.check_host(host, cstart)? + (pos - cstart)),
                            };
                        }
                        if !push(&mut acc, st, send - pos) {
                            break 'outer;
                        }
                        pos = send;
                    }
                }
            }
        }
        let (status, n) = acc.ok_or_else(|| Error::invalid("empty block status"))?;
        Ok(Extent {
            offset,
            len: n,
            status,
        })
    }

    /// Decompress guest cluster `ci` (whose entry is `e`) into `out`.
    pub(super) fn decompress_cluster(&self, ci: u64, e: u64, out: &mut [u8]) -> Result<()> {
        let (coff, clen) = self.geo.clayout.parse(e);
        if coff >= self.limit() {
            return Err(Error::invalid(format!(
                "compressed cluster for guest offset {:#x} points outside the file",
                ci << self.geo.cluster_bits
            )));
        }
        let mut input = vec![0u8; clen as usize];
        self.storage
            .read_at(&mut input, coff)
            .map_err(io("reading compressed data"))?;
        compressed::decompress(self.geo.compression, &input, out).map_err(|err| {
            Error::invalid(format!(
                "guest offset {:#x}: {}",
                ci << self.geo.cluster_bits,
                err.message()
            ))
        })
    }

    /// [`crate::Driver::read_compressed`].
    pub(super) fn read_compressed_range(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let g = self.geo;
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= g.size)
            .ok_or_else(|| {
                Error::invalid_argument("compressed read beyond the end of the image")
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        let first = offset >> g.cluster_bits;
        let last = (end - 1) >> g.cluster_bits;
        let entries = self.read_entries(first, last - first + 1)?;
        let mut cluster = vec![0u8; g.cs() as usize];
        for (k, &(e, _)) in entries.iter().enumerate() {
            let ci = first + k as u64;
            let cstart = ci << g.cluster_bits;
            if l2::classify(e) != Kind::Compressed {
                return Err(Error::invalid_argument(format!(
                    "guest offset {cstart:#x} is not a compressed cluster"
                )));
            }
            self.decompress_cluster(ci, e, &mut cluster)?;
            let a = offset.max(cstart);
            let b = end.min(cstart + g.cs());
            buf[(a - offset) as usize..(b - offset) as usize]
                .copy_from_slice(&cluster[(a - cstart) as usize..(b - cstart) as usize]);
        }
        Ok(())
    }
}
