//! `imgpull pull`: stream a backing chain into its top image, like
//! `virsh blockpull --wait --verbose` (optionally keeping a base).

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use imgpull_chain::{Chain, ChainOptions};
use imgpull_image::{Error, ErrorKind, Format, Image, OpenOptions, Result};
use imgpull_jobs::{EventBus, Job, JobOptions, LibvirtJobInfo, Outcome, StreamJob, StreamOptions};

use crate::progress::{follow, Display, Signals};

/// What `imgpull pull` was asked to do.
pub struct Request<'a> {
    /// The top image.
    pub image: &'a Path,
    /// The base to keep (must be in the image's backing chain).
    pub base: Option<&'a Path>,
    /// Speed limit in bytes/s (0 = unlimited).
    pub speed: u64,
    /// Record the base relative to the image's directory.
    pub keep_relative: bool,
    /// Print libvirt's job view as JSON lines and a final event.
    pub json: bool,
    /// No progress bar.
    pub no_progress: bool,
}

/// How often progress is reported.
const TICK: Duration = Duration::from_millis(200);

fn os_code(e: &Error) -> Option<i32> {
    e.io_error().and_then(|io| io.raw_os_error())
}

/// Refuse a top that cannot be written, before trying: a read-only file
/// (no write permission bit, which root would otherwise ignore).
fn check_writable(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io("cannot open", e).with_path(path))?;
    if meta.permissions().mode() & 0o222 == 0 {
        return Err(Error::new(
            ErrorKind::ReadOnly,
            format!(
                "image file is read-only (mode {:o}): cannot pull into it",
                meta.permissions().mode() & 0o7777
            ),
        )
        .with_path(path));
    }
    Ok(())
}

/// Open the chain with a writable top, with a clear message when the top
/// is read-only or immutable.
fn open_writable(path: &Path) -> Result<Chain> {
    Chain::open(
        path,
        &ChainOptions {
            writable: true,
            ..Default::default()
        },
    )
    .map_err(|e| {
        let top_error = e.path() == Some(path);
        match os_code(&e) {
            Some(c) if top_error && (c == libc::EACCES || c == libc::EPERM || c == libc::EROFS) => {
                Error::new(
                    ErrorKind::ReadOnly,
                    format!(
                        "cannot open for writing: {} (read-only or immutable image)",
                        std::io::Error::from_raw_os_error(c)
                            .to_string()
                            .split(" (os error")
                            .next()
                            .unwrap_or("")
                    ),
                )
                .with_path(path)
            }
            _ => e,
        }
    })
}

/// The index of `base` in the chain, matched by file identity.
fn find_base(chain: &Chain, image: &Path, base: &Path) -> Result<usize> {
    let meta =
        std::fs::metadata(base).map_err(|e| Error::io("cannot open base", e).with_path(base))?;
    let want = (meta.dev(), meta.ino());
    for (i, layer) in chain.layers().iter().enumerate() {
        let m = layer
            .storage()
            .file()
            .metadata()
            .map_err(|e| Error::io("cannot stat", e).with_path(layer.path()))?;
        if (m.dev(), m.ino()) == want {
            if i == 0 {
                return Err(Error::invalid_argument(format!(
                    "base '{}' is the image itself, not a backing file",
                    base.display()
                ))
                .with_path(image));
            }
            return Ok(i);
        }
    }
    Err(Error::invalid_argument(format!(
        "base '{}' is not in the backing chain of the image",
        base.display()
    ))
    .with_path(image))
}

/// Run `imgpull pull`.
pub fn run(req: &Request<'_>) -> Result<()> {
    let signals = Signals::install();
    let image = req.image;
    let label = image.display().to_string();
    // Inspect the top read-only first: refusing a raw image or doing
    // nothing for a standalone one must not open it for writing.
    let probe = Image::open(image, &OpenOptions::default())?;
    let info = probe.info();
    drop(probe);
    if info.format == Format::Raw {
        return Err(Error::unsupported(
            "a raw image has no backing file: nothing to pull into (the image must be qcow2 or QED)",
        )
        .with_path(image));
    }
    if info.backing.is_none() {
        if let Some(base) = req.base {
            std::fs::metadata(base)
                .map_err(|e| Error::io("cannot open base", e).with_path(base))?;
            return Err(Error::invalid_argument(format!(
                "base '{}' is not in the backing chain of the image (it has no backing file)",
                base.display()
            ))
            .with_path(image));
        }
        // Already standalone: nothing to do, no byte changes.
        let display = Display::new(&label, req.json, req.no_progress);
        let v = LibvirtJobInfo::from_raw(
            imgpull_jobs::JobType::Stream,
            req.speed,
            info.virtual_size,
            info.virtual_size,
            true,
        );
        display.show(&v, None);
        display.finish(&v, &Outcome::Completed);
        return Ok(());
    }
    check_writable(image)?;
    let chain = Arc::new(open_writable(image)?);
    let base = match req.base {
        Some(b) => Some(find_base(&chain, image, b)?),
        None => None,
    };
    let stream = StreamJob::new(
        chain.clone(),
        &StreamOptions {
            base,
            keep_relative: req.keep_relative,
            ..Default::default()
        },
    )?;
    let job = Job::new(
        "pull0",
        Box::new(stream),
        JobOptions {
            speed: req.speed,
            ..Default::default()
        },
        Arc::new(EventBus::new()),
    )
    .map_err(|e| Error::invalid_argument(e.to_string()).with_path(image))?;
    signals.watch(&job);
    job.start();
    let display = Display::new(&label, req.json, req.no_progress);
    let outcome = follow(&job, &display, TICK);
    job.join();
    drop(job);
    // Close every image (a last flush) before reporting.
    drop(chain);
    let _ = std::io::stdout().flush();
    match outcome {
        Outcome::Completed => Ok(()),
        Outcome::Cancelled => Err(Error::new(
            ErrorKind::Cancelled,
            "pull cancelled; the image keeps its backing file and what was copied (run pull again to finish)",
        )
        .with_path(image)),
        Outcome::Failed(msg) => {
            let prefix = format!("{}: ", image.display());
            let msg = msg.strip_prefix(&prefix).unwrap_or(&msg).to_string();
            Err(Error::new(ErrorKind::Io, format!("pull failed: {msg}")).with_path(image))
        }
    }
}
