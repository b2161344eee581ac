//! guest-agent: reports a Firecracker guest's CPU, memory, load, network,
//! disk and pressure figures to its VM manager.
//!
//! Data flows one way: configuration → [`Collector`] → [`Sample`] → buffer →
//! push, with a small shared status that the HTTP listener reads. Every file
//! under `/proc` is read through a proc root, so tests run on fixtures.
//! The modules are stages, each importing only those below it
//! (docs/design.md#data-flow-and-modules).
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

// Below every stage.
pub mod error;
mod logging;
mod notify;
pub mod sample;
pub mod sign;
mod stop;
// The stages, each above those before it.
pub mod collect;
pub mod config;
mod deliver;
mod net;
mod output;
mod serve;
mod status;
mod vm;
// The wiring and the binary's entry point.
pub mod agent;
pub mod cli;
// What a manager embeds.
pub mod ingest;

pub use agent::Running;
pub use collect::Collector;
pub use config::Config;
pub use error::{Error, Result};
pub use sample::{AGENT_VERSION, Sample};
pub use status::{GuestIpReport, GuestIpState, Health, HealthState, PushState};

/// The agent's parts, reachable for its own benchmarks and tests. Not a
/// stable interface: anything here may change in any release.
#[doc(hidden)]
pub mod internals {
    pub use crate::collect::route::parse_default_gateway;
    pub use crate::deliver::backoff::parse_retry_after;
    pub use crate::deliver::buffer::{Batch, Buffer};
    pub use crate::deliver::push::{Outcome, Sender};
    pub use crate::net::client::Client;
    pub use crate::net::url::{Target, UrlTemplate, VsockUrl};
    pub use crate::output::otlp::partial_success;
    pub use crate::output::prometheus::encode as encode_prometheus;
    pub use crate::output::{content_type, encode};
    pub use crate::sample::footprint;
    pub use crate::serve::listener::{
        LOOPBACK_RESERVE, Listener, MAX_CONNECTIONS, View, negotiate, parse_head,
        spawn as spawn_listener,
    };
    pub use crate::status::Status;
    pub use crate::stop::Stop;
    pub use crate::vm::guest_ip::report_url;
}
