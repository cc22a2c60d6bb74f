//! Where a request says it is going: the URI authority (HTTP/2 `:authority`, absolute-form HTTP/1) or else the
//! `Host` header, split into host and port.

use http::{Request, header};

/// The raw authority of the request (`host[:port]`), as the client sent it.
pub fn request_authority<B>(req: &Request<B>) -> Option<&str> {
    if let Some(authority) = req.uri().authority() {
        return Some(authority.as_str());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// Splits `host[:port]`, keeping IPv6 brackets on the host (`[::1]:80` → (`[::1]`, Some(80))). A port that
/// does not parse is treated as part of the host so a bad Host header cannot make routing panic or guess.
pub fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => {
                let host = &authority[..=end];
                let port = authority[end + 1..].strip_prefix(':').and_then(|p| p.parse().ok());
                (host, port)
            }
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (authority, None),
        },
        None => (authority, None),
    }
}

/// Well-known port of a URI scheme, for leaving it out of generated URLs.
pub fn default_port(scheme: &str) -> Option<u16> {
    if scheme.eq_ignore_ascii_case("http") {
        Some(80)
    } else if scheme.eq_ignore_ascii_case("https") {
        Some(443)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_host_and_port() {
        assert_eq!(split_host_port("example.com"), ("example.com", None));
        assert_eq!(split_host_port("example.com:8080"), ("example.com", Some(8080)));
        assert_eq!(split_host_port("[::1]:80"), ("[::1]", Some(80)));
        assert_eq!(split_host_port("[::1]"), ("[::1]", None));
        assert_eq!(split_host_port("bad:port"), ("bad:port", None));
    }

    #[test]
    fn authority_prefers_uri_then_host_header() {
        let req = Request::builder()
            .uri("http://a.example:81/x")
            .header("host", "b.example")
            .body(())
            .unwrap();
        assert_eq!(request_authority(&req), Some("a.example:81"));
        let req = Request::builder()
            .uri("/x")
            .header("host", "b.example")
            .body(())
            .unwrap();
        assert_eq!(request_authority(&req), Some("b.example"));
        let req = Request::builder().uri("/x").body(()).unwrap();
        assert_eq!(request_authority(&req), None);
    }
}
