//! L1/L2 entry encodings: standard and extended (subcluster) L2 entries,
//! compressed-cluster descriptors, and what a guest cluster or subcluster
//! is according to them.

use crate::error::{Error, Result};

/// Bit 63 of L1/L2 entries: the refcount of the referenced cluster is 1.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (v3, no extended L2): reads as zeros.
pub const ZERO: u64 = 1;
/// Host offset bits 9–55 of L1 entries and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Number of subclusters of a cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
/// All 32 allocation bits of an extended L2 bitmap.
pub const ALL_ALLOC: u64 = 0xffff_ffff;
/// All 32 zero bits of an extended L2 bitmap.
pub const ALL_ZERO: u64 = 0xffff_ffff << 32;

/// What one guest cluster (or, with extended L2, subcluster) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Not allocated: reads from the backing file.
    Unallocated,
    /// Reads as zeros, no host cluster.
    ZeroPlain,
    /// Reads as zeros, host cluster preallocated at this offset.
    ZeroAlloc(u64),
    /// Data at this host cluster offset.
    Normal(u64),
    /// A compressed cluster.
    Compressed,
}

/// Classify a standard L2 entry (no extended L2).
pub fn classify(entry: u64) -> Kind {
    let off = entry & OFFSET_MASK;
    if entry & COMPRESSED != 0 {
        Kind::Compressed
    } else if entry & ZERO != 0 {
        if off != 0 {
            Kind::ZeroAlloc(off)
        } else {
            Kind::ZeroPlain
        }
    } else if off == 0 {
        Kind::Unallocated
    } else {
        Kind::Normal(off)
    }
}

/// Classify subcluster `sc` of an extended L2 entry `(entry, bitmap)`.
/// An allocated subcluster of a cluster without host offset, or a
/// subcluster both allocated and zero, is an error (QEMU calls these
/// invalid and marks the image corrupt).
pub fn classify_sub(entry: u64, bitmap: u64, sc: u32) -> Result<Kind> {
    if entry & COMPRESSED != 0 {
        return Ok(Kind::Compressed);
    }
    let off = entry & OFFSET_MASK;
    let alloc = bitmap & ALL_ALLOC;
    let zero = bitmap >> 32;
    if off != 0 {
        if alloc & zero != 0 {
            return Err(invalid_bitmap(entry, bitmap));
        }
        Ok(if zero >> sc & 1 != 0 {
            Kind::ZeroAlloc(off)
        } else if alloc >> sc & 1 != 0 {
            Kind::Normal(off)
        } else {
            Kind::Unallocated
        })
    } else {
        if alloc != 0 {
            return Err(invalid_bitmap(entry, bitmap));
        }
        Ok(if zero >> sc & 1 != 0 {
            Kind::ZeroPlain
        } else {
            Kind::Unallocated
        })
    }
}

fn invalid_bitmap(entry: u64, bitmap: u64) -> Error {
    Error::invalid(format!(
        "invalid extended L2 entry {entry:#018x} with subcluster bitmap {bitmap:#018x}"
    ))
}

/// The bitmap mask of subclusters `[first, first + n)`.
pub fn sub_mask(first: u32, n: u32) -> u64 {
    if n == 0 {
        return 0;
    }
    let ones = if n >= 32 { ALL_ALLOC } else { (1u64 << n) - 1 };
    (ones << first) & ALL_ALLOC
}

/// Geometry of compressed-cluster descriptors for a cluster size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedLayout {
    /// Bit position of the sector-count field.
    pub csize_shift: u32,
    /// Mask of the sector-count field (after shifting).
    pub csize_mask: u64,
    /// Mask of the host offset field.
    pub offset_mask: u64,
}

impl CompressedLayout {
    /// The layout for clusters of `1 << cluster_bits` bytes.
    pub fn new(cluster_bits: u32) -> Self {
        let csize_shift = 62 - (cluster_bits - 8);
        CompressedLayout {
            csize_shift,
            csize_mask: (1u64 << (cluster_bits - 8)) - 1,
            offset_mask: (1u64 << csize_shift) - 1,
        }
    }

