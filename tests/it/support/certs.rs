//! Test certificates: a CA and a server certificate for 127.0.0.1, ::1 and localhost, made with
//! openssl (Debian package openssl).
//!
//! [`make_certs`] signs a certificate valid from now for 2 days (`openssl x509 -req -days`).
//! [`make_certs_valid`] signs one valid over any period, past or future, with `openssl ca
//! -startdate -enddate`: `openssl x509` in OpenSSL 3.0 (Debian 12) has only `-days`, counted
//! from now.

use std::path::Path;
use std::process::Command;

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The CA (made once per directory), a new server key and a request for it, and the extension
/// file naming 127.0.0.1, ::1 and localhost.
fn ca_and_request(dir: &Path) {
    if !dir.join("ca.key").exists() {
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=regcache test CA",
            ],
            dir,
        );
    }
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        dir,
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n",
    )
    .expect("ext");
}

/// A CA (made once per directory) and a server certificate for 127.0.0.1, ::1 and localhost signed by it, with serial `serial`.
pub fn make_certs(dir: &Path, serial: &str) {
    ca_and_request(dir);
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            serial,
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.crt",
        ],
        dir,
    );
}

/// Like [`make_certs`], with the server certificate valid from `not_before` to `not_after`
/// (`YYYYMMDDHHMMSSZ`, UTC), which may both be in the past or the future. `serial` is hex
/// without `0x`.
pub fn make_certs_valid(dir: &Path, serial: &str, not_before: &str, not_after: &str) {
    ca_and_request(dir);
    let db = dir.join("ca-db");
    let _ = std::fs::remove_dir_all(&db);
    std::fs::create_dir_all(&db).expect("ca db dir");
    std::fs::write(db.join("index.txt"), "").expect("index");
    std::fs::write(db.join("serial"), format!("{serial}\n")).expect("serial");
    std::fs::write(
        db.join("ca.cnf"),
        "[ca]\ndefault_ca = test\n[test]\ndatabase = ca-db/index.txt\nnew_certs_dir = ca-db\n\
         serial = ca-db/serial\ndefault_md = sha256\npolicy = any\nunique_subject = no\n\
         [any]\ncommonName = supplied\n",
    )
    .expect("ca config");
    openssl(
        &[
            "ca",
            "-batch",
            "-notext",
            "-config",
            "ca-db/ca.cnf",
            "-cert",
            "ca.crt",
            "-keyfile",
            "ca.key",
            "-in",
            "server.csr",
            "-startdate",
            not_before,
            "-enddate",
            not_after,
            "-extfile",
            "ext.cnf",
            "-out",
            "server.crt",
        ],
        dir,
    );
}

/// `YYYYMMDDHHMMSSZ` for the Unix time `secs` (for [`make_certs_valid`]), with date(1).
pub fn openssl_time(secs: i64) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y%m%d%H%M%SZ"])
        .output()
        .expect("run date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
