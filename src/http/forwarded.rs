//! The forwarded headers a backend gets: who the client is, what it asked
//! for and over what.
//!
//! From a trusted proxy (`trusted_proxies`), incoming `X-Forwarded-For` and
//! `Forwarded` are kept and sluice appends its own hop; its
//! `X-Forwarded-Proto` and `X-Forwarded-Host` stand. From anyone else all
//! four are removed first, whether sluice writes them or not: a client
//! must not be able to claim another address through sluice. Hop-by-hop
//! headers are pingora's to strip (its default upstream request policy
//! removes `Connection` and every header it names, `Keep-Alive`, `TE`,
//! `Trailer`, `Upgrade` outside WebSocket, `Proxy-*`).

use std::net::IpAddr;

use pingora::http::RequestHeader;

use crate::config::Forwarded;

const XFF: &str = "x-forwarded-for";
const XFP: &str = "x-forwarded-proto";
const XFH: &str = "x-forwarded-host";
const FORWARDED: &str = "forwarded";

/// What sluice knows about the request's hop.
pub struct Hop<'a> {
    /// The client (the real one when a trusted PROXY header said so).
    pub client: IpAddr,
    /// Whether its own forwarded headers are believed.
    pub trusted: bool,
    /// `https` or `http`.
    pub proto: &'static str,
    /// The host the client asked for.
    pub host: Option<&'a str>,
}

/// Every value of `name`, joined with `, ` (the list form of repeated fields).
fn joined(req: &RequestHeader, name: &str) -> Option<String> {
    let values: Vec<&str> = req
        .headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// An RFC 7239 node: IPv6 in brackets and quotes.
fn node(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

/// A value as an RFC 7239 token or, failing that, a quoted string.
fn token_or_quoted(v: &str) -> String {
    let token = !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if token {
        v.to_string()
    } else {
        let escaped: String = v
            .chars()
            .flat_map(|c| match c {
                '"' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        format!("\"{escaped}\"")
    }
}

/// Set the forwarded headers `which` on `req` for `hop`.
pub fn apply(req: &mut RequestHeader, which: &[Forwarded], hop: &Hop<'_>) -> pingora::Result<()> {
    let kept_xff = hop.trusted.then(|| joined(req, XFF)).flatten();
    let kept_fwd = hop.trusted.then(|| joined(req, FORWARDED)).flatten();
    let keep_xfp = hop.trusted && req.headers.contains_key(XFP);
    let keep_xfh = hop.trusted && req.headers.contains_key(XFH);
    if !hop.trusted {
        for name in [XFF, XFP, XFH, FORWARDED] {
            req.remove_header(name);
        }
    }
    for w in which {
        match w {
            Forwarded::XForwardedFor => {
                let ip = hop.client.to_string();
                let value = match kept_xff.as_deref() {
                    Some(before) => format!("{before}, {ip}"),
                    None => ip,
                };
                req.insert_header(XFF, value)?;
            }
            Forwarded::XForwardedProto if !keep_xfp => {
                req.insert_header(XFP, hop.proto)?;
            }
            Forwarded::XForwardedHost if !keep_xfh => {
                if let Some(host) = hop.host {
                    req.insert_header(XFH, host)?;
                }
            }
            Forwarded::Forwarded => {
                let mut element = format!("for={}", node(hop.client));
                if let Some(host) = hop.host {
                    element.push_str(&format!(";host={}", token_or_quoted(host)));
                }
                element.push_str(&format!(";proto={}", hop.proto));
                let value = match kept_fwd.as_deref() {
                    Some(before) => format!("{before}, {element}"),
                    None => element,
                };
                req.insert_header(FORWARDED, value)?;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Forwarded; 4] = [
        Forwarded::XForwardedFor,
        Forwarded::XForwardedProto,
        Forwarded::XForwardedHost,
        Forwarded::Forwarded,
    ];

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).expect("valid request");
        for (n, v) in headers {
            r.append_header(n.to_string(), *v).expect("valid header");
        }
        r
    }

    fn get(r: &RequestHeader, n: &str) -> Option<String> {
        joined(r, n)
    }

    #[test]
    fn untrusted_clients_headers_are_replaced() {
        let mut r = request(&[
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil"),
            ("Forwarded", "for=6.6.6.6"),
        ]);
        let hop = Hop {
            client: "192.0.2.7".parse().expect("ip"),
            trusted: false,
            proto: "http",
            host: Some("www.example.com"),
        };
        apply(&mut r, &ALL, &hop).expect("applied");
        assert_eq!(get(&r, XFF).as_deref(), Some("192.0.2.7"));
        assert_eq!(get(&r, XFP).as_deref(), Some("http"));
        assert_eq!(get(&r, XFH).as_deref(), Some("www.example.com"));
        assert_eq!(
            get(&r, FORWARDED).as_deref(),
            Some("for=192.0.2.7;host=www.example.com;proto=http")
        );
    }

    #[test]
    fn trusted_proxies_headers_are_appended_to() {
        let mut r = request(&[
            ("X-Forwarded-For", "203.0.113.1"),
            ("X-Forwarded-For", "198.51.100.2"),
            ("X-Forwarded-Proto", "https"),
            ("Forwarded", "for=203.0.113.1"),
        ]);
        let hop = Hop {
            client: "2001:db8::1".parse().expect("ip"),
            trusted: true,
            proto: "http",
            host: Some("a b"),
        };
        apply(&mut r, &ALL, &hop).expect("applied");
        assert_eq!(
            get(&r, XFF).as_deref(),
            Some("203.0.113.1, 198.51.100.2, 2001:db8::1")
        );
        assert_eq!(get(&r, XFP).as_deref(), Some("https"));
        assert_eq!(
            get(&r, FORWARDED).as_deref(),
            Some("for=203.0.113.1, for=\"[2001:db8::1]\";host=\"a b\";proto=http")
        );
    }

    #[test]
    fn headers_not_chosen_are_still_removed_from_untrusted_clients() {
        let mut r = request(&[("Forwarded", "for=6.6.6.6"), ("X-Forwarded-For", "6.6.6.6")]);
        let hop = Hop {
            client: "192.0.2.7".parse().expect("ip"),
            trusted: false,
            proto: "https",
            host: None,
        };
        apply(&mut r, &[Forwarded::XForwardedProto], &hop).expect("applied");
        assert_eq!(get(&r, FORWARDED), None);
        assert_eq!(get(&r, XFF), None);
        assert_eq!(get(&r, XFP).as_deref(), Some("https"));
    }
}
