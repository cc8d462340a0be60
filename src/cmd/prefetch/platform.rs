//! Image platforms (`os/arch[/variant]`) for `prefetch`: parsing `--platform`, this machine's
//! platform, and matching the `platform` of an index's children.

/// A platform as `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.trim().split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        };
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.to_ascii_lowercase(),
                arch: arch.to_ascii_lowercase(),
                variant: None,
            }),
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => Ok(Platform {
                os: os.to_ascii_lowercase(),
                arch: arch.to_ascii_lowercase(),
                variant: Some(v.to_ascii_lowercase()),
            }),
            _ => Err(format!(
                "invalid platform {s:?} (expected os/arch[/variant], e.g. linux/arm64)"
            )),
        }
    }

    /// This machine's platform, in OCI terms.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            arch: arch.into(),
            variant: None,
        }
    }

    /// Whether an index child's `platform` object is this platform (any variant when this one
    /// names none).
    pub(super) fn matches(&self, v: &serde_json::Value) -> bool {
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
        s("os") == self.os
            && s("architecture") == self.arch
            && self
                .variant
                .as_deref()
                .is_none_or(|want| s("variant") == want)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_match() {
        let p = Platform::parse("linux/arm64/v8").expect("platform");
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux/../x").is_err());
        let v = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        assert!(p.matches(&v));
        assert!(Platform::parse("linux/arm64").expect("p").matches(&v));
        assert!(!Platform::parse("linux/amd64").expect("p").matches(&v));
    }
}
