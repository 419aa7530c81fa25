//! The QED header: parsing, validation and the table geometry it implies.
//!
//! Layout (all fields little-endian), from QEMU's `docs/interop/qed_spec.rst`:
//!
//! | offset | size | field                     |
//! |-------:|-----:|---------------------------|
//! |      0 |    4 | magic `QED\0`             |
//! |      4 |    4 | cluster size (bytes)      |
//! |      8 |    4 | table size (clusters)     |
//! |     12 |    4 | header size (clusters)    |
//! |     16 |    8 | features                  |
//! |     24 |    8 | compat features           |
//! |     32 |    8 | autoclear features        |
//! |     40 |    8 | L1 table offset           |
//! |     48 |    8 | image (virtual) size      |
//! |     56 |    4 | backing file name offset  |
//! |     60 |    4 | backing file name size    |

use crate::error::{Error, Result};

/// Size of the fixed header structure in bytes.
pub(crate) const HEADER_LEN: usize = 64;
/// `QED\0` read as a little-endian `u32`.
pub(crate) const MAGIC: u32 = u32::from_le_bytes(*b"QED\0");

/// The image has a backing file.
pub(crate) const F_BACKING_FILE: u64 = 1;
/// The image needs a consistency check before it is written.
pub(crate) const F_NEED_CHECK: u64 = 2;
/// The backing file is raw: do not probe its format.
pub(crate) const F_BACKING_FORMAT_NO_PROBE: u64 = 4;
/// Every `features` bit we understand.
pub(crate) const KNOWN_FEATURES: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
/// Every `compat_features` bit we understand (none are defined).
pub(crate) const KNOWN_COMPAT: u64 = 0;
/// Every `autoclear_features` bit we understand (none are defined).
pub(crate) const KNOWN_AUTOCLEAR: u64 = 0;

/// Smallest cluster size allowed by the specification.
pub(crate) const MIN_CLUSTER: u64 = 4096;
/// Largest cluster size allowed by the specification.
pub(crate) const MAX_CLUSTER: u64 = 64 << 20;
/// Largest table size (in clusters) allowed by the specification.
pub(crate) const MAX_TABLE: u64 = 16;
/// Longest backing file name we read (QEMU's limit is `PATH_MAX - 1`).
pub(crate) const MAX_BACKING_NAME: u64 = 4095;

/// L2 tables are cached in slices of at most this many bytes.
const SLICE_BYTES: u64 = 64 << 10;

/// The header fields, in host byte order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub magic: u32,
    pub cluster_size: u32,
    pub table_size: u32,
    pub header_size: u32,
    pub features: u64,
    pub compat_features: u64,
    pub autoclear_features: u64,
    pub l1_table_offset: u64,
    pub image_size: u64,
    pub backing_filename_offset: u32,
    pub backing_filename_size: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// Decode the fixed header.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            magic: le32(b, 0),
            cluster_size: le32(b, 4),
            table_size: le32(b, 8),
            header_size: le32(b, 12),
            features: le64(b, 16),
            compat_features: le64(b, 24),
            autoclear_features: le64(b, 32),
            l1_table_offset: le64(b, 40),
            image_size: le64(b, 48),
            backing_filename_offset: le32(b, 56),
            backing_filename_size: le32(b, 60),
        }
    }

    /// Encode the fixed header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        b[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        b[56..60].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        b[60..64].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        b
    }

    /// Check every field that does not depend on the file and derive the
    /// table geometry. `file_len` is the current length of the image file,
    /// used to check that the L1 table lies inside it.
    pub fn validate(&self, file_len: u64) -> Result<Geometry> {
        if self.magic != MAGIC {
            return Err(Error::invalid("not a QED image (bad magic)"));
        }
        let unknown = self.features & !KNOWN_FEATURES;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "unsupported QED feature bits 0x{unknown:x}"
            )));
        }
        let geo = Geometry::new(u64::from(self.cluster_size), u64::from(self.table_size))?;
        let header_bytes = u64::from(self.header_size) * geo.cluster_size;
        if header_bytes > u64::from(u32::MAX) {
            return Err(Error::invalid(format!(
                "QED header size of {} clusters is too large",
                self.header_size
            )));
        }
        let geo = Geometry {
            header_bytes,
            ..geo
        };
        if !self.image_size.is_multiple_of(512) {
            return Err(Error::invalid(format!(
                "invalid QED image size {} (not a multiple of 512)",
                self.image_size
            )));
        }
        if self.image_size > geo.max_image_size() {
            return Err(Error::invalid(format!(
                "QED image size {} exceeds the {} bytes its tables can map",
                self.image_size,
                geo.max_image_size()
            )));
        }
        let file_size = geo.round_down(file_len);
        if !geo.table_offset_valid(self.l1_table_offset, file_size) {
            return Err(Error::invalid(format!(
                "invalid QED L1 table offset 0x{:x} ({}-byte table, header of {} bytes, \
                 file of {} bytes)",
                self.l1_table_offset, geo.table_bytes, geo.header_bytes, file_len
            )));
        }
        if self.features & F_BACKING_FILE != 0 {
            let end =
                u64::from(self.backing_filename_offset) + u64::from(self.backing_filename_size);
            if end > geo.header_bytes {
                return Err(Error::invalid(format!(
                    "QED backing file name at {}+{} lies outside the {}-byte header",
                    self.backing_filename_offset, self.backing_filename_size, geo.header_bytes
                )));
            }
            if u64::from(self.backing_filename_size) > MAX_BACKING_NAME {
                return Err(Error::invalid(format!(
                    "QED backing file name of {} bytes is too long (at most {})",
                    self.backing_filename_size, MAX_BACKING_NAME
                )));
            }
        }
        Ok(geo)
    }
}

