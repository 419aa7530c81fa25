//! Creating qcow2 images with qemu-img's options and layout: header in
//! cluster 0, refcount table from cluster 1, refcount block(s), then the
//! L1 table.

use super::compressed::Compression;
use super::header::{feature_table, Header, COMPAT_LAZY, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2};
use super::l2::words_to_be;
use super::refcount::{set_entry, MAX_TABLE_BYTES};
use super::{io, MAX_L1_BYTES};
use crate::driver::BackingFile;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// Options of a new image.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Params {
    size: u64,
    cluster_bits: u32,
    version: u32,
    refcount_order: u32,
    lazy: bool,
    extended: bool,
    compression: Compression,
    backing: Option<BackingFile>,
}

/// Parse a size with an optional binary suffix (`64k`, `2M`, `1G`...).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return None,
            };
            (&s[..i], 1u64 << shift)
        }
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn on_off(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(Error::invalid_argument(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

fn parse(size: u64, backing: Option<&BackingFile>, options: &[(String, String)]) -> Result<Params> {
    let mut p = Params {
        size,
        cluster_bits: 16,
        version: 3,
        refcount_order: 4,
        lazy: false,
        extended: false,
        compression: Compression::Zlib,
        backing: backing.cloned(),
    };
    let mut cluster_size = 65536u64;
    let mut refcount_bits = None;
    let mut compression = None;
    let (mut bname, mut bfmt) = (None, None);
    for (k, v) in options {
        match k.as_str() {
            "size" => {
                p.size = parse_size(v).ok_or_else(|| {
                    Error::invalid_argument(format!("Parameter 'size' does not accept value '{v}'"))
                })?
            }
            "cluster_size" => {
                cluster_size = parse_size(v).ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "Parameter 'cluster_size' does not accept value '{v}'"
                    ))
                })?
            }
            "compat" | "version" => {
                p.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => {
                        return Err(Error::invalid_argument(format!(
                            "Parameter 'version' does not accept value '{v}'"
                        )))
                    }
                }
            }
            "refcount_bits" => {
                let n: u64 = v.parse().map_err(|_| {
                    Error::invalid_argument(format!(
                        "Parameter 'refcount_bits' does not accept value '{v}'"
                    ))
                })?;
                refcount_bits = Some(n);
            }
            "lazy_refcounts" => p.lazy = on_off(k, v)?,
            "extended_l2" => p.extended = on_off(k, v)?,
            "compression_type" => {
                compression = Some(match v.as_str() {
                    "zlib" => Compression::Zlib,
                    "zstd" => Compression::Zstd,
                    _ => {
                        return Err(Error::invalid_argument(format!(
                            "Parameter 'compression-type' does not accept value '{v}'"
                        )))
                    }
                })
            }
            "backing_file" => bname = Some(v.clone()),
            "backing_fmt" => bfmt = Some(v.clone()),
            "preallocation" => {
                if v != "off" {
                    return Err(Error::unsupported(format!(
                        "preallocation={v} is not supported (only preallocation=off)"
                    )));
                }
            }
            "encryption" | "encrypt.format" | "encrypt.key-secret" => {
                return Err(Error::unsupported("encrypted images are not supported"))
            }
            "data_file" | "data_file_raw" => {
                return Err(Error::unsupported(
                    "images with an external data file are not supported",
                ))
            }
            _ => return Err(Error::invalid_argument(format!("Invalid parameter '{k}'"))),
        }
    }
    if let Some(name) = bname {
        p.backing = Some(BackingFile {
            name,
            format: bfmt.or_else(|| backing.and_then(|b| b.format.clone())),
        });
    } else if let (Some(f), Some(b)) = (bfmt, p.backing.as_mut()) {
        b.format = Some(f);
    }
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(Error::invalid_argument(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    p.cluster_bits = cluster_size.trailing_zeros();
    if let Some(bits) = refcount_bits {
        if !bits.is_power_of_two() || bits > 64 {
            return Err(Error::invalid_argument(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        p.refcount_order = bits.trailing_zeros();
    }
    let v3 = "compatibility level 1.1 and above (use version=v3 or greater)";
    if p.version == 2 {
        if p.refcount_order != 4 {
            return Err(Error::invalid_argument(format!(
                "Different refcount widths than 16 bits require {}",
                v3.replace("and above", "or above")
            )));
        }
        if p.lazy {
            return Err(Error::invalid_argument(format!(
                "Lazy refcounts only supported with {v3}"
            )));
        }
        if p.extended {
            return Err(Error::invalid_argument(format!(
                "Extended L2 entries are only supported with {v3}"
            )));
        }
        if compression == Some(Compression::Zstd) {
            return Err(Error::invalid_argument(format!(
                "Non-zlib compression type is only supported with {v3}"
            )));
        }
    }
    if p.extended && cluster_size < 16384 {
        return Err(Error::invalid_argument(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    p.compression = compression.unwrap_or(Compression::Zlib);
    p.size = p
        .size
        .checked_add(511)
        .map(|s| s & !511)
        .ok_or_else(|| Error::invalid_argument("image size too large"))?;
    Ok(p)
}

/// Create a qcow2 image of `size` bytes (rounded up to 512) in `storage`.
/// `options` are qemu-img's `-o` keys: `cluster_size`, `compat`,
/// `refcount_bits`, `lazy_refcounts`, `extended_l2`, `compression_type`,
/// `backing_file`, `backing_fmt`, `preallocation` (only `off`).
pub fn create(
    storage: &dyn Storage,
    size: u64,
    backing: Option<&BackingFile>,
    options: &[(String, String)],
) -> Result<()> {
    let p = parse(size, backing, options)?;
    let cb = p.cluster_bits;
    let cs = 1u64 << cb;
    let l2_entries = cs / if p.extended { 16 } else { 8 };
    let l1_size = (p.size as u128).div_ceil(cs as u128 * l2_entries as u128);
    if l1_size * 8 > MAX_L1_BYTES as u128 {
        return Err(Error::invalid_argument(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
        ));
    }
    let l1_size = l1_size as u64;
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    // Refcount table (t clusters) at cluster 1, then k blocks, then L1.
    let per_block = 1u64 << (cb + 3 - p.refcount_order);
    let (mut t, mut k) = (1u64, 1u64);
    loop {
        let total = 1 + t + k + l1_clusters;
        let nk = total.div_ceil(per_block);
        let nt = (nk * 8).div_ceil(cs);
        if nk <= k && nt <= t {
            break;
        }
        k = k.max(nk);
        t = t.max(nt);
    }
    if t * cs > MAX_TABLE_BYTES {
        return Err(Error::invalid_argument(
            "The image size is too large for file format 'qcow2' (refcount table too large)",
        ));
    }
    let total = 1 + t + k + l1_clusters;
    let l1_offset = if l1_size > 0 { (1 + t + k) * cs } else { 0 };
    let mut h = Header {
        version: p.version,
        cluster_bits: cb,
        size: p.size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_offset,
        rt_offset: cs,
        rt_clusters: t as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order: p.refcount_order,
        header_length: 72,
        tail: Vec::new(),
        extensions: Vec::new(),
        backing: p.backing.as_ref().map(|b| b.name.clone()),
    };
    if p.version == 3 {
        h.header_length = 112;
        h.tail = vec![0u8; 8];
        h.tail[0] = p.compression.code();
        if p.compression != Compression::Zlib {
            h.incompatible |= INCOMPAT_COMPRESSION;
        }
        if p.extended {
            h.incompatible |= INCOMPAT_EXTL2;
        }
        if p.lazy {
            h.compatible |= COMPAT_LAZY;
        }
        // qemu-img writes the feature name table only for clusters of
        // 8 KiB and more (leaving room for a backing file name otherwise).
        if cs >= 8192 {
            h.extensions.push(feature_table());
        }
    }
    h.set_backing_format(p.backing.as_ref().and_then(|b| b.format.as_deref()));
    let hdr = h.encode()?;
    // Refcount blocks: every cluster up to `total` is used once.
    let mut table = vec![0u64; (t * cs / 8) as usize];
    for j in 0..k {
        let off = (1 + t + j) * cs;
        table[j as usize] = off;
        let mut block = vec![0u8; cs as usize];
        let first = j * per_block;
        for c in first..(first + per_block).min(total) {
            set_entry(&mut block, c - first, p.refcount_order, 1);
        }
        storage
            .write_at(&block, off)
            .map_err(io("writing a refcount block"))?;
    }
    storage
        .write_at(&words_to_be(&table), cs)
        .map_err(io("writing the refcount table"))?;
    if l1_size > 0 {
        let zeros = vec![0u8; (l1_size * 8).min(1 << 20) as usize];
        let mut done = 0;
        while done < l1_size * 8 {
            let n = (l1_size * 8 - done).min(zeros.len() as u64);
            storage
                .write_at(&zeros[..n as usize], l1_offset + done)
                .map_err(io("writing the L1 table"))?;
            done += n;
        }
    }
    storage
        .write_at(&hdr, 0)
        .map_err(io("writing the header"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Vec<(String, String)> {
        s.split(',')
            .filter(|x| !x.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    #[test]
    fn sizes_and_options() {
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999E"), None);
        let p = parse(
            1000,
            None,
            &opts("cluster_size=2M,refcount_bits=1,extended_l2=on"),
        )
        .unwrap();
        assert_eq!((p.size, p.cluster_bits, p.refcount_order), (1024, 21, 0));
        let bad = [
            ("cluster_size=1000", "power of two"),
            ("cluster_size=4M", "power of two"),
            ("extended_l2=on,cluster_size=8k", "16384"),
            ("refcount_bits=3", "Refcount width"),
            ("compat=0.10,refcount_bits=8", "16 bits"),
            ("compat=0.10,lazy_refcounts=on", "Lazy"),
            ("foo=bar", "Invalid parameter 'foo'"),
            ("preallocation=full", "preallocation"),
            ("compat=2", "version"),
            ("lazy_refcounts=maybe", "'on' or 'off'"),
            ("compat=v2,extended_l2=on", "Extended"),
        ];
        for (o, msg) in bad {
            let e = parse(1 << 20, None, &opts(o)).unwrap_err();
            assert!(e.to_string().contains(msg), "{o}: {e}");
        }
        assert!(parse(u64::MAX, None, &[]).is_err());
    }
}
