//! Tests of the whole configuration: the top-level keys, errors naming their line, overlays, and
//! that the example config (`config/regcache.toml`), the reference (`docs/CONFIG.md`) and the
//! defaults in the code agree. Helpers for the sections' tests.

use std::path::Path;
use std::time::Duration;

use serde::de::{self, Visitor};

use super::raw::{
    RawAccess, RawConfig, RawConfigStore, RawLimits, RawLog, RawPeers, RawS3, RawStore, RawTls,
    RawUpstream,
};
use super::*;

/// The example config as shipped.
const EXAMPLE: &str = include_str!("../../config/regcache.toml");
/// The configuration reference.
const REFERENCE: &str = include_str!("../../docs/CONFIG.md");

/// Parses (and reads the files of) `text`, the error as its message.
pub fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, "test.toml", &Overrides::default()).map_err(|e| e.to_string())
}

/// Validates the values of `text` only, reading no file.
fn values(text: &str) -> Result<Config, String> {
    Config::parse_values(text, "test.toml", &Overrides::default())
        .map(|(c, _)| c)
        .map_err(|e| e.to_string())
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn empty_config_has_working_defaults() {
    let c = parse("").expect("defaults");
    assert_eq!(c.listen.to_string(), "127.0.0.1:5000");
    assert_eq!(c.upstreams.len(), 1);
    let d = c.default_upstream();
    assert_eq!(d.url.as_str(), "https://registry-1.docker.io/");
    assert!(d.hosts.iter().any(|h| h == "docker.io"));
    assert!(d.docker_hub_names);
    assert_eq!(d.freshness, Duration::from_secs(60));
    assert_eq!(c.max_manifest_size, 4 << 20);
}

/// The `Default` impls (and `new`s) are what an empty file, or a table with only its required
/// keys, gives: the code writes each default once.
#[test]
fn an_empty_file_gives_the_sections_defaults() {
    let c = values("").expect("defaults");
    assert_eq!(c.listen, DEFAULT_LISTEN);
    assert_eq!(c.max_manifest_size, DEFAULT_MAX_MANIFEST_SIZE);
    assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
    assert_eq!(c.log, LogConfig::default());
    assert_eq!(c.limits, LimitsConfig::default());
    assert_eq!(c.store, StoreConfig::default());
    assert_eq!(c.access, AccessConfig::default());
    assert_eq!((c.tls, c.config_store), (None, None));
    let hub = reqwest::Url::parse(DOCKER_HUB_URL).expect("url");
    assert_eq!(
        c.upstreams,
        vec![UpstreamConfig {
            hosts: ["registry-1.docker.io", "docker.io", "index.docker.io"]
                .map(String::from)
                .to_vec(),
            docker_hub_names: true,
            ..UpstreamConfig::new(DEFAULT_UPSTREAM_NAME.into(), hub)
        }]
    );
    let c = values(
        "[store.s3]\nbucket = \"b-1\"\n[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n\
         [config_store]\nkind = \"consul\"\nurl = \"http://127.0.0.1:8500\"\nkey = \"k\"\n",
    )
    .expect("required keys only");
    assert_eq!(c.store.s3, Some(S3Config::new("b-1".into())));
    assert_eq!(
        c.tls,
        Some(TlsConfig::new("/c.pem".into(), "/k.pem".into()))
    );
    assert_eq!(
        c.config_store,
        Some(ConfigStoreConfig::new(
            ConfigStoreKind::Consul,
            reqwest::Url::parse("http://127.0.0.1:8500").expect("url"),
            "k".into()
        ))
    );
}

#[test]
fn unknown_keys_are_refused_with_their_line() {
    let e = parse("listen = \"127.0.0.1:1\"\nlisten_addr = 3\n").expect_err("unknown key");
    assert!(e.contains("line 2") && e.contains("listen_addr"), "{e}");
    let e = parse("[upstreams.a]\nurl = \"https://x.io\"\nfreshnes = \"1s\"\n")
        .expect_err("unknown key");
    assert!(e.contains("line 3") && e.contains("freshnes"), "{e}");
}

#[test]
fn bad_urls_sizes_and_durations_name_the_line() {
    let e = parse("[upstreams.a]\nurl = \"ftp://x.io\"\n").expect_err("bad scheme");
    assert!(e.contains("line 2") && e.contains("http or https"), "{e}");
    let e = parse("max_manifest_size = \"4 parsecs\"\n").expect_err("bad size");
    assert!(e.contains("line 1") && e.contains("size"), "{e}");
    let e = parse("[upstreams.a]\nurl = \"https://x.io\"\nfreshness = \"soon\"\n")
        .expect_err("bad duration");
    assert!(e.contains("line 3") && e.contains("duration"), "{e}");
    let e = parse("listen = \"localhost\"\n").expect_err("bad listen");
    assert!(e.contains("line 1") && e.contains("listen"), "{e}");
    let e = parse("default_upstream = \"nope\"\n").expect_err("bad default");
    assert!(e.contains("line 1") && e.contains("nope"), "{e}");
}

/// The values are all checked before any file is read: a bad value is reported even when a file
/// the configuration names is missing, and no file is read for a configuration with a bad value.
#[test]
fn values_are_checked_before_files_are_read() {
    let e = parse(
        "[upstreams.a]\nurl = \"https://a.io\"\nusername = \"u\"\n\
         password_file = \"/nonexistent/password\"\nca_file = \"/nonexistent/ca.pem\"\n\
         [access]\nhtpasswd = \"/nonexistent/htpasswd\"\n[limits]\nmax_fills = 0\n\
         [tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n",
    )
    .expect_err("bad value");
    assert!(
        e.contains("limits.max_fills") && !e.contains("cannot read"),
        "the bad value is reported, not the first missing file: {e}"
    );
    let (_, reads) = Config::parse_values(
        "[upstreams.a]\nurl = \"https://a.io\"\nusername = \"u\"\npassword_file = \"/p\"\n\
         ca_file = \"/ca.pem\"\n[access]\nhtpasswd = \"/h\"\n\
         [tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n",
        "t",
        &Overrides::default(),
    )
    .expect("values are valid");
    assert_eq!(
        reads,
        vec![
            Read::PasswordFile {
                upstream: "a".into(),
                username: "u".into(),
                path: "/p".into()
            },
            Read::CaFile {
                upstream: "a".into(),
                path: "/ca.pem".into()
            },
            Read::Htpasswd { path: "/h".into() },
            Read::TlsPair {
                cert: "/c.pem".into(),
                key: "/k.pem".into()
            },
        ],
        "every file the configuration names, in the order they are read"
    );
}

#[test]
fn remote_overlay_merges_tables_and_keeps_local_keys() {
    let local = "listen = \"127.0.0.1:7000\"\n[upstreams.docker]\nurl = \"http://127.0.0.1:1\"\nfreshness = \"10s\"\n\
                 [config_store]\nkind = \"etcd\"\nurl = \"http://127.0.0.1:2379\"\nkey = \"/regcache\"\n";
    let remote =
        "[upstreams.docker]\nfreshness = \"5m\"\n[upstreams.ghcr]\nurl = \"https://ghcr.io\"\n";
    let c = Config::parse_layered(local, "local", remote, "etcd", &Overrides::default())
        .expect("valid overlay");
    assert_eq!(c.listen.to_string(), "127.0.0.1:7000");
    assert_eq!(c.default_upstream().url.as_str(), "http://127.0.0.1:1/");
    assert_eq!(c.default_upstream().freshness, Duration::from_secs(300));
    assert_eq!(c.upstreams.len(), 2);
    assert_eq!(
        c.config_store.as_ref().map(|s| s.key.as_str()),
        Some("/regcache")
    );
    let e = Config::parse_layered(
        local,
        "local",
        "[upstreams.docker]\nfreshness = 3\nbogus = 1\n",
        "etcd",
        &Overrides::default(),
    )
    .expect_err("unknown key in the overlay");
    assert!(
        e.to_string().contains("bogus") && e.to_string().contains("etcd"),
        "{e}"
    );
    let e = Config::parse_layered(
        local,
        "local",
        "[config_store]\nkey = \"x\"\n",
        "etcd",
        &Overrides::default(),
    )
    .expect_err("config_store from remote");
    assert!(e.to_string().contains("local file"), "{e}");
}

#[test]
fn config_file_with_a_password_readable_by_others_gets_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("regcache.toml");
    std::fs::write(
        &file,
        "[upstreams.a]\nurl = \"https://a.io\"\nusername = \"u\"\npassword = \"hunter2\"\n",
    )
    .expect("write");
    set_mode(&file, 0o640);
    let c = Config::load(&file, &Overrides::default()).expect("valid");
    assert!(c.inline_password);
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("regcache.toml") && w.contains("group or other users")),
        "{:?}",
        c.warnings
    );
    assert!(!c.warnings.iter().any(|w| w.contains("hunter2")));
    set_mode(&file, 0o600);
    let c = Config::load(&file, &Overrides::default()).expect("valid");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    std::fs::write(&file, "[upstreams.a]\nurl = \"https://a.io\"\n").expect("write");
    set_mode(&file, 0o644);
    let c = Config::load(&file, &Overrides::default()).expect("valid");
    assert!(
        c.warnings.is_empty(),
        "no password, no warning: {:?}",
        c.warnings
    );
}