/// Sizes derived from the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Table size in clusters.
    pub table_size: u64,
    /// Table size in bytes.
    pub table_bytes: u64,
    /// Entries per table.
    pub entries: u64,
    /// log2 of `entries`.
    pub l2_bits: u32,
    /// Bytes reserved for the header (`header_size` clusters).
    pub header_bytes: u64,
    /// Entries per cached L2 slice (divides `entries`).
    pub slice_entries: u64,
}

impl Geometry {
    /// The geometry of `cluster_size` and `table_size`, checked against the
    /// specification's ranges; the header size defaults to one cluster.
    pub fn new(cluster_size: u64, table_size: u64) -> Result<Geometry> {
        if !(MIN_CLUSTER..=MAX_CLUSTER).contains(&cluster_size) || !cluster_size.is_power_of_two() {
            return Err(Error::invalid(format!(
                "invalid QED cluster size {cluster_size} (must be a power of two from \
                 {MIN_CLUSTER} to {MAX_CLUSTER})"
            )));
        }
        if !(1..=MAX_TABLE).contains(&table_size) || !table_size.is_power_of_two() {
            return Err(Error::invalid(format!(
                "invalid QED table size {table_size} (must be a power of two from 1 to \
                 {MAX_TABLE} clusters)"
            )));
        }
        let table_bytes = cluster_size * table_size;
        let entries = table_bytes / 8;
        Ok(Geometry {
            cluster_size,
            cluster_bits: cluster_size.trailing_zeros(),
            table_size,
            table_bytes,
            entries,
            l2_bits: entries.trailing_zeros(),
            header_bytes: cluster_size,
            slice_entries: entries.min(SLICE_BYTES / 8),
        })
    }

    /// Guest bytes mapped by one L2 table.
    pub fn l2_span(&self) -> u64 {
        self.entries << self.cluster_bits
    }

    /// The largest image size the tables can map (saturating).
    pub fn max_image_size(&self) -> u64 {
        let max = u128::from(self.entries) * u128::from(self.l2_span());
        u64::try_from(max).unwrap_or(u64::MAX)
    }

    /// Whether QEMU's own size arithmetic (64-bit, wrapping) can represent
    /// the maximum image size of this geometry; QEMU refuses to open images
    /// whose geometry overflows it.
    pub fn qemu_can_size(&self) -> bool {
        u128::from(self.entries) * u128::from(self.l2_span()) <= u128::from(u64::MAX)
    }

    /// Number of L1 entries that map an image of `image_size` bytes.
    pub fn l1_entries_for(&self, image_size: u64) -> u64 {
        image_size.div_ceil(self.l2_span())
    }

    /// `x` rounded down to a cluster boundary.
    pub fn round_down(&self, x: u64) -> u64 {
        x & !(self.cluster_size - 1)
    }

