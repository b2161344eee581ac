//! What being a Firecracker guest adds: noticing a snapshot restore, and
//! telling a pull-model manager where the guest is.

pub mod guest_ip;
pub mod restore;
