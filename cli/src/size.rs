//! Sizes as qemu-img reads and prints them.

/// Parse a size with an optional binary suffix (`k`, `M`, `G`, `T`, `P`,
/// `E`, case-insensitive, optionally followed by `B`/`iB`; a bare number is
/// bytes), as qemu-img does. Fractions are allowed with a suffix (`1.5G`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || {
        format!(
            "invalid size '{s}' (expected a number of bytes with an optional k/M/G/T/P/E suffix)"
        )
    };
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => return Err(bad()),
    };
    if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| bad())?;
        let bytes = v * (1u128 << shift) as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
            return Err(format!("size '{s}' is too large"));
        }
        return Ok(bytes as u64);
    }
    let v: u64 = num.parse().map_err(|_| bad())?;
    v.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Format a size like QEMU's `size_to_str`: three significant digits and
/// a binary unit (`1 GiB`, `260 KiB`, `1.5 MiB`).
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // Pick the unit that keeps the value below 1000 (QEMU's frexp trick).
    let scaled = val as f64 / (1000.0 / 1024.0);
    let exp = if scaled < 1.0 {
        0
    } else {
        scaled.log2().floor() as i32 + 1
    };
    let i = ((exp - 1).max(0) / 10).min(6) as usize;
    let v = val as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(v), SUFFIXES[i])
}

/// `printf("%0.3g")` for values below 1000.
fn fmt_g3(v: f64) -> String {
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else if v >= 1.0 {
        2
    } else {
        3
    };
    let mut s = format!("{v:.decimals$}");
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_qemu_img() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert!(parse_size("").is_err());
        assert!(parse_size("12x").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999E").is_err());
    }

    #[test]
    fn prints_like_qemu_img() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(266240), "260 KiB");
        assert_eq!(size_to_str(327680), "320 KiB");
        assert_eq!(size_to_str(3 << 19), "1.5 MiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(2097152), "2 MiB");
    }
}
