//! What the benches share.

use tokio::runtime::{Builder, Runtime};

/// The two runtime flavours every bench runs on, built once, outside the
/// timed loop: two workers (the machine's cores) and a single thread.
pub fn runtimes() -> Vec<(&'static str, Runtime)> {
    vec![
        (
            "multi_thread_2",
            Builder::new_multi_thread()
                .worker_threads(2)
                .enable_time()
                .build()
                .unwrap(),
        ),
        (
            "current_thread",
            Builder::new_current_thread().enable_time().build().unwrap(),
        ),
    ]
}
