//! A bad config file refused by `check-config` and `serve`, naming the line, with exit code 2.

#[test]
fn check_config_reports_the_line_of_a_bad_key_and_exits_2() {
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("dir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"127.0.0.1:5000\"\n\n[upstreams.hub]\nurl = \"ftp://nowhere\"\n",
    )
    .expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["check-config"])
        .arg(&bad)
        .output()
        .expect("run regcache");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(
        err.contains("line 4") && err.contains("http or https"),
        "stderr: {err}"
    );

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[upstreams.hub]\nurl = \"http://127.0.0.1:1\"\nfreshness = \"5m\"\n",
    )
    .expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["check-config"])
        .arg(&good)
        .output()
        .expect("run regcache");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("freshness=300s"));
}

#[test]
fn serve_refuses_a_config_with_an_unknown_key() {
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("dir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:0\"\nlisten_port = 5\n").expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["serve", "--config"])
        .arg(&bad)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .expect("run regcache");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(
        err.contains("line 2") && err.contains("listen_port"),
        "stderr: {err}"
    );
}
