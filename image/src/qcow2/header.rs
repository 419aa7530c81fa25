//! The qcow2 header (v2 and v3), its header extensions and the backing
//! file name stored after them in cluster 0.
//!
//! Unknown additional header fields and unknown extensions are kept
//! byte-for-byte and written back when the header is rewritten.

use crate::error::{Error, Result};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Backing file format name extension.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table extension.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer extension.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// External data file name extension.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible bit 0: refcounts may be inconsistent.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible bit 1: the image may be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible bit 2: external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible bit 3: non-default compression type.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible bit 4: extended L2 entries.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// All incompatible bits we know.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible bit 0: lazy refcounts.
pub const COMPAT_LAZY: u64 = 1 << 0;
/// Autoclear bit 0: bitmaps are consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Byte offset of `incompatible_features` in the header.
pub const OFF_INCOMPATIBLE: u64 = 72;
/// Byte offset of `autoclear_features` in the header.
pub const OFF_AUTOCLEAR: u64 = 88;

/// The feature name table QEMU writes into new v3 images.
pub const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// One header extension, kept verbatim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    /// The extension type.
    pub kind: u32,
    /// Its data (without padding).
    pub data: Vec<u8>,
}

/// A parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 = none.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_offset: u64,
    /// Offset of the refcount table.
    pub rt_offset: u64,
    /// Clusters of the refcount table.
    pub rt_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length (72 for v2).
    pub header_length: u32,
    /// Header bytes from offset 104 to `header_length` (v3), verbatim;
    /// byte 0 of it is `compression_type`.
    pub tail: Vec<u8>,
    /// Header extensions in file order (without the end marker).
    pub extensions: Vec<Extension>,
    /// Backing file name.
    pub backing: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (be32(b, at) as u64) << 32 | be32(b, at + 4) as u64
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The compression type field (0 when absent).
    pub fn compression_type(&self) -> u8 {
        self.tail.first().copied().unwrap_or(0)
    }

    /// The recorded backing format, if any.
    pub fn backing_format(&self) -> Option<String> {
        self.extension(EXT_BACKING_FORMAT)
            .map(|d| String::from_utf8_lossy(d).into_owned())
    }

    /// The data of the first extension of `kind`.
    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// The feature-table name of bit `bit` of feature type `kind`
    /// (0 incompatible, 1 compatible, 2 autoclear).
    pub fn feature_name(&self, kind: u8, bit: u32) -> Option<String> {
        let table = self.extension(EXT_FEATURE_TABLE)?;
        table.chunks_exact(48).find_map(|e| {
            if e[0] == kind && e[1] as u32 == bit {
                let name = &e[2..];
                let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                Some(String::from_utf8_lossy(&name[..end]).into_owned())
            } else {
                None
            }
        })
    }

    /// Parse the header from the start of the file. `first` holds at least
    /// the first 104 bytes; `cluster0` returns the first cluster (as far as
    /// the file goes) once the cluster size is known.
    pub fn parse(first: &[u8], cluster0: impl FnOnce(u64) -> Result<Vec<u8>>) -> Result<Header> {
        if first.len() < 72 {
            return Err(Error::invalid("file too short for a qcow2 header"));
        }
        if be32(first, 0) != MAGIC {
            return Err(Error::invalid("not a qcow2 image (bad magic)"));
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "qcow2 version {version} is not supported"
            )));
        }
        let cluster_bits = be32(first, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::invalid(format!(
                "cluster_bits {cluster_bits} out of range (cluster size must be 512 B to 2 MiB)"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let buf = cluster0(cs)?;
        if buf.len() < 72 {
            return Err(Error::invalid("file too short for a qcow2 header"));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(&buf, 24),
            crypt_method: be32(&buf, 32),
            l1_size: be32(&buf, 36),
            l1_offset: be64(&buf, 40),
            rt_offset: be64(&buf, 48),
            rt_clusters: be32(&buf, 56),
            nb_snapshots: be32(&buf, 60),
            snapshots_offset: be64(&buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            tail: Vec::new(),
            extensions: Vec::new(),
            backing: None,
        };
        let backing_offset = be64(&buf, 8);
        let backing_size = be32(&buf, 16);
        if version == 3 {
            if buf.len() < 104 {
                return Err(Error::invalid("file too short for a qcow2 v3 header"));
            }
            h.incompatible = be64(&buf, 72);
            h.compatible = be64(&buf, 80);
            h.autoclear = be64(&buf, 88);
            h.refcount_order = be32(&buf, 96);
            h.header_length = be32(&buf, 100);
            if h.header_length < 104 || !h.header_length.is_multiple_of(8) {
                return Err(Error::invalid(format!(
                    "invalid header length {} (at least 104 and a multiple of 8)",
                    h.header_length
                )));
            }
            if h.header_length as u64 > cs || h.header_length as usize > buf.len() {
                return Err(Error::invalid(format!(
                    "header length {} exceeds the cluster size or the file",
                    h.header_length
                )));
            }
            h.tail = buf[104..h.header_length as usize].to_vec();
            if h.refcount_order > 6 {
                return Err(Error::invalid(format!(
                    "refcount order {} is out of range (at most 6)",
                    h.refcount_order
                )));
            }
        }
        // Header extensions run until the end marker, the backing file
        // name or the end of cluster 0.
        let ext_end = if backing_offset != 0 {
            backing_offset.min(cs) as usize
        } else {
            cs as usize
        }
        .min(buf.len());
        let mut pos = h.header_length as usize;
        while pos + 8 <= ext_end {
            let kind = be32(&buf, pos);
            let len = be32(&buf, pos + 4) as usize;
            // The length is checked before the end marker is recognised,
            // as QEMU does ("Header extension too large").
            let data_end = pos + 8 + len;
            if data_end > ext_end {
                return Err(Error::invalid(format!(
                    "header extension {kind:#010x} ({len} bytes) runs past the header area"
                )));
            }
            if kind == 0 {
                break;
            }
            h.extensions.push(Extension {
                kind,
                data: buf[pos + 8..data_end].to_vec(),
            });
            pos = (data_end + 7) & !7;
        }
        if backing_offset != 0 {
            if backing_size > 1023 {
                return Err(Error::invalid(format!(
                    "backing file name too long ({backing_size} bytes, at most 1023)"
                )));
            }
            let end = backing_offset.checked_add(backing_size as u64);
            if end.is_none_or(|e| e > cs || e as usize > buf.len()) {
                return Err(Error::invalid(format!(
                    "backing file name at {backing_offset}+{backing_size} lies outside the first cluster"
                )));
            }
            let s = &buf[backing_offset as usize..backing_offset as usize + backing_size as usize];
            h.backing = Some(String::from_utf8_lossy(s).into_owned());
        }
        Ok(h)
    }

    /// Encode the whole header area (header, extensions, end marker,
    /// backing file name); it must fit in cluster 0.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut b = vec![0u8; self.header_length as usize];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.rt_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.rt_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b[72..80].copy_from_slice(&self.incompatible.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            let n = self.tail.len().min(b.len() - 104);
            b[104..104 + n].copy_from_slice(&self.tail[..n]);
        }
        for e in &self.extensions {
            b.extend_from_slice(&e.kind.to_be_bytes());
            b.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            b.extend_from_slice(&e.data);
            b.resize((b.len() + 7) & !7, 0);
        }
        b.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing {
            if name.len() > 1023 {
                return Err(Error::invalid_argument(format!(
                    "backing file name too long ({} bytes, at most 1023)",
                    name.len()
                )));
            }
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(Error::invalid_argument(format!(
                "header, extensions and backing file name ({} bytes) do not fit in the first cluster ({} bytes)",
                b.len(),
                self.cluster_size()
            )));
        }
        Ok(b)
    }

    /// Replace, add or remove the backing format extension (added first,
    /// where QEMU puts it; other extensions keep their order).
    pub fn set_backing_format(&mut self, format: Option<&str>) {
        match format {
            Some(f) => {
                if let Some(e) = self
                    .extensions
                    .iter_mut()
                    .find(|e| e.kind == EXT_BACKING_FORMAT)
                {
                    e.data = f.as_bytes().to_vec();
                } else {
                    self.extensions.insert(
                        0,
                        Extension {
                            kind: EXT_BACKING_FORMAT,
                            data: f.as_bytes().to_vec(),
                        },
                    );
                }
            }
            None => self.extensions.retain(|e| e.kind != EXT_BACKING_FORMAT),
        }
    }
}

