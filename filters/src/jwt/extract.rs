//! Where a token is found in a request: a header (with a prefix such as `Bearer `), a query parameter, or a
//! cookie — Envoy's `from_headers`, `from_params` and `from_cookies`.

use http::{HeaderMap, HeaderName, Request, header};

/// One place a rule looks for its token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenLocation {
    /// The header's first value; with a non-empty prefix the value must start with it (compared ignoring ASCII
    /// case, since auth schemes are case-insensitive), and the token is what follows, up to a space or comma.
    Header {
        name: HeaderName,
        prefix: String,
    },
    Param(String),
    Cookie(String),
}

impl TokenLocation {
    /// Envoy's default when a rule names no location: `Authorization: Bearer <token>` and `?access_token=`.
    pub fn defaults() -> Vec<TokenLocation> {
        vec![
            TokenLocation::Header {
                name: header::AUTHORIZATION,
                prefix: "Bearer ".to_string(),
            },
            TokenLocation::Param("access_token".to_string()),
        ]
    }

    /// The token at this location, if any (an empty value counts as none).
    pub fn extract<'r, B>(&self, req: &'r Request<B>) -> Option<&'r str> {
        let token = match self {
            TokenLocation::Header { name, prefix } => from_header(req.headers(), name, prefix),
            TokenLocation::Param(name) => from_query(req.uri().query()?, name),
            TokenLocation::Cookie(name) => from_cookies(req.headers(), name),
        }?;
        (!token.is_empty()).then_some(token)
    }
}

fn from_header<'r>(headers: &'r HeaderMap, name: &HeaderName, prefix: &str) -> Option<&'r str> {
    let value = headers.get(name)?.to_str().ok()?;
    let rest = if prefix.is_empty() {
        value
    } else {
        let head = value.get(..prefix.len())?;
        if !head.eq_ignore_ascii_case(prefix) {
            return None;
        }
        &value[prefix.len()..]
    };
    let rest = rest.trim_start();
    let end = rest.find([' ', ',', '\t']).unwrap_or(rest.len());
    Some(&rest[..end])
}

fn from_query<'r>(query: &'r str, name: &str) -> Option<&'r str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then_some(v)
    })
}

fn from_cookies<'r>(headers: &'r HeaderMap, name: &str) -> Option<&'r str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v.trim_matches('"'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn header_with_prefix() {
        let loc = &TokenLocation::defaults()[0];
        assert_eq!(
            loc.extract(&req("/", &[("authorization", "Bearer abc.def.ghi")])),
            Some("abc.def.ghi")
        );
        assert_eq!(loc.extract(&req("/", &[("authorization", "bearer abc")])), Some("abc"));
        assert_eq!(
            loc.extract(&req("/", &[("authorization", "Bearer abc ,x")])),
            Some("abc")
        );
        assert_eq!(loc.extract(&req("/", &[("authorization", "Basic abc")])), None);
        assert_eq!(loc.extract(&req("/", &[("authorization", "Bearer ")])), None);
        assert_eq!(loc.extract(&req("/", &[("authorization", "Bear")])), None);
        assert_eq!(loc.extract(&req("/", &[])), None);
        let custom = TokenLocation::Header {
            name: HeaderName::from_static("x-jwt"),
            prefix: String::new(),
        };
        assert_eq!(custom.extract(&req("/", &[("x-jwt", "tok")])), Some("tok"));
    }

    #[test]
    fn param_and_cookie() {
        let p = TokenLocation::Param("access_token".into());
        assert_eq!(p.extract(&req("/a?x=1&access_token=tok", &[])), Some("tok"));
        assert_eq!(p.extract(&req("/a?access_token=", &[])), None);
        assert_eq!(p.extract(&req("/a", &[])), None);
        let c = TokenLocation::Cookie("session".into());
        assert_eq!(
            c.extract(&req("/", &[("cookie", "a=1; session=tok; b=2")])),
            Some("tok")
        );
        assert_eq!(
            c.extract(&req("/", &[("cookie", "a=1"), ("cookie", "session=\"t2\"")])),
            Some("t2")
        );
        assert_eq!(c.extract(&req("/", &[("cookie", "sessionx=1")])), None);
    }
}
