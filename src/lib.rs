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
pub mod cli;
pub mod collect;
pub mod config;
pub mod error;
pub mod ingest;
pub mod sample;

mod backoff;
mod buffer;
mod client;
mod cpu;
mod encode;
mod guest_ip;
mod healthcheck;
mod influx;
mod listener;
mod logging;
mod push;
mod restore;
mod route;
mod status;
mod stop;
mod vsock;

pub use agent::Running;
pub use collect::{AGENT_VERSION, Collector};
pub use config::Config;
pub use error::{Error, Result};
pub use guest_ip::{GuestIpReport, GuestIpState};
pub use sample::Sample;
pub use status::{Health, HealthState, PushState};

/// The agent's parts, reachable for its own benchmarks and tests. Not a
/// stable interface: anything here may change in any release.
#[doc(hidden)]
pub mod internals {
    pub use crate::buffer::{Batch, Buffer, footprint};
    pub use crate::encode::{content_type, encode};
    pub use crate::listener::{Listener, MAX_CONNECTIONS, spawn as spawn_listener};
    pub use crate::push::{Outcome, Sender};
    pub use crate::route::{Target, UrlTemplate, parse_default_gateway};
    pub use crate::status::Shared;
    pub use crate::stop::Stop;
}
