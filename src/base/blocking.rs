//! Work handed to threads outside the runtime's workers, keeping the
//! caller's tracing span.
//!
//! A span is entered per thread: work sent to tokio's blocking pool or to
//! rayon's starts with no span, so its events would lose the pipeline's
//! and the stage's names. These wrappers carry the span across.

use tokio::task::JoinHandle;

/// `tokio::task::spawn_blocking`, inside the caller's current span.
pub(crate) fn spawn_blocking<F, R>(f: F) -> JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
}

/// `rayon::spawn`, inside the caller's current span.
pub(crate) fn spawn_on_rayon(f: impl FnOnce() + Send + 'static) {
    let span = tracing::Span::current();
    rayon::spawn(move || span.in_scope(f));
}
