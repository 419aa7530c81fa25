//! Errors that name the image and the problem.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What kind of failure an [`Error`] is, for callers that react differently
/// (the CLI maps kinds to exit codes, the QMP socket to error classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// An operating-system I/O error.
    Io,
    /// The file is not a valid image of its format (bad magic, truncated,
    /// tables pointing outside the file, inconsistent header, ...).
    Invalid,
    /// A valid image using a feature we deliberately do not support
    /// (encryption, external data file, unknown incompatible feature, ...).
    Unsupported,
    /// The image may not be written: opened read-only, marked corrupt, or
    /// carrying internal snapshots.
    ReadOnly,
    /// Another process holds a conflicting lock on the file.
    Locked,
    /// A file named by the user or by a backing-file header does not exist.
    NotFound,
    /// A bad argument from the caller (offset beyond the end, bad option).
    InvalidArgument,
    /// The operation was cancelled.
    Cancelled,
}

/// An error about one image file.
///
/// Its `Display` form is `PATH: message` (or just the message when no file
/// is involved), which is what the CLI prints.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    path: Option<PathBuf>,
    msg: String,
    source: Option<io::Error>,
}

/// Result alias used throughout imgpull.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` with message `msg`, not yet tied to a file.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            path: None,
            msg: msg.into(),
            source: None,
        }
    }

    /// Shorthand for [`ErrorKind::Invalid`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, msg)
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, msg)
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid_argument(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, msg)
    }

    /// An I/O error with a short description of what was being done.
    pub fn io(what: impl Into<String>, err: io::Error) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            path: None,
            msg: format!("{}: {}", what.into(), os_message(&err)),
            source: Some(err),
        }
    }

    /// Attach the file this error is about, unless one is already attached.
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The file this error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The message without the path.
    pub fn message(&self) -> &str {
        &self.msg
    }

    /// The underlying OS error, if this is an I/O error.
    pub fn io_error(&self) -> Option<&io::Error> {
        self.source.as_ref()
    }
}

/// An I/O error's text without Rust's " (os error N)" suffix.
fn os_message(err: &io::Error) -> String {
    let s = err.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{}: {}", p.display(), self.msg),
            None => f.write_str(&self.msg),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Extension to attach a path to any `Result<T, Error>`.
pub trait ResultExt<T> {
    /// Attach `path` to the error, if there is one and it has no path yet.
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|e| e.with_path(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_the_file_once() {
        let e = Error::invalid("bad magic")
            .with_path("/a/b.qcow2")
            .with_path("/other");
        assert_eq!(e.to_string(), "/a/b.qcow2: bad magic");
        assert_eq!(e.kind(), ErrorKind::Invalid);
    }

    #[test]
    fn io_not_found_maps_to_not_found() {
        let e = Error::io("open", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}
