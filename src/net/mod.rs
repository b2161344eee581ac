//! Talking to peers: the URLs the agent sends to, its one HTTP client
//! (ureq) with the transports for vsock and Unix sockets, and the guest's
//! own address toward a peer. Every stage that makes a request uses this
//! one; nothing here knows what is sent.

pub mod address;
pub mod client;
pub mod transport;
pub mod url;
