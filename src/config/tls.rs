//! `[tls]`: the listener's certificate and key files, and reading them: PEM to a certificate
//! chain and a signing key, checked to match and to be within their validity dates.
//!
//! A certificate outside its validity period is refused, at start and on reload: clients that
//! verify it would fail. The period is read from the DER by [`validity`], a reader of just the
//! path to `tbsCertificate.validity` (no crate in the dependency tree exposes it: webpki keeps
//! it private), run after webpki has parsed the same certificate (`keys_match`). The listener's
//! certificate in force is the app layer's (`app::tls`), its acceptor the http layer's (`http::tls`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::files::Read;
use crate::config::raw::RawTls;
use crate::config::Pending;

/// Serve HTTPS with this certificate chain and key (PEM files, reloaded on SIGHUP).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Warn when the certificate ends within this time.
    pub expiry_warning: Duration,
}

impl TlsConfig {
    /// The pair `cert` and `key` (the keys a `[tls]` table must set), every other key at its
    /// default: the one place those defaults are written.
    pub fn new(cert: PathBuf, key: PathBuf) -> TlsConfig {
        TlsConfig {
            cert,
            key,
            expiry_warning: Duration::from_secs(14 * 86_400),
        }
    }
}

/// `[tls]`; the files are left to `pending`.
pub(super) fn validate(raw: RawTls, pending: &mut Pending) -> TlsConfig {
    pending.reads.push(Read::TlsPair {
        cert: raw.cert.clone(),
        key: raw.key.clone(),
    });
    let d = TlsConfig::new(raw.cert, raw.key);
    TlsConfig {
        expiry_warning: raw.expiry_warning.map_or(d.expiry_warning, |v| v.0),
        ..d
    }
}

/// When a certificate may be used (`notBefore`, `notAfter`), in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// One DER element at the start of `input`: its tag, its content and what follows it. Only what
/// a certificate uses: one-byte tags, definite lengths of at most 4 bytes.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if !(1..=4).contains(&n) {
            return None;
        }
        let (bytes, rest) = (rest.get(..n)?, rest.get(n..)?);
        (
            bytes.iter().fold(0usize, |l, b| (l << 8) | usize::from(*b)),
            rest,
        )
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

