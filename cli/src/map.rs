//! `imgpull map`: the chain's allocation map, as `qemu-img map` prints it.

use std::path::Path;

use imgpull_chain::{render_json, Chain, ChainOptions};
use imgpull_image::{Error, Format, Result};

/// `printf("%#-16" PRIx64)`: `0x`-prefixed hex (plain `0` for zero),
/// left-aligned in 16 columns.
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// Run `imgpull map`.
pub fn run(path: &Path, format: Option<Format>, json: bool, force_share: bool) -> Result<()> {
    let chain = Chain::open(
        path,
        &ChainOptions {
            format,
            writable: false,
            force_share,
        },
    )?;
    let entries = chain.map()?;
    if json {
        print!("{}", render_json(&entries));
        return Ok(());
    }
    let layers = chain.layers();
    let mut out = format!(
        "{:<16}{:<16}{:<16}{}\n",
        "Offset", "Length", "Mapped to", "File"
    );
    for e in &entries {
        if e.data && e.offset.is_none() {
            return Err(Error::unsupported(
                "File contains external, encrypted or compressed clusters.",
            )
            .with_path(path));
        }
        if e.data && !e.zero {
            out += &format!(
                "{}{}{}{}\n",
                hex16(e.start),
                hex16(e.length),
                hex16(e.offset.unwrap_or(0)),
                layers[e.depth].path().display()
            );
        }
    }
    print!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_columns() {
        assert_eq!(super::hex16(0), format!("{:<16}", "0"));
        assert_eq!(super::hex16(65536), format!("{:<16}", "0x10000"));
    }
}
