//! The operator's view with real parts: headless Chromium (Debian's `chromium`) loads the status
//! page of a running regcache whose upstream (Debian's docker-registry, behind a relay) is
//! black-holed; Debian's `promtool` checks the alert rules of `deploy/prometheus` and runs their
//! unit tests (`tests/prometheus`); a real Prometheus scrapes a fleet of two regcache servers with
//! a shared bucket (moto) that served pulls from a registry announcing a rate limit (Debian's
//! docker-registry behind nginx), and evaluates every alert rule and every expression of the
//! Grafana dashboard over what it scraped.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::support::clients::{command, describe, require, run};
use crate::support::daemon::home_dir;
use crate::support::fleet::Fleet;
use crate::support::media::accept_all;
use crate::support::moto::{Moto, ACCESS_KEY, REGION, SECRET_KEY};
use crate::support::net::Relay;
use crate::support::nginx::Nginx;
use crate::support::process::{free_port, Process};
use crate::support::prometheus::{Job, Prometheus};
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

/// The tokens of `expr` that name a regcache metric (`regcache_…`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("regcache_") {
        let boundary = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        if boundary && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Every `expr` of the dashboard's panels (rows' panels included), and its variables' queries.
fn dashboard_queries(dashboard: &serde_json::Value) -> (Vec<(String, String)>, Vec<String>) {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a target without expr: {t}"));
                out.push((
                    p["title"].as_str().unwrap_or("?").to_owned(),
                    expr.to_owned(),
                ));
            }
            walk(&p["panels"], out);
        }
    }
    let mut exprs = Vec::new();
    walk(&dashboard["panels"], &mut exprs);
    let variables = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or_else(|| panic!("a query variable without its query: {v}"))
                .to_owned()
        })
        .collect();
    (exprs, variables)
}

/// What Grafana puts for the dashboard's variables: every server, and short windows.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
        .replace("$instance", ".*")
}

/// Pulls `image` (`repo:tag`, all four manifest types accepted) through the server at `addr` with
/// plain HTTP requests: its manifest, then its config and layers.
fn pull(addr: SocketAddr, image: &str) {
    let (repo, tag) = image.split_once(':').expect("repo:tag");
    let m = http_get(
        addr,
        &format!("/v2/{repo}/manifests/{tag}"),
        &[("Accept", accept_all())],
    )
    .unwrap_or_else(|| panic!("no answer from {addr}"));
    assert_eq!(m.status, 200, "{image} through {addr}");
    let manifest: serde_json::Value = serde_json::from_slice(&m.body).expect("manifest JSON");
    let blobs = manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(std::iter::once(&manifest["config"]));
    for b in blobs {
        let d = b["digest"].as_str().expect("a descriptor's digest");
        let r = http_get(addr, &format!("/v2/{repo}/blobs/{d}"), &[])
            .unwrap_or_else(|| panic!("no answer from {addr} for {d}"));
        assert_eq!(r.status, 200, "{d} through {addr}");
    }
}

