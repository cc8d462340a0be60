//! `[store.s3]`: the S3-compatible bucket shared by several regcache servers, behind the local
//! store, with its defaults and checks (bucket name, endpoint, region, prefix, credentials).

use std::time::Duration;

use crate::config::files::{self, Read};
use crate::config::raw::RawS3;
use crate::config::Pending;

/// The shared S3-compatible bucket behind the local store (`[store.s3]`).
#[derive(Clone, PartialEq)]
pub struct S3Config {
    pub bucket: String,
    /// `None`: AWS S3 itself (the endpoint follows from the region).
    pub endpoint: Option<reqwest::Url>,
    pub region: String,
    /// Key prefix inside the bucket, without slashes at either end ("" for none).
    pub prefix: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub virtual_hosted_style: bool,
    /// Bound on one bucket request (a blob download is bounded per chunk instead).
    pub timeout: Duration,
    /// Answer GETs of blobs held by the bucket with a redirect to a presigned URL.
    pub redirect: bool,
    pub redirect_ttl: Duration,
}

impl S3Config {
    /// The bucket `bucket` (the key a `[store.s3]` table must set), every other key at its
    /// default: the one place those defaults are written.
    pub fn new(bucket: String) -> S3Config {
        S3Config {
            bucket,
            endpoint: None,
            region: "us-east-1".into(),
            prefix: String::new(),
            access_key_id: None,
            secret_access_key: None,
            virtual_hosted_style: false,
            timeout: Duration::from_secs(5),
            redirect: false,
            redirect_ttl: Duration::from_secs(900),
        }
    }
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint.as_ref().map(|u| u.as_str()))
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<hidden>"),
            )
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("timeout", &self.timeout)
            .field("redirect", &self.redirect)
            .field("redirect_ttl", &self.redirect_ttl)
            .finish()
    }
}

