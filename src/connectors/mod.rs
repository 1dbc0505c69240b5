//! Connectors to external systems: sources and sinks built on the layers
//! below.

pub mod file;
#[cfg(feature = "kafka")]
pub mod kafka;
