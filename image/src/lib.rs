//! One layer of a disk-image chain.
//!
//! * [`Driver`] — the format-driver interface: where a guest range of this
//!   layer lives, and how to make a range writable.
//! * [`qcow2`], [`qed`], [`raw`] — the drivers.
//! * [`Storage`] — the byte storage under a driver (the I/O backend);
//!   [`uring`] has the io_uring backend and the backend choice.
//! * [`Image`] — an open layer file: driver + path, with the generic read
//!   and copy-on-write paths every user shares.
#![warn(missing_docs)]

pub mod driver;
pub mod error;
pub mod image;
pub mod lock;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod storage;
pub mod uring;

pub use driver::{BackingFile, Driver, Extent, Format, HostRun, InfoValue, LayerInfo, Status};
pub use error::{Error, ErrorKind, Result, ResultExt};
pub use image::{
    probe, CreateOptions, GuestRead, Image, OpenOptions, RangeGuard, RangeLocks, Zeros,
};
pub use storage::{Allocation, IoReq, Storage, SyncFile};
pub use uring::{io_counters, submit_many, FixedBuf, FixedPool, IoCounters, PreadFile, UringFile};