#[test]
fn the_example_config_is_valid_and_so_is_its_s3_block() {
    parse(EXAMPLE).expect("config/regcache.toml as shipped");
    // Uncomment the [store.s3] block, as an operator would.
    let mut text = String::new();
    let mut in_s3 = false;
    for line in EXAMPLE.lines() {
        if line.trim() == "# [store.s3]" {
            in_s3 = true;
        }
        if in_s3 && line.trim().is_empty() {
            in_s3 = false;
        }
        match line.strip_prefix("# ") {
            Some(rest) if in_s3 => text.push_str(rest),
            _ => text.push_str(line),
        }
        text.push('\n');
    }
    assert!(text.contains("\n[store.s3]\n"), "the block was found");
    // PATH is set in any test environment and stands for the secret here.
    let text = text.replace("REGCACHE_S3_SECRET", "PATH");
    let c = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let s3 = c.store.s3.expect("s3 configured");
    assert_eq!(s3.bucket, "regcache-fleet");
    assert_eq!(s3.prefix, "fleet-a");
    assert_eq!(s3.redirect_ttl, Duration::from_secs(900));
}

/// One `key = value` of the example, set or shown commented out.
struct Setting {
    /// `""` for the top level, else the table's name (`upstreams.docker`, `store.s3`).
    table: String,
    key: String,
    value: toml::Value,
    line: usize,
}