    /// Host byte offset and byte length of the compressed data.
    pub fn parse(&self, entry: u64) -> (u64, u64) {
        let off = entry & self.offset_mask;
        let sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1;
        (off, sectors * 512 - (off & 511))
    }

    /// The 512-byte-aligned host range `(start, len)` whose clusters hold
    /// refcounts for this compressed cluster.
    pub fn host_range(&self, entry: u64) -> (u64, u64) {
        let off = entry & self.offset_mask;
        let sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1;
        (off & !511, sectors * 512)
    }

    /// Encode a descriptor (used by tests).
    #[cfg(test)]
    pub fn encode(&self, off: u64, len: u64) -> u64 {
        let sectors = (off + len - 1) / 512 - off / 512;
        COMPRESSED | (sectors << self.csize_shift) | off
    }
}

/// Decode big-endian 64-bit words.
pub fn words_from_be(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// Encode words big-endian.
pub fn words_to_be(words: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 8);
    for w in words {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_entries() {
        assert_eq!(classify(0), Kind::Unallocated);
        assert_eq!(classify(ZERO), Kind::ZeroPlain);
        assert_eq!(classify(COPIED | 0x50000 | ZERO), Kind::ZeroAlloc(0x50000));
        assert_eq!(classify(COPIED | 0x50000), Kind::Normal(0x50000));
        assert_eq!(classify(COMPRESSED | 0x1234), Kind::Compressed);
    }

    #[test]
    fn extended_bitmaps() {
        let e = COPIED | 0x70000;
        let bm = 0b0101 | (0b1000u64 << 32);
        assert_eq!(classify_sub(e, bm, 0).unwrap(), Kind::Normal(0x70000));
        assert_eq!(classify_sub(e, bm, 1).unwrap(), Kind::Unallocated);
        assert_eq!(classify_sub(e, bm, 2).unwrap(), Kind::Normal(0x70000));
        assert_eq!(classify_sub(e, bm, 3).unwrap(), Kind::ZeroAlloc(0x70000));
        assert_eq!(classify_sub(0, ALL_ZERO, 31).unwrap(), Kind::ZeroPlain);
        assert_eq!(classify_sub(0, 0, 5).unwrap(), Kind::Unallocated);
        // Allocated without an offset, or allocated and zero: invalid.
        assert!(classify_sub(0, 1, 0).is_err());
        assert!(classify_sub(e, 1 | (1 << 32), 7).is_err());
        assert_eq!(sub_mask(0, 32), ALL_ALLOC);
        assert_eq!(sub_mask(3, 2), 0b11000);
        assert_eq!(sub_mask(31, 1), 1 << 31);
        assert_eq!(sub_mask(4, 0), 0);
    }

    #[test]
    fn compressed_descriptors() {
        // 64 KiB clusters: 8-bit sector count at bit 54.
        let l = CompressedLayout::new(16);
        assert_eq!(l.csize_shift, 54);
        assert_eq!(l.csize_mask, 0xff);
        let e = l.encode(0x5_0123, 1000);
        assert_eq!(e & COMPRESSED, COMPRESSED);
        let (off, len) = l.parse(e);
        assert_eq!(off, 0x5_0123);
        // Sectors 0x280..=0x282 hold bytes 0x50123..0x5050b: 3 sectors.
        assert_eq!(len, 3 * 512 - 0x123);
        assert!(len >= 1000);
        assert_eq!(l.host_range(e), (0x5_0000, 3 * 512));
        // 2 MiB clusters: 13-bit count at bit 49.
        let l = CompressedLayout::new(21);
        assert_eq!(l.csize_shift, 49);
        let e = l.encode(1 << 40, 2 << 20);
        assert_eq!(l.parse(e), (1 << 40, 2 << 20));
        // 512-byte clusters: 1-bit count.
        let l = CompressedLayout::new(9);
        assert_eq!(l.csize_mask, 1);
        assert_eq!(l.parse(l.encode(700, 400)), (700, 1024 - 188));
    }

    #[test]
    fn be_words_round_trip() {
        let w = vec![1, 0x8000_0000_0005_0000, u64::MAX];
        assert_eq!(words_from_be(&words_to_be(&w)), w);
    }
}
