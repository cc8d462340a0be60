//! `[limits]`: bounds on what one client (or all of them) can make regcache do, with their
//! defaults and ranges.

use std::time::Duration;

use crate::config::raw::RawLimits;
use crate::config::units::ByteSize;

/// Validated `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Open client connections; more are answered `503` and closed (restart to change).
    pub max_connections: usize,
    /// Largest request head (request line and headers); more gets `431`.
    pub max_header_size: usize,
    /// Longest request target (path and query); longer gets `414`.
    pub max_uri_length: usize,
    /// Time a client has to send a request's headers, and longest idle keep-alive.
    pub header_read_timeout: Duration,
    /// Blob fills from upstreams running at once.
    pub max_fills: usize,
    /// How long a request waits for a fill slot before `503`.
    pub fill_wait: Duration,
    /// Bytes that fills on a full disk may keep in memory, all together, so that later clients
    /// of the same blob can join them; past it a fill streams its blob through.
    pub fill_memory: u64,
    /// Largest `n` on tag lists and the catalog.
    pub max_page: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 4096,
            max_header_size: 32 << 10,
            max_uri_length: 8 << 10,
            header_read_timeout: Duration::from_secs(30),
            max_fills: 64,
            fill_wait: Duration::from_secs(30),
            fill_memory: 256 << 20,
            max_page: 10_000,
        }
    }
}

pub(super) fn validate(raw: RawLimits) -> Result<LimitsConfig, String> {
    let d = LimitsConfig::default();
    let size = |v: Option<ByteSize>, default: usize| -> Result<usize, String> {
        match v {
            None => Ok(default),
            Some(b) => usize::try_from(b.0).map_err(|_| format!("{} is too large", b.0)),
        }
    };
    let limits = LimitsConfig {
        max_connections: raw.max_connections.unwrap_or(d.max_connections),
        max_header_size: size(raw.max_header_size, d.max_header_size)
            .map_err(|e| format!("limits.max_header_size: {e}"))?,
        max_uri_length: size(raw.max_uri_length, d.max_uri_length)
            .map_err(|e| format!("limits.max_uri_length: {e}"))?,
        header_read_timeout: raw
            .header_read_timeout
            .map_or(d.header_read_timeout, |v| v.0),
        max_fills: raw.max_fills.unwrap_or(d.max_fills),
        fill_wait: raw.fill_wait.map_or(d.fill_wait, |v| v.0),
        fill_memory: raw.fill_memory.map_or(d.fill_memory, |v| v.0),
        max_page: raw.max_page.unwrap_or(d.max_page),
    };
    if !(1..=1_000_000).contains(&limits.max_connections) {
        return Err("limits.max_connections must be from 1 to 1000000".into());
    }
    if !(1024..=(16 << 20)).contains(&limits.max_header_size) {
        return Err("limits.max_header_size must be from 1KiB to 16MiB".into());
    }
    if !(256..=65_534).contains(&limits.max_uri_length) {
        return Err("limits.max_uri_length must be from 256 to 65534 bytes".into());
    }
    if limits.header_read_timeout.is_zero()
        || limits.header_read_timeout > Duration::from_secs(3600)
    {
        return Err("limits.header_read_timeout must be more than 0 and at most 1h".into());
    }
    if !(1..=100_000).contains(&limits.max_fills) {
        return Err("limits.max_fills must be from 1 to 100000".into());
    }
    if limits.fill_wait > Duration::from_secs(3600) {
        return Err("limits.fill_wait must be at most 1h".into());
    }
    if limits.fill_memory > 1 << 40 {
        return Err("limits.fill_memory must be at most 1TiB".into());
    }
    if !(1..=1_000_000).contains(&limits.max_page) {
        return Err("limits.max_page must be from 1 to 1000000".into());
    }
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    #[test]
    fn limits_have_defaults_and_bounds() {
        let c = parse("").expect("defaults");
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.limits.max_page, 10_000);
        let c = parse(
            "[limits]\nmax_connections = 10\nmax_header_size = \"8KiB\"\nmax_uri_length = 1024\n\
             header_read_timeout = \"2s\"\nmax_fills = 3\nfill_wait = 0\nfill_memory = \"64MiB\"\n\
             max_page = 50\n",
        )
        .expect("valid");
        assert_eq!(
            c.limits,
            LimitsConfig {
                max_connections: 10,
                max_header_size: 8192,
                max_uri_length: 1024,
                header_read_timeout: Duration::from_secs(2),
                max_fills: 3,
                fill_wait: Duration::ZERO,
                fill_memory: 64 << 20,
                max_page: 50,
            }
        );
        for (text, key) in [
            ("[limits]\nmax_connections = 0\n", "max_connections"),
            ("[limits]\nmax_header_size = 100\n", "max_header_size"),
            ("[limits]\nmax_uri_length = 100000\n", "max_uri_length"),
            ("[limits]\nheader_read_timeout = 0\n", "header_read_timeout"),
            ("[limits]\nmax_fills = 0\n", "max_fills"),
            ("[limits]\nfill_memory = \"2TiB\"\n", "fill_memory"),
            ("[limits]\nmax_page = 0\n", "max_page"),
            ("[limits]\nmax_conections = 1\n", "max_conections"),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(key), "{text:?}: {e}");
        }
    }
}
