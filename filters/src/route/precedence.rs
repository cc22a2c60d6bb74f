//! The static part of Gateway API match precedence, as a sort key computed once per (route, rule, match).
//!
//! The key must be a total order (Rust's sort may panic on an inconsistent comparator), which settles two
//! cases the specs leave open:
//! - Routes with a creation timestamp sort before routes without one; among routes without one, `source_order`
//!   decides. Timestamps are parsed (RFC 3339, any offset, fractional seconds); one that does not parse is
//!   compared as a string after all parsed ones.
//! - When HTTPRoutes and GRPCRoutes share a table, each kind is sorted by its own key and the two kinds form
//!   two blocks; the block of the kind whose oldest route is older comes first (Gateway API resolves
//!   conflicting routes in favour of the older one).
//!
//! A match without a path condition ranks as `PathPrefix /`: that is what the Gateway API CRD defaults it to,
//! and the conformance tests rely on it (a header-only match must beat a `PathPrefix /` match without headers).
//!
//! The hostname part of precedence depends on the request and is handled by the table (see `table.rs`).

use std::cmp::{Ordering, Reverse};

use super::matching::{Conditions, PathCond, ValueCond};
use super::model::{Route, RouteKind};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timestamp {
    Parsed { seconds: i64, nanos: u32 },
    Unparsed(String),
    Missing,
}

impl Timestamp {
    pub(crate) fn of(ts: Option<&str>) -> Timestamp {
        match ts {
            None => Timestamp::Missing,
            Some(s) => match parse_rfc3339(s) {
                Some((seconds, nanos)) => Timestamp::Parsed { seconds, nanos },
                None => Timestamp::Unparsed(s.to_owned()),
            },
        }
    }
}

/// Route age: older first, then position in the source, then `{namespace}/{name}` alphabetically.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Age {
    timestamp: Timestamp,
    source_order: usize,
    qualified_name: String,
}

impl Age {
    pub(crate) fn of(route: &Route) -> Age {
        Age {
            timestamp: Timestamp::of(route.creation_timestamp.as_deref()),
            source_order: route.source_order,
            qualified_name: format!("{}/{}", route.namespace, route.name),
        }
    }
}

/// Per-kind specificity. Lower sorts first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Specificity {
    Http {
        /// Exact (0) > Regex (1) > Prefix (2); then more characters.
        path: (u8, Reverse<usize>),
        method_absent: bool,
        headers: Reverse<usize>,
        query: Reverse<usize>,
    },
    Grpc {
        service: (u8, Reverse<usize>),
        method: (u8, Reverse<usize>),
        headers: Reverse<usize>,
    },
}

impl Specificity {
    fn of(kind: RouteKind, c: &Conditions) -> Specificity {
        match kind {
            RouteKind::Grpc => {
                let spec = |v: Option<&ValueCond>| {
                    let (class, len) = ValueCond::specificity(v);
                    (class, Reverse(len))
                };
                Specificity::Grpc {
                    service: spec(c.grpc().and_then(|g| g.service())),
                    method: spec(c.grpc().and_then(|g| g.method())),
                    headers: Reverse(c.header_count()),
                }
            }
            RouteKind::Http | RouteKind::VirtualService => Specificity::Http {
                path: path_rank(&c.path),
                method_absent: !c.has_method(),
                headers: Reverse(c.header_count()),
                query: Reverse(c.query_count()),
            },
        }
    }
}

fn path_rank(p: &PathCond) -> (u8, Reverse<usize>) {
    match p {
        PathCond::Exact(s) | PathCond::ExactIgnoreCase(s) => (0, Reverse(s.len())),
        PathCond::Regex(re) => (1, Reverse(re.as_str().len())),
        // Stored without the trailing slash, `/` as "": count the characters of the configured form.
        PathCond::Segments(s) | PathCond::SegmentsIgnoreCase(s) => (2, Reverse(s.len().max(1))),
        PathCond::Plain(s) | PathCond::PlainIgnoreCase(s) => (2, Reverse(s.len())),
        PathCond::Any => (2, Reverse(1)),
    }
}

/// Everything that orders one entry, most significant first.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct SortKey {
    block: usize,
    specificity: Specificity,
    age: Age,
    route_position: usize,
    rule_index: usize,
    match_index: usize,
}

impl SortKey {
    pub(crate) fn new(
        block: usize,
        kind: RouteKind,
        conditions: &Conditions,
        age: Age,
        (route_position, rule_index, match_index): (usize, usize, usize),
    ) -> SortKey {
        SortKey {
            block,
            specificity: Specificity::of(kind, conditions),
            age,
            route_position,
            rule_index,
            match_index,
        }
    }
}

/// Whether the gRPC block of a mixed table goes first: when its oldest route is older than the oldest HTTPRoute.
pub(crate) fn grpc_block_first(routes: &[(RouteKind, Age)]) -> bool {
    let oldest = |kind: RouteKind| routes.iter().filter(|(k, _)| *k == kind).map(|(_, a)| a).min();
    match (oldest(RouteKind::Http), oldest(RouteKind::Grpc)) {
        (Some(http), Some(grpc)) => grpc.cmp(http) == Ordering::Less,
        _ => false,
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` → (seconds since the epoch, nanoseconds).
fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(range)?;
        part.bytes().all(|c| c.is_ascii_digit()).then(|| part.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' {
        return None;
    }
    if b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, d) in frac.bytes().take(digits).enumerate() {
            if i < 9 {
                nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
            }
        }
        rest = &frac[digits..];
    }
    let offset = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let v = |a: u8, b: u8| i64::from(a - b'0') * 10 + i64::from(b - b'0');
            let minutes = v(digits[0], digits[1]) * 60 + v(digits[2], digits[3]);
            if *sign == b'+' { minutes * 60 } else { -minutes * 60 }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    Some((days * 86_400 + hour * 3600 + minute * 60 + second - offset, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(parse_rfc3339("2024-03-01T12:00:00Z"), Some((1_709_294_400, 0)));
        assert_eq!(parse_rfc3339("2024-03-01T14:00:00+02:00"), Some((1_709_294_400, 0)));
        assert_eq!(
            parse_rfc3339("2024-03-01T12:00:00.5Z"),
            Some((1_709_294_400, 500_000_000))
        );
        assert_eq!(parse_rfc3339("2024-03-01"), None);
        assert_eq!(parse_rfc3339("2024-13-01T12:00:00Z"), None);
        assert_eq!(parse_rfc3339("2024-03-01T12:00:00"), None);
    }

    #[test]
    fn timestamps_order_by_instant_then_missing_last() {
        let a = Timestamp::of(Some("2024-03-01T13:00:00+02:00"));
        let b = Timestamp::of(Some("2024-03-01T12:00:00Z"));
        assert!(a < b, "11:00Z is older than 12:00Z");
        assert!(b < Timestamp::of(Some("garbage")));
        assert!(Timestamp::of(Some("garbage")) < Timestamp::Missing);
    }
}
