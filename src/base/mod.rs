//! The transport core: chunks, the item-bounded edge channel, edge
//! configuration, counters, errors and overflow-safe time. Every other
//! layer builds on it; it uses none of them.

pub(crate) mod ack;
pub(crate) mod atomic_file;
pub(crate) mod channel;
pub(crate) mod chunk;
pub(crate) mod config;
pub(crate) mod counters;
pub(crate) mod error;
#[cfg(streamz_loom)]
pub(crate) mod loom_notify;
pub(crate) mod signal;
pub(crate) mod time;