#[test]
fn a_real_prometheus_evaluates_every_alert_and_dashboard_expression_over_a_fleet_with_a_bucket() {
    let dashboard_path = repo().join("deploy/grafana/regcache.json");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&dashboard_path).expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let (panel_exprs, variable_queries) = dashboard_queries(&dashboard);
    assert!(panel_exprs.len() >= 20, "{panel_exprs:?}");

    // Docker Hub's rate-limit headers on every answer of a real registry.
    let registry = Registry::start_seeded();
    let nginx = Nginx::start_in_front_of_with(
        registry.addr(),
        "add_header ratelimit-limit \"100;w=21600\" always;\n\
         add_header ratelimit-remaining \"76;w=21600\" always;\n\
         add_header docker-ratelimit-source \"192.0.2.7\" always;",
    );
    let mut moto = Moto::start();
    moto.create_bucket("regcache-ops");
    let s3 = format!(
        "[store.s3]\nbucket = \"regcache-ops\"\nendpoint = \"{}\"\nregion = \"{REGION}\"\n\
         access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n\
         virtual_hosted_style = false\ntimeout = \"5s\"\n",
        moto.url()
    );
    let fleet = Fleet::start_with(2, &nginx.http_url(), "", &s3);
    fleet.wait_formed();
    for i in 0..2 {
        pull(fleet.addr(i), Seeded::SMALL_OCI);
        pull(fleet.addr(i), Seeded::BUSYBOX);
    }

    let rules = repo().join("deploy/prometheus/regcache-alerts.yml");
    let prom = Prometheus::start(
        &[Job {
            name: "regcache",
            targets: (0..2).map(|i| fleet.addr(i).to_string()).collect(),
        }],
        &[rules],
    );
    let within = Duration::from_secs(30);
    prom.wait_for("count(up{job=\"regcache\"} == 1) == 2", within);
    prom.wait_for("regcache_upstream_ratelimit_remaining", within);
    prom.wait_for("sum(regcache_fills_total{source=\"upstream\"}) > 0", within);
    prom.wait_for("regcache_peer_up", within);
    prom.wait_for("regcache_bucket_up", within);
    // Two scrapes of each after the pulls, so that rate() has points.
    std::thread::sleep(Duration::from_secs(3));

    let scraped = prom.label_values("__name__", None);
    let mut problems = Vec::new();
    // What is wrong with `expr` (of `what`): it does not evaluate, or names a metric that was not
    // scraped.
    let check = |what: &str, expr: &str| -> Vec<String> {
        let mut found = Vec::new();
        let v = prom.query(expr);
        if v["status"] != "success" {
            found.push(format!("{what}: `{expr}` does not evaluate: {v}"));
        }
        for name in metric_names(expr) {
            if !scraped.contains(&name) {
                found.push(format!(
                    "{what}: `{expr}` names {name}, which regcache does not export"
                ));
            }
        }
        found
    };
    for (title, expr) in &panel_exprs {
        problems.extend(check(&format!("panel {title:?}"), &substitute(expr)));
    }
    for q in &variable_queries {
        // Grafana's `label_values(metric, label)`: the label's values among the metric's series.
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("a variable query that is not label_values: {q}"));
        let (metric, label) = inner.split_once(',').expect("label_values(metric, label)");
        problems.extend(check(&format!("variable {q}"), metric.trim()));
        let values = prom.label_values(label.trim(), Some(metric.trim()));
        assert_eq!(values.len(), 2, "{q}: one value per server: {values:?}");
    }

    // The rules as Prometheus loaded and evaluated them.
    let t = std::time::Instant::now();
    let groups = loop {
        let v = prom.api("/api/v1/rules", &[]);
        let groups = v["data"]["groups"].as_array().cloned().unwrap_or_default();
        let evaluated = groups.iter().all(|g| {
            g["rules"].as_array().into_iter().flatten().all(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001-"))
            })
        });
        if !groups.is_empty() && evaluated {
            break groups;
        }
        assert!(
            t.elapsed() < within,
            "the rules were not evaluated: {v}\n{}",
            prom.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let rules: Vec<&serde_json::Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(
        rules.len(),
        9,
        "every alert of the file was loaded: {groups:?}"
    );
    for r in &rules {
        let name = r["name"].as_str().unwrap_or("?");
        if r["health"] != "ok" {
            problems.push(format!(
                "alert {name}: evaluated with {}: {}",
                r["health"], r["lastError"]
            ));
        }
        problems.extend(check(
            &format!("alert {name}"),
            r["query"].as_str().unwrap_or(""),
        ));
    }
    assert!(
        problems.is_empty(),
        "{}\n(scraped: {scraped:?})",
        problems.join("\n")
    );

    // And the facts they show are true of this fleet: every server and peer up, the bucket up,
    // nothing failed, the quota as the upstream announced it, nothing firing.
    let value = |expr: &str| -> f64 {
        let v = prom.query(expr);
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("`{expr}`: {v}"))
    };
    assert_eq!(value("min(regcache_upstream_up)"), 1.0);
    assert_eq!(value("min(regcache_peer_up)"), 1.0);
    assert_eq!(value("min(regcache_bucket_up)"), 1.0);
    assert_eq!(value("sum(regcache_fills_failed_total)"), 0.0);
    assert_eq!(value("max(regcache_upstream_ratelimit_remaining)"), 76.0);
    assert_eq!(value("max(regcache_upstream_ratelimit_limit)"), 100.0);
    let firing = prom.api("/api/v1/alerts", &[]);
    assert_eq!(
        firing["data"]["alerts"].as_array().map(Vec::len),
        Some(0),
        "a healthy fleet fires no alert: {firing}"
    );
}
