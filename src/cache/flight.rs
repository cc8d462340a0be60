//! Single flight: one future per key at a time, its result shared by every caller with that key,
//! and the key forgotten when the future ends however it ends (a panic included). A caller may
//! wait for it at most a budget: the flight goes on without it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, Shared};

use super::{lock, CacheError};

pub(crate) type Flight<T> = Shared<BoxFuture<'static, Result<T, CacheError>>>;

/// Runs one future per key at a time; callers with the same key share its result.
pub(crate) struct Flights<T: Clone> {
    map: Arc<Mutex<HashMap<String, Entry<T>>>>,
    /// Where the flights run, whoever starts them.
    runtime: tokio::runtime::Handle,
}

/// A flight in the map, and whether a caller has already stopped waiting for it.
struct Entry<T: Clone> {
    flight: Flight<T>,
    outlived: Arc<AtomicBool>,
}

/// What a caller that waits for a flight at most a budget gets ([`Flights::run_within`]).
pub(crate) enum Waited<T: Clone> {
    /// The flight ended within the budget: its result.
    Landed(Result<T, CacheError>),
    /// The budget passed first; the flight goes on. `first`: this caller is the first that
    /// stopped waiting for this flight, and gets it to follow to its end.
    Outlived { flight: Flight<T>, first: bool },
}

/// Takes a flight's key out of the map when the flight's task ends, however it ends (a panic
/// included), so that the next request starts a new flight instead of sharing a failed one.
struct Landing<T: Clone> {
    map: Arc<Mutex<HashMap<String, Entry<T>>>>,
    key: String,
}

impl<T: Clone> Drop for Landing<T> {
    fn drop(&mut self) {
        lock(&self.map).remove(&self.key);
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// Flights run on `runtime`.
    pub(crate) fn new(runtime: tokio::runtime::Handle) -> Self {
        Flights {
            map: Arc::new(Mutex::new(HashMap::new())),
            runtime,
        }
    }

    /// Returns the shared result and whether this caller joined an existing flight.
    pub(crate) async fn run<F>(
        &self,
        key: String,
        make: impl FnOnce() -> F,
    ) -> (Result<T, CacheError>, bool)
    where
        F: Future<Output = Result<T, CacheError>> + Send + 'static,
    {
        let (flight, _, joined) = self.start(key, make);
        (flight.await, joined)
    }

    /// [`Flights::run`], waiting at most `budget` for the flight to end.
    pub(crate) async fn run_within<F>(
        &self,
        key: String,
        budget: Duration,
        make: impl FnOnce() -> F,
    ) -> Waited<T>
    where
        F: Future<Output = Result<T, CacheError>> + Send + 'static,
    {
        let (flight, outlived, _) = self.start(key, make);
        match tokio::time::timeout(budget, flight.clone()).await {
            Ok(result) => Waited::Landed(result),
            Err(_) => Waited::Outlived {
                flight,
                first: !outlived.swap(true, Ordering::AcqRel),
            },
        }
    }

    /// The flight of `key`, started with `make` unless one is running, and whether this caller
    /// joined one.
    fn start<F>(&self, key: String, make: impl FnOnce() -> F) -> (Flight<T>, Arc<AtomicBool>, bool)
    where
        F: Future<Output = Result<T, CacheError>> + Send + 'static,
    {
        let mut map = lock(&self.map);
        if let Some(e) = map.get(&key) {
            return (e.flight.clone(), Arc::clone(&e.outlived), true);
        }
        let fut = make();
        let landing = Landing {
            map: Arc::clone(&self.map),
            key: key.clone(),
        };
        // Spawned so that a client hanging up does not cancel the work others wait for;
        // on the flights' runtime, so that a stalled caller's shard does not stall it.
        let handle = self.runtime.spawn(async move {
            let _landing = landing;
            fut.await
        });
        let shared = async move {
            handle
                .await
                .unwrap_or_else(|e| Err(CacheError::task("fetch", e)))
        }
        .boxed()
        .shared();
        let outlived = Arc::new(AtomicBool::new(false));
        map.insert(
            key,
            Entry {
                flight: shared.clone(),
                outlived: Arc::clone(&outlived),
            },
        );
        (shared, outlived, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn panics_inside_the_flight() -> Result<u32, CacheError> {
        panic!("a bug inside the flight")
    }

    /// A caller that stops waiting leaves the flight running: the next caller joins it (no
    /// second run), only the first to give up is told it is the first, and the flight's result
    /// reaches whoever follows it.
    #[tokio::test]
    async fn a_flight_outlives_the_callers_that_stop_waiting_and_is_joined_not_run_again() {
        let flights = Flights::<u32>::new(tokio::runtime::Handle::current());
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let make = |runs: &Arc<std::sync::atomic::AtomicUsize>, released| {
            let runs = Arc::clone(runs);
            move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let _ = released.await;
                Ok(7)
            }
        };
        let key = || "docker/library/alpine@3.20 accept=all".to_owned();
        let budget = Duration::from_millis(20);
        let Waited::Outlived { flight, first } = flights
            .run_within(key(), budget, make(&runs, released))
            .await
        else {
            panic!("the flight waits for its release: it cannot land within the budget");
        };
        assert!(first, "the first caller to give up is told so");
        let (_unused, never) = tokio::sync::oneshot::channel::<()>();
        let Waited::Outlived { first, .. } =
            flights.run_within(key(), budget, make(&runs, never)).await
        else {
            panic!("the second caller joins the same flight, still held");
        };
        assert!(
            !first,
            "only the first caller to give up follows the flight"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one run for both callers");
        let _ = release.send(());
        assert!(matches!(flight.await, Ok(7)), "the flight ran to its end");
    }

    #[tokio::test]
    async fn a_manifest_flight_that_panics_is_forgotten_and_the_next_request_starts_a_new_one() {
        let flights = Flights::<u32>::new(tokio::runtime::Handle::current());
        let (first, joined) = flights
            .run("docker/library/alpine@3.20".into(), || async {
                panics_inside_the_flight()
            })
            .await;
        assert!(
            matches!(first, Err(CacheError::Internal(_))) && !joined,
            "the flight that panicked: {first:?}, joined {joined}"
        );
        let (second, joined) = flights
            .run("docker/library/alpine@3.20".into(), || async { Ok(7) })
            .await;
        assert!(
            matches!(second, Ok(7)) && !joined,
            "the next request must start a flight of its own, not share the one that panicked: \
             {second:?}, joined {joined}"
        );
    }
}
