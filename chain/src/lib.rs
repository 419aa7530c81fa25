//! Backing chains: open an image and every image below it, read guest data
//! through the chain, and answer allocation status above a base.
//!
//! A [`Chain`] is shared by several threads (guest queues, a job, the control
//! socket). Its layer list is an immutable snapshot behind a lock, so readers
//! never block each other and a job can swap the list when it drops layers.
#![warn(missing_docs)]

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use imgpull_image::{
    Allocation, Error, ErrorKind, Format, GuestRead, Image, OpenOptions, Result, Status,
};

mod map;
pub use map::{render_json, MapEntry};

/// Upper bound on the number of layers in a chain (loops are detected
/// separately; this guards against absurdly deep chains).
pub const MAX_DEPTH: usize = 256;

/// How to open a chain.
#[derive(Clone, Debug, Default)]
pub struct ChainOptions {
    /// Format of the top image, or `None` to probe it.
    pub format: Option<Format>,
    /// Open the top image for writing (backing images are always read-only).
    pub writable: bool,
    /// Take no locks (qemu-img's `-U`); read-only chains only.
    pub force_share: bool,
}

/// Whether a backing name is a `json:` or protocol pseudo-filename
/// (`nbd://host`, `nbd:host:port`, ...), as QEMU decides it: a colon before
/// the first slash.
fn protocol_of(name: &str) -> Option<&str> {
    let stop = name.find(['/', ':'])?;
    if name.as_bytes()[stop] == b':' {
        Some(&name[..stop])
    } else {
        None
    }
}

/// Resolve the backing name recorded in `referrer` the way QEMU does:
/// absolute names stay as they are, relative ones are relative to the
/// directory of `referrer` (as it was named, not canonicalised).
/// `json:` and protocol pseudo-filenames are refused; `file:` is stripped.
pub fn resolve_backing(referrer: &Path, name: &str) -> Result<PathBuf> {
    if name.is_empty() {
        return Err(Error::invalid("empty backing file name").with_path(referrer));
    }
    let name = match protocol_of(name) {
        Some("file") => &name[5..],
        Some("json") => {
            return Err(Error::unsupported(format!(
                "backing file '{name}' is a json: pseudo-filename, which is not supported"
            ))
            .with_path(referrer))
        }
        Some(proto) => {
            return Err(Error::unsupported(format!(
                "backing file '{name}' uses protocol '{proto}', which is not supported (only local files are)"
            ))
            .with_path(referrer))
        }
        None => name,
    };
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(match referrer.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    })
}

/// Where a guest range lives in a chain: the extent answered by the layer
/// at `depth` (0 = top). An `Unallocated` status means no layer between the
/// queried top and base has the range (or the range lies beyond the end of
/// the backing of the layer at `depth`); it reads as zeros when the query
/// ran to the bottom of the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainExtent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Index of the layer that answered (0 = top of the chain).
    pub depth: usize,
    /// The answering layer's status.
    pub status: Status,
    /// `true` when the walk stopped because the range lies beyond the end
    /// of the layer below `depth` (a shorter backing file): the range reads
    /// as zeros even though a lower layer (e.g. a kept base) may hold data
    /// at that offset.
    pub past_end: bool,
    /// `true` for `Data` whose host range is a hole in the layer's file
    /// (only looked at where the driver says data may be holes, as QEMU
    /// does for metadata-preallocated qcow2): it reads as zeros, and
    /// `qemu-img map` shows it as both data and zero.
    pub file_hole: bool,
}

/// An open backing chain, top first.
#[derive(Debug)]
pub struct Chain {
    layers: RwLock<Arc<Vec<Arc<Image>>>>,
}

/// Guest reads through the layers from `depth` down; implements
/// [`GuestRead`] so a layer's copy-on-write path can read what lies below.
#[derive(Clone, Debug)]
pub struct Below {
    layers: Arc<Vec<Arc<Image>>>,
    depth: usize,
}

impl GuestRead for Below {
    fn read_guest(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Some(img) = self.layers.get(self.depth) else {
            buf.fill(0);
            return Ok(());
        };
        let size = img.virtual_size();
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if !head.is_empty() {
            let next = Below {
                layers: self.layers.clone(),
                depth: self.depth + 1,
            };
            img.read(offset, head, &next)?;
        }
        Ok(())
    }
}