/// Every setting of the example, commented out or not, in order.
fn example_settings() -> Vec<Setting> {
    let mut out = Vec::new();
    let mut table = String::new();
    for (i, line) in EXAMPLE.lines().enumerate() {
        let code = line.strip_prefix("# ").unwrap_or(line);
        if let Some(name) = code
            .trim_end()
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
        {
            if name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(&c))
            {
                table = name.to_owned();
            }
            continue;
        }
        let Some((key, _)) = code.split_once('=') else {
            continue;
        };
        let key = key.trim_end();
        if key.is_empty() || !key.bytes().all(|c| c.is_ascii_lowercase() || c == b'_') {
            continue;
        }
        // The rest of the line is the value, then maybe a comment: TOML reads both.
        out.extend(Setting::parse(&table, key, code, i + 1));
    }
    out
}

impl Setting {
    /// `key`'s value in `assignment` (`key = value`, a TOML line), if it is one.
    fn parse(table: &str, key: &str, assignment: &str, line: usize) -> Option<Setting> {
        let mut parsed = toml::from_str::<toml::Table>(assignment).ok()?;
        Some(Setting {
            table: table.to_owned(),
            key: key.to_owned(),
            value: parsed.remove(key)?,
            line,
        })
    }
}

/// `settings` as one TOML document.
fn document<'a>(settings: impl IntoIterator<Item = &'a Setting>) -> String {
    let mut doc = toml::Table::new();
    for s in settings {
        let mut t = &mut doc;
        for part in s.table.split('.').filter(|p| !p.is_empty()) {
            let entry = t
                .entry(part)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(inner) = entry else {
                panic!("{} is not a table", s.table)
            };
            t = inner;
        }
        t.insert(s.key.clone(), s.value.clone());
    }
    toml::to_string(&doc).expect("a TOML document")
}

/// The keys a table cannot do without: taken from the example for every comparison.
const REQUIRED: [(&str, &str); 9] = [
    ("upstreams.docker", "url"),
    ("config_store", "kind"),
    ("config_store", "url"),
    ("config_store", "key"),
    ("store.s3", "bucket"),
    ("tls", "cert"),
    ("tls", "key"),
    ("peers", "urls"),
    ("peers", "token_file"),
];

