//! The `[config_store]` table as `check-config` validates it.

use crate::config_store::{store_with, Env, KEY};
use crate::support::process::Process;

/// `[config_store] poll_interval = "0s"` makes the etcd watcher loop with no pause at all (a busy
/// loop against etcd), and `timeout = "0s"` makes every request to the store fail at once; both
/// are accepted today, while the upstreams' durations must be "more than 0".
#[test]
fn config_store_zero_poll_interval_or_timeout_is_refused() {
    let env = Env::new();
    for (what, poll, timeout) in [("poll_interval", "0s", "1s"), ("timeout", "1s", "0s")] {
        env.write_local(
            "http://127.0.0.1:1",
            "",
            &store_with("etcd", "http://127.0.0.1:2", KEY, poll, timeout),
        );
        let config = env.config.to_str().expect("temp path is UTF-8");
        let out = Process::run_to_end(&["check-config", config]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(2) && stderr.contains(what),
            "config_store.{what} = \"0s\" should be refused (exit 2, naming the key), got {:?}\n\
             --- stdout ---\n{}--- stderr ---\n{stderr}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
