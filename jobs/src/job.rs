//! [`Job`]: one block job running in its own thread, driven through QEMU's
//! state machine, controlled by verbs, observed through queries and events.
//!
//! The lifecycle follows QEMU's `job.c`: `created` → `running` (⇄ `paused`)
//! → on success `waiting` → `pending` (→ `finalize` when auto-finalize is
//! off) → the driver's prepare/commit → `BLOCK_JOB_COMPLETED` →
//! `concluded` → `null` (→ `dismiss` when auto-dismiss is off); on error or
//! cancel `aborting` → the driver's abort → `BLOCK_JOB_COMPLETED` with the
//! error, or `BLOCK_JOB_CANCELLED` → `concluded` → `null`.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::event::{ErrorAction, Event, EventBus, EventKind, IoOperation};
use crate::ratelimit::TokenBucket;
use crate::status::{JobError, JobStatus, JobType, Verb};

/// What a job does on an I/O error (QAPI `BlockdevOnError`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    /// End the job with the error (the default).
    #[default]
    Report,
    /// Go on; the job ends with the error and does not finish its change.
    Ignore,
    /// Pause the job; `resume` retries.
    Stop,
    /// Pause on "no space left", report anything else.
    Enospc,
}

impl OnError {
    /// Parse the QAPI name (`report`, `ignore`, `stop`, `enospc`).
    pub fn from_name(s: &str) -> Option<OnError> {
        Some(match s {
            "report" => OnError::Report,
            "ignore" => OnError::Ignore,
            "stop" => OnError::Stop,
            "enospc" => OnError::Enospc,
            _ => return None,
        })
    }
}

/// A device's I/O status as a block job reports it (`io-status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoStatus {
    /// No error.
    Ok,
    /// An I/O error stopped the job.
    Failed,
    /// Running out of space stopped the job.
    Nospace,
}

/// Options fixed when a job is created.
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// Speed limit in bytes/s (0 = unlimited).
    pub speed: u64,
    /// Finish without waiting for `finalize` (QEMU's default: true).
    pub auto_finalize: bool,
    /// Disappear once concluded without waiting for `dismiss` (default: true).
    pub auto_dismiss: bool,
    /// What to do on I/O errors.
    pub on_error: OnError,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            speed: 0,
            auto_finalize: true,
            auto_dismiss: true,
            on_error: OnError::Report,
        }
    }
}

/// Why a driver's `run` stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError {
    /// The job was cancelled (nothing more to report).
    Cancelled,
    /// A failure, with the message reported in events and queries.
    Failed(String),
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Completed; its change is done.
    Completed,
    /// Failed with this error; nothing was finalized.
    Failed(String),
    /// Cancelled; nothing was finalized.
    Cancelled,
}

/// The work of one kind of job (QEMU's `JobDriver`). `run` does the
/// long-running part in the job's thread; the others are called once, in
/// the job's thread, at the end.
pub trait JobDriver: Send + Sync {
    /// The job type.
    fn job_type(&self) -> JobType;

    /// The progress end known before the job runs (so that queries made
    /// before `run` sets it already show it); `0` when unknown.
    fn expected_len(&self) -> u64 {
        0
    }

    /// Do the work, calling the context's pause points and progress and
    /// rate-limit hooks; return `Err(Cancelled)` when the context says the
    /// job is cancelled.
    fn run(&self, ctx: &JobContext<'_>) -> Result<(), RunError>;

    /// Make the change permanent after a successful run (stream: rewrite
    /// the backing file). An error turns the job into a failure.
    fn prepare(&self) -> Result<(), String> {
        Ok(())
    }

    /// Called after a successful prepare.
    fn commit(&self) {}

    /// Called when the job failed or was cancelled.
    fn abort(&self) {}

    /// Called last in every case.
    fn clean(&self) {}
}

#[derive(Debug)]
struct State {
    status: JobStatus,
    cancelled: bool,
    pause_count: u32,
    user_paused: bool,
    /// Threads of the job doing work (not sleeping, not parked).
    busy: u32,
    speed: u64,
    bucket: TokenBucket,
    io_status: IoStatus,
    /// The first error ignored under `on-error=ignore`.
    ignored_error: Option<String>,
    /// The job's final error (`error` in queries).
    error: Option<String>,
    finalize_requested: bool,
    cur: u64,
    end: u64,
    outcome: Option<Outcome>,
    started: bool,
}

/// One block job. Shared as `Arc<Job>` between its thread and controllers.
pub struct Job {
    id: String,
    job_type: JobType,
    auto_finalize: bool,
    auto_dismiss: bool,
    on_error: OnError,
    epoch: Instant,
    state: Mutex<State>,
    wake: Condvar,
    bus: Arc<EventBus>,
    /// The work; taken by the job's thread and dropped (releasing the
    /// images it holds) before the job concludes.
    driver: Mutex<Option<Box<dyn JobDriver>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("type", &self.job_type)
            .field("state", &*self.lock())
            .finish()
    }
}

