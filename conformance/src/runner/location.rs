//! `Location` headers read the way the Go harness reads them (`url.Parse`, then `Hostname()`, `Port()`,
//! `Scheme`, `Path`): a relative Location has an empty scheme and host, the path is percent-decoded.

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Location {
    pub scheme: String,
    pub host: String,
    pub port: String,
    pub path: String,
    pub query: String,
    /// Path and query as written (not decoded): what a client following the redirect sends.
    pub request_target: String,
}

pub fn parse(location: &str) -> Location {
    let mut rest = location.split('#').next().unwrap_or_default();
    let mut out = Location::default();
    if let Some((scheme, after)) = rest.split_once(':')
        && is_scheme(scheme)
    {
        out.scheme = scheme.to_ascii_lowercase();
        rest = after;
    }
    if let Some(after) = rest.strip_prefix("//") {
        let end = after.find(['/', '?']).unwrap_or(after.len());
        let authority = &after[..end];
        rest = &after[end..];
        let host_port = authority.rsplit_once('@').map(|(_, hp)| hp).unwrap_or(authority);
        let (host, port) = super::target::split_host_port(host_port);
        out.host = host.to_string();
        out.port = port.unwrap_or_default().to_string();
    }
    out.request_target = rest.to_string();
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    out.path = percent_decode(path);
    out.query = query.to_string();
    out
}

fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_and_relative_locations() {
        let l = parse("https://example.org:8443/a%20b/c?x=1#frag");
        assert_eq!(
            l,
            Location {
                scheme: "https".into(),
                host: "example.org".into(),
                port: "8443".into(),
                path: "/a b/c".into(),
                query: "x=1".into(),
                request_target: "/a%20b/c?x=1".into(),
            }
        );
        let l = parse("http://10.200.0.1/replacement-prefix/lemon");
        assert_eq!((l.host.as_str(), l.port.as_str()), ("10.200.0.1", ""));
        assert_eq!(l.path, "/replacement-prefix/lemon");
        let l = parse("/relative?q");
        assert_eq!(
            (l.scheme.as_str(), l.host.as_str(), l.path.as_str()),
            ("", "", "/relative")
        );
        let l = parse("http://[::1]:80");
        assert_eq!((l.host.as_str(), l.port.as_str(), l.path.as_str()), ("::1", "80", ""));
        let l = parse("HTTP://user@host:1/p");
        assert_eq!(
            (l.scheme.as_str(), l.host.as_str(), l.port.as_str()),
            ("http", "host", "1")
        );
        assert_eq!(parse("/100%").path, "/100%");
    }
}
