//! Delivery (docs/design.md#delivery): the bounded buffer between
//! collection and the network, the retry delays, and the sender that posts
//! batches and settles them by the manager's answer.

pub mod backoff;
pub mod buffer;
pub mod push;
