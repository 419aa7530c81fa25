//! The set of live jobs of a process, by id (what QMP commands look up).

use std::sync::{Arc, Mutex};

use crate::job::{id_wellformed, Job};
use crate::status::{JobError, JobStatus};

/// Live jobs by id. Jobs that reached status `null` are forgotten.
#[derive(Debug, Default)]
pub struct JobRegistry {
    jobs: Mutex<Vec<Arc<Job>>>,
}

impl JobRegistry {
    /// An empty registry.
    pub fn new() -> JobRegistry {
        JobRegistry::default()
    }

    fn prune(jobs: &mut Vec<Arc<Job>>) {
        jobs.retain(|j| j.status() != JobStatus::Null);
    }

    /// Check that `id` may name a new job: well-formed and not in use
    /// (QEMU's "Invalid job ID" / "Job ID '%s' already in use").
    pub fn check_id(&self, id: &str) -> Result<(), JobError> {
        if !id_wellformed(id) {
            return Err(JobError::new("Invalid job ID"));
        }
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        Self::prune(&mut jobs);
        if jobs.iter().any(|j| j.id() == id) {
            return Err(JobError::new(format!("Job ID '{id}' already in use")));
        }
        Ok(())
    }

    /// Add a created job (its id must pass [`JobRegistry::check_id`]).
    pub fn insert(&self, job: Arc<Job>) -> Result<(), JobError> {
        self.check_id(job.id())?;
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(job);
        Ok(())
    }

    /// The live job named `id`.
    pub fn find(&self, id: &str) -> Option<Arc<Job>> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        Self::prune(&mut jobs);
        jobs.iter().find(|j| j.id() == id).cloned()
    }

    /// Every live job, oldest first.
    pub fn list(&self) -> Vec<Arc<Job>> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        Self::prune(&mut jobs);
        jobs.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobContext, JobDriver, JobOptions, Outcome, RunError};
    use crate::status::JobType;

    struct Nop;
    impl JobDriver for Nop {
        fn job_type(&self) -> JobType {
            JobType::Stream
        }
        fn run(&self, _ctx: &JobContext<'_>) -> Result<(), RunError> {
            Ok(())
        }
    }

    #[test]
    fn ids_are_unique_until_the_job_is_gone() {
        let reg = JobRegistry::new();
        let opts = JobOptions {
            auto_dismiss: false,
            ..Default::default()
        };
        let j = Job::new("pull0", Box::new(Nop), opts, Arc::default()).unwrap();
        reg.insert(j.clone()).unwrap();
        assert_eq!(
            reg.check_id("pull0").unwrap_err().to_string(),
            "Job ID 'pull0' already in use"
        );
        assert_eq!(
            reg.check_id("-x").unwrap_err().to_string(),
            "Invalid job ID"
        );
        j.start();
        assert_eq!(j.wait(), Outcome::Completed);
        assert!(
            reg.find("pull0").is_some(),
            "concluded jobs stay until dismissed"
        );
        j.dismiss().unwrap();
        assert!(reg.find("pull0").is_none());
        assert!(reg.list().is_empty());
        reg.check_id("pull0").unwrap();
        j.join();
    }
}
