//! Decompression of compressed clusters: raw deflate (no zlib header,
//! QEMU's "zlib" type) or zstd (compression type 1). Decompression stops
//! once one cluster of output has been produced; the input may carry
//! trailing bytes (sector padding, the next compressed cluster).

use crate::error::{Error, Result};

/// The compression type of an image (header field `compression_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (type 0, called "zlib" by QEMU).
    Zlib,
    /// Zstandard (type 1).
    Zstd,
}

impl Compression {
    /// The header field value.
    pub fn code(self) -> u8 {
        match self {
            Compression::Zlib => 0,
            Compression::Zstd => 1,
        }
    }

    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

fn short(what: &str) -> Error {
    Error::invalid(format!(
        "compressed cluster data ({what}) ends before a whole cluster was produced"
    ))
}

/// Decompress `input` until `out` is full.
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        Compression::Zlib => inflate(input, out),
        Compression::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut d = Decompress::new(false);
    loop {
        let (i, o) = (d.total_in() as usize, d.total_out() as usize);
        if o == out.len() {
            return Ok(());
        }
        let st = d
            .decompress(&input[i..], &mut out[o..], FlushDecompress::Finish)
            .map_err(|e| {
                Error::invalid(format!("corrupt deflate data in compressed cluster: {e}"))
            })?;
        let progressed = d.total_in() as usize != i || d.total_out() as usize != o;
        if d.total_out() as usize == out.len() {
            return Ok(());
        }
        if st == Status::StreamEnd || !progressed {
            return Err(short("deflate"));
        }
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|e| Error::invalid(format!("zstd: {e}")))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let (ip, op) = (inb.pos(), outb.pos());
        if op == outb.capacity() {
            return Ok(());
        }
        dec.run(&mut inb, &mut outb)
            .map_err(|e| Error::invalid(format!("corrupt zstd data in compressed cluster: {e}")))?;
        if outb.pos() == outb.capacity() {
            return Ok(());
        }
        if inb.pos() == ip && outb.pos() == op {
            return Err(short("zstd"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn raw_deflate_with_trailing_garbage() {
        let data = pattern(65536);
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut c = enc.finish().unwrap();
        c.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; 65536];
        decompress(Compression::Zlib, &c, &mut out).unwrap();
        assert_eq!(out, data);
        // Truncated input: a clear error, no panic.
        let mut out = vec![0u8; 65536];
        assert!(decompress(Compression::Zlib, &c[..c.len() / 3], &mut out).is_err());
        assert!(decompress(Compression::Zlib, &[0xff; 64], &mut out).is_err());
    }

    #[test]
    fn zstd_with_trailing_garbage() {
        let data = pattern(4096);
        let mut c = zstd::bulk::compress(&data, 3).unwrap();
        c.extend_from_slice(&[0u8; 100]);
        let mut out = vec![0u8; 4096];
        decompress(Compression::Zstd, &c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(Compression::Zstd, &c[..10], &mut out).is_err());
        assert!(decompress(Compression::Zstd, &[7u8; 40], &mut out).is_err());
    }
}
