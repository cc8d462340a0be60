//! Confirming that the server committed what a run moved ([`confirm`]): a `HEAD` of the manifest
//! or blob until the server answers `x-regcache-cache: hit`, within `--commit-timeout`, and why
//! not ([`Uncommitted`]) when it never will.
//!
//! The server answers a blob's last byte once its digest is verified, and commits it afterwards
//! (fsync, rename, fsync of the directory, one database transaction at redb's default durability,
//! `Immediate`). `hit` is answered from that record, so it means durable. Blobs are asked with
//! `Cache-Control: only-if-cached`: the server then never starts a fill to answer (a plain `HEAD`
//! of a blob it does not hold would fetch it again), answers `coalesced` while the fill is being
//! fetched or committed, and `504` once it ended without a commit.

use std::time::{Duration, Instant};

use crate::cmd::prefetch::fetch::{outcome, Ctx};
use crate::oci::media::Accept;

/// What a run confirms: a manifest (an index, a platform's manifest) or a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Object {
    Manifest,
    Blob,
}

impl std::fmt::Display for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Object::Manifest => "manifest",
            Object::Blob => "blob",
        })
    }
}

/// Why a manifest or blob is not durable on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Cause {
    /// Not confirmed committed within `--commit-timeout`.
    Timeout,
    /// The server's store is full: it served the bytes without storing them.
    StoreFull,
    /// The server served it without storing it, its store not being full: a failed commit.
    NotStored,
}

/// A manifest or blob the server served but did not (yet) commit: an element of `uncommitted`
/// in the `--json` summary.
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct Uncommitted {
    pub kind: Object,
    pub digest: String,
    pub cause: Cause,
    pub message: String,
}

impl std::fmt::Display for Uncommitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.digest, self.message)
    }
}

/// The first pause between two questions; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_millis(250);

/// Asks the server about the manifest or blob at `url` until it answers `hit` (`None`), or it
/// will not be stored, or `--commit-timeout` has passed (`Some`). An answer that is neither (an
/// error status) is an error.
pub(super) async fn confirm(
    ctx: &Ctx,
    kind: Object,
    url: &str,
    digest: &str,
) -> anyhow::Result<Option<Uncommitted>> {
    let deadline = Instant::now() + ctx.commit_timeout;
    let mut pause = FIRST_PAUSE;
    loop {
        let request = match kind {
            // A stored manifest is answered from the store only to a client accepting its type.
            Object::Manifest => ctx
                .client
                .head(url)
                .header("accept", Accept::ALL.header_value().unwrap_or_default()),
            Object::Blob => ctx
                .client
                .head(url)
                .header("cache-control", "only-if-cached"),
        };
        let resp = request.send().await?;
        let status = resp.status();
        match outcome(&resp) {
            Some("hit") if status.is_success() => return Ok(None),
            Some("passthrough") => return Ok(Some(not_stored(ctx, kind, digest).await)),
            _ if status == reqwest::StatusCode::GATEWAY_TIMEOUT => {
                return Ok(Some(not_stored(ctx, kind, digest).await))
            }
            // Still being fetched or committed (or, from a server that does not know
            // `only-if-cached`, fetched anew).
            _ if status.is_success() => {}
            _ => anyhow::bail!("{kind} {digest}: {status}"),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Some(Uncommitted {
                kind,
                digest: digest.to_owned(),
                cause: Cause::Timeout,
                message: format!(
                    "not committed within {:?} (--commit-timeout)",
                    ctx.commit_timeout
                ),
            }));
        }
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// A manifest or blob the server served without storing it: [`Cause::StoreFull`] when its
/// `/readyz` says its store is full, else [`Cause::NotStored`].
pub(super) async fn not_stored(ctx: &Ctx, kind: Object, digest: &str) -> Uncommitted {
    let full = match ctx
        .client
        .get(format!("{}/readyz", ctx.server))
        .send()
        .await
    {
        Ok(r) => r.bytes().await.is_ok_and(|body| {
            serde_json::from_slice::<serde_json::Value>(&body)
                .is_ok_and(|v| v["store_full"] == true)
        }),
        Err(_) => false,
    };
    let (cause, message) = if full {
        (
            Cause::StoreFull,
            "the server's store is full: it served the bytes without storing them",
        )
    } else {
        (
            Cause::NotStored,
            "the server served it without storing it (a failed commit: see the server's log)",
        )
    };
    Uncommitted {
        kind,
        digest: digest.to_owned(),
        cause,
        message: message.to_owned(),
    }
}