/// QEMU's `query-block-jobs` entry (`BlockJobInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    /// Job type (`stream`).
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The job id.
    pub device: String,
    /// Progress end.
    pub len: u64,
    /// Progress so far (never decreases).
    pub offset: u64,
    /// Whether the job is doing work right now (not sleeping or paused).
    pub busy: bool,
    /// Whether a pause was requested (pause count > 0).
    pub paused: bool,
    /// Speed limit in bytes/s.
    pub speed: u64,
    /// I/O status.
    pub io_status: IoStatus,
    /// Whether the job is ready for `complete`.
    pub ready: bool,
    /// Status.
    pub status: JobStatus,
    /// Auto-finalize flag.
    pub auto_finalize: bool,
    /// Auto-dismiss flag.
    pub auto_dismiss: bool,
    /// The error, once the job failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// QEMU's `query-jobs` entry (`JobInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// The job id.
    pub id: String,
    /// Job type.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// Status.
    pub status: JobStatus,
    /// Progress so far.
    pub current_progress: u64,
    /// Progress end.
    pub total_progress: u64,
    /// The error, once the job failed or was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// libvirt's `virDomainBlockJobInfo` view of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LibvirtJobInfo {
    /// libvirt's job type name (`pull`).
    #[serde(rename = "type")]
    pub job_type: &'static str,
    /// Speed limit in bytes/s.
    pub bandwidth: u64,
    /// Progress so far.
    pub cur: u64,
    /// Progress end.
    pub end: u64,
}

impl LibvirtJobInfo {
    /// The view libvirt builds from QEMU's raw `offset`/`len`, with its
    /// quirk for `0/0`: a job that has not started reports `0/1`, one that
    /// finished as a no-op `1/1`, so `cur == end` always means done.
    pub fn from_raw(job_type: JobType, speed: u64, cur: u64, end: u64, done: bool) -> Self {
        let (cur, end) = if cur == 0 && end == 0 {
            (u64::from(done), 1)
        } else {
            (cur, end)
        };
        LibvirtJobInfo {
            job_type: job_type.libvirt_name(),
            bandwidth: speed,
            cur,
            end,
        }
    }

    /// The bandwidth in MiB/s, rounded up as libvirt reports it without
    /// `VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES`.
    pub fn bandwidth_mib(&self) -> u64 {
        self.bandwidth.div_ceil(1 << 20)
    }
}

