//! guest-agent: reports a Firecracker guest's CPU, memory, load, network,
//! disk and pressure figures to its VM manager.
//!
//! Data flows one way: configuration → [`Collector`] → [`Sample`] → buffer →
//! push, with a small shared status that the HTTP listener reads. Every file
//! under `/proc` is read through a proc root, so tests run on fixtures.
//!
//! ```no_run
//! // An agent in-process, pushing to a receiver on loopback every second.
//! let config = guest_agent::config::resolve(
//!     &[("url", "http://127.0.0.1:18080/v1/guest-metrics".into()), ("interval", "1s".into())],
//!     &[],
//!     None,
//! )?;
//! let running = guest_agent::agent::start(config)?;
//! // … later
//! running.stop();
//! # Ok::<(), guest_agent::Error>(())
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod agent;
pub mod backoff;
pub mod buffer;
pub mod cli;
pub mod collect;
pub mod config;
pub mod cpu;
pub mod encode;
pub mod error;
pub mod influx;
pub mod listener;
pub mod logging;
pub mod push;
pub mod restore;
pub mod route;
pub mod sample;
pub mod status;
pub mod stop;

pub use collect::{AGENT_VERSION, Collector};
pub use config::Config;
pub use error::{Error, Result};
pub use sample::Sample;
