//! Choosing a pool for a request by its host and path.
//!
//! A route names a host (exact, or `*.` and a name for one more label on
//! the left, as in [`crate::tls::names`]), a path prefix, or both. The most
//! specific route wins: a route with a matching host beats one without (an
//! exact host beats a wildcard), and among those the longest matching path
//! prefix wins. Requests no route takes go to the default pool, if any.
//! Prefixes compare bytes: `/api` also takes `/apix`; write `/api/` for the
//! directory only.

use crate::tls::names::NameTable;

/// Routes to values (pools in sluice; anything in the tests).
#[derive(Debug)]
pub struct Router<T> {
    by_host: NameTable<Vec<(String, T)>>,
    any_host: Vec<(String, T)>,
    default: Option<T>,
}

impl<T: Clone> Router<T> {
    /// Routes from `(host, path prefix, value)`, in file order; `default`
    /// takes the rest.
    pub fn new(routes: Vec<(Option<String>, Option<String>, T)>, default: Option<T>) -> Router<T> {
        let mut lists: Vec<(String, Vec<(String, T)>)> = Vec::new();
        let mut any_host = Vec::new();
        for (host, path, value) in routes {
            let prefix = path.unwrap_or_else(|| "/".to_string());
            match host {
                None => any_host.push((prefix, value)),
                Some(h) => match lists.iter_mut().find(|(n, _)| *n == h) {
                    Some((_, list)) => list.push((prefix, value)),
                    None => lists.push((h, vec![(prefix, value)])),
                },
            }
        }
        let mut by_host = NameTable::default();
        for (host, mut list) in lists {
            // Longest prefix first; stable, so file order breaks ties.
            list.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
            by_host.insert(&host, list);
        }
        any_host.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Router {
            by_host,
            any_host,
            default,
        }
    }

    /// The value for a request to `host` (as the client sent it, port and
    /// all; `None` when it sent none) and `path`.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&T> {
        let path = if path.is_empty() { "/" } else { path };
        let found = host
            .map(strip_port)
            .and_then(|h| self.by_host.get(h))
            .and_then(|list| first_prefix(list, path));
        found
            .or_else(|| first_prefix(&self.any_host, path))
            .or(self.default.as_ref())
    }
}

fn first_prefix<'a, T>(list: &'a [(String, T)], path: &str) -> Option<&'a T> {
    list.iter()
        .find(|(p, _)| path.starts_with(p.as_str()))
        .map(|(_, v)| v)
}

/// `host` without its port (`[::1]:80` -> `[::1]`, `a.example:8080` -> `a.example`).
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router<&'static str> {
        let r = |h: Option<&str>, p: Option<&str>, v| (h.map(String::from), p.map(String::from), v);
        Router::new(
            vec![
                r(Some("api.example.com"), None, "api"),
                r(Some("api.example.com"), Some("/v2/"), "api2"),
                r(Some("*.example.com"), None, "wild"),
                r(None, Some("/static/"), "static"),
                r(None, Some("/static/big/"), "big"),
            ],
            Some("default"),
        )
    }

    #[test]
    fn exact_host_beats_wildcard_and_longest_prefix_wins() {
        let r = router();
        assert_eq!(r.route(Some("api.example.com"), "/"), Some(&"api"));
        assert_eq!(
            r.route(Some("API.example.com:8443"), "/v2/x"),
            Some(&"api2")
        );
        assert_eq!(r.route(Some("www.example.com"), "/static/a"), Some(&"wild"));
        // One label only, as in certificates.
        assert_eq!(r.route(Some("a.b.example.com"), "/"), Some(&"default"));
        assert_eq!(r.route(Some("other.org"), "/static/big/x"), Some(&"big"));
        assert_eq!(r.route(Some("other.org"), "/static/x"), Some(&"static"));
        assert_eq!(r.route(None, "/x"), Some(&"default"));
    }

    #[test]
    fn without_default_unrouted_requests_find_nothing() {
        let r = Router::new(vec![(Some("a.example".to_string()), None, 1)], None);
        assert_eq!(r.route(Some("a.example"), "/"), Some(&1));
        assert_eq!(r.route(Some("b.example"), "/"), None);
        assert_eq!(r.route(None, "/"), None);
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("a.example:80"), "a.example");
        assert_eq!(strip_port("a.example"), "a.example");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
