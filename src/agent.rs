//! The running agent: collection on a fixed cadence, delivery, listener.

use crate::config::Config;
use crate::error::Result;

/// Runs until SIGTERM or SIGINT.
pub fn run(_config: Config) -> Result<()> {
    Err(crate::Error::Usage("the push loop is not built yet".into()))
}
