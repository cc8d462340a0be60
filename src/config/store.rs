//! `[store]`: the local store's size limits and how often they are enforced, with their
//! defaults; `[store.s3]`, the shared bucket behind it, is in [`s3`](super::s3).

use std::time::Duration;

use crate::config::raw::RawStore;
use crate::config::s3::{self, S3Config};
use crate::config::Pending;

/// Size limits of the store and how often they are enforced.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// Evict least recently used content when the store holds more than this.
    pub max_size: Option<u64>,
    /// Evict when the filesystem has less than this free.
    pub min_free: Option<u64>,
    /// Percent of `max_size` to evict down to.
    pub low_water: u8,
    /// Time between two background checks of the limits (and access-time flushes).
    pub gc_interval: Duration,
    /// The shared bucket tier, when configured (`max_size` then caps the local tier).
    pub s3: Option<S3Config>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_size: None,
            min_free: None,
            low_water: 90,
            gc_interval: Duration::from_secs(10),
            s3: None,
        }
    }
}

pub(super) fn validate(raw: RawStore, pending: &mut Pending) -> Result<StoreConfig, String> {
    let d = StoreConfig::default();
    let low_water = raw.low_water.unwrap_or(d.low_water);
    if !(1..=100).contains(&low_water) {
        return Err(format!(
            "store.low_water = {low_water} must be a percentage from 1 to 100"
        ));
    }
    let gc_interval = raw.gc_interval.map_or(d.gc_interval, |v| v.0);
    if gc_interval.is_zero() {
        return Err("store.gc_interval must be more than 0".into());
    }
    Ok(StoreConfig {
        // 0 is no limit, as unset is.
        max_size: raw.max_size.map(|b| b.0).filter(|b| *b > 0).or(d.max_size),
        min_free: raw.min_free.map(|b| b.0).filter(|b| *b > 0).or(d.min_free),
        low_water,
        gc_interval,
        s3: match raw.s3 {
            None => d.s3,
            Some(raw) => Some(s3::validate(raw, pending)?),
        },
    })
}