/// `[store.s3]`; a secret from the environment is left to `pending`.
pub(super) fn validate(raw: RawS3, pending: &mut Pending) -> Result<S3Config, String> {
    let b = &raw.bucket;
    let valid_bucket = (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && b.starts_with(|c: char| c.is_ascii_alphanumeric())
        && b.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !valid_bucket {
        return Err(format!(
            "store.s3.bucket = {b:?} is not a bucket name (3 to 63 of a-z, 0-9, '-' and '.')"
        ));
    }
    if let Some(e) = &raw.endpoint {
        if e.0.query().is_some() || e.0.path() != "/" {
            return Err(format!(
                "store.s3.endpoint = {:?} must be a bare scheme://host[:port] URL",
                e.0.as_str()
            ));
        }
    }
    let d = S3Config::new(raw.bucket);
    let region = raw.region.unwrap_or(d.region.clone());
    if region.is_empty()
        || !region
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-')
    {
        return Err(format!("store.s3.region = {region:?} is not a region name"));
    }
    let prefix = raw
        .prefix
        .map_or(d.prefix.clone(), |p| p.trim_matches('/').to_owned());
    if prefix.split('/').any(|s| s == "." || s == "..")
        || prefix.contains("//")
        || prefix.chars().any(|c| c.is_control())
    {
        return Err(format!("store.s3.prefix = {prefix:?} is not a key prefix"));
    }
    let has_secret = raw.secret_access_key.is_some() || raw.secret_access_key_env.is_some();
    let secret = match (raw.secret_access_key, raw.secret_access_key_env) {
        (Some(_), Some(_)) => {
            return Err("store.s3: set one of secret_access_key and secret_access_key_env".into())
        }
        (Some(s), None) => {
            pending.inline_secret = true;
            Some(s)
        }
        (None, Some(var)) => {
            files::check_env_name("store.s3.secret_access_key_env", &var)?;
            pending.reads.push(Read::S3SecretEnv { var });
            None
        }
        (None, None) => None,
    };
    if has_secret != raw.access_key_id.is_some() {
        return Err(
            "store.s3: access_key_id and a secret go together (set both, or neither to use \
             AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the instance's role)"
                .into(),
        );
    }
    let timeout = raw.timeout.map_or(d.timeout, |v| v.0);
    if timeout < Duration::from_millis(10) {
        return Err("store.s3.timeout must be at least 10ms".into());
    }
    let redirect_ttl = raw.redirect_ttl.map_or(d.redirect_ttl, |v| v.0);
    if redirect_ttl < Duration::from_secs(1) || redirect_ttl > Duration::from_secs(7 * 24 * 3600) {
        return Err("store.s3.redirect_ttl must be from 1s to 7 days".into());
    }
    Ok(S3Config {
        endpoint: raw.endpoint.map(|e| e.0),
        region,
        prefix,
        access_key_id: raw.access_key_id,
        secret_access_key: secret,
        virtual_hosted_style: raw.virtual_hosted_style.unwrap_or(d.virtual_hosted_style),
        timeout,
        redirect: raw.redirect.unwrap_or(d.redirect),
        redirect_ttl,
        ..d
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    #[test]
    fn s3_store_settings_are_checked() {
        let base = "[store.s3]\nbucket = \"fleet-cache\"\n";
        let c = parse(base).expect("minimal");
        let s3 = c.store.s3.expect("s3 set");
        assert_eq!(s3.region, "us-east-1");
        assert_eq!(s3.prefix, "");
        assert_eq!(s3.timeout, Duration::from_secs(5));
        assert!(!s3.redirect && !s3.virtual_hosted_style);
        assert!(parse("").expect("defaults").store.s3.is_none());

        let c = parse(&format!(
            "{base}endpoint = \"http://127.0.0.1:9000\"\nprefix = \"/site-a/\"\n\
             access_key_id = \"AK\"\nsecret_access_key = \"SK\"\nredirect = true\n\
             redirect_ttl = \"1h\"\ntimeout = \"2s\"\n"
        ))
        .expect("full");
        let s3 = c.store.s3.as_ref().expect("s3 set");
        assert_eq!(s3.prefix, "site-a");
        assert_eq!(s3.redirect_ttl, Duration::from_secs(3600));
        assert!(
            c.inline_password,
            "an inline secret key counts as a password"
        );
        assert!(
            !format!("{s3:?}").contains("SK"),
            "the secret never reaches logs"
        );
        let c = parse(&format!(
            "{base}access_key_id = \"AK\"\nsecret_access_key_env = \"PATH\"\n"
        ))
        .expect("secret from the environment");
        let s3 = c.store.s3.as_ref().expect("s3 set");
        assert_eq!(s3.secret_access_key, std::env::var("PATH").ok());
        assert!(!c.inline_password);

        for (bad, want) in [
            ("[store.s3]\nbucket = \"Bad_Name\"\n", "store.s3.bucket"),
            ("[store.s3]\nbucket = \"ab\"\n", "store.s3.bucket"),
            (&format!("{base}endpoint = \"http://h:1/path\"\n"), "no path"),
            (&format!("{base}endpoint = \"ftp://h\"\n"), "endpoint"),
            (&format!("{base}prefix = \"a/../b\"\n"), "store.s3.prefix"),
            (&format!("{base}region = \"us east\"\n"), "store.s3.region"),
            (&format!("{base}access_key_id = \"AK\"\n"), "go together"),
            (&format!("{base}secret_access_key_env = \"PATH\"\n"), "go together"),
            (
                &format!("{base}secret_access_key = \"a\"\nsecret_access_key_env = \"PATH\"\n"),
                "one of secret_access_key",
            ),
            (
                &format!("{base}access_key_id = \"AK\"\nsecret_access_key_env = \"REGCACHE_SURELY_UNSET_9\"\n"),
                "not set",
            ),
            (
                &format!("{base}access_key_id = \"AK\"\nsecret_access_key_env = \"A B\"\n"),
                "not an environment variable name",
            ),
            (&format!("{base}timeout = \"1ms\"\n"), "store.s3.timeout"),
            (&format!("{base}redirect_ttl = \"30d\"\n"), "redirect_ttl"),
            (&format!("{base}bucket_name = \"x\"\n"), "bucket_name"),
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
