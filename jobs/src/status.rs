//! QEMU's job state machine: statuses, the allowed transitions, and which
//! command verbs each status accepts (QEMU `job.c`'s `JobSTT` and
//! `JobVerbTable`).

use std::fmt;

use serde::Serialize;

/// A job's status, QEMU's QAPI `JobStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Erroneous default; never seen by users.
    Undefined,
    /// Created but not started.
    Created,
    /// Running.
    Running,
    /// Paused by a user or by an error.
    Paused,
    /// Ready for `complete` (jobs with a second phase; never a stream job).
    Ready,
    /// A ready job that is paused.
    Standby,
    /// Finished its work, waiting for the other jobs of its transaction.
    Waiting,
    /// Waiting for `finalize` (only when auto-finalize is off).
    Pending,
    /// Failed or cancelled, rolling back.
    Aborting,
    /// Finished; waiting for `dismiss` (only when auto-dismiss is off).
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    /// Every status, in QAPI order (the rows and columns of the tables).
    pub const ALL: [JobStatus; 11] = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    /// The QAPI name (`running`, `concluded`, ...).
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether QEMU's transition table allows moving from `self` to `to`.
    pub fn can_transition_to(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Undefined, Created)
                | (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready)
                | (Waiting, Pending | Aborting)
                | (Pending, Aborting | Concluded)
                | (Aborting, Aborting | Concluded)
                | (Concluded, Null)
        )
    }

    /// Whether the job has finished its work (successfully or not) and
    /// will not copy any more data.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Waiting
                | JobStatus::Pending
                | JobStatus::Aborting
                | JobStatus::Concluded
                | JobStatus::Null
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A command verb, QEMU's `JobVerb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    /// `job-cancel` / `block-job-cancel`.
    Cancel,
    /// `job-pause` / `block-job-pause`.
    Pause,
    /// `job-resume` / `block-job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `block-job-change`.
    Change,
    /// `job-complete` / `block-job-complete`.
    Complete,
    /// `job-finalize` / `block-job-finalize`.
    Finalize,
    /// `job-dismiss` / `block-job-dismiss`.
    Dismiss,
}

impl Verb {
    /// The QAPI name (`set-speed`, ...), as used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Change => "change",
            Verb::Complete => "complete",
            Verb::Finalize => "finalize",
            Verb::Dismiss => "dismiss",
        }
    }

    /// Whether QEMU's verb table allows this verb in `status`.
    pub fn allowed_in(self, status: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            Verb::Cancel => matches!(
                status,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            Verb::Pause | Verb::Resume | Verb::SetSpeed | Verb::Change => {
                matches!(status, Created | Running | Paused | Ready | Standby)
            }
            Verb::Complete => matches!(status, Ready | Standby),
            Verb::Finalize => matches!(status, Pending),
            Verb::Dismiss => matches!(status, Concluded),
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The kind of a job, QAPI `JobType` (only what imgpull runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobType {
    /// Block streaming (libvirt's "pull").
    Stream,
}

impl JobType {
    /// QEMU's name (`stream`).
    pub fn name(self) -> &'static str {
        match self {
            JobType::Stream => "stream",
        }
    }

    /// libvirt's name for the job type (`pull`).
    pub fn libvirt_name(self) -> &'static str {
        match self {
            JobType::Stream => "pull",
        }
    }
}

impl fmt::Display for JobType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A refused job command, with QEMU's error text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobError {
    msg: String,
}

impl JobError {
    /// An error with the given text.
    pub fn new(msg: impl Into<String>) -> JobError {
        JobError { msg: msg.into() }
    }

    /// QEMU's refusal of a verb: `Job 'ID' in state 'S' cannot accept
    /// command verb 'V'`.
    pub fn bad_verb(id: &str, status: JobStatus, verb: Verb) -> JobError {
        JobError::new(format!(
            "Job '{id}' in state '{status}' cannot accept command verb '{verb}'"
        ))
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.msg
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for JobError {}

#[cfg(test)]
mod tests {
    use super::JobStatus::*;
    use super::*;

    /// QEMU's `JobSTT`, row by row, as 0/1 in QAPI order
    /// (U, C, R, P, Y, S, W, D, X, E, N).
    const STT: [[u8; 11]; 11] = [
        [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], // U
        [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1], // C
        [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0], // R
        [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], // P
        [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0], // Y
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0], // S
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0], // W
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], // D
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], // X
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], // E
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // N
    ];

    #[test]
    fn transition_table_is_qemus() {
        for (i, from) in JobStatus::ALL.iter().enumerate() {
            for (j, to) in JobStatus::ALL.iter().enumerate() {
                assert_eq!(
                    from.can_transition_to(*to),
                    STT[i][j] == 1,
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn verb_table_is_qemus() {
        // QEMU's JobVerbTable, columns U C R P Y S W D X E N.
        let table: [(Verb, [u8; 11]); 8] = [
            (Verb::Cancel, [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
            (Verb::Pause, [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
            (Verb::Resume, [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
            (Verb::SetSpeed, [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
            (Verb::Change, [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
            (Verb::Complete, [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]),
            (Verb::Finalize, [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
            (Verb::Dismiss, [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
        ];
        for (verb, row) in table {
            for (j, st) in JobStatus::ALL.iter().enumerate() {
                assert_eq!(verb.allowed_in(*st), row[j] == 1, "{verb} in {st}");
            }
        }
    }

    #[test]
    fn names_and_error_text() {
        assert_eq!(Concluded.name(), "concluded");
        assert_eq!(Verb::SetSpeed.name(), "set-speed");
        assert_eq!(
            serde_json::to_string(&Pending).unwrap(),
            "\"pending\"".to_string()
        );
        assert_eq!(
            JobError::bad_verb("pull0", Running, Verb::Complete).to_string(),
            "Job 'pull0' in state 'running' cannot accept command verb 'complete'"
        );
        assert_eq!(JobType::Stream.libvirt_name(), "pull");
    }
}
