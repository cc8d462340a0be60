//! The status page: `GET /` from a browser (`Accept: text/html`), one small HTML page rendered on
//! the server from the same [`Status`] as `GET /_regcache/status`. No script, no external asset
//! (the style is inline, and the `Content-Security-Policy` allows nothing else), every value
//! HTML-escaped, never cached; under the access rules of the API.

use std::fmt::Write as _;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use indicatif::HumanBytes;

use crate::app::App;
use crate::http::error::ApiError;
use crate::http::response::{plain, Body};
use crate::http::status::{
    duration_text, no_store, quota_text, status, time_text, State, Status, PATH,
};

/// Whether a request for `/` is a browser's: an `Accept` line names `text/html`.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT).iter().any(|line| {
        line.to_str().is_ok_and(|l| {
            l.split(',').any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/html"))
            })
        })
    })
}

/// The answer to `GET`/`HEAD /` from a browser.
pub fn answer(app: &App, method: &Method) -> Result<Response<Body>, ApiError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(ApiError::unsupported(&format!("{method}")));
    }
    let mut resp = plain(
        StatusCode::OK,
        render(&status(app)),
        "text/html; charset=utf-8",
        method == Method::HEAD,
    );
    no_store(&mut resp);
    let h = resp.headers_mut();
    // Belt and braces for the escaping: nothing but the inline style may load or run.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; form-action 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}

