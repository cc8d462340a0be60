//! The configuration's sources: the local file, an optional remote overlay in etcd or consul
//! (read one bounded answer at a time by [`StoreClient`]), and the last good remote copy kept in
//! the data directory.
//!
//! The local file alone is always enough to start: at start regcache never waits for the config
//! store, it uses the last good copy (if any) and applies the store's current value as soon as the
//! background watcher (`app::watch`) reads it. An overlay that fails validation is logged and
//! ignored, never half-applied.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;

use crate::config::{Config, ConfigError, ConfigStoreConfig, ConfigStoreKind, Overrides};

/// Name of the last good remote copy inside the data directory.
pub const LAST_GOOD_FILE: &str = "config-store.last-good.toml";
/// The temporary file the last good copy is written to before it is renamed into place.
pub const LAST_GOOD_TEMP: &str = ".config-store.last-good.toml.tmp";

/// Largest value (the overlay's TOML text) accepted from the config store: far more than any
/// configuration needs, and below etcd's default request limit (`--max-request-bytes`, 1.5 MiB).
/// A larger value is refused whole, like an invalid one.
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// Largest answer read from the store: a value of [`MAX_VALUE_BYTES`] base64-encoded (4/3) in
/// the store's JSON envelope. Reading stops there, whatever the store sends.
const MAX_ANSWER_BYTES: usize = MAX_VALUE_BYTES / 3 * 4 + (64 << 10);

/// The store's answer or value is larger than regcache accepts.
#[derive(Debug, thiserror::Error)]
#[error(
    "the value is too large: regcache accepts at most {MAX_VALUE_BYTES} bytes of TOML \
     ({MAX_ANSWER_BYTES} bytes of answer)"
)]
pub struct TooLarge;

/// Why a read of the config store gave no value.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The answer or the value is over the bound; refused whole.
    #[error(transparent)]
    TooLarge(TooLarge),
    /// The store could not be asked, or answered something else than a value.
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
}

/// Where the configuration comes from, and the remote text currently applied.
pub struct ConfigSource {
    local_path: Option<PathBuf>,
    overrides: Overrides,
    /// The local file as last read (at start and on SIGHUP): a remote change never applies a
    /// local edit that was not asked for.
    local: Mutex<Option<(String, String)>>,
    /// The remote text in force (None: no overlay).
    remote: Mutex<Option<String>>,
}

fn read_local(path: Option<&Path>) -> Result<(String, String), ConfigError> {
    match path {
        None => Ok((String::new(), "(defaults)".into())),
        Some(p) => std::fs::read_to_string(p)
            .map(|t| (t, p.display().to_string()))
            .map_err(|source| ConfigError::Read {
                path: p.to_owned(),
                source,
            }),
    }
}

/// How the config store's value is named in errors and logs: `etcd key "/regcache"`.
pub fn remote_origin(cs: &ConfigStoreConfig) -> String {
    let kind = match cs.kind {
        ConfigStoreKind::Etcd => "etcd",
        ConfigStoreKind::Consul => "consul",
    };
    format!("{kind} key {:?}", cs.key)
}

impl ConfigSource {
    pub fn new(local_path: Option<PathBuf>, overrides: Overrides) -> ConfigSource {
        ConfigSource {
            local_path,
            overrides,
            local: Mutex::new(None),
            remote: Mutex::new(None),
        }
    }

