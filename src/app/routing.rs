//! The routing in force, swapped whole on reload: the configuration applied last, one upstream
//! client per registry (kept across a reload that leaves its settings unchanged, with its tokens
//! and breaker state) and the host → upstream map.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;
use crate::telemetry::metrics::Metrics;
use crate::upstream::Upstream;

/// The part of the configuration that can change while serving: upstreams and routing.
pub struct Routing {
    pub config: Config,
    upstreams: Vec<Arc<Upstream>>,
    /// Lower-case host name → index in `upstreams`.
    hosts: HashMap<String, usize>,
}

impl Routing {
    /// Builds the upstream clients, sending their requests on `runtime`, reusing those of
    /// `previous` whose settings did not change (so their tokens and circuit state survive a
    /// reload).
    pub fn build(
        config: Config,
        metrics: &Arc<Metrics>,
        runtime: &tokio::runtime::Handle,
        previous: Option<&Routing>,
    ) -> anyhow::Result<Routing> {
        let mut upstreams = Vec::new();
        let mut hosts = HashMap::new();
        for (i, u) in config.upstreams.iter().enumerate() {
            for h in &u.hosts {
                hosts.insert(h.to_ascii_lowercase(), i);
            }
            let reused = previous
                .and_then(|p| p.upstreams.iter().find(|old| old.config == *u))
                .cloned();
            let up = match reused {
                Some(up) => up,
                None => {
                    Upstream::new(u.clone(), Arc::clone(metrics), runtime.clone()).map_err(|e| {
                        anyhow::anyhow!("cannot build the HTTP client for upstream {}: {e}", u.name)
                    })?
                }
            };
            upstreams.push(up);
        }
        Ok(Routing {
            config,
            upstreams,
            hosts,
        })
    }

    pub fn default_upstream(&self) -> Arc<Upstream> {
        Arc::clone(&self.upstreams[self.config.default_upstream])
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    pub fn upstream_for_host(&self, host: &str) -> Option<Arc<Upstream>> {
        self.hosts
            .get(&host.to_ascii_lowercase())
            .map(|&i| Arc::clone(&self.upstreams[i]))
    }

    /// Every pin as an image reference (`name:tag` or `name@digest`).
    pub fn pin_names(
        &self,
        store: &crate::store::Store,
    ) -> Result<Vec<String>, crate::store::StoreError> {
        Ok(store
            .pins()?
            .into_iter()
            .map(|(u, r, x)| {
                let name = self.catalog_name(&u, &r);
                if x.contains(':') {
                    format!("{name}@{x}")
                } else {
                    format!("{name}:{x}")
                }
            })
            .collect())
    }

    /// The name under which `/v2/_catalog` lists a cached repository.
    pub fn catalog_name(&self, upstream: &str, repo: &str) -> String {
        if upstream == self.config.default_upstream().name {
            return repo.to_owned();
        }
        match self.upstreams.iter().find(|u| u.name() == upstream) {
            Some(u) => {
                let host = u.config.hosts.first().cloned().unwrap_or_default();
                format!("{host}/{repo}")
            }
            None => format!("{upstream}/{repo}"),
        }
    }
}