/// The feature name table extension as QEMU writes it.
pub fn feature_table() -> Extension {
    let mut data = Vec::with_capacity(FEATURE_NAMES.len() * 48);
    for &(kind, bit, name) in FEATURE_NAMES {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        data.extend_from_slice(&e);
    }
    Extension {
        kind: EXT_FEATURE_TABLE,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_offset: 0x30000,
            rt_offset: 0x10000,
            rt_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 112,
            tail: vec![0; 8],
            extensions: vec![
                feature_table(),
                Extension {
                    kind: 0x1234_5678,
                    data: vec![1, 2, 3],
                },
            ],
            backing: None,
        }
    }

    fn reparse(b: &[u8]) -> Result<Header> {
        Header::parse(b, |cs| Ok(b[..b.len().min(cs as usize)].to_vec()))
    }

    #[test]
    fn round_trip_keeps_unknown_extensions() {
        let mut h = sample();
        h.backing = Some("base.qcow2".into());
        h.set_backing_format(Some("qcow2"));
        let b = h.encode().unwrap();
        let p = reparse(&b).unwrap();
        assert_eq!(p, h);
        assert_eq!(p.extensions[0].kind, EXT_BACKING_FORMAT);
        assert_eq!(p.extensions[2].data, vec![1, 2, 3]);
        assert_eq!(p.backing_format().as_deref(), Some("qcow2"));
        assert_eq!(p.feature_name(0, 4).as_deref(), Some("extended L2 entries"));
        let mut q = p.clone();
        q.set_backing_format(None);
        q.backing = None;
        let p2 = reparse(&q.encode().unwrap()).unwrap();
        assert_eq!(p2.extensions.len(), 2);
        assert_eq!(p2.backing, None);
    }

    #[test]
    fn bad_headers_are_errors() {
        let good = sample().encode().unwrap();
        assert!(reparse(&good[..50]).is_err());
        let mut b = good.clone();
        b[0] = b'X';
        assert!(reparse(&b).unwrap_err().to_string().contains("magic"));
        let mut b = good.clone();
        b[23] = 30;
        assert!(reparse(&b)
            .unwrap_err()
            .to_string()
            .contains("cluster_bits"));
        let mut b = good.clone();
        b[100..104].copy_from_slice(&100u32.to_be_bytes());
        assert!(reparse(&b).is_err());
        let mut b = good.clone();
        b[100..104].copy_from_slice(&0x7fff_fff8u32.to_be_bytes());
        assert!(reparse(&b).is_err());
        let mut b = good.clone();
        // Backing name pointing past the cluster.
        b[8..16].copy_from_slice(&0xfff0u64.to_be_bytes());
        b[16..20].copy_from_slice(&100u32.to_be_bytes());
        assert!(reparse(&b).is_err());
        // Extension length running away.
        let mut b = good.clone();
        b[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(reparse(&b).is_err());
        let mut h = sample();
        h.backing = Some("x".repeat(1024));
        assert!(h.encode().is_err());
        let mut h = sample();
        h.cluster_bits = 9;
        h.backing = Some("y".repeat(200));
        assert!(h.encode().unwrap_err().to_string().contains("fit"));
    }
}