    /// The remote text in force.
    pub fn remote(&self) -> Option<String> {
        self.remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records `text` as the remote text in force.
    pub fn set_remote(&self, text: Option<String>) {
        *self.remote.lock().unwrap_or_else(|p| p.into_inner()) = text;
    }

    /// The local text: the copy last read, or the file now when `reread` (or never read).
    fn local_text(&self, reread: bool) -> Result<(String, String), ConfigError> {
        let mut cached = self.local.lock().unwrap_or_else(|p| p.into_inner());
        match cached.as_ref() {
            Some(c) if !reread => Ok(c.clone()),
            _ => {
                let fresh = read_local(self.local_path.as_deref())?;
                *cached = Some(fresh.clone());
                Ok(fresh)
            }
        }
    }

    /// The local file (as last read) with `remote` overlaid (if any), validated.
    pub fn build(&self, remote: Option<&str>) -> Result<Config, ConfigError> {
        self.build_from(remote, false)
    }

    fn build_from(&self, remote: Option<&str>, reread: bool) -> Result<Config, ConfigError> {
        let (local, origin) = self.local_text(reread)?;
        let plain = Config::parse(&local, &origin, &self.overrides)?;
        // Only a password written in the local file makes its mode matter.
        let local_password = plain.inline_password;
        let mut config = match (remote, &plain.config_store) {
            (Some(r), Some(cs)) => {
                Config::parse_layered(&local, &origin, r, &remote_origin(cs), &self.overrides)?
            }
            _ => plain,
        };
        if let (Some(path), true) = (&self.local_path, local_password) {
            config.check_file_mode(path);
        }
        Ok(config)
    }

    /// Where the last good remote copy is kept: in the `data_dir` of the local file as last read
    /// (with the flags), never in one an overlay sets, so that the start that reads the copy and
    /// the watcher that writes it agree on the place.
    fn last_good_path(&self) -> Result<PathBuf, ConfigError> {
        Ok(self.build(None)?.data_dir.join(LAST_GOOD_FILE))
    }

    /// Keeps `text` as the last good remote copy (atomically), or removes the copy when the
    /// overlay is gone (`None`).
    pub fn keep_last_good(&self, text: Option<&str>) -> anyhow::Result<()> {
        let path = self.last_good_path()?;
        let saved = match text {
            Some(t) => write_atomic(&path, t),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        saved.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The configuration to start with: the local file, overlaid with the last good remote copy
    /// when a config store is configured and a valid copy exists. Never contacts the store.
    pub fn initial(&self) -> Result<Config, ConfigError> {
        let local_only = self.build(None)?;
        if local_only.config_store.is_none() {
            return Ok(local_only);
        }
        let path = self.last_good_path()?;
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(local_only);
        };
        match self.build(Some(&text)) {
            Ok(c) => {
                self.set_remote(Some(text));
                Ok(c)
            }
            Err(e) => {
                eprintln!(
                    "regcache: ignoring the last good remote config {}: {e}",
                    path.display()
                );
                Ok(local_only)
            }
        }
    }

    /// Re-reads the local file (SIGHUP) and overlays the remote text in force. An invalid file
    /// leaves the copy in force untouched.
    pub fn rebuild(&self) -> Result<Config, ConfigError> {
        let previous = self.local.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let result = self.build_from(self.remote().as_deref(), true);
        if result.is_err() {
            *self.local.lock().unwrap_or_else(|p| p.into_inner()) = previous;
        }
        result
    }
}

/// Writes `text` to `path` atomically (temp file, fsync, rename, fsync directory).
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(LAST_GOOD_TEMP);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// A value read from the store: the text (None when the key is absent) and its version.
type Answer = (Option<String>, u64);

/// The answer's body, refused ([`TooLarge`]) beyond [`MAX_ANSWER_BYTES`] without reading on.
async fn read_answer(mut resp: reqwest::Response) -> anyhow::Result<Vec<u8>> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(TooLarge.into());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(TooLarge.into());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The value's text from its base64 form, refused ([`TooLarge`]) beyond [`MAX_VALUE_BYTES`].
fn decode_value(value: &str) -> anyhow::Result<String> {
    let raw = base64::engine::general_purpose::STANDARD.decode(value)?;
    if raw.len() > MAX_VALUE_BYTES {
        return Err(TooLarge.into());
    }
    Ok(String::from_utf8(raw)?)
}

/// Reads the key from etcd through the v3 JSON gateway.
async fn read_etcd(client: &reqwest::Client, cs: &ConfigStoreConfig) -> anyhow::Result<Answer> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let url = format!("{}/v3/kv/range", cs.url.as_str().trim_end_matches('/'));
    let body = serde_json::json!({ "key": b64.encode(cs.key.as_bytes()) }).to_string();
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .timeout(cs.timeout)
        .send()
        .await?;
    if !resp.status().is_success() {
        anyhow::bail!("etcd answered {}", resp.status());
    }
    let v: serde_json::Value = serde_json::from_slice(&read_answer(resp).await?)?;
    let Some(kv) = v.get("kvs").and_then(|k| k.get(0)) else {
        return Ok((None, 0));
    };
    let value = kv.get("value").and_then(|x| x.as_str()).unwrap_or("");
    let text = decode_value(value)?;
    let rev = kv
        .get("mod_revision")
        .and_then(|r| {
            r.as_str()
                .and_then(|s| s.parse().ok())
                .or_else(|| r.as_u64())
        })
        .unwrap_or(0);
    Ok((Some(text), rev))
}

/// Reads the key from consul KV; a blocking query when `index` is known.
async fn read_consul(
    client: &reqwest::Client,
    cs: &ConfigStoreConfig,
    index: u64,
) -> anyhow::Result<Answer> {
    let mut url = format!(
        "{}/v1/kv/{}",
        cs.url.as_str().trim_end_matches('/'),
        cs.key.trim_start_matches('/')
    );
    if index > 0 {
        url = format!(
            "{url}?index={index}&wait={}ms",
            cs.poll_interval.as_millis()
        );
    }
    let resp = client
        .get(url)
        .timeout(cs.poll_interval + cs.poll_interval / 16 + cs.timeout)
        .send()
        .await?;
    let new_index = resp
        .headers()
        .get("x-consul-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok((None, new_index));
    }
    if !resp.status().is_success() {
        anyhow::bail!("consul answered {}", resp.status());
    }
    let v: serde_json::Value = serde_json::from_slice(&read_answer(resp).await?)?;
    let value = v
        .get(0)
        .and_then(|e| e.get("Value"))
        .and_then(|x| x.as_str())
        .unwrap_or("");
    let text = decode_value(value)?;
    Ok((Some(text), new_index))
}

/// A client of the config store: each [`read`](StoreClient::read) is one bounded request (for
/// consul, once an index is known, a blocking query that waits up to `poll_interval` for a
/// change).
pub struct StoreClient {
    client: reqwest::Client,
    cs: ConfigStoreConfig,
    /// consul's `X-Consul-Index` of the last answer (0: none yet, or reset).
    index: u64,
}

impl StoreClient {
    pub fn new(cs: ConfigStoreConfig) -> reqwest::Result<StoreClient> {
        let client = reqwest::Client::builder()
            .connect_timeout(cs.timeout)
            .build()?;
        Ok(StoreClient {
            client,
            cs,
            index: 0,
        })
    }

