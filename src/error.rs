//! The one error type of the agent. Every variant carries the context a user
//! needs to act on it: which file, which setting, which URL.

use std::fmt;
use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the agent, with its context.
#[derive(Debug)]
pub enum Error {
    /// A file under the proc root (or the config file) could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file was read but its contents did not parse.
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// The command line itself was malformed (unknown flag, missing value).
    Usage(String),
    /// The agent could not set itself up (a thread, a signal handler).
    Startup {
        /// What was being set up.
        what: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A network operation failed.
    Network {
        /// The URL or address involved.
        target: String,
        /// What went wrong.
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Read { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            Error::Parse { path, reason } => write!(f, "cannot parse {}: {reason}", path.display()),
            Error::Usage(msg) => write!(f, "{msg}"),
            Error::Startup { what, source } => write!(f, "cannot start {what}: {source}"),
            Error::Network { target, reason } => write!(f, "{target}: {reason}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Read { source, .. } | Error::Startup { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl Error {
    /// Turns a procfs parse error into ours, naming the file it came from.
    pub(crate) fn from_proc(path: &std::path::Path, err: procfs::ProcError) -> Error {
        match err {
            procfs::ProcError::Io(source, _) => Error::Read {
                path: path.to_path_buf(),
                source,
            },
            other => Error::Parse {
                path: path.to_path_buf(),
                reason: other.to_string(),
            },
        }
    }

    /// True when the error says the file does not exist (an absent optional source).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}
