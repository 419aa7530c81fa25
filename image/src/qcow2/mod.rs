//! qcow2 (v2 and v3). PLACEHOLDER: being written.

use crate::driver::{BackingFile, Driver, Extent, HostRun, LayerInfo};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    storage: Box<dyn Storage>,
}

impl Qcow2 {
    /// Open a qcow2 image over `storage`.
    pub fn open(storage: Box<dyn Storage>, _writable: bool) -> Result<Qcow2> {
        let _ = storage;
        Err(Error::unsupported("qcow2 not yet implemented"))
    }
}

/// Create a qcow2 image.
pub fn create(
    _s: &dyn Storage,
    _size: u64,
    _b: Option<&BackingFile>,
    _o: &[(String, String)],
) -> Result<()> {
    Err(Error::unsupported("qcow2 not yet implemented"))
}

impl Driver for Qcow2 {
    fn info(&self) -> LayerInfo {
        unimplemented!()
    }
    fn storage(&self) -> &dyn Storage {
        &*self.storage
    }
    fn block_status(&self, _o: u64, _l: u64) -> Result<Extent> {
        unimplemented!()
    }
    fn read_compressed(&self, _o: u64, _b: &mut [u8]) -> Result<()> {
        unimplemented!()
    }
    fn granularity(&self) -> u64 {
        unimplemented!()
    }
    fn prepare_write(&self, _o: u64, _l: u64) -> Result<Vec<HostRun>> {
        unimplemented!()
    }
    fn commit_write(&self, _r: &[HostRun]) -> Result<()> {
        unimplemented!()
    }
    fn zero_range(&self, _o: u64, _l: u64) -> Result<bool> {
        unimplemented!()
    }
    fn flush(&self) -> Result<()> {
        unimplemented!()
    }
    fn set_backing(&self, _b: Option<&BackingFile>) -> Result<()> {
        unimplemented!()
    }
}
