//! The operator's view with real parts: headless Chromium (Debian's `chromium`) loads the status
//! page of a running regcache whose upstream (Debian's docker-registry, behind a relay) is
//! black-holed; Debian's `promtool` checks the alert rules of `deploy/prometheus` and runs their
//! unit tests (`tests/prometheus`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::support::clients::{command, describe, require, run};
use crate::support::daemon::home_dir;
use crate::support::media::accept_all;
use crate::support::net::Relay;
use crate::support::process::{free_port, Process};
use crate::support::registry::{http_get, Registry, Seeded};

/// `chromium --headless --dump-dom URL`: the DOM Chromium built from the page, serialized. It
/// contacts nothing but `url` (no background networking, component updates or sync; no proxy),
/// with a fresh profile and `HOME` of its own.
fn chromium_dom(url: &str, home: &Path) -> String {
    let chromium = require("chromium", "chromium");
    let mut cmd = command(&chromium);
    cmd.env("HOME", home)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-proxy-server",
            "--no-first-run",
        ])
        .arg(format!(
            "--user-data-dir={}",
            home.join("profile").display()
        ))
        .args(["--dump-dom", url]);
    let out = run(cmd, Duration::from_secs(90));
    assert!(
        out.status.success(),
        "{}",
        describe("chromium --dump-dom", &out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of each cell of each row of the table `id` in `dom` (tags dropped, entities of the
/// page's escaping decoded).
fn table_rows(dom: &str, id: &str) -> Vec<Vec<String>> {
    let start = dom
        .find(&format!("<table id=\"{id}\""))
        .unwrap_or_else(|| panic!("no table {id} in the DOM:\n{dom}"));
    let table = &dom[start..];
    let table = &table[..table.find("</table>").unwrap_or(table.len())];
    table
        .split("<tr>")
        .skip(1)
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|cell| {
                    let cell = &cell[cell.find('>').map_or(0, |i| i + 1)..];
                    let cell = &cell[..cell.find("</td>").unwrap_or(cell.len())];
                    text(cell)
                })
                .collect()
        })
        .collect()
}

/// `html` without its tags, entities decoded.
fn text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

#[test]
fn chromium_shows_a_black_holed_upstream_as_down_on_the_status_page() {
    let registry = Registry::start_seeded();
    let relay = Relay::start(registry.addr());
    let home = home_dir("regcache-status-page-");
    let config = home.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[upstreams.docker]\nurl = \"http://{}\"\nfreshness = \"1ms\"\n\
             failure_threshold = 1\nconnect_timeout = \"1s\"\n",
            home.path().join("data").display(),
            relay.addr()
        ),
    )
    .expect("write config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let rc = Process::start(&config, addr, &home.path().join("regcache.log"));
    let (repo, tag) = Seeded::SMALL_OCI
        .split_once(':')
        .expect("seeded image name");
    let pull = || {
        http_get(
            addr,
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Accept", accept_all())],
        )
        .expect("GET manifest")
    };
    let fresh = pull();
    assert_eq!(fresh.status, 200, "{}", rc.log_text());
    assert_eq!(fresh.header("warning"), None);

    relay.set_black_hole(true);
    let stale = pull();
    assert_eq!(stale.status, 200, "{}", rc.log_text());
    assert!(
        stale.header("warning").is_some(),
        "served stale once the upstream is black-holed"
    );

    // The revalidation goes on in the background past `revalidate_budget`: its failure marks the
    // upstream down.
    let t = std::time::Instant::now();
    while !http_get(addr, "/_regcache/status", &[])
        .is_some_and(|r| String::from_utf8_lossy(&r.body).contains("\"state\":\"down\""))
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the upstream was never marked down:\n{}",
            rc.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let dom = chromium_dom(&format!("http://{addr}/"), home.path());
    let upstreams = table_rows(&dom, "upstreams");
    let docker = upstreams
        .iter()
        .find(|cells| cells.first().is_some_and(|c| c == "docker"))
        .unwrap_or_else(|| panic!("no row for the upstream docker in the DOM:\n{dom}"));
    assert_eq!(
        docker.get(2).map(String::as_str),
        Some("down"),
        "the state cell of the upstream: {docker:?}\n{dom}"
    );
    assert!(
        docker
            .get(5)
            .is_some_and(|c| c.contains(&format!("{repo}:{tag}: 1, last "))),
        "the tag served stale: {docker:?}\n{dom}"
    );
    let at = dom
        .find("id=\"health\"")
        .unwrap_or_else(|| panic!("no health block in the DOM:\n{dom}"));
    let rest = &dom[at..];
    let health = text(&rest[..rest.find("</div>").unwrap_or(rest.len())]);
    assert!(
        health.contains("upstream docker is down"),
        "{health}\n{dom}"
    );
    // Chromium built this DOM (it adds the tbody the page leaves out): the page was parsed.
    assert!(dom.contains("<tbody>"), "{dom}");
}

/// The repository's root (where `deploy/` and `tests/` are).
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn promtool_checks_the_alert_rules_and_their_unit_tests_pass() {
    let promtool = require("promtool", "prometheus");
    let rules = repo().join("deploy/prometheus/regcache-alerts.yml");
    let mut check = command(&promtool);
    check.arg("check").arg("rules").arg(&rules);
    let out = run(check, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        describe("promtool check rules", &out)
    );
    let found = String::from_utf8_lossy(&out.stdout);
    assert!(
        found.contains("SUCCESS: 9 rules found"),
        "the nine alerts of docs/OPERATIONS.md: {found}"
    );
    // Run from its directory: the test file names the rules relative to itself.
    let mut test = command(&promtool);
    test.current_dir(repo().join("tests/prometheus")).args([
        "test",
        "rules",
        "regcache-alerts.test.yml",
    ]);
    let out = run(test, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        describe("promtool test rules", &out)
    );
}