/// Where the example deliberately shows something other than the default (`*`: the whole
/// table), and why.
const NOT_DEFAULT: [(&str, &str, &str); 14] = [
    (
        "",
        "data_dir",
        "the default follows $STATE_DIRECTORY; the example shows it without",
    ),
    (
        "upstreams.docker",
        "username",
        "credentials: none by default",
    ),
    (
        "upstreams.docker",
        "password",
        "credentials: none by default",
    ),
    (
        "upstreams.docker",
        "password_file",
        "credentials: none by default",
    ),
    (
        "upstreams.docker",
        "ca_file",
        "an example file: none by default",
    ),
    ("upstreams.ghcr", "*", "a second upstream, as an example"),
    ("store", "max_size", "an example limit: none by default"),
    ("store", "min_free", "an example limit: none by default"),
    (
        "store.s3",
        "endpoint",
        "an example server: AWS S3 by default",
    ),
    ("store.s3", "prefix", "an example prefix: none by default"),
    (
        "store.s3",
        "access_key_id",
        "an example key: the AWS chain by default",
    ),
    (
        "store.s3",
        "secret_access_key_env",
        "goes with access_key_id",
    ),
    (
        "access",
        "allow",
        "an example list: every address by default",
    ),
    (
        "access",
        "htpasswd",
        "an example file: no credentials by default",
    ),
];

fn deliberate(s: &Setting) -> bool {
    NOT_DEFAULT
        .iter()
        .any(|(t, k, _)| *t == s.table && (*k == s.key || *k == "*"))
}

/// The example's required keys: the table each comparison starts from.
fn required() -> Vec<Setting> {
    let required: Vec<Setting> = example_settings()
        .into_iter()
        .filter(|s| REQUIRED.contains(&(s.table.as_str(), s.key.as_str())))
        .collect();
    assert_eq!(
        required.len(),
        REQUIRED.len(),
        "the example shows every required key once"
    );
    required
}

/// Checks that each of `settings` (from `source`) sets its key to its default: added to the
/// required keys, it changes nothing, on the values alone (no file named needs to exist).
/// Returns how many were compared.
fn assert_defaults<'a>(source: &str, settings: impl IntoIterator<Item = &'a Setting>) -> usize {
    let required = required();
    let base_text = document(&required);
    let base = values(&base_text).unwrap_or_else(|e| panic!("{e}\n{base_text}"));
    // The explicit Docker Hub table is the implicit one.
    assert_eq!(base.upstreams, values("").expect("defaults").upstreams);
    let mut compared = 0;
    for s in settings {
        if REQUIRED.contains(&(s.table.as_str(), s.key.as_str())) {
            continue;
        }
        let text = document(required.iter().chain([s]));
        let with =
            values(&text).unwrap_or_else(|e| panic!("{source} line {}: {e}\n{text}", s.line));
        assert!(
            with == base,
            "{source} line {} shows {}{}{} = {}, which is not the default: correct it or the \
             default (the code, the example and docs/CONFIG.md agree), or, in the example, list \
             it in NOT_DEFAULT with the reason\n--- with it ---\n{with:#?}\n--- defaults ---\n\
             {base:#?}",
            s.line,
            s.table,
            if s.table.is_empty() { "" } else { "." },
            s.key,
            s.value
        );
        compared += 1;
    }
    compared
}

/// Every value the example sets, commented out or not, is the default, except the ones
/// [`NOT_DEFAULT`] lists.
#[test]
fn the_example_config_shows_the_defaults() {
    let settings = example_settings();
    let compared = assert_defaults(
        "config/regcache.toml",
        settings.iter().filter(|s| !deliberate(s)),
    );
    assert!(compared >= 30, "only {compared} settings were compared");
    for (table, key, why) in NOT_DEFAULT {
        if key == "*" {
            assert!(
                settings.iter().any(|s| s.table == table),
                "NOT_DEFAULT names [{table}] ({why}), which the example does not show"
            );
        } else {
            assert!(
                settings.iter().any(|s| s.table == table && s.key == key),
                "NOT_DEFAULT names {table}.{key} ({why}), which the example does not set"
            );
        }
    }
    let data_dir = settings
        .iter()
        .find(|s| s.key == "data_dir")
        .expect("data_dir");
    assert_eq!(data_dir.value.as_str(), Some(DEFAULT_DATA_DIR));
}

