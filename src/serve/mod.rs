//! Serving: the local HTTP listener (`/health`, `/metrics`, the pull port of
//! a manager that pulls) and `guest-agent --health`, which asks it.

pub mod healthcheck;
pub mod listener;
pub mod pull;
