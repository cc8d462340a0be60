//! How a command finds and calls a running regcache: the URL the configuration gives it, the store
//! commands' choice between the data directory and the server holding it ([`target`]), the HTTP
//! client of `prefetch` and `status` ([`client_builder`]), and the client of the loopback-only
//! operator endpoints ([`call`]).

use std::sync::Arc;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};

use crate::app::App;
use crate::cmd::args::ClientArgs;
use crate::cmd::Exit;
use crate::config::Config;

/// Where a store command (`gc`, `verify`, `pin`) runs.
pub enum Target {
    /// On the data directory, whose lock this process now holds.
    Offline(Arc<App>),
    /// Through the operator endpoints of the server at this URL.
    Server(String),
}

/// With `--server`, that server; else the data directory (its `App` on `runtime`, the command's),
/// or, when another regcache holds its lock, that regcache at the configured address.
pub fn target(
    config: &Config,
    server: &ClientArgs,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<Target> {
    if let Some(url) = server.given() {
        return Ok(Target::Server(url));
    }
    match App::open(config.clone(), runtime.clone()) {
        Ok(app) => Ok(Target::Offline(app)),
        Err(e) if e.is_in_use() => Ok(Target::Server(configured_url(config))),
        Err(e) => Err(e.into()),
    }
}

/// The URL of the server this configuration describes: its listen address, `https` with `[tls]`.
pub fn configured_url(config: &Config) -> String {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{}", config.listen)
}

/// Whether `url` names this machine (`localhost` or a loopback address), where no proxy stands
/// in between.
pub fn is_loopback(url: &str) -> bool {
    reqwest::Url::parse(url).ok().is_some_and(|u| {
        let host = u.host_str().unwrap_or("");
        host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

/// A client of the server at `server`, like any registry client: direct on loopback, else
/// through the environment's proxy; with `auth` (`USER:PASSWORD`, for a server with
/// `access.htpasswd`), Basic credentials on every request. A malformed `auth` is a usage error.
pub fn client_builder(
    server: &str,
    auth: Option<&str>,
) -> Result<reqwest::ClientBuilder, (Exit, String)> {
    let mut builder = reqwest::Client::builder();
    if is_loopback(server) {
        builder = builder.no_proxy();
    }
    let Some(auth) = auth else {
        return Ok(builder);
    };
    let Some((user, pass)) = auth.split_once(':') else {
        return Err((Exit::Usage, "--auth must be USER:PASSWORD".into()));
    };
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let Ok(mut value) = reqwest::header::HeaderValue::from_str(&format!("Basic {token}")) else {
        return Err((
            Exit::Usage,
            "--auth holds characters that cannot be sent".into(),
        ));
    };
    value.set_sensitive(true);
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, value);
    Ok(builder.default_headers(headers))
}

/// Calls an operator endpoint and returns its JSON answer; an error answer becomes an error
/// naming the server and its status.
pub async fn call(method: reqwest::Method, url: String) -> anyhow::Result<serde_json::Value> {
    // The operator endpoints answer loopback clients only; a loopback server's certificate is
    // typically self-signed, and there is no one in between to trust or distrust.
    let client = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(is_loopback(&url))
        .build()?;
    let resp = client
        .request(method, &url)
        .header(crate::http::OPERATOR_HEADER, "1")
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the running regcache at {url}: {e}"))?;
    let status = resp.status();
    let body = resp.bytes().await?;
    if !status.is_success() {
        anyhow::bail!(
            "{} (the server at {url} answered {status})",
            error_message(&body)
        );
    }
    Ok(serde_json::from_slice(&body)?)
}

/// The code and message of an OCI error body (`{"errors":[…]}`), else the start of the body.
pub fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let e = &v["errors"][0];
            Some(format!(
                "{} {}",
                e["code"].as_str()?,
                e["message"].as_str().unwrap_or("")
            ))
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect())
}

/// What [`query_value`] leaves as it is: the unreserved characters of RFC 3986, and `/`, which
/// image names are full of and a query may hold.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// Percent-encodes a query value (an image name for `?image=`).
pub fn query_value(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, QUERY_VALUE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_keep_names_readable_and_encode_the_rest() {
        assert_eq!(
            query_value("ghcr.io/org/app_x:1.2-rc~1"),
            "ghcr.io/org/app_x%3A1.2-rc~1"
        );
        assert_eq!(
            query_value("alpine@sha256:ab&x=1 +é"),
            "alpine%40sha256%3Aab%26x%3D1%20%2B%C3%A9",
            "separators, blanks, plus and UTF-8 bytes are encoded (upper-case hex)"
        );
    }

    #[test]
    fn loopback_urls_are_recognised_in_every_spelling() {
        for url in [
            "http://localhost:5000",
            "http://127.0.0.1:5000",
            "https://127.1.2.3",
            "http://[::1]:5000",
        ] {
            assert!(is_loopback(url), "{url} is loopback");
        }
        for url in ["http://10.0.0.1:5000", "http://example.com", "not a url"] {
            assert!(!is_loopback(url), "{url} is not loopback");
        }
    }

    #[test]
    fn store_commands_go_to_the_server_holding_the_data_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config::defaults(&crate::config::Overrides {
            data_dir: Some(dir.path().to_owned()),
            listen: Some(([127, 0, 0, 1], 5099).into()),
            ..Default::default()
        })
        .expect("config");
        let none = ClientArgs { server: None };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let first = match target(&config, &none, rt.handle()) {
            Ok(Target::Offline(app)) => app,
            Ok(Target::Server(url)) => panic!("a free data directory is used offline, not {url}"),
            Err(e) => panic!("a free data directory opens: {e:#}"),
        };
        match target(&config, &none, rt.handle()) {
            Ok(Target::Server(url)) => assert_eq!(url, "http://127.0.0.1:5099"),
            Ok(Target::Offline(_)) => panic!("a held data directory was opened a second time"),
            Err(e) => panic!("a held data directory means asking its server, not: {e:#}"),
        }
        drop(first);
        let given = ClientArgs {
            server: Some("http://127.0.0.1:6000/".into()),
        };
        match target(&config, &given, rt.handle()) {
            Ok(Target::Server(url)) => assert_eq!(url, "http://127.0.0.1:6000"),
            _ => panic!("--server is used as given, without opening the store"),
        }
    }

    #[test]
    fn error_messages_come_from_oci_bodies_or_the_start_of_the_body() {
        let oci = br#"{"errors":[{"code":"DENIED","message":"loopback only"}]}"#;
        assert_eq!(error_message(oci), "DENIED loopback only");
        assert_eq!(error_message(b"plain text"), "plain text");
    }
}