/// `s` with the characters that mean something in HTML text or attribute values escaped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin-bottom:1em}\
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}\
.up,.ok{color:#176b2c;font-weight:bold}.down,.bad{color:#b00020;font-weight:bold}\
ul{margin:0;padding-left:1.2em}";

/// A state as a table cell: the word itself (`up`, `down`), coloured by its class.
fn state_cell(state: State) -> String {
    format!("<td class=\"{0}\">{0}</td>", state.as_str())
}

/// The page for `s`.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>regcache status</title><style>{STYLE}</style></head><body>\n\
         <h1>regcache {}</h1>\n<p>Up {} (since {}).</p>\n",
        escape(&s.version),
        escape(&duration_text(s.uptime_seconds)),
        escape(&time_text(s.started_at))
    );
    let problems = s.problems();
    if problems.is_empty() {
        o.push_str("<p id=\"health\" class=\"ok\">Healthy.</p>\n");
    } else {
        o.push_str("<div id=\"health\" class=\"bad\"><p>Not healthy:</p><ul>");
        for p in &problems {
            let _ = write!(o, "<li>{}</li>", escape(p));
        }
        o.push_str("</ul></div>\n");
    }

    o.push_str(
        "<h2>Upstreams</h2>\n<table id=\"upstreams\"><tr><th>upstream</th><th>URL</th>\
         <th>state</th><th>since</th><th>rate limit</th><th>served stale in the last hour</th></tr>\n",
    );
    for u in &s.upstreams {
        let since = match (u.down_since, u.down_for_seconds) {
            (Some(at), Some(secs)) => format!("{} ({})", time_text(at), duration_text(secs)),
            _ => String::new(),
        };
        let quota = u.ratelimit.as_ref().map(quota_text).unwrap_or_default();
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td>{}<td>{}</td><td>{}</td><td>",
            escape(&u.name),
            escape(&u.url),
            state_cell(u.state),
            escape(&since),
            escape(&quota)
        );
        let stale = &u.stale_last_hour;
        if stale.answers > 0 {
            let _ = write!(
                o,
                "{} answers{}<ul>",
                stale.answers,
                if stale.complete { "" } else { " (the latest)" }
            );
            for t in &stale.tags {
                let _ = write!(
                    o,
                    "<li>{}: {}, last {} ago</li>",
                    escape(&t.tag),
                    t.answers,
                    escape(&duration_text(t.last_served_seconds_ago))
                );
            }
            o.push_str("</ul>");
        }
        o.push_str("</td></tr>\n");
    }
    o.push_str("</table>\n");

    let st = &s.store;
    let _ = write!(
        o,
        "<h2>Store</h2>\n<table id=\"store\"><tr><th>ready</th><th>used</th><th>limit</th>\
         <th>free</th><th>full</th></tr>\n<tr><td class=\"{}\">{}</td><td>{}</td><td>{}</td>\
         <td>{}</td><td class=\"{}\">{}</td></tr>\n</table>\n",
        if st.ready { "ok" } else { "bad" },
        escape(
            st.error
                .as_deref()
                .unwrap_or(if st.ready { "yes" } else { "no" })
        ),
        HumanBytes(st.used_bytes),
        st.max_size
            .map_or_else(|| "none".to_owned(), |m| HumanBytes(m).to_string()),
        st.free_bytes
            .map_or_else(|| "unknown".to_owned(), |f| HumanBytes(f).to_string()),
        if st.full { "bad" } else { "ok" },
        if st.full { "full" } else { "no" }
    );

    if let Some(b) = &s.bucket {
        let _ = write!(
            o,
            "<h2>Bucket</h2>\n<table id=\"bucket\"><tr><th>state</th><th>writes pending</th></tr>\n\
             <tr>{}<td>{}</td></tr>\n</table>\n",
            state_cell(b.state),
            b.pending_writes
        );
    }

    if !s.peers.is_empty() {
        o.push_str(
            "<h2>Peers</h2>\n<table id=\"peers\"><tr><th>peer</th><th>state</th><th>down for</th></tr>\n",
        );
        for p in &s.peers {
            let _ = writeln!(
                o,
                "<tr><td>{}{}</td>{}<td>{}</td></tr>",
                escape(&p.url),
                if p.is_self { " (this server)" } else { "" },
                state_cell(p.state),
                escape(&p.down_for_seconds.map(duration_text).unwrap_or_default())
            );
        }
        o.push_str("</table>\n");
    }

    let t = &s.traffic;
    let ratio = t
        .hit_ratio
        .map_or_else(|| "-".to_owned(), |r| format!("{:.1} %", r * 100.0));
    let _ = write!(
        o,
        "<h2>Traffic since start</h2>\n<table id=\"traffic\"><tr><th>hit ratio</th><th>answers</th>\
         <th>served</th><th>fetched from upstreams</th><th>saved</th></tr>\n<tr><td>{}</td>\
         <td>{} ({} from the cache)</td><td>{}</td><td>{}</td><td>{}</td></tr>\n</table>\n\
         <p>The same as JSON: <a href=\"{PATH}\">{PATH}</a>. This page does not refresh itself.</p>\n\
         </body></html>\n",
        escape(&ratio),
        t.answers,
        t.hits,
        HumanBytes(t.served_bytes),
        HumanBytes(t.fetched_bytes),
        HumanBytes(t.saved_bytes)
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::status::{BucketState, PeerState, StoreState, Traffic, UpstreamState};
    use crate::telemetry::stale::{StaleSummary, StaleTag};

    fn status_with(name: &str, url: &str, tag: &str, error: Option<&str>) -> Status {
        Status {
            version: "1.2.3".into(),
            started_at: 0,
            uptime_seconds: 90,
            healthy: false,
            upstreams: vec![UpstreamState {
                name: name.into(),
                url: url.into(),
                state: State::Down,
                down_since: Some(60),
                down_for_seconds: Some(30),
                ratelimit: Some(serde_json::json!({"remaining": 3, "limit": 100})),
                stale_last_hour: StaleSummary {
                    answers: 2,
                    complete: true,
                    tags: vec![StaleTag {
                        tag: tag.into(),
                        answers: 2,
                        last_served_at: 80,
                        last_served_seconds_ago: 10,
                    }],
                },
            }],
            store: StoreState {
                ready: error.is_none(),
                error: error.map(str::to_owned),
                used_bytes: 1024,
                free_bytes: None,
                full: true,
                max_size: None,
            },
            bucket: Some(BucketState {
                state: State::Up,
                pending_writes: 4,
            }),
            peers: vec![PeerState {
                url: "http://10.0.0.2:5000".into(),
                state: State::Down,
                is_self: false,
                down_for_seconds: Some(5),
            }],
            traffic: Traffic {
                outcomes: Default::default(),
                answers: 0,
                hits: 0,
                hit_ratio: None,
                served_bytes: 0,
                fetched_bytes: 0,
                fetched_bytes_by_upstream: Default::default(),
                saved_bytes: 0,
            },
        }
    }

    #[test]
    fn every_value_from_outside_is_escaped() {
        let evil = "<script>alert('x')</script>&\"";
        let page = render(&status_with(evil, evil, evil, Some(evil)));
        assert!(!page.contains("<script"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"),
            "{page}"
        );
    }

    #[test]
    fn the_page_shows_the_words_down_and_full_and_the_problems() {
        let page = render(&status_with(
            "docker",
            "https://registry-1.docker.io/",
            "library/alpine:3.20",
            None,
        ));
        for want in [
            "<td>docker</td><td>https://registry-1.docker.io/</td><td class=\"down\">down</td>",
            "<li>upstream docker is down</li>",
            "<li>peer http://10.0.0.2:5000 is down</li>",
            "3 of 100 left",
            "<li>library/alpine:3.20: 2, last 10s ago</li>",
            "<td class=\"bad\">full</td>",
            "<td class=\"up\">up</td><td>4</td>",
        ] {
            assert!(page.contains(want), "no {want:?} in\n{page}");
        }
    }

    #[test]
    fn only_an_accept_naming_text_html_gets_the_page() {
        let with = |lines: &[&str]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append(header::ACCEPT, HeaderValue::from_str(l).expect("header"));
            }
            wants_html(&h)
        };
        assert!(with(&[
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        ]));
        assert!(with(&["application/json", "Text/HTML; q=0.5"]));
        assert!(!with(&[]));
        assert!(!with(&["*/*"]));
        assert!(!with(&["application/json, text/htmlx"]));
    }
}