const SEQUENCE: u8 = 0x30;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// Days from 1970-01-01 to the civil date `y-m-d` (proleptic Gregorian; H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date (year, month, day) of `days` since 1970-01-01: the inverse of
/// [`days_from_civil`].
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// `2025-01-31 23:59:59 UTC` for a Unix time.
pub fn format_utc(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// An X.509 time (RFC 5280 4.1.2.5: `YYMMDDHHMMSSZ` as UTCTime, years 1950 to 2049, or
/// `YYYYMMDDHHMMSSZ` as GeneralizedTime) as a Unix time.
fn x509_time(tag: u8, v: &[u8]) -> Option<i64> {
    let digits = v.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        digits
            .get(r)?
            .iter()
            .try_fold(0i64, |n, c| Some(n * 10 + i64::from(c - b'0')))
    };
    let (year, rest) = match (tag, digits.len()) {
        (UTC_TIME, 12) => {
            let yy = num(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        (GENERALIZED_TIME, 14) => (num(0..4)?, 4),
        _ => return None,
    };
    let field = |i: usize| num(rest + 2 * i..rest + 2 * i + 2);
    let (month, day, hour, minute, second) =
        (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if !(1..=days_in_month).contains(&day) || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// The validity period of a DER certificate: `Certificate.tbsCertificate.validity`, after the
/// optional version, the serial number, the signature algorithm and the issuer.
pub fn validity(cert: &[u8]) -> Option<Validity> {
    let (SEQUENCE, certificate, _) = der_element(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = der_element(certificate)? else {
        return None;
    };
    let mut rest = tbs;
    // [0] EXPLICIT version, present in every v2 and v3 certificate.
    if rest.first() == Some(&0xa0) {
        rest = der_element(rest)?.2;
    }
    for _ in 0..3 {
        rest = der_element(rest)?.2; // serialNumber, signature, issuer
    }
    let (SEQUENCE, validity, _) = der_element(rest)? else {
        return None;
    };
    let (tag, before, rest) = der_element(validity)?;
    let not_before = x509_time(tag, before)?;
    let (tag, after, _) = der_element(rest)?;
    let not_after = x509_time(tag, after)?;
    Some(Validity {
        not_before,
        not_after,
    })
}

/// Seconds since the Unix epoch now, signed like certificate times.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A warning when the certificate in `cert` ends within `within` of `now`.
pub fn expiry_warning(cert: &Path, not_after: i64, now: i64, within: Duration) -> Option<String> {
    let left = not_after - now;
    let within = i64::try_from(within.as_secs()).unwrap_or(i64::MAX);
    (left < within).then(|| {
        format!(
            "the TLS certificate {} expires on {} (in {} days, less than tls.expiry_warning): \
             renew it and reload, clients refuse it after that",
            cert.display(),
            format_utc(not_after),
            left / 86_400
        )
    })
}

/// Refuses a certificate that `now` is outside of, naming its dates.
fn check_validity(cert: &Path, v: Validity, now: i64) -> anyhow::Result<()> {
    if now < v.not_before {
        anyhow::bail!(
            "the certificate in {} is not valid before {} (it is {} now): clients would refuse it",
            cert.display(),
            format_utc(v.not_before),
            format_utc(now)
        );
    }
    if now > v.not_after {
        anyhow::bail!(
            "the certificate in {} expired on {} (it is {} now): clients would refuse it; renew it",
            cert.display(),
            format_utc(v.not_after),
            format_utc(now)
        );
    }
    Ok(())
}

/// Reads the PEM certificate chain in `cert` (the server's certificate first) and the private key in
/// `key`, and checks that they match and that `now` is within the certificate's validity.
pub fn load_pair(cert: &Path, key: &Path, now: i64) -> anyhow::Result<(CertifiedKey, Validity)> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| anyhow::anyhow!("cannot read certificate {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("invalid certificate PEM in {}: {e}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("no certificate in {}", cert.display());
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("cannot read private key {}: {e}", key.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| anyhow::anyhow!("unsupported private key in {}: {e}", key.display()))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()
        .map_err(|e| anyhow::anyhow!("{} does not match {}: {e}", key.display(), cert.display()))?;
    // The server's own certificate only: an expired certificate further up the chain (a
    // cross-signed root) does not stop clients that build another path.
    let v = ck
        .end_entity_cert()
        .ok()
        .and_then(|c| validity(c))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot read the validity dates of the certificate in {}",
                cert.display()
            )
        })?;
    check_validity(cert, v, now)?;
    Ok((ck, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DER element: `tag`, a length (long form past 127 bytes), `content`.
    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match content.len() {
            n @ 0..=127 => out.push(n as u8),
            n @ 128..=255 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(content);
        out
    }

    /// The shape of a v3 certificate up to its validity (and a subject after it).
    fn certificate(not_before: (u8, &str), not_after: (u8, &str)) -> Vec<u8> {
        let tbs = [
            der(0xa0, &der(0x02, &[2])),
            der(0x02, &[0x10, 0x01]),
            der(SEQUENCE, &der(0x06, &[0x2a, 0x86, 0x48])),
            der(SEQUENCE, &[b'i'; 200]), // a long issuer: a two-byte length
            der(
                SEQUENCE,
                &[
                    der(not_before.0, not_before.1.as_bytes()),
                    der(not_after.0, not_after.1.as_bytes()),
                ]
                .concat(),
            ),
            der(SEQUENCE, b"subject"),
        ]
        .concat();
        der(
            SEQUENCE,
            &[der(SEQUENCE, &tbs), der(SEQUENCE, b"sig")].concat(),
        )
    }

    #[test]
    fn validity_is_read_from_utc_and_generalized_times() {
        let c = certificate(
            (UTC_TIME, "200101000000Z"),
            (GENERALIZED_TIME, "20991231235959Z"),
        );
        let v = validity(&c).expect("validity");
        assert_eq!(v.not_before, 1_577_836_800, "2020-01-01");
        assert_eq!(format_utc(v.not_before), "2020-01-01 00:00:00 UTC");
        assert_eq!(format_utc(v.not_after), "2099-12-31 23:59:59 UTC");
        // UTCTime years: 50 to 99 are 19xx, 00 to 49 are 20xx (RFC 5280).
        let c = certificate((UTC_TIME, "500101000000Z"), (UTC_TIME, "491231235959Z"));
        let v = validity(&c).expect("validity");
        assert_eq!(format_utc(v.not_before), "1950-01-01 00:00:00 UTC");
        assert_eq!(format_utc(v.not_after), "2049-12-31 23:59:59 UTC");
        let leap = certificate((UTC_TIME, "240229120000Z"), (UTC_TIME, "240301000000Z"));
        assert!(validity(&leap).is_some(), "2024-02-29 exists");
    }

    #[test]
    fn malformed_validity_is_refused_and_every_truncation_is_an_error() {
        let good = (UTC_TIME, "200101000000Z");
        for bad in [
            (UTC_TIME, "230229000000Z"),         // not a leap year
            (UTC_TIME, "201301000000Z"),         // month 13
            (UTC_TIME, "200101240000Z"),         // hour 24
            (UTC_TIME, "2001010000Z"),           // no seconds
            (UTC_TIME, "200101000000+0100"),     // not UTC
            (GENERALIZED_TIME, "200101000000Z"), // two-digit year in GeneralizedTime
            (GENERALIZED_TIME, "20200101000000.5Z"),
            (0x04, "200101000000Z"), // not a time at all
        ] {
            assert_eq!(validity(&certificate(good, bad)), None, "{bad:?}");
        }
        let c = certificate(good, (GENERALIZED_TIME, "20991231235959Z"));
        for n in 0..c.len() {
            assert_eq!(validity(&c[..n]), None, "a prefix of {n} bytes");
        }
    }

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn expiry_warning_names_the_date_within_the_window_only() {
        let day = 86_400;
        let w = expiry_warning(
            Path::new("/c.pem"),
            10 * day,
            0,
            Duration::from_secs(14 * 86_400),
        )
        .expect("10 days left, 14 days window");
        assert!(
            w.contains("/c.pem") && w.contains("1970-01-11") && w.contains("in 10 days"),
            "{w}"
        );
        assert_eq!(
            expiry_warning(
                Path::new("/c.pem"),
                20 * day,
                0,
                Duration::from_secs(14 * 86_400)
            ),
            None
        );
        let v = Validity {
            not_before: 100,
            not_after: 200,
        };
        assert!(check_validity(Path::new("c"), v, 150).is_ok());
        let e = check_validity(Path::new("c"), v, 201)
            .expect_err("expired")
            .to_string();
        assert!(e.contains("expired on 1970-01-01 00:03:20 UTC"), "{e}");
        let e = check_validity(Path::new("c"), v, 99)
            .expect_err("early")
            .to_string();
        assert!(
            e.contains("not valid before 1970-01-01 00:01:40 UTC"),
            "{e}"
        );
    }
}
