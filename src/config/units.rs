//! The config's units: durations (`"30s"`, `"1.5m"`, a number of seconds), sizes (`"4MiB"`, a
//! number of bytes) and upstream URLs, with their serde forms. The command-line flags that take
//! a duration or a size parse them here too.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// A duration written as `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"` or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationValue(pub Duration);

/// A size written as `"4MiB"`, `"512KiB"`, `"10GB"`, `"123"` or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// An upstream URL: http or https, no query, no fragment, no credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl(pub reqwest::Url);

/// A duration: a decimal number of seconds, or of `ms`, `s`, `m`, `h` or `d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("invalid duration {s:?} (expected e.g. \"30s\", \"5m\", \"250ms\")")
    })?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        u => {
            return Err(format!(
                "invalid duration unit {u:?} in {s:?} (use ms, s, m, h or d)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A size: a number of bytes, then a unit, powers of 1024 (`KiB`, `MiB`, `GiB`, `TiB`) or of 1000
/// (`K`/`KB`/`kB`, `M`/`MB`, `G`/`GB`, `T`/`TB`), or none (or `B`) for bytes. No crate in the
/// dependency tree parses sizes (indicatif only prints them).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (expected e.g. \"4MiB\", \"10GB\")"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        "T" | "TB" => 1_000_000_000_000,
        "TiB" => 1 << 40,
        u => {
            return Err(format!(
                "invalid size unit {u:?} in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// An upstream's (or the config store's) root URL: http or https, a host, no credentials, no
/// query or fragment, no path.
pub fn parse_upstream_url(s: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!("URL {s:?} must use http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("URL {s:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "URL {s:?} must not hold credentials: use the upstream's username and password keys"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("URL {s:?} must not have a query or fragment"));
    }
    if url.path() != "/" && !url.path().is_empty() {
        return Err(format!(
            "URL {s:?} must be the registry's root (no path): requests go to <url>/v2/…"
        ));
    }
    Ok(url)
}

/// Deserializes a string (or an integer, where `int` accepts one) through `parse`.
struct StrOrInt<F>(F, &'static str);

impl<'de, T, F: FnOnce(&str) -> Result<T, String>> de::Visitor<'de> for StrOrInt<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        if v < 0 {
            return Err(E::custom(format!("{v} is negative")));
        }
        (self.0)(&v.to_string()).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt(
            |s: &str| parse_duration(s).map(DurationValue),
            "a duration such as \"30s\"",
        ))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt(
            |s: &str| parse_size(s).map(ByteSize),
            "a size such as \"4MiB\"",
        ))
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(StrOrInt(
            |s: &str| parse_upstream_url(s).map(UpstreamUrl),
            "an http(s) URL",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("17"), Ok(17));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("2 weeks").is_err());
    }
}
