//! What regcache tells its operators: the Prometheus metrics and the log writer.

pub mod logbuf;
pub mod metrics;
