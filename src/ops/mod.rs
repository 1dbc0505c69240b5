//! The operators, one per file: fused steps (map, filter, tap, skip,
//! sample, unbatch, dedupe), operators on the driver (batcher, throttle,
//! debounce, take, windows, the router under partition and switch), and
//! fan-in and fan-out. They use the transport core and the flow layer.

pub(crate) mod batcher;
pub(crate) mod broadcast;
pub(crate) mod buffer;
pub(crate) mod debounce;
pub(crate) mod dedupe;
pub(crate) mod filter;
pub(crate) mod map;
pub(crate) mod merge;
pub(crate) mod par_map;
pub(crate) mod partition;
pub(crate) mod route;
pub(crate) mod sample;
pub(crate) mod skip;
pub(crate) mod switch;
pub(crate) mod take;
pub(crate) mod tap;
pub(crate) mod throttle;
pub(crate) mod unbatch;
pub(crate) mod window;
