//! Job events as QEMU emits them (`JOB_STATUS_CHANGE`, `BLOCK_JOB_*`) and
//! the bus that delivers every event to every subscriber.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::status::{JobStatus, JobType};

/// Which kind of I/O failed (`BLOCK_JOB_ERROR`'s `operation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOperation {
    /// Reading.
    Read,
    /// Writing.
    Write,
}

impl IoOperation {
    /// The QAPI name.
    pub fn name(self) -> &'static str {
        match self {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
        }
    }
}

/// What a job did about an I/O error (`BLOCK_JOB_ERROR`'s `action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorAction {
    /// Ended the job with the error.
    Report,
    /// Went on; the job will end with the error.
    Ignore,
    /// Paused the job; `resume` retries.
    Stop,
}

impl ErrorAction {
    /// The QAPI name.
    pub fn name(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// The body of an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `JOB_STATUS_CHANGE`: emitted on every status transition.
    JobStatusChange {
        /// Job id.
        id: String,
        /// The new status.
        status: JobStatus,
    },
    /// `BLOCK_JOB_COMPLETED`: the job finished; `error` is set when it failed.
    BlockJobCompleted {
        /// Job type.
        job_type: JobType,
        /// Job id (QEMU's `device`).
        device: String,
        /// Progress end (`len`).
        len: u64,
        /// Progress reached (`offset`).
        offset: u64,
        /// Speed limit in bytes/s.
        speed: u64,
        /// The error, when the job failed.
        error: Option<String>,
    },
    /// `BLOCK_JOB_CANCELLED`: the job was cancelled.
    BlockJobCancelled {
        /// Job type.
        job_type: JobType,
        /// Job id (QEMU's `device`).
        device: String,
        /// Progress end (`len`).
        len: u64,
        /// Progress reached (`offset`).
        offset: u64,
        /// Speed limit in bytes/s.
        speed: u64,
    },
    /// `BLOCK_JOB_ERROR`: an I/O error and what the job did about it.
    BlockJobError {
        /// Job id (QEMU's `device`).
        device: String,
        /// Reading or writing.
        operation: IoOperation,
        /// The action taken.
        action: ErrorAction,
    },
    /// `BLOCK_JOB_PENDING`: waiting for `finalize` (auto-finalize off).
    BlockJobPending {
        /// Job type.
        job_type: JobType,
        /// Job id.
        id: String,
    },
}

/// An event with the wall-clock time it was emitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// When it was emitted.
    pub timestamp: SystemTime,
    /// What happened.
    pub kind: EventKind,
}

impl Event {
    /// An event stamped now.
    pub fn now(kind: EventKind) -> Event {
        Event {
            timestamp: SystemTime::now(),
            kind,
        }
    }

    /// The QMP event name (`JOB_STATUS_CHANGE`, `BLOCK_JOB_COMPLETED`, ...).
    pub fn name(&self) -> &'static str {
        match self.kind {
            EventKind::JobStatusChange { .. } => "JOB_STATUS_CHANGE",
            EventKind::BlockJobCompleted { .. } => "BLOCK_JOB_COMPLETED",
            EventKind::BlockJobCancelled { .. } => "BLOCK_JOB_CANCELLED",
            EventKind::BlockJobError { .. } => "BLOCK_JOB_ERROR",
            EventKind::BlockJobPending { .. } => "BLOCK_JOB_PENDING",
        }
    }

    /// The job the event is about.
    pub fn job_id(&self) -> &str {
        match &self.kind {
            EventKind::JobStatusChange { id, .. } | EventKind::BlockJobPending { id, .. } => id,
            EventKind::BlockJobCompleted { device, .. }
            | EventKind::BlockJobCancelled { device, .. }
            | EventKind::BlockJobError { device, .. } => device,
        }
    }

    /// The QMP `data` member, with QEMU's field names.
    pub fn data(&self) -> Value {
        match &self.kind {
            EventKind::JobStatusChange { id, status } => {
                json!({"status": status.name(), "id": id})
            }
            EventKind::BlockJobCompleted {
                job_type,
                device,
                len,
                offset,
                speed,
                error,
            } => {
                let mut m = Map::new();
                m.insert("device".into(), json!(device));
                m.insert("len".into(), json!(len));
                m.insert("offset".into(), json!(offset));
                m.insert("speed".into(), json!(speed));
                m.insert("type".into(), json!(job_type.name()));
                if let Some(e) = error {
                    m.insert("error".into(), json!(e));
                }
                Value::Object(m)
            }
            EventKind::BlockJobCancelled {
                job_type,
                device,
                len,
                offset,
                speed,
            } => json!({
                "device": device,
                "len": len,
                "offset": offset,
                "speed": speed,
                "type": job_type.name(),
            }),
            EventKind::BlockJobError {
                device,
                operation,
                action,
            } => json!({
                "device": device,
                "operation": operation.name(),
                "action": action.name(),
            }),
            EventKind::BlockJobPending { job_type, id } => {
                json!({"type": job_type.name(), "id": id})
            }
        }
    }

    /// The whole QMP event object:
    /// `{"timestamp": {"seconds", "microseconds"}, "event", "data"}`.
    pub fn to_qmp(&self) -> Value {
        let since = self
            .timestamp
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        json!({
            "timestamp": {"seconds": since.as_secs(), "microseconds": since.subsec_micros()},
            "event": self.name(),
            "data": self.data(),
        })
    }
}

