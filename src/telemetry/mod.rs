//! What regcache tells its operators: the Prometheus metrics, the stale answers of the last hour
//! and the log writer.

pub mod logbuf;
pub mod metrics;
pub mod stale;
