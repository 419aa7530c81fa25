//! Watching a running job: a progress bar on a terminal, libvirt-style
//! JSON lines, the final event, and SIGINT/SIGTERM turned into a cancel.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use imgpull_jobs::{Job, LibvirtJobInfo, Outcome};
use serde_json::{json, Value};

use crate::size::size_to_str;

/// SIGINT and SIGTERM, blocked in every thread of the process and waited
/// for by one thread that cancels the registered job (`virsh blockpull
/// --wait`: "cancel the operation if ... SIGINT is sent").
pub struct Signals {
    inner: Arc<SignalState>,
}

struct SignalState {
    caught: AtomicBool,
    job: Mutex<Weak<Job>>,
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

impl Signals {
    /// Block SIGINT/SIGTERM in this thread (and so in every thread it
    /// starts afterwards) and start the thread that waits for them. Call
    /// before starting any other thread.
    pub fn install() -> Signals {
        let set = signal_set();
        // SAFETY: changes this thread's signal mask with a valid set.
        unsafe {
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        let inner = Arc::new(SignalState {
            caught: AtomicBool::new(false),
            job: Mutex::new(Weak::new()),
        });
        let st = inner.clone();
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: waits for a signal of a valid, blocked set.
                let r = unsafe { libc::sigwait(&set, &mut sig) };
                if r != 0 {
                    return;
                }
                st.caught.store(true, Ordering::SeqCst);
                let job = st.job.lock().unwrap_or_else(|p| p.into_inner()).upgrade();
                if let Some(job) = job {
                    // A job that already finished cannot be cancelled: fine.
                    let _ = job.cancel();
                }
            });
        if spawned.is_err() {
            // Without the waiting thread, let the signals act as usual.
            // SAFETY: as above.
            unsafe {
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            }
        }
        Signals { inner }
    }

    /// Cancel `job` on a signal (at once if one already came), as long as
    /// it exists (only a weak reference is kept, so the job and the images
    /// it holds close when the caller drops it).
    pub fn watch(&self, job: &Arc<Job>) {
        *self.inner.job.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(job);
        if self.caught() {
            let _ = job.cancel();
        }
    }

    /// Whether a signal came.
    pub fn caught(&self) -> bool {
        self.inner.caught.load(Ordering::SeqCst)
    }
}

/// How to show a job's progress.
pub struct Display {
    /// Print libvirt's job view as JSON lines on stdout.
    pub json: bool,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub bar: bool,
    /// The image, for the bar and the final event.
    pub label: String,
}

impl Display {
    /// JSON lines as asked, a bar only if stderr is a terminal.
    pub fn new(label: &str, json: bool, no_progress: bool) -> Display {
        Display {
            json,
            bar: !no_progress && std::io::stderr().is_terminal(),
            label: label.to_string(),
        }
    }

    /// Print one progress line (JSON) and redraw the bar.
    pub fn show(&self, info: &LibvirtJobInfo, rate: Option<f64>) {
        if self.json {
            let line = serde_json::to_string(info).unwrap_or_default();
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        if self.bar {
            let pct = if info.end == 0 {
                100
            } else {
                (info.cur as u128 * 100 / info.end as u128) as u64
            };
            let width = 30usize;
            let fill = (pct as usize * width / 100).min(width);
            let mut line = format!(
                "\rPulling {}: [{}{}] {:>3}% {} / {}",
                self.label,
                "#".repeat(fill),
                " ".repeat(width - fill),
                pct,
                size_to_str(info.cur),
                size_to_str(info.end)
            );
            if let Some(r) = rate {
                line.push_str(&format!("  {}/s", size_to_str(r as u64)));
            }
            if info.bandwidth > 0 {
                line.push_str(&format!(" (limit {}/s)", size_to_str(info.bandwidth)));
            }
            // Clear what a longer previous line left behind.
            line.push_str("\x1b[K");
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(line.as_bytes());
            let _ = err.flush();
        }
    }

    /// Print the final event (JSON) and end the bar's line.
    pub fn finish(&self, info: &LibvirtJobInfo, outcome: &Outcome) {
        if self.json {
            let (name, error) = match outcome {
                Outcome::Completed => ("COMPLETED", None),
                Outcome::Failed(m) => ("FAILED", Some(m.clone())),
                Outcome::Cancelled => ("CANCELED", None),
            };
            let mut ev = json!({
                "event": name,
                "type": info.job_type,
                "image": self.label,
                "bandwidth": info.bandwidth,
                "cur": info.cur,
                "end": info.end,
            });
            if let (Some(e), Value::Object(m)) = (error, &mut ev) {
                m.insert("error".into(), Value::String(e));
            }
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{ev}");
            let _ = out.flush();
        }
        if self.bar {
            let word = match outcome {
                Outcome::Completed => "Pull complete",
                Outcome::Failed(_) => "Pull failed",
                Outcome::Cancelled => "Pull aborted",
            };
            eprintln!("\n{word}");
        }
    }
}

/// Follow `job` until it concludes: progress lines every `every`, then the
/// final event. Returns how it ended.
pub fn follow(job: &Job, display: &Display, every: Duration) -> Outcome {
    let mut last = job.libvirt_info();
    display.show(&last, None);
    let mut t_last = Instant::now();
    let outcome = loop {
        if let Some(o) = job.wait_timeout(every) {
            break o;
        }
        let info = job.libvirt_info();
        let dt = t_last.elapsed().as_secs_f64();
        if info != last {
            let rate = (dt > 0.0).then(|| info.cur.saturating_sub(last.cur) as f64 / dt);
            display.show(&info, rate);
            last = info;
            t_last = Instant::now();
        }
    };
    let info = job.libvirt_info();
    if info != last || display.bar {
        display.show(&info, None);
    }
    display.finish(&info, &outcome);
    outcome
}
