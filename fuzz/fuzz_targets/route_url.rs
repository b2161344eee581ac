//! The route table and the URL parsers: a push URL template, a vsock URL,
//! a Retry-After value (docs/testing.md#fuzzing).
#![no_main]

use std::net::Ipv4Addr;

use guest_agent::internals::{UrlTemplate, VsockUrl, parse_default_gateway, parse_retry_after};
use libfuzzer_sys::fuzz_target;

/// Whether the URI that goes on the request line says what the configured
/// URL says: the same text, but for the `/` of an empty path and the case
/// of scheme and host.
fn same_url(url: &str, uri: &http::Uri) -> bool {
    let shown = uri.to_string();
    if shown.eq_ignore_ascii_case(url) {
        return true;
    }
    let head = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len());
    url.len() >= head
        && url.is_char_boundary(head)
        && shown.eq_ignore_ascii_case(&format!("{}/{}", &url[..head], &url[head..]))
}

fuzz_target!(|data: &[u8]| {
    let _ = parse_default_gateway(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = UrlTemplate::parse(text) {
        let target = t
            .resolve(Some(Ipv4Addr::new(10, 0, 2, 2)))
            .unwrap_or_else(|| panic!("accepted {text:?} has no target"));
        let line = target.uri.path_and_query().map_or("/", |p| p.as_str());
        assert!(
            !line.bytes().any(|b| b.is_ascii_control() || b == b' '),
            "{text:?}: request target {line:?}"
        );
        if !text.starts_with("vsock://") {
            assert!(
                same_url(&target.url, &target.uri),
                "{text:?} is sent as {}",
                target.uri
            );
        }
    }
    if let Ok(v) = VsockUrl::parse(text) {
        assert!(v.path.starts_with('/'), "{text:?}: path {:?}", v.path);
        assert!(
            !v.path.chars().any(|c| c.is_control() || c.is_whitespace()),
            "{text:?}: path {:?}",
            v.path
        );
    }
    if parse_retry_after(text).is_some() {
        let t = text.trim();
        assert!(
            !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()),
            "Retry-After {text:?}"
        );
    }
});