    /// The store's value now: the TOML text, or `None` when the key is absent.
    pub async fn read(&mut self) -> Result<Option<String>, FetchError> {
        let read = match self.cs.kind {
            ConfigStoreKind::Etcd => read_etcd(&self.client, &self.cs).await,
            ConfigStoreKind::Consul => read_consul(&self.client, &self.cs, self.index).await,
        };
        match read {
            Ok((text, index)) => {
                // consul: an index that goes backwards means a reset.
                self.index = if index < self.index { 0 } else { index };
                Ok(text)
            }
            Err(e) => {
                self.index = 0;
                Err(match e.downcast::<TooLarge>() {
                    Ok(t) => FetchError::TooLarge(t),
                    Err(e) => FetchError::Unreachable(e),
                })
            }
        }
    }

    /// Whether the next read waits by itself (a consul blocking query), so that the caller
    /// should not pause before it.
    pub fn blocks(&self) -> bool {
        self.cs.kind == ConfigStoreKind::Consul && self.index != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A store that answers every request with a chunked body of `total` bytes of JSON-ish
    /// filler (ending with the bytes sent so far, once it stops); returns its URL and the count.
    async fn endless_store(total: usize) -> (reqwest::Url, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = reqwest::Url::parse(&format!("http://{}", listener.local_addr().expect("addr")))
            .expect("url");
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&sent);
        tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut head = [0u8; 4096];
            let _ = s.read(&mut head).await;
            let chunk = vec![b' '; 64 << 10];
            let frame = [
                format!("{:x}\r\n", chunk.len()).into_bytes(),
                chunk,
                b"\r\n".to_vec(),
            ]
            .concat();
            let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                            transfer-encoding: chunked\r\n\r\n"
                .to_vec();
            while counter.load(std::sync::atomic::Ordering::Relaxed) < total {
                out.extend_from_slice(&frame);
                if s.write_all(&out).await.is_err() {
                    return; // the client stopped reading and closed
                }
                counter.fetch_add(out.len(), std::sync::atomic::Ordering::Relaxed);
                out.clear();
            }
            let _ = s.write_all(b"1\r\n{\r\n0\r\n\r\n").await;
        });
        (url, sent)
    }

    #[tokio::test]
    async fn an_endless_answer_is_cut_at_the_bound_and_refused_as_too_large() {
        let total = 256 << 20;
        let (url, sent) = endless_store(total).await;
        let cs = ConfigStoreConfig {
            kind: ConfigStoreKind::Etcd,
            url,
            key: "k".into(),
            poll_interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(30),
        };
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let err = read_etcd(&client, &cs).await.expect_err("must be refused");
        assert!(err.is::<TooLarge>(), "refused as too large, got: {err:#}");
        // The server writes until the kernel's buffers are full once the client stops reading.
        let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            sent < 64 << 20,
            "reading stops near the bound ({MAX_ANSWER_BYTES} bytes), the store sent {sent}"
        );
    }
}
