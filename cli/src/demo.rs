//! `imgpull demo`: build a small chain (raw base ← QED ← qcow2) with our
//! own image code in a temporary directory, pull it with the progress bar,
//! verify the result, and remove everything.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use imgpull_chain::{Chain, ChainOptions};
use imgpull_image::{
    BackingFile, CreateOptions, Error, ErrorKind, Format, Image, OpenOptions, Result, Zeros,
};
use imgpull_jobs::{EventBus, Job, JobOptions, Outcome, StreamJob, StreamOptions};

use crate::progress::{follow, Display, Signals};
use crate::size::size_to_str;

const MIB: u64 = 1 << 20;
/// Virtual size of the sample disk.
const SIZE: u64 = 32 * MIB;
/// Speed of the demo pull, so the bar has something to show.
const SPEED: u64 = 16 * MIB;

/// Bytes that differ per position, so a misplaced copy shows.
fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let p = offset + i;
            ((p >> 9) as u8).wrapping_mul(31) ^ (p as u8) ^ seed
        })
        .collect()
}

fn create(path: &Path, format: Format, backing: Option<(&str, Format)>) -> Result<()> {
    Image::create(
        path,
        &CreateOptions {
            format,
            size: SIZE,
            backing: backing.map(|(name, f)| BackingFile {
                name: name.to_string(),
                format: Some(f.name().to_string()),
            }),
            options: vec![],
        },
    )
}

fn open_rw(path: &Path) -> Result<Chain> {
    Chain::open(
        path,
        &ChainOptions {
            writable: true,
            ..Default::default()
        },
    )
}

/// Guest writes through our own write path: `(offset, len, seed)` data,
/// then `(offset, len)` zero ranges.
fn write_layer(path: &Path, data: &[(u64, usize, u8)], zeros: &[(u64, u64)]) -> Result<()> {
    let chain = open_rw(path)?;
    let top = chain.top();
    let below = chain.below(1);
    for &(off, len, seed) in data {
        top.write(off, &pattern(seed, off, len), &below)?;
    }
    for &(off, len) in zeros {
        top.write_zeroes(off, len, &below)?;
    }
    top.flush()
}

fn build(dir: &Path) -> Result<()> {
    let base = dir.join("base.raw");
    let mid = dir.join("mid.qed");
    let top = dir.join("top.qcow2");
    create(&base, Format::Raw, None)?;
    write_layer(&base, &[(0, 8 << 20, 1), (20 << 20, 4 << 20, 2)], &[])?;
    create(&mid, Format::Qed, Some(("base.raw", Format::Raw)))?;
    write_layer(
        &mid,
        &[
            (100_000, 5000, 3),
            (4 << 20, 2 << 20, 4),
            ((21 << 20) + 123, 777, 5),
        ],
        // Zeros that hide data of the base.
        &[(6 << 20, 1 << 20)],
    )?;
    create(&top, Format::Qcow2, Some(("mid.qed", Format::Qed)))?;
    write_layer(
        &top,
        &[(1 << 20, 4096, 6), ((30 << 20) + 1, 10, 7)],
        &[((20 << 20) + (64 << 10), 64 << 10)],
    )?;
    Ok(())
}

fn describe(dir: &Path) -> Result<()> {
    for name in ["base.raw", "mid.qed", "top.qcow2"] {
        let img = Image::open(dir.join(name), &OpenOptions::default())?;
        let info = img.info();
        let backing = match &info.backing {
            Some(b) => format!(
                "backing {} ({})",
                b.name,
                b.format.as_deref().unwrap_or("probed")
            ),
            None => "no backing file".to_string(),
        };
        println!(
            "  {name:<10} {:<5} {:>7}  {backing}",
            info.format.name(),
            size_to_str(info.virtual_size)
        );
    }
    Ok(())
}

fn guest_content(path: &Path) -> Result<Vec<u8>> {
    let chain = Chain::open(path, &ChainOptions::default())?;
    let mut buf = vec![0u8; chain.virtual_size() as usize];
    chain.read(0, &mut buf)?;
    Ok(buf)
}

fn pull(top: &Path, signals: &Signals) -> Result<Outcome> {
    let chain = Arc::new(open_rw(top)?);
    let stream = StreamJob::new(chain.clone(), &StreamOptions::default())?;
    let stats = stream.stats();
    let job = Job::new(
        "demo",
        Box::new(stream),
        JobOptions {
            speed: SPEED,
            ..Default::default()
        },
        Arc::new(EventBus::new()),
    )
    .map_err(|e| Error::invalid_argument(e.to_string()))?;
    signals.watch(&job);
    job.start();
    let display = Display::new("top.qcow2", false, false);
    let outcome = follow(&job, &display, Duration::from_millis(100));
    job.join();
    println!(
        "  copied {} of data and zeroed {} without writing data (limit {}/s)",
        size_to_str(stats.copied()),
        size_to_str(stats.zeroed()),
        size_to_str(SPEED)
    );
    Ok(outcome)
}

fn demo_in(dir: &Path, signals: &Signals) -> Result<()> {
    build(dir)?;
    describe(dir)?;
    let top = dir.join("top.qcow2");
    let before = guest_content(&top)?;
    println!("pulling the chain into top.qcow2 ...");
    match pull(&top, signals)? {
        Outcome::Completed => {}
        Outcome::Cancelled => {
            return Err(Error::new(ErrorKind::Cancelled, "demo cancelled").with_path(&top))
        }
        Outcome::Failed(m) => {
            return Err(Error::new(ErrorKind::Io, format!("pull failed: {m}")).with_path(&top))
        }
    }
    describe(dir)?;
    // Verify with the top alone: no backing file, same guest content.
    let img = Image::open(&top, &OpenOptions::default())?;
    if let Some(b) = img.info().backing {
        return Err(Error::invalid(format!(
            "verification failed: the image still has backing file '{}'",
            b.name
        ))
        .with_path(&top));
    }
    let mut after = vec![0u8; img.virtual_size() as usize];
    img.read(0, &mut after, &Zeros)?;
    if let Some(i) = before.iter().zip(&after).position(|(a, b)| a != b) {
        return Err(Error::invalid(format!(
            "verification failed: guest byte {i} differs after the pull"
        ))
        .with_path(&top));
    }
    if before.len() != after.len() {
        return Err(Error::invalid("verification failed: the size changed").with_path(&top));
    }
    println!(
        "verified: top.qcow2 stands alone (no backing file) and its {} of guest data are identical to the chain's before the pull",
        size_to_str(after.len() as u64)
    );
    Ok(())
}

/// Run `imgpull demo`.
pub fn run() -> Result<()> {
    let signals = Signals::install();
    let dir = tempfile::Builder::new()
        .prefix("imgpull-demo-")
        .tempdir()
        .map_err(|e| Error::io("cannot create a temporary directory", e))?;
    let path = dir.path().to_path_buf();
    println!(
        "imgpull demo: a raw base, a QED overlay and a qcow2 overlay in {}",
        path.display()
    );
    let result = demo_in(&path, &signals);
    let removed = dir.close();
    match removed {
        Ok(()) => println!("removed {}", path.display()),
        Err(e) => eprintln!("imgpull: could not remove {}: {e}", path.display()),
    }
    result
}
