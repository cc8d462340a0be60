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

/// A duration that can be turned off: `"off"` or a zero duration (`0`, `"0s"`) is off (`None`),
/// anything else a duration as [`DurationValue`] takes it (`"300ms"`, `"1.5s"`, `2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationOrOff(pub Option<Duration>);

/// A size written as `"4MiB"`, `"512KiB"`, `"10GB"`, `"123"` or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// An upstream URL: http or https, no query, no fragment, no credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl(pub reqwest::Url);

/// The longest duration the config takes (about 31 years): far beyond any timeout, and small
/// enough that adding it to an `Instant` cannot overflow.
const MAX_DURATION: Duration = Duration::from_secs(1_000_000_000);

/// A duration: a decimal number, then a unit, `ms`, `s`, `m`, `h` or `d`, or none for seconds,
/// with blanks allowed around both (`"500ms"`, `"1.5s"`, `"2h"`, `"30"`, `"0.5"`, `"30 s"`),
/// from 0 to 10^9 seconds.
///
/// humantime reads the number, exactly (`"0.1s"` is 100 ms to the nanosecond). Three things
/// are done around it, each to keep a form the config has always taken the way it was: the
/// units stay these five, because humantime's set is wider in ways a typo reaches (`"5M"` is five
/// months there, `"5m"` five minutes); the number is read as seconds and then scaled, because
/// humantime refuses fractions of an hour or a day that are not whole seconds (`"0.001h"`); and
/// a bare number is seconds (humantime wants a unit), as are `".5"` and `"5."`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let out_of_range = || format!("duration {s:?} is out of range");
    let secs = seconds(number).map_err(|e| match e {
        Some(humantime::DurationError::NumberOverflow) => out_of_range(),
        _ => format!("invalid duration {s:?} (expected e.g. \"30s\", \"5m\", \"250ms\")"),
    })?;
    let d = match unit.trim() {
        "ms" => Some(secs / 1000),
        "" | "s" => Some(secs),
        "m" => secs.checked_mul(60),
        "h" => secs.checked_mul(3600),
        "d" => secs.checked_mul(86_400),
        u => {
            return Err(format!(
                "invalid duration unit {u:?} in {s:?} (use ms, s, m, h or d)"
            ))
        }
    };
    d.filter(|d| *d <= MAX_DURATION).ok_or_else(out_of_range)
}

/// [`parse_duration`], or `"off"`; a zero duration is off too (`None`).
pub fn parse_duration_or_off(s: &str) -> Result<Option<Duration>, String> {
    if s.trim() == "off" {
        return Ok(None);
    }
    parse_duration(s)
        .map(|d| Some(d).filter(|d| !d.is_zero()))
        .map_err(|e| format!("{e}, or \"off\""))
}

/// `number` (digits, with at most one decimal point and at least one digit) as seconds, read by
/// humantime; `None` as the error when it is not such a number. humantime wants a digit on each
/// side of the point and reads nanoseconds at most, so `".5"` is given as `"0.5"`, `"5."` as
/// `"5"`, and the digits past the ninth decimal (below a nanosecond) are left out.
fn seconds(number: &str) -> Result<Duration, Option<humantime::DurationError>> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
        return Err(None);
    }
    let int = if int.is_empty() { "0" } else { int };
    let frac = frac.get(..9).unwrap_or(frac);
    let text = if frac.is_empty() {
        format!("{int}s")
    } else {
        format!("{int}.{frac}s")
    };
    humantime::parse_duration(&text).map_err(Some)
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

