//! Operators for pipelines whose dependencies fail: calls with timeouts
//! and retries (`AsyncMapper`, `Retry`), dead-letter queues, health gates
//! and the opt-in circuit breaker. They use the layers below (the core,
//! flows and the driver, the operators).

pub(crate) mod async_mapper;
#[cfg(feature = "circuit-breaker")]
pub mod breaker;
pub mod dlq;
pub(crate) mod health;
pub(crate) mod retry;
