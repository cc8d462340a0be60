//! Work handed to the background runtime: [`on_runtime`] runs a future as a task of a given
//! runtime and awaits it from wherever the caller runs, so that what the work starts (hyper's
//! pooled client connections above all) lives on that runtime, not on the caller's shard.
//!
//! Every request to an upstream, the bucket or a peer goes through it. hyper drives a client
//! connection with a task spawned on the runtime where the connection was made, and its pool lends
//! that connection to any later request, of any shard: a connection made on a shard would stall,
//! with that shard, every request that reuses it. Made by a task of the background runtime, every
//! pooled connection lives there, and a response body is still read from whatever thread polls it
//! (through the channel its connection task feeds: hyper's own, bounded, no copy).

use std::future::Future;

/// The runtime the work was sent to is shutting down: the task ended before the work did.
#[derive(Debug, thiserror::Error)]
#[error("the background runtime is shutting down")]
pub struct Stopped(#[source] pub tokio::task::JoinError);

/// Runs `work` as a task of `runtime` and awaits its output. The task is aborted when the caller
/// gives up (drops the future this returns), as the work itself would be if the caller ran it; a
/// panic in it is resumed in the caller.
pub async fn on_runtime<F>(runtime: &tokio::runtime::Handle, work: F) -> Result<F::Output, Stopped>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let task = tokio_util::task::AbortOnDropHandle::new(runtime.spawn(work));
    match task.await {
        Ok(output) => Ok(output),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(Stopped(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn background() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-background")
            .enable_all()
            .build()
            .expect("runtime")
    }

    fn caller() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn the_work_runs_on_the_given_runtime_and_its_output_reaches_the_caller() {
        let bg = background();
        let ran_on = caller().block_on(on_runtime(bg.handle(), async {
            std::thread::current().name().map(str::to_owned)
        }));
        assert_eq!(
            ran_on.expect("the work's output").as_deref(),
            Some("test-background")
        );
    }

    #[test]
    fn a_caller_that_gives_up_aborts_the_work() {
        let bg = background();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        caller().block_on(async {
            let work = on_runtime(bg.handle(), async move {
                // Held until the task ends: its end closes the channel.
                let _tx = tx;
                std::future::pending::<()>().await
            });
            let gave_up = tokio::time::timeout(std::time::Duration::from_millis(10), work).await;
            assert!(gave_up.is_err(), "the work never ends by itself");
        });
        let closed = bg.block_on(rx);
        assert!(closed.is_err(), "the aborted task dropped what it held");
    }

    #[test]
    fn a_runtime_shut_down_gives_a_stopped_error_not_a_hang() {
        let bg = background();
        let handle = bg.handle().clone();
        bg.shutdown_background();
        let got = caller().block_on(on_runtime(&handle, async { 1 }));
        assert!(matches!(got, Err(Stopped(_))), "{got:?}");
    }
}