/// Identity of a file for loop detection.
fn file_id(img: &Image) -> Option<(u64, u64)> {
    img.storage()
        .file()
        .metadata()
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// How much of the host range `[host, host + len)` of `img`'s file shares
/// the answer of its first byte, and whether that is a hole. Past the end
/// of the file it is all hole (QEMU reads zeros there).
fn file_holes(img: &Image, host: u64, len: u64) -> Result<(u64, bool)> {
    let io = |e| Error::io("querying holes", e).with_path(img.path());
    let storage = img.storage();
    if host >= storage.len().map_err(io)? {
        return Ok((len, true));
    }
    let (a, n) = storage.allocation(host, len).map_err(io)?;
    Ok((n.min(len), a == Allocation::Hole))
}

impl Chain {
    /// Open `path` and its whole backing chain.
    pub fn open(path: impl AsRef<Path>, opts: &ChainOptions) -> Result<Chain> {
        let path = path.as_ref();
        let top = Image::open(
            path,
            &OpenOptions {
                writable: opts.writable,
                format: opts.format,
                force_share: opts.force_share,
            },
        )?;
        let mut seen = HashSet::new();
        seen.extend(file_id(&top));
        let mut layers = vec![Arc::new(top)];
        loop {
            let cur = layers.last().expect("chain has a top");
            let Some(backing) = cur.info().backing else {
                break;
            };
            if layers.len() >= MAX_DEPTH {
                return Err(Error::unsupported(format!(
                    "backing chain is deeper than {MAX_DEPTH} layers"
                ))
                .with_path(path));
            }
            let bpath = resolve_backing(cur.path(), &backing.name)?;
            let format = match backing.format.as_deref() {
                None => None,
                Some(name) => Some(Format::from_name(name).ok_or_else(|| {
                    Error::unsupported(format!(
                        "backing file '{}' has format '{name}', which is not supported",
                        backing.name
                    ))
                    .with_path(cur.path())
                })?),
            };
            let img = Image::open(
                &bpath,
                &OpenOptions {
                    writable: false,
                    format,
                    force_share: opts.force_share,
                },
            )
            .map_err(|e| {
                let kind = e.kind();
                Error::new(
                    kind,
                    format!("could not open backing file '{}': {}", backing.name, e),
                )
                .with_path(cur.path())
            })?;
            if let Some(id) = file_id(&img) {
                if !seen.insert(id) {
                    return Err(Error::invalid(format!(
                        "backing file '{}' creates a loop in the backing chain",
                        backing.name
                    ))
                    .with_path(cur.path()));
                }
            }
            layers.push(Arc::new(img));
        }
        Ok(Chain::from_layers(layers))
    }

    /// A chain made of already open layers, top first.
    pub fn from_layers(layers: Vec<Arc<Image>>) -> Chain {
        assert!(!layers.is_empty(), "a chain has at least one layer");
        Chain {
            layers: RwLock::new(Arc::new(layers)),
        }
    }

    /// A snapshot of the layer list, top first.
    pub fn layers(&self) -> Arc<Vec<Arc<Image>>> {
        self.layers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replace the layer list (after a job changed the backing links).
    pub fn set_layers(&self, layers: Vec<Arc<Image>>) {
        assert!(!layers.is_empty(), "a chain has at least one layer");
        *self.layers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(layers);
    }

    /// The top layer.
    pub fn top(&self) -> Arc<Image> {
        self.layers()[0].clone()
    }

    /// Number of layers.
    pub fn depth(&self) -> usize {
        self.layers().len()
    }

    /// Guest-visible size (the top's virtual size).
    pub fn virtual_size(&self) -> u64 {
        self.top().virtual_size()
    }

    /// A reader of the guest view through layers `depth..`.
    pub fn below(&self, depth: usize) -> Below {
        Below {
            layers: self.layers(),
            depth,
        }
    }

    /// Read guest-visible bytes.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.virtual_size();
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > size)
        {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "read at {offset}+{} beyond the end of the image ({size} bytes)",
                    buf.len()
                ),
            )
            .with_path(self.top().path()));
        }
        self.below(0).read_guest(offset, buf)
    }

    /// Allocation status of `[offset, offset + len)` in layers
    /// `top..base` (`base` exclusive; `None` = to the bottom of the chain).
    /// Walks down while a layer leaves the range unallocated, as QEMU's
    /// `bdrv_block_status_above` does; stops early (status `Unallocated`,
    /// at the depth that has the range unallocated) where the range lies
    /// beyond the end of the next layer.
    pub fn block_status(
        &self,
        offset: u64,
        len: u64,
        top: usize,
        base: Option<usize>,
    ) -> Result<ChainExtent> {
        let layers = self.layers();
        let end = base.unwrap_or(layers.len()).min(layers.len());
        if top >= end {
            return Err(Error::invalid_argument(format!(
                "block status: layer range {top}..{end} is empty"
            )));
        }
        let mut d = top;
        let mut len = len;
        loop {
            let mut ext = layers[d].block_status(offset, len)?;
            if let Status::Data { host } = ext.status {
                if layers[d].driver().data_may_be_holes()? {
                    let (len, hole) = file_holes(&layers[d], host, ext.len)?;
                    ext.len = len;
                    return Ok(ChainExtent {
                        offset,
                        len,
                        depth: d,
                        status: ext.status,
                        past_end: false,
                        file_hole: hole,
                    });
                }
            }
            if ext.status.is_allocated() || d + 1 >= end {
                return Ok(ChainExtent {
                    offset,
                    len: ext.len,
                    depth: d,
                    status: ext.status,
                    past_end: false,
                    file_hole: false,
                });
            }
            let next_size = layers[d + 1].virtual_size();
            if offset >= next_size {
                return Ok(ChainExtent {
                    offset,
                    len: ext.len,
                    depth: d,
                    status: ext.status,
                    past_end: true,
                    file_hole: false,
                });
            }
            len = ext.len.min(next_size - offset);
            d += 1;
        }
    }

    /// The whole chain's allocation map, merged exactly as
    /// `qemu-img map --output=json` merges it.
    pub fn map(&self) -> Result<Vec<MapEntry>> {
        map::map(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_resolve_like_qemu() {
        let r =
            |a: &str, b: &str| resolve_backing(Path::new(a), b).map(|p| p.display().to_string());
        assert_eq!(r("top.qcow2", "base.raw").unwrap(), "base.raw");
        assert_eq!(r("d/top.qcow2", "base.raw").unwrap(), "d/base.raw");
        assert_eq!(r("/x/d/top.qcow2", "../b/base").unwrap(), "/x/d/../b/base");
        assert_eq!(r("/x/top", "/abs/base").unwrap(), "/abs/base");
        assert_eq!(r("/x/top", "file:base").unwrap(), "/x/base");
        assert_eq!(
            r("/x/top", "dir:with/colon").unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        assert_eq!(r("/x/top", "./a:b").unwrap(), "/x/./a:b");
        let e = r("/x/top", "json:{\"file\":1}").unwrap_err();
        assert!(e.to_string().contains("json:"), "{e}");
        let e = r("/x/top", "nbd://localhost/x").unwrap_err();
        assert!(e.to_string().contains("'nbd'"), "{e}");
    }
}