impl<'de> Deserialize<'de> for DurationOrOff {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt(
            |s: &str| parse_duration_or_off(s).map(DurationOrOff),
            "a duration such as \"250ms\", or \"off\"",
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

    /// Every form of duration the config accepted before durations went through humantime, with
    /// its value.
    #[test]
    fn every_duration_form_the_config_accepts_stays_accepted() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        for (text, want) in [
            ("500ms", ms(500)),
            ("250ms", ms(250)),
            ("0.5ms", Duration::from_micros(500)),
            ("30s", s(30)),
            ("1.5s", ms(1500)),
            ("0.1s", ms(100)),
            ("5m", s(300)),
            ("1.5m", s(90)),
            ("2h", s(7200)),
            ("0.001h", Duration::from_micros(3_600_000)),
            ("1d", s(86_400)),
            ("1.5d", s(129_600)),
            ("14d", s(14 * 86_400)),
            // A bare number is seconds, with or without a fraction.
            ("30", s(30)),
            ("0", Duration::ZERO),
            ("0.5", ms(500)),
            // Blanks around the number and the unit.
            (" 30s ", s(30)),
            ("30 s", s(30)),
            ("\t2h", s(7200)),
            // A point with nothing on one side, leading zeros, digits below a nanosecond.
            (".5s", ms(500)),
            ("5.s", s(5)),
            ("007s", s(7)),
            ("1.0000000001s", s(1)),
            // The longest accepted.
            ("1000000000", s(1_000_000_000)),
            ("1000000000s", s(1_000_000_000)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text:?}");
        }
        for bad in [
            "",
            " ",
            "s",
            "soon",
            ".",
            "..5s",
            "1.2.3s",
            "-1s",
            "+1s",
            "1e3s",
            "2 weeks",
            "5M",
            "1w",
            "1y",
            "1h30m",
            "1h 30m",
            "5 m s",
            "1000000001",
            "11575d",
            "9999999999999999999999s",
        ] {
            assert!(
                parse_duration(bad).is_err(),
                "{bad:?} was refused before humantime and stays refused: {:?}",
                parse_duration(bad)
            );
        }
        assert!(parse_duration("soon").is_err_and(|e| e.contains("invalid duration")));
        assert!(parse_duration("2 weeks").is_err_and(|e| e.contains("unit \"weeks\"")));
        assert!(parse_duration("1000000001").is_err_and(|e| e.contains("out of range")));
        assert!(parse_duration("99999999999999999999s").is_err_and(|e| e.contains("out of range")));
    }

    /// The parser before humantime (f64 seconds), kept as the reference the one above must agree
    /// with.
    fn before_humantime(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: f64 = num.parse().map_err(|_| "invalid".to_string())?;
        let secs = match unit.trim() {
            "ms" => n / 1000.0,
            "" | "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            _ => return Err("unit".into()),
        };
        if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
            return Err("range".into());
        }
        Ok(Duration::from_secs_f64(secs))
    }

    /// Durations built from digits, points, blanks and units (good and bad) are accepted by both
    /// parsers or by neither, with the same value to within 0.1 ms (the old parser's f64 seconds
    /// were that precise at most; the digits of a number below a nanosecond, times a day at most,
    /// are left out now).
    #[test]
    fn durations_are_accepted_as_before_humantime() {
        let pieces = [
            "0",
            "1",
            "5",
            "9",
            "12",
            "007",
            "3600",
            ".",
            ".",
            " ",
            "ms",
            "s",
            "m",
            "h",
            "d",
            "M",
            "w",
            "x",
            "e",
            "-",
            "5",
            "25",
            "0000000001",
        ];
        // xorshift: the same inputs at every run.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut below = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let mut accepted = 0;
        for _ in 0..50_000 {
            let n = 1 + below(5);
            let text: String = (0..n).map(|_| pieces[below(pieces.len())]).collect();
            match (before_humantime(&text), parse_duration(&text)) {
                (Ok(a), Ok(b)) => {
                    accepted += 1;
                    let diff = a.abs_diff(b);
                    assert!(
                        diff <= Duration::from_micros(100),
                        "{text:?}: {a:?} before, {b:?} now"
                    );
                }
                (Err(_), Err(_)) => {}
                (before, now) => panic!("{text:?}: {before:?} before, {now:?} now"),
            }
        }
        assert!(
            accepted > 1000,
            "the generator reaches valid durations: {accepted}"
        );
    }
}
