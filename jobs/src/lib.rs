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
