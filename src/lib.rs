//! guest-agent: reports a Firecracker guest's CPU, memory, load, network,
//! disk and pressure figures to its VM manager.
//!
//! Data flows one way: configuration → [`Collector`] → [`Sample`] → buffer →
//! push, with a small shared status that the HTTP listener reads. Every file
//! under `/proc` is read through a proc root, so tests run on fixtures.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod collect;
pub mod cpu;
pub mod error;
pub mod sample;

pub use collect::{AGENT_VERSION, Collector};
pub use error::{Error, Result};
pub use sample::Sample;
pub mod config;
pub mod route;
pub use config::Config;
pub mod agent;
pub mod buffer;
pub mod cli;
pub mod logging;
pub mod status;