/// Whether `id` is a well-formed QEMU id: a letter, then letters, digits,
/// `-`, `.` and `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl Job {
    /// Create a job in status `created` (emitting `JOB_STATUS_CHANGE`);
    /// [`Job::start`] runs it. `id` must be well-formed.
    pub fn new(
        id: &str,
        driver: Box<dyn JobDriver>,
        opts: JobOptions,
        bus: Arc<EventBus>,
    ) -> Result<Arc<Job>, JobError> {
        if !id_wellformed(id) {
            return Err(JobError::new("Invalid job ID"));
        }
        let epoch = Instant::now();
        let job = Arc::new(Job {
            id: id.to_string(),
            job_type: driver.job_type(),
            auto_finalize: opts.auto_finalize,
            auto_dismiss: opts.auto_dismiss,
            on_error: opts.on_error,
            epoch,
            state: Mutex::new(State {
                status: JobStatus::Undefined,
                cancelled: false,
                pause_count: 0,
                user_paused: false,
                busy: 0,
                speed: opts.speed,
                bucket: TokenBucket::new(opts.speed, Duration::ZERO),
                io_status: IoStatus::Ok,
                ignored_error: None,
                error: None,
                finalize_requested: false,
                cur: 0,
                end: driver.expected_len(),
                outcome: None,
                started: false,
            }),
            wake: Condvar::new(),
            bus,
            driver: Mutex::new(Some(driver)),
            thread: Mutex::new(None),
        });
        let mut st = job.lock();
        job.transition(&mut st, JobStatus::Created);
        drop(st);
        Ok(job)
    }

    /// Start the job's thread. Starting twice does nothing.
    pub fn start(self: &Arc<Self>) {
        let mut th = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if th.is_some() {
            return;
        }
        let job = self.clone();
        let handle = std::thread::Builder::new()
            .name(format!("job-{}", self.id))
            .spawn(move || job.lifecycle());
        match handle {
            Ok(h) => *th = Some(h),
            Err(e) => {
                // No thread: fail the job the way QEMU fails a job early.
                drop(th);
                let Some(driver) = self.take_driver() else {
                    return;
                };
                let mut st = self.lock();
                st.started = true;
                st.error = Some(format!("cannot start the job thread: {e}"));
                self.transition(&mut st, JobStatus::Aborting);
                self.finish_aborted(st, driver);
            }
        }
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The job type.
    pub fn job_type(&self) -> JobType {
        self.job_type
    }

    /// The event bus the job publishes to.
    pub fn bus(&self) -> &Arc<EventBus> {
        &self.bus
    }

    /// The current status.
    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// Progress `(cur, end)`.
    pub fn progress(&self) -> (u64, u64) {
        let st = self.lock();
        (st.cur, st.end)
    }

    /// The current speed limit (bytes/s, 0 = unlimited).
    pub fn speed(&self) -> u64 {
        self.lock().speed
    }

    /// Whether a user paused the job.
    pub fn is_user_paused(&self) -> bool {
        self.lock().user_paused
    }

    /// Whether the job was asked to cancel.
    pub fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }

    /// How the job ended, once it has concluded.
    pub fn outcome(&self) -> Option<Outcome> {
        self.lock().outcome.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn emit(&self, kind: EventKind) {
        self.bus.publish(Event::now(kind));
    }

    /// Move to `to` (emitting `JOB_STATUS_CHANGE`), as QEMU's
    /// `job_state_transition`. An illegal transition is a bug in this crate;
    /// it is refused (and asserted in debug builds).
    fn transition(&self, st: &mut State, to: JobStatus) {
        let from = st.status;
        debug_assert!(
            from.can_transition_to(to),
            "illegal job transition {from} -> {to}"
        );
        if !from.can_transition_to(to) {
            return;
        }
        st.status = to;
        if from != to {
            self.emit(EventKind::JobStatusChange {
                id: self.id.clone(),
                status: to,
            });
        }
        self.wake.notify_all();
    }

    fn check_verb(&self, st: &State, verb: Verb) -> Result<(), JobError> {
        if verb.allowed_in(st.status) {
            Ok(())
        } else {
            Err(JobError::bad_verb(&self.id, st.status, verb))
        }
    }

    /// `job-cancel`: ask the job to stop. A paused job is resumed so that
    /// it can stop; a job waiting for `finalize` aborts. Returns at once;
    /// use [`Job::wait`] to wait for the end.
    pub fn cancel(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        self.check_verb(&st, Verb::Cancel)?;
        st.cancelled = true;
        if st.user_paused {
            // "Cancelling a paused job automatically resumes it."
            st.user_paused = false;
            st.pause_count = st.pause_count.saturating_sub(1);
            st.io_status = IoStatus::Ok;
        }
        self.wake.notify_all();
        Ok(())
    }

    /// `block-job-cancel`: like [`Job::cancel`], but a paused job is only
    /// cancelled with `force` (QEMU's check).
    pub fn block_job_cancel(&self, force: bool) -> Result<(), JobError> {
        if !force && self.is_user_paused() {
            self.check_verb(&self.lock(), Verb::Cancel)?;
            return Err(JobError::new(format!(
                "The block job for device '{}' is currently paused",
                self.id
            )));
        }
        self.cancel()
    }

    /// `job-pause`: the job pauses at its next pause point (status
    /// `paused` then; `paused` is reported true at once).
    pub fn pause(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        self.check_verb(&st, Verb::Pause)?;
        if st.user_paused {
            return Err(JobError::new("Job is already paused"));
        }
        st.user_paused = true;
        st.pause_count += 1;
        self.wake.notify_all();
        Ok(())
    }

    /// `job-resume`: undo a pause (also clears the I/O error status).
    pub fn resume(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        if !st.user_paused || st.pause_count == 0 {
            return Err(JobError::new("Can't resume a job that was not paused"));
        }
        self.check_verb(&st, Verb::Resume)?;
        st.io_status = IoStatus::Ok;
        st.user_paused = false;
        st.pause_count -= 1;
        self.wake.notify_all();
        Ok(())
    }

    /// `block-job-set-speed`: change the limit (bytes/s, 0 = unlimited).
    /// Takes effect at once, also for a request already waiting.
    pub fn set_speed(&self, speed: u64) -> Result<(), JobError> {
        let mut st = self.lock();
        self.check_verb(&st, Verb::SetSpeed)?;
        st.speed = speed;
        let now = self.now();
        st.bucket.set_rate(speed, now);
        self.wake.notify_all();
        Ok(())
    }

    /// `job-complete`: stream jobs have no second phase, so this is only
    /// ever refused (by the verb table, or because the driver cannot).
    pub fn complete(&self) -> Result<(), JobError> {
        let st = self.lock();
        self.check_verb(&st, Verb::Complete)?;
        Err(JobError::new(format!(
            "The active block job '{}' cannot be completed",
            self.id
        )))
    }

    /// `job-finalize`: finish a job waiting in `pending`; returns once it
    /// has concluded.
    pub fn finalize(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        self.check_verb(&st, Verb::Finalize)?;
        st.finalize_requested = true;
        self.wake.notify_all();
        while st.status == JobStatus::Pending {
            st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// `job-dismiss`: remove a concluded job (status `null`).
    pub fn dismiss(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        self.check_verb(&st, Verb::Dismiss)?;
        self.transition(&mut st, JobStatus::Null);
        Ok(())
    }

    /// Wait until the job has concluded (or been dismissed) and return how
    /// it ended.
    pub fn wait(&self) -> Outcome {
        let mut st = self.lock();
        loop {
            if let Some(o) = &st.outcome {
                if matches!(st.status, JobStatus::Concluded | JobStatus::Null) {
                    return o.clone();
                }
            }
            st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Wait up to `timeout` for the job to conclude; `None` on timeout.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Outcome> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(o) = &st.outcome {
                if matches!(st.status, JobStatus::Concluded | JobStatus::Null) {
                    return Some(o.clone());
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            st = self
                .wake
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Join the job's thread (after it concluded).
    pub fn join(&self) {
        let h = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }

    /// The `query-block-jobs` view.
    pub fn query_block_job(&self) -> BlockJobInfo {
        let st = self.lock();
        BlockJobInfo {
            job_type: self.job_type,
            device: self.id.clone(),
            len: st.end,
            offset: st.cur,
            busy: st.busy > 0,
            paused: st.pause_count > 0,
            speed: st.speed,
            io_status: st.io_status,
            ready: matches!(st.status, JobStatus::Ready | JobStatus::Standby),
            status: st.status,
            auto_finalize: self.auto_finalize,
            auto_dismiss: self.auto_dismiss,
            error: st.error.clone(),
        }
    }

    /// The `query-jobs` view.
    pub fn query_job(&self) -> JobInfo {
        let st = self.lock();
        JobInfo {
            id: self.id.clone(),
            job_type: self.job_type,
            status: st.status,
            current_progress: st.cur,
            total_progress: st.end,
            error: st.error.clone(),
        }
    }

    /// The libvirt `virDomainGetBlockJobInfo` view (bandwidth in bytes/s).
    pub fn libvirt_info(&self) -> LibvirtJobInfo {
        let st = self.lock();
        let done = st.status.is_finished() || matches!(st.status, JobStatus::Ready);
        LibvirtJobInfo::from_raw(self.job_type, st.speed, st.cur, st.end, done)
    }

    // ---- the job's thread ----

    fn take_driver(&self) -> Option<Box<dyn JobDriver>> {
        self.driver.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn lifecycle(self: Arc<Self>) {
        let Some(driver) = self.take_driver() else {
            return;
        };
        let mut st = self.lock();
        st.started = true;
        if st.cancelled {
            // Cancelled before it ran: straight to aborting.
            self.transition(&mut st, JobStatus::Aborting);
            return self.finish_aborted(st, driver);
        }
        self.transition(&mut st, JobStatus::Running);
        st.busy += 1;
        drop(st);
        let ctx = JobContext { job: &self };
        let r = driver.run(&ctx);
        let mut st = self.lock();
        st.busy = st.busy.saturating_sub(1);
        let failure = match r {
            Err(RunError::Failed(msg)) => Some(msg),
            Err(RunError::Cancelled) => None,
            Ok(()) => st.ignored_error.clone(),
        };
        if st.cancelled || failure.is_some() {
            st.error = failure;
            self.transition(&mut st, JobStatus::Aborting);
            return self.finish_aborted(st, driver);
        }
        self.transition(&mut st, JobStatus::Waiting);
        self.transition(&mut st, JobStatus::Pending);
        if !self.auto_finalize {
            self.emit(EventKind::BlockJobPending {
                job_type: self.job_type,
                id: self.id.clone(),
            });
            while !st.finalize_requested && !st.cancelled {
                st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.cancelled {
                self.transition(&mut st, JobStatus::Aborting);
                return self.finish_aborted(st, driver);
            }
        }
        drop(st);
        let prepared = driver.prepare();
        let mut st = self.lock();
        if let Err(msg) = prepared {
            st.error = Some(msg);
            self.transition(&mut st, JobStatus::Aborting);
            return self.finish_aborted(st, driver);
        }
        drop(st);
        driver.commit();
        driver.clean();
        drop(driver);
        let mut st = self.lock();
        self.emit(EventKind::BlockJobCompleted {
            job_type: self.job_type,
            device: self.id.clone(),
            len: st.end,
            offset: st.cur,
            speed: st.speed,
            error: None,
        });
        st.outcome = Some(Outcome::Completed);
        self.conclude(st);
    }

    /// From `aborting`: the driver's abort and clean, the final event,
    /// conclude.
    fn finish_aborted(&self, st: MutexGuard<'_, State>, driver: Box<dyn JobDriver>) {
        drop(st);
        driver.abort();
        driver.clean();
        drop(driver);
        let mut st = self.lock();
        if st.cancelled {
            // QEMU reports a cancelled job's error as strerror(ECANCELED).
            st.error.get_or_insert_with(|| "Operation canceled".into());
            self.emit(EventKind::BlockJobCancelled {
                job_type: self.job_type,
                device: self.id.clone(),
                len: st.end,
                offset: st.cur,
                speed: st.speed,
            });
            st.outcome = Some(Outcome::Cancelled);
        } else {
            let msg = st.error.clone().unwrap_or_else(|| "unknown error".into());
            st.error = Some(msg.clone());
            self.emit(EventKind::BlockJobCompleted {
                job_type: self.job_type,
                device: self.id.clone(),
                len: st.end,
                offset: st.cur,
                speed: st.speed,
                error: Some(msg.clone()),
            });
            st.outcome = Some(Outcome::Failed(msg));
        }
        self.conclude(st);
    }

    fn conclude(&self, mut st: MutexGuard<'_, State>) {
        st.busy = 0;
        self.transition(&mut st, JobStatus::Concluded);
        if self.auto_dismiss {
            self.transition(&mut st, JobStatus::Null);
        }
        self.wake.notify_all();
    }
}

/// What a [`JobDriver`] sees of its job while running: cancellation, pause
/// points, progress, the rate limit and error handling. Safe to use from
/// the driver's worker threads.
pub struct JobContext<'a> {
    job: &'a Job,
}

/// The result of [`JobContext::throttle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Throttle {
    /// The bytes may be copied now.
    Go,
    /// The job was cancelled while waiting (no tokens were taken).
    Cancelled,
}

impl JobContext<'_> {
    /// The job id.
    pub fn id(&self) -> &str {
        &self.job.id
    }

    /// Whether the job has been asked to cancel.
    pub fn is_cancelled(&self) -> bool {
        self.job.lock().cancelled
    }

    /// Whether a pause was requested (the driver should come to a pause
    /// point soon).
    pub fn pause_requested(&self) -> bool {
        let st = self.job.lock();
        st.pause_count > 0 && !st.cancelled
    }

    /// QEMU's `job_pause_point`: if a pause was requested, report `paused`
    /// and block until resumed (or cancelled), then report `running`.
    /// Call it only with no I/O of the job in flight.
    pub fn pause_point(&self) {
        let job = self.job;
        let mut st = job.lock();
        if st.pause_count == 0 || st.cancelled {
            return;
        }
        let from = st.status;
        let (parked, back) = match from {
            JobStatus::Ready => (JobStatus::Standby, JobStatus::Ready),
            _ => (JobStatus::Paused, JobStatus::Running),
        };
        job.transition(&mut st, parked);
        st.busy = st.busy.saturating_sub(1);
        while st.pause_count > 0 && !st.cancelled {
            st = job.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.busy += 1;
        job.transition(&mut st, back);
    }

    /// Set the progress end (QEMU's `len`; the stream job's virtual size).
    pub fn set_progress_end(&self, end: u64) {
        self.job.lock().end = end;
    }

    /// Add `n` bytes of progress (skipped or copied alike).
    pub fn add_progress(&self, n: u64) {
        let mut st = self.job.lock();
        st.cur = st.cur.saturating_add(n);
        if st.cur > st.end {
            st.end = st.cur;
        }
    }

    /// The current speed limit in bytes/s (0 = unlimited).
    pub fn speed(&self) -> u64 {
        self.job.lock().speed
    }

    /// The request size to use for rate-limited copying now.
    pub fn piece(&self) -> u64 {
        self.job.lock().bucket.piece()
    }

    /// Wait until `n` bytes may be copied under the speed limit. The wait
    /// is woken by set-speed (re-evaluated at the new rate, never letting
    /// the request through early) and by cancel (returns
    /// [`Throttle::Cancelled`]).
    pub fn throttle(&self, n: u64) -> Throttle {
        let job = self.job;
        let mut st = job.lock();
        let mut waiting = false;
        let result = loop {
            if st.cancelled {
                break Throttle::Cancelled;
            }
            let now = job.now();
            let Some(wait) = st.bucket.take(n, now) else {
                break Throttle::Go;
            };
            if !waiting {
                // Tokens overflowing while we wait (not scheduled in time)
                // are owed back by the bucket.
                st.bucket.add_waiter(now);
                waiting = true;
            }
            st.busy = st.busy.saturating_sub(1);
            st = job
                .wake
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            st.busy += 1;
        };
        if waiting {
            let now = job.now();
            st.bucket.remove_waiter(now);
        }
        result
    }

    /// Mark one more thread of the job as busy (a worker starting);
    /// [`JobContext::idle`] undoes it.
    pub fn busy(&self) {
        self.job.lock().busy += 1;
    }

    /// Mark a worker thread as finished.
    pub fn idle(&self) {
        let mut st = self.job.lock();
        st.busy = st.busy.saturating_sub(1);
    }

    /// Apply the job's on-error policy to an I/O error (QEMU's
    /// `block_job_error_action`): emits `BLOCK_JOB_ERROR` and returns what
    /// to do. On [`ErrorAction::Stop`] the job is paused as by a user (the
    /// caller goes to a pause point and then retries); on
    /// [`ErrorAction::Ignore`] the error is remembered and the job will end
    /// with it.
    pub fn error_action(&self, msg: &str, op: IoOperation, nospace: bool) -> ErrorAction {
        let job = self.job;
        let action = match job.on_error {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc if nospace => ErrorAction::Stop,
            OnError::Enospc => ErrorAction::Report,
        };
        let mut st = job.lock();
        job.emit(EventKind::BlockJobError {
            device: job.id.clone(),
            operation: op,
            action,
        });
        match action {
            ErrorAction::Stop => {
                if !st.user_paused {
                    st.user_paused = true;
                    st.pause_count += 1;
                }
                st.io_status = if nospace {
                    IoStatus::Nospace
                } else {
                    IoStatus::Failed
                };
            }
            ErrorAction::Ignore => {
                st.ignored_error.get_or_insert_with(|| msg.to_string());
            }
            ErrorAction::Report => {}
        }
        action
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::mpsc::Receiver;

    /// A driver that makes `steps` units of progress, 1 byte each, with a
    /// pause point and a rate-limited step in between; it can fail at a
    /// given step.
    struct Counter {
        steps: u64,
        fail_at: Option<u64>,
        prepare_fails: bool,
        gate: Mutex<bool>,
        gate_cv: Condvar,
        calls: Mutex<Vec<&'static str>>,
        errors_seen: AtomicU32,
        retried: AtomicBool,
    }

    impl Counter {
        fn new(steps: u64) -> Counter {
            Counter {
                steps,
                fail_at: None,
                prepare_fails: false,
                gate: Mutex::new(true),
                gate_cv: Condvar::new(),
                calls: Mutex::new(vec![]),
                errors_seen: AtomicU32::new(0),
                retried: AtomicBool::new(false),
            }
        }
        fn close_gate(&self) {
            *self.gate.lock().unwrap() = false;
        }
        fn open_gate(&self) {
            *self.gate.lock().unwrap() = true;
            self.gate_cv.notify_all();
        }
    }

    impl JobDriver for Arc<Counter> {
        fn job_type(&self) -> JobType {
            JobType::Stream
        }
        fn run(&self, ctx: &JobContext<'_>) -> Result<(), RunError> {
            ctx.set_progress_end(self.steps);
            let mut i = 0;
            while i < self.steps {
                ctx.pause_point();
                if ctx.is_cancelled() {
                    return Err(RunError::Cancelled);
                }
                {
                    let mut g = self.gate.lock().unwrap();
                    while !*g && !ctx.is_cancelled() {
                        g = self
                            .gate_cv
                            .wait_timeout(g, Duration::from_millis(5))
                            .unwrap()
                            .0;
                    }
                }
                if Some(i) == self.fail_at && !self.retried.load(Ordering::SeqCst) {
                    self.errors_seen.fetch_add(1, Ordering::SeqCst);
                    match ctx.error_action("Input/output error", IoOperation::Read, false) {
                        ErrorAction::Report => {
                            return Err(RunError::Failed("Input/output error".into()))
                        }
                        ErrorAction::Stop => {
                            self.retried.store(true, Ordering::SeqCst);
                            continue;
                        }
                        ErrorAction::Ignore => {}
                    }
                }
                if ctx.throttle(1) == Throttle::Cancelled {
                    return Err(RunError::Cancelled);
                }
                ctx.add_progress(1);
                i += 1;
            }
            Ok(())
        }
        fn prepare(&self) -> Result<(), String> {
            self.calls.lock().unwrap().push("prepare");
            if self.prepare_fails {
                Err("could not rewrite the header".into())
            } else {
                Ok(())
            }
        }
        fn commit(&self) {
            self.calls.lock().unwrap().push("commit");
        }
        fn abort(&self) {
            self.calls.lock().unwrap().push("abort");
        }
        fn clean(&self) {
            self.calls.lock().unwrap().push("clean");
        }
    }

    fn names(rx: &Receiver<Event>) -> Vec<String> {
        rx.try_iter()
            .map(|e| match &e.kind {
                EventKind::JobStatusChange { status, .. } => status.name().to_string(),
                _ => e.name().to_string(),
            })
            .collect()
    }

    fn make(c: &Arc<Counter>, opts: JobOptions) -> (Arc<Job>, Receiver<Event>) {
        let bus = Arc::new(EventBus::new());
        let rx = bus.subscribe();
        let job = Job::new("pull0", Box::new(c.clone()), opts, bus).unwrap();
        (job, rx)
    }

    fn wait_for(job: &Job, s: JobStatus) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while job.status() != s {
            assert!(
                Instant::now() < deadline,
                "timeout waiting for {s}, at {}",
                job.status()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn success_sequence_like_qemu() {
        let c = Arc::new(Counter::new(100));
        let (job, rx) = make(&c, JobOptions::default());
        assert_eq!(job.status(), JobStatus::Created);
        job.start();
        assert_eq!(job.wait(), Outcome::Completed);
        job.join();
        assert_eq!(
            names(&rx),
            [
                "created",
                "running",
                "waiting",
                "pending",
                "BLOCK_JOB_COMPLETED",
                "concluded",
                "null"
            ]
        );
        assert_eq!(*c.calls.lock().unwrap(), ["prepare", "commit", "clean"]);
        assert_eq!(job.progress(), (100, 100));
        assert_eq!(
            job.dismiss().unwrap_err().to_string(),
            "Job 'pull0' in state 'null' cannot accept command verb 'dismiss'"
        );
    }

    #[test]
    fn manual_finalize_and_dismiss() {
        let c = Arc::new(Counter::new(10));
        let opts = JobOptions {
            auto_finalize: false,
            auto_dismiss: false,
            ..Default::default()
        };
        let (job, rx) = make(&c, opts);
        job.start();
        wait_for(&job, JobStatus::Pending);
        let q = job.query_block_job();
        assert_eq!(
            (q.status, q.offset, q.len, q.ready),
            (JobStatus::Pending, 10, 10, false)
        );
        assert_eq!(
            job.dismiss().unwrap_err().to_string(),
            "Job 'pull0' in state 'pending' cannot accept command verb 'dismiss'"
        );
        assert!(job.set_speed(5).is_err());
        job.finalize().unwrap();
        assert_eq!(job.status(), JobStatus::Concluded);
        assert_eq!(job.query_job().error, None);
        job.dismiss().unwrap();
        assert_eq!(job.status(), JobStatus::Null);
        assert_eq!(
            names(&rx),
            [
                "created",
                "running",
                "waiting",
                "pending",
                "BLOCK_JOB_PENDING",
                "BLOCK_JOB_COMPLETED",
                "concluded",
                "null"
            ]
        );
        job.join();
    }

    #[test]
    fn cancel_while_pending_aborts() {
        let c = Arc::new(Counter::new(3));
        let opts = JobOptions {
            auto_finalize: false,
            ..Default::default()
        };
        let (job, rx) = make(&c, opts);
        job.start();
        wait_for(&job, JobStatus::Pending);
        job.cancel().unwrap();
        assert_eq!(job.wait(), Outcome::Cancelled);
        let n = names(&rx);
        assert_eq!(
            &n[3..],
            [
                "pending",
                "BLOCK_JOB_PENDING",
                "aborting",
                "BLOCK_JOB_CANCELLED",
                "concluded",
                "null"
            ]
        );
        assert_eq!(*c.calls.lock().unwrap(), ["abort", "clean"]);
        job.join();
    }

    #[test]
    fn pause_resume_cancel() {
        let c = Arc::new(Counter::new(1_000_000));
        let (job, rx) = make(&c, JobOptions::default());
        c.close_gate();
        job.start();
        wait_for(&job, JobStatus::Running);
        job.pause().unwrap();
        assert!(job.query_block_job().paused, "paused reported at once");
        assert_eq!(
            job.pause().unwrap_err().to_string(),
            "Job is already paused"
        );
        c.open_gate();
        wait_for(&job, JobStatus::Paused);
        let q = job.query_block_job();
        assert!(q.paused && !q.busy);
        let at = job.progress().0;
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(job.progress().0, at, "no progress while paused");
        assert_eq!(
            job.complete().unwrap_err().to_string(),
            "Job 'pull0' in state 'paused' cannot accept command verb 'complete'"
        );
        assert_eq!(
            job.block_job_cancel(false).unwrap_err().to_string(),
            "The block job for device 'pull0' is currently paused"
        );
        job.resume().unwrap();
        assert_eq!(
            job.resume().unwrap_err().to_string(),
            "Can't resume a job that was not paused"
        );
        wait_for(&job, JobStatus::Running);
        job.set_speed(1000).unwrap();
        assert_eq!(job.query_block_job().speed, 1000);
        job.pause().unwrap();
        wait_for(&job, JobStatus::Paused);
        // Cancelling a paused job resumes it first, as QEMU does.
        job.block_job_cancel(true).unwrap();
        assert_eq!(job.wait(), Outcome::Cancelled);
        let n = names(&rx);
        assert_eq!(
            n,
            [
                "created",
                "running",
                "paused",
                "running",
                "paused",
                "running",
                "aborting",
                "BLOCK_JOB_CANCELLED",
                "concluded",
                "null"
            ]
        );
        assert!(job.progress().0 < 1_000_000);
        job.join();
    }

    #[test]
    fn rate_limited_job_sleeps_and_cancel_wakes_it() {
        let c = Arc::new(Counter::new(1_000_000));
        let opts = JobOptions {
            speed: 1,
            ..Default::default()
        };
        let (job, _rx) = make(&c, opts);
        job.start();
        wait_for(&job, JobStatus::Running);
        std::thread::sleep(Duration::from_millis(30));
        let q = job.query_block_job();
        assert!(!q.busy, "sleeping on the rate limit is not busy");
        assert_eq!(q.offset, 0, "1 byte/s: the first byte needs a full token");
        let t = Instant::now();
        job.cancel().unwrap();
        assert_eq!(job.wait(), Outcome::Cancelled);
        assert!(t.elapsed() < Duration::from_secs(2));
        let q = job.query_job();
        assert_eq!(q.error.as_deref(), Some("Operation canceled"));
        job.join();
    }

    #[test]
    fn set_speed_wakes_a_sleeping_job() {
        let c = Arc::new(Counter::new(1000));
        let opts = JobOptions {
            speed: 1,
            ..Default::default()
        };
        let (job, _rx) = make(&c, opts);
        job.start();
        std::thread::sleep(Duration::from_millis(20));
        job.set_speed(0).unwrap();
        assert_eq!(
            job.wait_timeout(Duration::from_secs(10)),
            Some(Outcome::Completed)
        );
        job.join();
    }

    #[test]
    fn failure_reports_error() {
        let mut c = Counter::new(10);
        c.fail_at = Some(4);
        let c = Arc::new(c);
        let (job, rx) = make(&c, JobOptions::default());
        job.start();
        let o = job.wait();
        assert_eq!(o, Outcome::Failed("Input/output error".into()));
        let evs: Vec<_> = rx.try_iter().collect();
        let n: Vec<_> = evs.iter().map(|e| e.name()).collect();
        assert_eq!(
            n,
            [
                "JOB_STATUS_CHANGE",
                "JOB_STATUS_CHANGE",
                "BLOCK_JOB_ERROR",
                "JOB_STATUS_CHANGE",
                "BLOCK_JOB_COMPLETED",
                "JOB_STATUS_CHANGE",
                "JOB_STATUS_CHANGE"
            ]
        );
        assert_eq!(evs[3].data()["status"], "aborting");
        assert_eq!(evs[4].data()["error"], "Input/output error");
        assert_eq!(evs[4].data()["offset"], 4);
        assert_eq!(*c.calls.lock().unwrap(), ["abort", "clean"]);
        job.join();
    }

    #[test]
    fn on_error_stop_pauses_and_resume_retries() {
        let mut c = Counter::new(10);
        c.fail_at = Some(3);
        let c = Arc::new(c);
        let opts = JobOptions {
            on_error: OnError::Stop,
            ..Default::default()
        };
        let (job, rx) = make(&c, opts);
        job.start();
        wait_for(&job, JobStatus::Paused);
        let q = job.query_block_job();
        assert_eq!(q.io_status, IoStatus::Failed);
        assert!(q.paused);
        job.resume().unwrap();
        assert_eq!(job.wait(), Outcome::Completed);
        let n = names(&rx);
        assert_eq!(&n[2..5], ["BLOCK_JOB_ERROR", "paused", "running"]);
        assert_eq!(c.errors_seen.load(Ordering::SeqCst), 1);
        job.join();
    }

    #[test]
    fn on_error_ignore_ends_with_the_error_without_prepare() {
        let mut c = Counter::new(10);
        c.fail_at = Some(3);
        let c = Arc::new(c);
        let opts = JobOptions {
            on_error: OnError::Ignore,
            ..Default::default()
        };
        let (job, _rx) = make(&c, opts);
        job.start();
        assert_eq!(job.wait(), Outcome::Failed("Input/output error".into()));
        assert_eq!(job.progress(), (10, 10));
        assert_eq!(*c.calls.lock().unwrap(), ["abort", "clean"]);
        job.join();
    }

    #[test]
    fn prepare_failure_fails_the_job() {
        let mut c = Counter::new(2);
        c.prepare_fails = true;
        let c = Arc::new(c);
        let opts = JobOptions {
            auto_dismiss: false,
            ..Default::default()
        };
        let (job, _rx) = make(&c, opts);
        job.start();
        assert_eq!(
            job.wait(),
            Outcome::Failed("could not rewrite the header".into())
        );
        assert_eq!(job.status(), JobStatus::Concluded);
        let q = job.query_block_job();
        assert_eq!(q.error.as_deref(), Some("could not rewrite the header"));
        assert_eq!(*c.calls.lock().unwrap(), ["prepare", "abort", "clean"]);
        job.dismiss().unwrap();
        job.join();
    }

    #[test]
    fn cancel_before_start() {
        let c = Arc::new(Counter::new(2));
        let (job, rx) = make(&c, JobOptions::default());
        job.cancel().unwrap();
        job.start();
        assert_eq!(job.wait(), Outcome::Cancelled);
        assert_eq!(
            names(&rx),
            [
                "created",
                "aborting",
                "BLOCK_JOB_CANCELLED",
                "concluded",
                "null"
            ]
        );
        job.join();
    }

    #[test]
    fn ids_and_views() {
        assert!(id_wellformed("pull-vda-libvirt-1-format"));
        assert!(!id_wellformed("1abc"));
        assert!(!id_wellformed(""));
        assert!(!id_wellformed("a b"));
        let c = Arc::new(Counter::new(2));
        let e = Job::new("9", Box::new(c), JobOptions::default(), Arc::default()).unwrap_err();
        assert_eq!(e.to_string(), "Invalid job ID");
        let v = LibvirtJobInfo::from_raw(JobType::Stream, 5, 0, 0, false);
        assert_eq!((v.cur, v.end), (0, 1));
        let v = LibvirtJobInfo::from_raw(JobType::Stream, 5, 0, 0, true);
        assert_eq!((v.cur, v.end), (1, 1));
        let v = LibvirtJobInfo::from_raw(JobType::Stream, (1 << 20) + 1, 3, 9, true);
        assert_eq!((v.cur, v.end, v.bandwidth_mib()), (3, 9, 2));
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            serde_json::json!({"type": "pull", "bandwidth": (1u64 << 20) + 1, "cur": 3, "end": 9})
        );
        let info = BlockJobInfo {
            job_type: JobType::Stream,
            device: "pull0".into(),
            len: 1,
            offset: 0,
            busy: false,
            paused: false,
            speed: 0,
            io_status: IoStatus::Ok,
            ready: false,
            status: JobStatus::Running,
            auto_finalize: true,
            auto_dismiss: true,
            error: None,
        };
        let v = serde_json::to_value(&info).unwrap();
        for k in [
            "type",
            "device",
            "len",
            "offset",
            "busy",
            "paused",
            "speed",
            "io-status",
            "ready",
            "status",
            "auto-finalize",
            "auto-dismiss",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert!(v.get("error").is_none());
        assert_eq!(v["io-status"], "ok");
    }
}
