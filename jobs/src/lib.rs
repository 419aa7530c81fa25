//! Block jobs on open backing chains.
//!
//! * [`status`] — QEMU's job state machine: statuses, transitions, verbs,
//!   and QEMU's error texts.
//! * [`job`] — [`Job`]: a job running in its own thread, controlled by
//!   verbs (cancel, pause, resume, set-speed, finalize, dismiss), observed
//!   through QEMU's and libvirt's query views; [`JobDriver`] is what a
//!   kind of job implements.
//! * [`event`] — `JOB_STATUS_CHANGE` / `BLOCK_JOB_*` events and the bus
//!   that delivers each to every subscriber.
//! * [`ratelimit`] — the token bucket behind the speed limit.
//! * [`stream`] — the stream (pull) job.
//!
//! Nothing here is specific to the command line: the daemon's QMP socket
//! drives the same [`Job`]s while its guest queues do I/O on the same
//! open chain (the stream job takes the top's range locks).
//!
//! ```no_run
//! use std::sync::Arc;
//! use imgpull_chain::{Chain, ChainOptions};
//! use imgpull_jobs::{EventBus, Job, JobOptions, Outcome, StreamJob, StreamOptions};
//!
//! let opts = ChainOptions { writable: true, ..Default::default() };
//! let chain = Arc::new(Chain::open("top.qcow2", &opts)?);
//! // Keep layer 2 (the top's backing's backing) as the new backing file.
//! let stream = StreamJob::new(chain.clone(), &StreamOptions { base: Some(2), ..Default::default() })?;
//! let bus = Arc::new(EventBus::new());
//! let events = bus.subscribe(); // JOB_STATUS_CHANGE, BLOCK_JOB_COMPLETED, ...
//! let job = Job::new("pull0", Box::new(stream), JobOptions { speed: 64 << 20, ..Default::default() }, bus)
//!     .expect("valid job id");
//! job.start();
//! job.set_speed(0).ok(); // any verb, from any thread, while it runs
//! assert_eq!(job.wait(), Outcome::Completed);
//! for e in events.try_iter() {
//!     println!("{}", e.to_qmp());
//! }
//! # Ok::<(), imgpull_image::Error>(())
//! ```
#![warn(missing_docs)]

pub mod event;
pub mod job;
pub mod ratelimit;
pub mod registry;
pub mod status;
pub mod stream;

pub use event::{ErrorAction, Event, EventBus, EventKind, IoOperation};
pub use job::{
    BlockJobInfo, IoStatus, Job, JobContext, JobDriver, JobInfo, JobOptions, LibvirtJobInfo,
    OnError, Outcome, RunError, Throttle,
};
pub use registry::JobRegistry;
pub use status::{JobError, JobStatus, JobType, Verb};
pub use stream::{StreamJob, StreamOptions, StreamStats};
