//! Listing pages (tag lists and the catalog): the `n` a client may ask for, one page of a sorted
//! list after `last`, and the `Link` to the next page.

use http::header;
use http::Response;

use crate::http::error::{ApiError, Code};
use crate::http::response::{set_header, Body};
use crate::http::router::url_encode;

/// The `n` of a listing: a number from 0 to `max` (`limits.max_page`).
pub fn parse_n(n: Option<&str>, max: usize) -> Result<Option<usize>, ApiError> {
    match n {
        None => Ok(None),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n <= max && s.bytes().all(|c| c.is_ascii_digit()) => Ok(Some(n)),
            _ => Err(ApiError::new(
                Code::PaginationNumberInvalid,
                format!("n must be a number from 0 to {max} (limits.max_page)"),
            )),
        },
    }
}

/// One page of a sorted list, after `last`, at most `n` long, and whether more follow.
pub fn page(items: Vec<String>, n: Option<usize>, last: Option<&str>) -> (Vec<String>, bool) {
    let mut items: Vec<String> = match last {
        Some(l) => items.into_iter().filter(|t| t.as_str() > l).collect(),
        None => items,
    };
    match n {
        Some(n) if items.len() > n => {
            items.truncate(n);
            (items, true)
        }
        _ => (items, false),
    }
}

/// Adds the `Link` to the page after `last` (same `n`, and the `ns` the request was routed by).
pub fn link_header(
    resp: &mut Response<Body>,
    path: &str,
    n: Option<usize>,
    last: &str,
    ns: Option<&str>,
) {
    let mut q = format!("last={}", url_encode(last));
    if let Some(n) = n {
        q = format!("n={n}&{q}");
    }
    if let Some(ns) = ns {
        q = format!("{q}&ns={}", url_encode(ns));
    }
    set_header(
        resp.headers_mut(),
        header::LINK,
        &format!("<{path}?{q}>; rel=\"next\""),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_n_and_last() {
        let items: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            page(items.clone(), Some(2), None),
            (vec!["a".into(), "b".into()], true)
        );
        assert_eq!(
            page(items.clone(), Some(2), Some("b")),
            (vec!["c".into(), "d".into()], false)
        );
        assert_eq!(page(items, None, Some("d")), (vec![], false));
        let max = 10_000;
        assert!(parse_n(Some("x"), max).is_err());
        assert!(parse_n(Some("100000"), max).is_err());
        assert!(parse_n(Some("+5"), max).is_err());
        assert_eq!(parse_n(Some("5"), 5).ok(), Some(Some(5)));
        assert!(parse_n(Some("6"), 5).is_err());
    }

    #[test]
    fn the_next_link_keeps_n_and_ns() {
        let mut resp = Response::new(crate::http::response::empty());
        link_header(
            &mut resp,
            "/v2/a/tags/list",
            Some(2),
            "v 1",
            Some("ghcr.io"),
        );
        assert_eq!(
            resp.headers()[header::LINK],
            "</v2/a/tags/list?n=2&last=v%201&ns=ghcr.io>; rel=\"next\""
        );
    }
}