/// The defaults docs/CONFIG.md gives as a value (`` `"60s"` ``, `` `false` ``; not "none" or
/// "required"), as settings of `upstreams.docker` for the `[upstreams.NAME]` rows.
fn reference_defaults() -> Vec<Setting> {
    let mut out = Vec::new();
    let mut table = None;
    for (i, line) in REFERENCE.lines().enumerate() {
        if let Some(heading) = line.strip_prefix("## ") {
            table = if heading == "Top level" {
                Some(String::new())
            } else {
                heading
                    .strip_prefix("`[")
                    .and_then(|h| h.split_once("]`"))
                    .map(|(t, _)| t.replace("NAME", "docker"))
            };
            continue;
        }
        let Some(table) = &table else { continue };
        // | `key` | type | default | meaning |, with `\|` inside cells.
        let cells: Vec<String> = line
            .replace("\\|", "/")
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect();
        let [_, key, _, default, ..] = cells.as_slice() else {
            continue;
        };
        let (Some(key), Some(value)) = (
            key.strip_prefix('`').and_then(|k| k.strip_suffix('`')),
            default
                .strip_prefix('`')
                .and_then(|d| d.split_once('`'))
                .map(|(v, _)| v),
        ) else {
            continue;
        };
        out.extend(Setting::parse(
            table,
            key,
            &format!("{key} = {value}"),
            i + 1,
        ));
    }
    out
}

/// Every default docs/CONFIG.md gives as a value is the default in the code.
#[test]
fn the_reference_gives_the_defaults() {
    let settings = reference_defaults();
    let compared = assert_defaults("docs/CONFIG.md", &settings);
    assert!(compared >= 30, "only {compared} defaults were compared");
}

/// The field names a serde struct reads, as its derived `Deserialize` hands them to the
/// deserializer.
fn fields<T: de::DeserializeOwned>() -> &'static [&'static str] {
    struct Grab<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for Grab<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("fields taken"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut out: &'static [&'static str] = &[];
    let _ = T::deserialize(Grab(&mut out));
    out
}

/// Every table of the file: its name in docs/CONFIG.md's headings and its raw type's keys.
fn tables() -> Vec<(&'static str, &'static [&'static str])> {
    vec![
        ("", fields::<RawConfig>()),
        ("log", fields::<RawLog>()),
        ("upstreams.NAME", fields::<RawUpstream>()),
        ("limits", fields::<RawLimits>()),
        ("access", fields::<RawAccess>()),
        ("store", fields::<RawStore>()),
        ("store.s3", fields::<RawS3>()),
        ("tls", fields::<RawTls>()),
        ("config_store", fields::<RawConfigStore>()),
        ("peers", fields::<RawPeers>()),
    ]
}

/// docs/CONFIG.md has a row for every key of every table (walking the raw types' fields), and
/// the example config shows every key (set, commented out, or named in a comment as `key = …`).
#[test]
fn the_reference_and_the_example_name_every_key() {
    let tables = tables();
    assert!(fields::<RawConfig>().contains(&"listen"), "fields are read");
    let is_table = |table: &str, key: &str| {
        let path = if table.is_empty() {
            key.to_owned()
        } else {
            format!("{table}.{key}")
        };
        tables
            .iter()
            .any(|(t, _)| *t == path || t.starts_with(&format!("{path}.")))
    };
    let mut missing = Vec::new();
    for (table, keys) in &tables {
        let heading = if table.is_empty() {
            "## Top level".to_owned()
        } else {
            format!("## `[{table}]`")
        };
        let Some(start) = REFERENCE.lines().position(|l| l.starts_with(&heading)) else {
            missing.push(format!("docs/CONFIG.md has no heading {heading:?}"));
            continue;
        };
        let section: Vec<&str> = REFERENCE
            .lines()
            .skip(start + 1)
            .take_while(|l| !l.starts_with("## "))
            .collect();
        for key in keys.iter().filter(|k| !is_table(table, k)) {
            let row = format!("| `{key}` |");
            if !section.iter().any(|l| l.starts_with(&row)) {
                missing.push(format!(
                    "docs/CONFIG.md, {heading}: no row for `{key}` (if it is a table, add it to \
                     tables() in this test)"
                ));
            }
            if !EXAMPLE.contains(&format!("{key} =")) {
                missing.push(format!("config/regcache.toml does not show `{key} = …`"));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}
