//! Creating QED images the way `qemu-img create -f qed` does: one header
//! cluster holding the header and the backing file name, followed by a
//! zeroed L1 table.

use super::header::{
    Geometry, Header, F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE, HEADER_LEN, MAGIC,
    MAX_BACKING_NAME,
};
use crate::driver::BackingFile;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// QEMU's default cluster size.
const DEFAULT_CLUSTER: u64 = 64 << 10;
/// QEMU's default table size (clusters).
const DEFAULT_TABLE: u64 = 4;

/// Parse a qemu-style size: a decimal number (fractions allowed) with an
/// optional binary suffix `b`, `k`, `M`, `G`, `T`, `P` or `E`.
pub(crate) fn parse_size(key: &str, value: &str) -> Result<u64> {
    let bad = || {
        Error::invalid_argument(format!(
            "option '{key}': '{value}' is not a size (a number with an optional k, M, G, \
             T, P or E suffix)"
        ))
    };
    let v = value.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(split);
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => return Err(bad()),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 18 {
        return Err(bad());
    }
    let digits = format!("{int}{frac}");
    let mantissa: u128 = digits.parse().map_err(|_| bad())?;
    let scaled = mantissa.checked_shl(shift).ok_or_else(bad)?;
    let div = 10u128.pow(frac.len() as u32);
    if scaled % div != 0 {
        return Err(bad());
    }
    u64::try_from(scaled / div).map_err(|_| bad())
}

fn parse_int(key: &str, value: &str) -> Result<u64> {
    value.trim().parse().map_err(|_| {
        Error::invalid_argument(format!("option '{key}' expects an integer, not '{value}'"))
    })
}

/// Create a QED image of `size` bytes (rounded up to a multiple of 512)
/// in `storage`, which must be empty.
///
/// Options (`-o` of qemu-img): `size`, `cluster_size` (default 64 KiB,
/// size suffixes accepted), `table_size` (clusters, default 4),
/// `backing_file` and `backing_fmt` (also given as `backing`). QED can only
/// record that the backing file is raw (`backing_fmt=raw`); other formats
/// are probed when the image is opened.
pub fn create(
    storage: &dyn Storage,
    size: u64,
    backing: Option<&BackingFile>,
    options: &[(String, String)],
) -> Result<()> {
    let mut size = size;
    let mut cluster = DEFAULT_CLUSTER;
    let mut table = DEFAULT_TABLE;
    let mut opt_backing: Option<String> = None;
    let mut opt_format: Option<String> = None;
    for (k, v) in options {
        match k.as_str() {
            "size" => size = parse_size(k, v)?,
            "cluster_size" => cluster = parse_size(k, v)?,
            "table_size" => table = parse_int(k, v)?,
            "backing_file" => opt_backing = Some(v.clone()),
            "backing_fmt" => opt_format = Some(v.clone()),
            _ => {
                return Err(Error::invalid_argument(format!(
                    "invalid option '{k}' for format 'qed'"
                )))
            }
        }
    }
    let backing = match (backing, opt_backing) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid_argument(
                "the backing file is given twice (argument and backing_file option)",
            ))
        }
        (Some(b), None) => {
            if let (Some(a), Some(o)) = (&b.format, &opt_format) {
                if a != o {
                    return Err(Error::invalid_argument(format!(
                        "conflicting backing formats '{a}' and '{o}'"
                    )));
                }
            }
            Some(BackingFile {
                name: b.name.clone(),
                format: b.format.clone().or(opt_format),
            })
        }
        // Like qemu-img, a backing format without a backing file is ignored.
        (None, name) => name.map(|name| BackingFile {
            name,
            format: opt_format,
        }),
    };
    let size = size
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::invalid_argument(format!("image size {size} is too large")))?;
    let geo = Geometry::new(cluster, table).map_err(|e| Error::invalid_argument(e.message()))?;
    if !geo.qemu_can_size() {
        return Err(Error::invalid_argument(format!(
            "QED cluster size {cluster} with table size {table} is not usable: QEMU's \
             maximum image size computation overflows for this geometry"
        )));
    }
    if size > geo.max_image_size() {
        return Err(Error::invalid_argument(format!(
            "QED image size {size} is too large: cluster size {cluster} with table size \
             {table} maps at most {} bytes",
            geo.max_image_size()
        )));
    }
    let mut header = Header {
        magic: MAGIC,
        cluster_size: cluster as u32,
        table_size: table as u32,
        header_size: 1,
        features: 0,
        compat_features: 0,
        autoclear_features: 0,
        l1_table_offset: cluster,
        image_size: size,
        backing_filename_offset: 0,
        backing_filename_size: 0,
    };
    let name = backing.as_ref().map_or(&[][..], |b| b.name.as_bytes());
    if let Some(b) = &backing {
        let room = (cluster - HEADER_LEN as u64).min(MAX_BACKING_NAME);
        if name.is_empty() || name.contains(&0) || name.len() as u64 > room {
            return Err(Error::invalid_argument(format!(
                "backing file name '{}' is empty, contains a NUL byte or is longer than \
                 the {room} bytes the QED header has room for",
                b.name
            )));
        }
        header.features |= F_BACKING_FILE;
        if b.format.as_deref() == Some("raw") {
            header.features |= F_BACKING_FORMAT_NO_PROBE;
        }
        header.backing_filename_offset = HEADER_LEN as u32;
        header.backing_filename_size = name.len() as u32;
    }
    let mut first = header.encode().to_vec();
    first.extend_from_slice(name);
    storage
        .write_at(&first, 0)
        .map_err(|e| Error::io("writing QED header", e))?;
    // A zeroed L1 table right after the header cluster.
    let chunk = geo.table_bytes.min(1 << 20);
    let zeros = vec![0u8; chunk as usize];
    let mut pos = 0;
    while pos < geo.table_bytes {
        storage
            .write_at(&zeros, cluster + pos)
            .map_err(|e| Error::io("writing QED L1 table", e))?;
        pos += chunk;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_size("s", "4096").unwrap(), 4096);
        assert_eq!(parse_size("s", "64k").unwrap(), 65536);
        assert_eq!(parse_size("s", "64K").unwrap(), 65536);
        assert_eq!(parse_size("s", "1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("s", "1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("s", "2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("s", "512b").unwrap(), 512);
        for bad in ["", "k", "1x", "1.2.3", "0.1", "99999E", "-1"] {
            assert!(parse_size("s", bad).is_err(), "{bad}");
        }
        assert!(parse_int("t", "4k").is_err());
        assert_eq!(parse_int("t", "16").unwrap(), 16);
    }
}