/// Delivers every published event to every current subscriber, in order.
/// One bus may be shared by many jobs (a daemon's QMP monitor subscribes
/// once for all of them).
#[derive(Debug, Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<Sender<Event>>>,
}

impl EventBus {
    /// A bus with no subscribers.
    pub fn new() -> EventBus {
        EventBus::default()
    }

    /// Receive every event published from now on. Dropping the receiver
    /// unsubscribes.
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = channel();
        self.lock().push(tx);
        rx
    }

    /// Send `event` to every subscriber (never blocks).
    pub fn publish(&self, event: Event) {
        self.lock().retain(|tx| tx.send(event.clone()).is_ok());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sender<Event>>> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subscriber_gets_every_event() {
        let bus = EventBus::new();
        let a = bus.subscribe();
        let b = bus.subscribe();
        let ev = |s| {
            Event::now(EventKind::JobStatusChange {
                id: "j".into(),
                status: s,
            })
        };
        bus.publish(ev(JobStatus::Created));
        drop(b);
        bus.publish(ev(JobStatus::Running));
        let c = bus.subscribe();
        bus.publish(ev(JobStatus::Null));
        let got: Vec<_> = a.try_iter().map(|e| e.data()["status"].clone()).collect();
        assert_eq!(got, vec![json!("created"), json!("running"), json!("null")]);
        assert_eq!(c.try_iter().count(), 1);
        assert_eq!(bus.lock().len(), 2, "dropped subscriber removed");
    }

    #[test]
    fn qmp_payloads_match_qemu() {
        let done = Event::now(EventKind::BlockJobCompleted {
            job_type: JobType::Stream,
            device: "pull0".into(),
            len: 1 << 30,
            offset: 1 << 30,
            speed: 0,
            error: None,
        });
        assert_eq!(done.name(), "BLOCK_JOB_COMPLETED");
        assert_eq!(
            done.data(),
            json!({"device": "pull0", "len": 1073741824u64, "offset": 1073741824u64,
                   "speed": 0, "type": "stream"})
        );
        let failed = Event::now(EventKind::BlockJobCompleted {
            job_type: JobType::Stream,
            device: "pull0".into(),
            len: 10,
            offset: 0,
            speed: 0,
            error: Some("Input/output error".into()),
        });
        assert_eq!(failed.data()["error"], json!("Input/output error"));
        let err = Event::now(EventKind::BlockJobError {
            device: "pull1".into(),
            operation: IoOperation::Read,
            action: ErrorAction::Stop,
        });
        assert_eq!(
            err.data(),
            json!({"device": "pull1", "operation": "read", "action": "stop"})
        );
        let q = err.to_qmp();
        assert_eq!(q["event"], json!("BLOCK_JOB_ERROR"));
        assert!(q["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert_eq!(err.job_id(), "pull1");
    }
}
