//! Header handling as the Go harness does it: `Header.Set` canonicalises names and keeps one value; checks
//! compare names case-insensitively and multiple values joined with `,` (no space).

pub use crate::echo::canonical_header_name as canonical;

/// Go's `Header.Set`: canonical name, replacing any earlier value of the same header.
pub fn set(headers: &mut Vec<(String, String)>, name: &str, value: &str) {
    let name = canonical(name);
    headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
    headers.push((name, value.to_string()));
}

/// Every value of `name` (case-insensitive), in order.
pub fn values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The values of `name` joined with `,`, or `None` when absent.
pub fn joined(headers: &[(String, String)], name: &str) -> Option<String> {
    let values = values(headers, name);
    (!values.is_empty()).then(|| values.join(","))
}

/// All spaces removed (`ignore_whitespace_in_response_headers`).
pub fn without_spaces(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

/// Removes `name` (case-insensitive) and returns its last value.
pub fn take(headers: &mut Vec<(String, String)>, name: &str) -> Option<String> {
    let found = headers
        .iter()
        .rev()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone());
    headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_canonicalises_and_replaces() {
        let mut h = Vec::new();
        set(&mut h, "x-header-set", "a");
        set(&mut h, "access-control-request-method", "GET");
        set(&mut h, "X-HEADER-SET", "b");
        assert_eq!(
            h,
            vec![
                ("Access-Control-Request-Method".to_string(), "GET".to_string()),
                ("X-Header-Set".to_string(), "b".to_string())
            ]
        );
        assert_eq!(canonical("www-authenticate"), "Www-Authenticate");
        assert_eq!(canonical("x-1a-b"), "X-1a-B");
    }

    #[test]
    fn lookups_are_case_insensitive_and_join_with_commas() {
        let h = vec![
            ("x-a".to_string(), "1".to_string()),
            ("X-A".to_string(), "2".to_string()),
            ("b".to_string(), "x, y".to_string()),
        ];
        assert_eq!(joined(&h, "X-a").as_deref(), Some("1,2"));
        assert_eq!(joined(&h, "c"), None);
        assert_eq!(without_spaces(" x, y "), "x,y");
        let mut h = h;
        assert_eq!(take(&mut h, "x-a").as_deref(), Some("2"));
        assert_eq!(h.len(), 1);
    }
}
