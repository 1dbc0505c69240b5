//! The transport core: chunks, the item-bounded edge channel, edge
//! configuration, counters, errors and overflow-safe time. Every other
//! layer builds on it; it uses none of them.

pub(crate) mod ack;
pub(crate) mod atomic_file;
pub(crate) mod blocking;
pub(crate) mod channel;
pub(crate) mod chunk;
pub(crate) mod config;
pub(crate) mod counters;
pub(crate) mod error;
#[cfg(streamz_loom)]
pub(crate) mod loom_notify;
#[cfg(streamz_loom)]
pub(crate) mod loom_watch;
pub(crate) mod signal;
pub(crate) mod telemetry;
pub(crate) mod time;

/// The health gate's state channel: tokio's `watch`, or under the model
/// tests (`--cfg streamz_loom`) its model on loom's lock.
#[cfg(streamz_loom)]
pub(crate) use loom_watch as watch;
#[cfg(not(streamz_loom))]
pub(crate) use tokio::sync::watch;