    /// Number of clusters covering `bytes` bytes.
    pub fn clusters(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size)
    }

    /// Whether `offset` is cluster-aligned and past the header.
    fn cluster_offset_ok(&self, offset: u64) -> bool {
        offset & (self.cluster_size - 1) == 0 && offset >= self.header_bytes
    }

    /// Whether a data cluster at `offset` is aligned, past the header and
    /// starts before `file_size` (a cluster-aligned end of file).
    pub fn data_offset_valid(&self, offset: u64, file_size: u64) -> bool {
        self.cluster_offset_ok(offset) && offset < file_size
    }

    /// Whether a table at `offset` is aligned, past the header and lies
    /// entirely before `file_size` (a cluster-aligned end of file).
    pub fn table_offset_valid(&self, offset: u64, file_size: u64) -> bool {
        self.cluster_offset_ok(offset)
            && offset
                .checked_add(self.table_bytes)
                .is_some_and(|end| end <= file_size)
    }

    /// Why a data cluster offset is invalid, for error messages.
    pub fn data_offset_problem(&self, offset: u64, file_size: u64) -> &'static str {
        if offset & (self.cluster_size - 1) != 0 {
            "not cluster-aligned"
        } else if offset < self.header_bytes {
            "inside the header"
        } else if offset >= file_size {
            "past the end of the file"
        } else {
            "valid"
        }
    }

    /// Why a table offset is invalid, for error messages.
    pub fn table_offset_problem(&self, offset: u64, file_size: u64) -> &'static str {
        if offset & (self.cluster_size - 1) != 0 {
            "not cluster-aligned"
        } else if offset < self.header_bytes {
            "inside the header"
        } else if !self.table_offset_valid(offset, file_size) {
            "past the end of the file"
        } else {
            "valid"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            magic: MAGIC,
            cluster_size: 65536,
            table_size: 4,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: 65536,
            image_size: 10 << 20,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        }
    }

    #[test]
    fn encode_parse_round_trip() {
        let mut h = sample();
        h.features = F_BACKING_FILE;
        h.backing_filename_offset = 64;
        h.backing_filename_size = 5;
        let b = h.encode();
        assert_eq!(&b[0..4], b"QED\0");
        assert_eq!(Header::parse(&b), h);
    }

    #[test]
    fn geometry_of_defaults() {
        let g = sample().validate(65536 + 4 * 65536).unwrap();
        assert_eq!(g.entries, 32768);
        assert_eq!(g.l2_span(), 2 << 30);
        assert_eq!(g.max_image_size(), 1 << 46);
        assert_eq!(g.l1_entries_for(10 << 20), 1);
        assert_eq!(g.slice_entries, 8192);
    }

    #[test]
    fn rejects_bad_fields() {
        let len = 5 * 65536;
        let msg = |h: Header| h.validate(len).unwrap_err().to_string();
        let mut h = sample();
        h.magic = 0;
        assert!(msg(h).contains("bad magic"));
        let mut h = sample();
        h.features = 0x18;
        let e = h.validate(len).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        assert!(e.to_string().contains("0x18"), "{e}");
        for cs in [0, 2048, 3 << 12, 128 << 20] {
            let mut h = sample();
            h.cluster_size = cs;
            assert!(msg(h).contains("cluster size"));
        }
        for ts in [0, 3, 32] {
            let mut h = sample();
            h.table_size = ts;
            assert!(msg(h).contains("table size"));
        }
        let mut h = sample();
        // QEMU accepts a header size of 0 clusters (there is then no
        // room for a backing file name).
        h.header_size = 0;
        assert!(h.validate(len).is_ok());
        let mut h = sample();
        h.header_size = u32::MAX;
        assert!(msg(h).contains("too large"));
        let mut h = sample();
        h.image_size = 1000;
        assert!(msg(h).contains("multiple of 512"));
        let mut h = sample();
        h.image_size = (1 << 46) + 512;
        assert!(msg(h).contains("exceeds"));
        for l1 in [0, 1000, 2 * 65536, !65535] {
            let mut h = sample();
            h.l1_table_offset = l1;
            assert!(msg(h).contains("L1 table offset"), "{l1}");
        }
        let mut h = sample();
        h.features = F_BACKING_FILE;
        h.backing_filename_offset = 65530;
        h.backing_filename_size = 10;
        assert!(msg(h).contains("outside"));
    }

    #[test]
    fn offset_problems_are_named() {
        let mut g = Geometry::new(4096, 4).unwrap();
        g.header_bytes = 3 * 4096;
        let end = 100 * 4096;
        assert_eq!(g.data_offset_problem(4096, end), "inside the header");
        assert_eq!(
            g.data_offset_problem(5 * 4096 + 8, end),
            "not cluster-aligned"
        );
        assert_eq!(g.data_offset_problem(end, end), "past the end of the file");
        assert_eq!(g.data_offset_problem(end - 4096, end), "valid");
        assert!(g.data_offset_valid(end - 4096, end));
        assert_eq!(g.table_offset_problem(4096, end), "inside the header");
        assert_eq!(
            g.table_offset_problem(end - 4096, end),
            "past the end of the file"
        );
        assert!(g.table_offset_valid(end - 4 * 4096, end));
        assert!(!g.table_offset_valid(!4095, u64::MAX));
    }

    #[test]
    fn huge_geometry_saturates() {
        let g = Geometry::new(64 << 20, 16).unwrap();
        assert_eq!(g.max_image_size(), u64::MAX);
        assert!(!g.qemu_can_size());
        assert!(Geometry::new(1 << 20, 16).unwrap().qemu_can_size());
    }
}
