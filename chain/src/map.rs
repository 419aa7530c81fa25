//! The chain's allocation map, as `qemu-img map` reports it.

use std::fmt::Write as _;

use imgpull_image::{Result, Status};

use crate::{Chain, ChainExtent};

/// One entry of `qemu-img map --output=json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Index of the layer holding the range (0 = top), or, for ranges no
    /// layer holds, of the layer below which nothing is left.
    pub depth: usize,
    /// Whether a layer holds the range.
    pub present: bool,
    /// Whether the range reads as zeros.
    pub zero: bool,
    /// Whether the range holds data.
    pub data: bool,
    /// Whether the data is compressed.
    pub compressed: bool,
    /// Host offset in the holding layer's file, when there is one.
    pub offset: Option<u64>,
}

impl MapEntry {
    /// The entry for one chain extent.
    pub fn from_extent(e: &ChainExtent) -> MapEntry {
        let (present, zero, data, compressed, offset) = match e.status {
            Status::Data { host } => (true, false, true, false, Some(host)),
            Status::Zero { host } => (true, true, false, false, host),
            Status::Compressed => (true, false, true, true, None),
            Status::Unallocated { host } => (false, true, false, false, host),
        };
        MapEntry {
            start: e.offset,
            length: e.len,
            depth: e.depth,
            present,
            zero: zero || e.file_hole,
            data,
            compressed,
            offset,
        }
    }

    /// Whether `next` continues this entry (qemu-img's merge rule).
    pub fn mergeable(&self, next: &MapEntry) -> bool {
        if self.length == 0
            || self.zero != next.zero
            || self.data != next.data
            || self.compressed != next.compressed
            || self.depth != next.depth
            || self.present != next.present
            || self.offset.is_some() != next.offset.is_some()
        {
            return false;
        }
        match (self.offset, next.offset) {
            (Some(a), Some(b)) => a + self.length == b,
            _ => true,
        }
    }

    /// The entry in qemu-img's JSON text form (one object, no newline).
    pub fn to_json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            let _ = write!(s, ", \"offset\": {o}");
        }
        s.push('}');
        s
    }
}

/// Render a whole map exactly as `qemu-img map --output=json` prints it.
pub fn render_json(entries: &[MapEntry]) -> String {
    let body: Vec<String> = entries.iter().map(MapEntry::to_json).collect();
    format!("[{}]\n", body.join(",\n"))
}

pub(crate) fn map(chain: &Chain) -> Result<Vec<MapEntry>> {
    const STEP: u64 = 1 << 30;
    let size = chain.virtual_size();
    let mut out: Vec<MapEntry> = Vec::new();
    if size == 0 {
        // qemu-img prints one empty entry for an empty image.
        return Ok(vec![MapEntry {
            start: 0,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        }]);
    }
    let mut offset = 0;
    while offset < size {
        let n = STEP.min(size - offset);
        let ext = chain.block_status(offset, n, 0, None)?;
        let e = MapEntry::from_extent(&ext);
        match out.last_mut() {
            Some(last) if last.mergeable(&e) => last.length += e.length,
            _ => out.push(e),
        }
        offset += ext.len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_rules() {
        let a = MapEntry {
            start: 0,
            length: 10,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: Some(100),
        };
        let mut b = MapEntry {
            start: 10,
            offset: Some(110),
            ..a
        };
        assert!(a.mergeable(&b));
        b.offset = Some(120);
        assert!(!a.mergeable(&b));
        let z = MapEntry {
            data: false,
            zero: true,
            offset: None,
            ..a
        };
        assert!(!a.mergeable(&z));
        assert!(z.mergeable(&MapEntry { start: 10, ..z }));
        assert_eq!(
            render_json(&[a, z]),
            "[{ \"start\": 0, \"length\": 10, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 100},\n{ \"start\": 0, \"length\": 10, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false, \"compressed\": false}]\n"
        );
    }
}
