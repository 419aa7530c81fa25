//! `imgpull`: pull disk-image backing chains; inspect and map them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use imgpull_image::Format;

mod create;
mod demo;
mod info;
mod map;
mod progress;
mod pull;
mod size;

#[derive(Parser)]
#[command(
    name = "imgpull",
    version,
    about = "Disk-image block jobs on qcow2, QED and raw backing chains",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Output format, as qemu-img's `--output`.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

/// Image formats accepted by `-f` / `-F`.
#[derive(Clone, Copy, ValueEnum)]
enum Fmt {
    Qcow2,
    Qed,
    Raw,
}

impl From<Fmt> for Format {
    fn from(f: Fmt) -> Format {
        match f {
            Fmt::Qcow2 => Format::Qcow2,
            Fmt::Qed => Format::Qed,
            Fmt::Raw => Format::Raw,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Show an image's format, size, backing file and format details
    /// (the fields and key names of `qemu-img info`).
    Info {
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Show every image of the backing chain, top first.
        #[arg(long)]
        backing_chain: bool,
        /// Image format (probed when omitted).
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<Fmt>,
        /// Open without taking locks, even if another process uses the image.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// The image.
        image: PathBuf,
    },
    /// Print the allocation map of the whole backing chain, identical to
    /// `qemu-img map`.
    Map {
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Image format (probed when omitted).
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<Fmt>,
        /// Open without taking locks, even if another process uses the image.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// The image.
        image: PathBuf,
    },
    /// Create a qcow2 or QED image, or an overlay over a backing file,
    /// with qemu-img's defaults.
    Create {
        /// Format of the new image.
        #[arg(short = 'f', long = "format", value_enum)]
        format: Fmt,
        /// Backing file to record (relative names are relative to IMAGE's directory).
        #[arg(short = 'b', long = "backing")]
        backing: Option<String>,
        /// Format of the backing file.
        #[arg(short = 'F', long = "backing-format", value_enum)]
        backing_format: Option<Fmt>,
        /// Do not open the backing file (its size is then not known: give SIZE).
        #[arg(short = 'u')]
        unsafe_backing: bool,
        /// Format options, `key=value[,key=value...]` (e.g. cluster_size=4k,compat=0.10).
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Quiet: print nothing on success.
        #[arg(short = 'q')]
        quiet: bool,
        /// The image to create.
        image: PathBuf,
        /// Virtual size in bytes, with an optional k/M/G/T suffix (default: the backing file's).
        #[arg(value_parser = size::parse_size)]
        size: Option<u64>,
    },
    /// Pull the backing chain into IMAGE and wait (libvirt's blockpull,
    /// QEMU's block-stream).
    ///
    /// Afterwards IMAGE has no backing file, or BASE as its backing file.
    /// Ctrl-C (SIGINT) or SIGTERM cancels cleanly (exit 130): the chain
    /// stays valid and a later pull resumes where this one stopped.
    Pull {
        /// Keep this image of the chain as the new backing file (pull only
        /// the layers above it).
        #[arg(long, value_name = "IMAGE")]
        base: Option<PathBuf>,
        /// Speed limit in bytes/s, with an optional binary suffix (64M); 0 = unlimited.
        #[arg(
            long,
            value_name = "RATE",
            value_parser = size::parse_size,
            default_value = "0",
            allow_negative_numbers = true
        )]
        speed: u64,
        /// Record the base relative to IMAGE's directory instead of its
        /// absolute path (nothing to record without --base).
        #[arg(long)]
        keep_relative: bool,
        /// Print libvirt's job view as JSON lines on stdout, then the final event.
        #[arg(long)]
        json: bool,
        /// No progress bar on stderr.
        #[arg(long)]
        no_progress: bool,
        /// The image to pull into (qcow2 or QED).
        image: PathBuf,
    },
    /// Build a small sample chain in a temporary directory, pull it with a
    /// progress bar, verify the result, and remove it.
    Demo,
}

fn run(cli: Cli) -> imgpull_image::Result<()> {
    match cli.cmd {
        Cmd::Info {
            output,
            backing_chain,
            format,
            force_share,
            image,
        } => info::run(
            &image,
            format.map(Into::into),
            output == Output::Json,
            backing_chain,
            force_share,
        ),
        Cmd::Map {
            output,
            format,
            force_share,
            image,
        } => map::run(
            &image,
            format.map(Into::into),
            output == Output::Json,
            force_share,
        ),
        Cmd::Create {
            format,
            backing,
            backing_format,
            unsafe_backing,
            options,
            quiet,
            image,
            size,
        } => {
            let options = create::parse_options(&options)
                .map_err(|m| imgpull_image::Error::invalid_argument(m).with_path(&image))?;
            create::run(create::Request {
                path: &image,
                format: format.into(),
                backing: backing.as_deref(),
                backing_format: backing_format.map(Into::into),
                unsafe_backing,
                options,
                size,
                quiet,
            })
        }
        Cmd::Pull {
            base,
            speed,
            keep_relative,
            json,
            no_progress,
            image,
        } => pull::run(&pull::Request {
            image: &image,
            base: base.as_deref(),
            speed,
            keep_relative,
            json,
            no_progress,
        }),
        Cmd::Demo => demo::run(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imgpull: {e}");
            // A cancel by SIGINT/SIGTERM that left everything clean.
            if e.kind() == imgpull_image::ErrorKind::Cancelled {
                return ExitCode::from(130);
            }
            ExitCode::from(1)
        }
    }
}
