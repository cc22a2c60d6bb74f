//! Rule selection with Gateway API precedence.
//!
//! Every (route, rule, match) becomes one entry; entries are sorted once, when the table is built, by the
//! static key of `precedence.rs`. The one request-dependent part of precedence is the route hostname: among
//! routes whose hostnames match the request, the most specific matching hostname wins (exact over wildcard,
//! longer over shorter), and routes without hostnames come last. That is done without sorting per request:
//! the table keeps, for each distinct hostname (most specific first), the entries of the routes that list it,
//! in precedence order. `find` walks the hostname groups that match the request host in that order, then the
//! routes without hostnames, and returns the first entry whose conditions hold. At most one hostname of each
//! specificity can match a given host, so the walk visits the groups in exactly the precedence order. A route
//! listed under several matching hostnames is checked again in a later group, which costs time but cannot
//! change the answer.
//!
//! A table that contains a VirtualService keeps document order (route, rule, match) for every entry, as Istio
//! does; hostnames then only filter.
//!
//! `find` allocates nothing: the returned [`Matched`] is built from `Arc` clones.

use std::sync::Arc;

use http::{HeaderMap, Method};

use super::matching::{Conditions, HostPattern};
use super::model::{Route, RouteKind, RouteMatch, Rule};
use super::precedence::{Age, SortKey, grpc_block_first};

/// The parts of a request routing looks at.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// Host / :authority without the port, lower-cased by the caller.
    pub host: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// The rule chosen for a request, inserted into the request extensions by the route layer.
#[derive(Clone, Debug)]
pub struct Matched {
    pub route: Arc<Route>,
    pub rule: Arc<Rule>,
    /// For `ReplacePrefixMatch`: the configured prefix that matched (`/` for a match without a path condition,
    /// the whole path for an exact match, `None` for a regex match). Gateway API prefixes come without a
    /// trailing slash (except `/`).
    pub matched_prefix: Option<Arc<str>>,
    /// Position of the rule in `route.rules`, and of the match in that rule's `matches`.
    pub rule_index: usize,
    pub match_index: usize,
}

#[derive(Debug)]
struct Entry {
    route: Arc<Route>,
    rule: Arc<Rule>,
    rule_index: usize,
    match_index: usize,
    conditions: Conditions,
    matched_prefix: Option<Arc<str>>,
    /// The route's hostnames (empty = any host).
    hosts: Arc<[HostPattern]>,
}

impl Entry {
    fn matched(&self) -> Matched {
        Matched {
            route: self.route.clone(),
            rule: self.rule.clone(),
            matched_prefix: self.matched_prefix.clone(),
            rule_index: self.rule_index,
            match_index: self.match_index,
        }
    }

    fn accepts_host(&self, host: Option<&str>) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(host))
    }
}

#[derive(Debug)]
struct HostGroup {
    pattern: HostPattern,
    entries: Box<[u32]>,
}

#[derive(Debug, Default)]
enum Order {
    /// VirtualService: entries in document order, hostnames only filter.
    #[default]
    Document,
    /// Gateway API: hostname groups from most to least specific, then the entries of routes without hostnames.
    ByHostname { groups: Box<[HostGroup]>, any: Box<[u32]> },
}

/// All rules of all routes attached to one parent, sorted by precedence once when the snapshot is built.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub routes: Vec<Arc<Route>>,
    entries: Vec<Entry>,
    order: Order,
}

impl RouteTable {
    pub fn new(routes: Vec<Arc<Route>>) -> RouteTable {
        let document = routes.iter().any(|r| r.kind == RouteKind::VirtualService);
        let ages: Vec<(RouteKind, Age)> = routes.iter().map(|r| (r.kind, Age::of(r))).collect();
        let grpc_first = grpc_block_first(&ages);
        let default_match = [RouteMatch::default()];

        let mut keyed: Vec<(Option<SortKey>, Entry)> = Vec::new();
        for (position, (route, (_, age))) in routes.iter().zip(&ages).enumerate() {
            let hosts: Arc<[HostPattern]> = route.hostnames.iter().map(|h| HostPattern::compile(h)).collect();
            let block = usize::from((route.kind == RouteKind::Grpc) != grpc_first);
            for (rule_index, rule) in route.rules.iter().enumerate() {
                // Gateway API: a rule without matches is one `PathPrefix /` match.
                let matches = if rule.matches.is_empty() {
                    &default_match[..]
                } else {
                    &rule.matches[..]
                };
                for (match_index, m) in matches.iter().enumerate() {
                    let conditions = Conditions::compile(m, route.kind);
                    let key = (!document).then(|| {
                        SortKey::new(
                            block,
                            route.kind,
                            &conditions,
                            age.clone(),
                            (position, rule_index, match_index),
                        )
                    });
                    let entry = Entry {
                        route: route.clone(),
                        rule: rule.clone(),
                        rule_index,
                        match_index,
                        matched_prefix: conditions.matched_prefix().map(Arc::from),
                        conditions,
                        hosts: hosts.clone(),
                    };
                    keyed.push((key, entry));
                }
            }
        }
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        let entries: Vec<Entry> = keyed.into_iter().map(|(_, e)| e).collect();
        let order = if document {
            Order::Document
        } else {
            by_hostname(&entries)
        };
        RouteTable { routes, entries, order }
    }

    pub fn find(&self, req: &RequestView<'_>) -> Option<Matched> {
        match &self.order {
            Order::Document => self
                .entries
                .iter()
                .find(|e| e.accepts_host(req.host) && e.conditions.matches(req))
                .map(Entry::matched),
            Order::ByHostname { groups, any } => groups
                .iter()
                .filter(|g| g.pattern.matches(req.host))
                .find_map(|g| self.first_match(&g.entries, req))
                .or_else(|| self.first_match(any, req)),
        }
    }

    fn first_match(&self, indexes: &[u32], req: &RequestView<'_>) -> Option<Matched> {
        indexes
            .iter()
            .filter_map(|&i| self.entries.get(i as usize))
            .find(|e| e.conditions.matches(req))
            .map(Entry::matched)
    }

    /// Number of (route, rule, match) entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in precedence order, before hostname ranking: (route, rule index, match index). For
    /// config dumps and tests.
    pub fn precedence(&self) -> impl Iterator<Item = (&Arc<Route>, usize, usize)> {
        self.entries.iter().map(|e| (&e.route, e.rule_index, e.match_index))
    }
}

fn by_hostname(entries: &[Entry]) -> Order {
    let mut patterns: Vec<&HostPattern> = entries
        .iter()
        .flat_map(|e| e.hosts.iter())
        .filter(|p| **p != HostPattern::Any)
        .collect();
    patterns.sort_by(|a, b| b.specificity().cmp(&a.specificity()).then_with(|| a.cmp(b)));
    patterns.dedup();
    let indexes = |keep: &dyn Fn(&Entry) -> bool| -> Box<[u32]> {
        entries
            .iter()
            .enumerate()
            .filter(|(_, e)| keep(e))
            .filter_map(|(i, _)| u32::try_from(i).ok())
            .collect()
    };
    let groups = patterns
        .into_iter()
        .map(|p| HostGroup {
            pattern: p.clone(),
            entries: indexes(&|e| e.hosts.contains(p)),
        })
        .collect();
    let any = indexes(&|e| e.hosts.is_empty() || e.hosts.contains(&HostPattern::Any));
    Order::ByHostname { groups, any }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::model::{GrpcMethodMatch, HeaderMatch, PathMatch, QueryMatch, StringMatch};
    use http::HeaderName;
    use regex::Regex;

    struct R {
        kind: RouteKind,
        name: &'static str,
        namespace: &'static str,
        ts: Option<&'static str>,
        order: usize,
        hostnames: Vec<&'static str>,
        rules: Vec<Vec<RouteMatch>>,
    }

    fn r(name: &'static str, rules: Vec<Vec<RouteMatch>>) -> R {
        R {
            kind: RouteKind::Http,
            name,
            namespace: "ns",
            ts: None,
            order: 0,
            hostnames: vec![],
            rules,
        }
    }

    impl R {
        fn build(self) -> Arc<Route> {
            Arc::new(Route {
                kind: self.kind,
                namespace: self.namespace.into(),
                name: self.name.into(),
                creation_timestamp: self.ts.map(String::from),
                source_order: self.order,
                hostnames: self.hostnames.into_iter().map(String::from).collect(),
                rules: self
                    .rules
                    .into_iter()
                    .map(|matches| {
                        Arc::new(Rule {
                            matches,
                            ..Default::default()
                        })
                    })
                    .collect(),
            })
        }
    }

    fn table(routes: Vec<R>) -> RouteTable {
        RouteTable::new(routes.into_iter().map(R::build).collect())
    }

    fn prefix(p: &str) -> RouteMatch {
        RouteMatch {
            path: Some(PathMatch::Prefix(p.into())),
            ..Default::default()
        }
    }

    fn exact(p: &str) -> RouteMatch {
        RouteMatch {
            path: Some(PathMatch::Exact(p.into())),
            ..Default::default()
        }
    }

    fn regex(p: &str) -> RouteMatch {
        RouteMatch {
            path: Some(PathMatch::Regex(Regex::new(p).unwrap())),
            ..Default::default()
        }
    }

    fn header(name: &'static str, value: &str) -> HeaderMatch {
        HeaderMatch {
            name: HeaderName::from_static(name),
            value: StringMatch::Exact(value.into()),
            invert: false,
        }
    }

    fn query(name: &str, value: &str) -> QueryMatch {
        QueryMatch {
            name: name.into(),
            value: StringMatch::Exact(value.into()),
        }
    }

    struct Req {
        method: Method,
        path: &'static str,
        query: Option<&'static str>,
        host: Option<&'static str>,
        headers: HeaderMap,
    }

    fn get(path: &'static str) -> Req {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        Req {
            method: Method::GET,
            path,
            query,
            host: None,
            headers: HeaderMap::new(),
        }
    }

    impl Req {
        fn header(mut self, name: &'static str, value: &'static str) -> Req {
            self.headers.append(name, http::HeaderValue::from_static(value));
            self
        }
        fn host(mut self, host: &'static str) -> Req {
            self.host = Some(host);
            self
        }
        fn method(mut self, m: Method) -> Req {
            self.method = m;
            self
        }
    }

    /// (route name, rule index, match index) of the winner.
    fn winner(t: &RouteTable, req: &Req) -> Option<(String, usize, usize)> {
        let view = RequestView {
            method: &req.method,
            path: req.path,
            query: req.query,
            host: req.host,
            headers: &req.headers,
        };
        t.find(&view)
            .map(|m| (m.route.name.clone(), m.rule_index, m.match_index))
    }

    fn name_of(t: &RouteTable, req: &Req) -> Option<String> {
        winner(t, req).map(|w| w.0)
    }

    #[test]
    fn exact_beats_regex_beats_prefix() {
        let t = table(vec![
            r("prefix", vec![vec![prefix("/foo")]]),
            r("regex", vec![vec![regex("/fo+")]]),
            r("exact", vec![vec![exact("/foo")]]),
        ]);
        assert_eq!(name_of(&t, &get("/foo")).as_deref(), Some("exact"));
        assert_eq!(name_of(&t, &get("/fooo")).as_deref(), Some("regex"));
        assert_eq!(name_of(&t, &get("/foo/x")).as_deref(), Some("prefix"));
        assert_eq!(name_of(&t, &get("/bar")), None);
    }

    #[test]
    fn longer_regex_first() {
        let t = table(vec![
            r("short", vec![vec![regex("/f.*")]]),
            r("long", vec![vec![regex("/fo.*")]]),
        ]);
        assert_eq!(name_of(&t, &get("/foo")).as_deref(), Some("long"));
        assert_eq!(name_of(&t, &get("/fa")).as_deref(), Some("short"));
    }

    #[test]
    fn longer_prefix_first() {
        let t = table(vec![
            r("root", vec![vec![prefix("/")]]),
            r("foo", vec![vec![prefix("/foo")]]),
            r("foobar", vec![vec![prefix("/foo/bar")]]),
        ]);
        assert_eq!(name_of(&t, &get("/foo/bar/baz")).as_deref(), Some("foobar"));
        assert_eq!(name_of(&t, &get("/foo/barn")).as_deref(), Some("foo"));
        assert_eq!(name_of(&t, &get("/foobar")).as_deref(), Some("root"));
    }

    #[test]
    fn method_beats_headers() {
        let with_method = RouteMatch {
            method: Some(Method::GET),
            ..prefix("/foo")
        };
        let with_headers = RouteMatch {
            headers: vec![header("a", "1"), header("b", "2")],
            ..prefix("/foo")
        };
        let t = table(vec![
            r("headers", vec![vec![with_headers]]),
            r("method", vec![vec![with_method]]),
        ]);
        let req = get("/foo").header("a", "1").header("b", "2");
        assert_eq!(name_of(&t, &req).as_deref(), Some("method"));
        assert_eq!(name_of(&t, &req.method(Method::POST)).as_deref(), Some("headers"));
    }

    #[test]
    fn more_headers_beat_more_query_params() {
        let one_header = RouteMatch {
            headers: vec![header("a", "1")],
            query: vec![query("x", "1"), query("y", "1")],
            ..prefix("/")
        };
        let two_headers = RouteMatch {
            headers: vec![header("a", "1"), header("b", "1")],
            ..prefix("/")
        };
        let t = table(vec![
            r("one", vec![vec![one_header]]),
            r("two", vec![vec![two_headers]]),
        ]);
        assert_eq!(
            name_of(&t, &get("/?x=1&y=1").header("a", "1").header("b", "1")).as_deref(),
            Some("two")
        );
    }

    #[test]
    fn more_query_params_first() {
        let one = RouteMatch {
            query: vec![query("animal", "dolphin")],
            ..Default::default()
        };
        let two = RouteMatch {
            query: vec![query("animal", "dolphin"), query("color", "blue")],
            ..Default::default()
        };
        let t = table(vec![r("one", vec![vec![one]]), r("two", vec![vec![two]])]);
        assert_eq!(name_of(&t, &get("/?animal=dolphin&color=blue")).as_deref(), Some("two"));
        assert_eq!(
            name_of(&t, &get("/?animal=dolphin&color=yellow")).as_deref(),
            Some("one")
        );
    }

    #[test]
    fn no_path_ranks_as_prefix_root() {
        // HTTPRouteMatching: `PathPrefix /` (rule 0) vs a header-only match (rule 1): the header wins.
        let headers_only = RouteMatch {
            headers: vec![header("version", "two")],
            ..Default::default()
        };
        let t = table(vec![r(
            "matching",
            vec![vec![prefix("/")], vec![prefix("/v2"), headers_only]],
        )]);
        assert_eq!(
            winner(&t, &get("/").header("version", "two")),
            Some(("matching".into(), 1, 1))
        );
        assert_eq!(winner(&t, &get("/")), Some(("matching".into(), 0, 0)));
        assert_eq!(winner(&t, &get("/v2example")), Some(("matching".into(), 0, 0)));
        assert_eq!(winner(&t, &get("/v2/")), Some(("matching".into(), 1, 0)));
    }

    #[test]
    fn older_creation_timestamp_first() {
        let t = table(vec![
            R {
                ts: Some("2024-02-01T00:00:00Z"),
                order: 0,
                ..r("young", vec![vec![prefix("/")]])
            },
            R {
                ts: Some("2024-01-01T00:00:00Z"),
                order: 1,
                ..r("old", vec![vec![prefix("/")]])
            },
            R {
                ts: None,
                order: 2,
                ..r("none", vec![vec![prefix("/")]])
            },
        ]);
        assert_eq!(name_of(&t, &get("/")).as_deref(), Some("old"));
        let names: Vec<_> = t.precedence().map(|(r, _, _)| r.name.as_str()).collect();
        assert_eq!(names, ["old", "young", "none"]);
    }

    #[test]
    fn source_order_then_name() {
        let t = table(vec![
            r("b", vec![vec![prefix("/")]]),
            R {
                order: 1,
                ..r("a", vec![vec![prefix("/")]])
            },
        ]);
        assert_eq!(name_of(&t, &get("/")).as_deref(), Some("b"), "source order 0 beats 1");
        let t = table(vec![
            R {
                namespace: "ns",
                ..r("b", vec![vec![prefix("/")]])
            },
            R {
                namespace: "ns",
                ..r("a", vec![vec![prefix("/")]])
            },
            R {
                namespace: "a-b",
                ..r("z", vec![vec![prefix("/")]])
            },
        ]);
        // "{namespace}/{name}" as one string: "a-b/z" < "ns/a" < "ns/b".
        let names: Vec<_> = t.precedence().map(|(r, _, _)| r.name.as_str()).collect();
        assert_eq!(names, ["z", "a", "b"]);
    }

    #[test]
    fn rule_index_then_match_index() {
        let t = table(vec![r(
            "r",
            vec![vec![prefix("/a"), prefix("/b")], vec![prefix("/a"), prefix("/b")]],
        )]);
        assert_eq!(winner(&t, &get("/a")), Some(("r".into(), 0, 0)));
        assert_eq!(winner(&t, &get("/b")), Some(("r".into(), 0, 1)));
        let order: Vec<_> = t.precedence().map(|(_, rule, m)| (rule, m)).collect();
        assert_eq!(order, [(0, 0), (0, 1), (1, 0), (1, 1)]);
    }

    #[test]
    fn rule_without_matches_matches_everything() {
        let t = table(vec![r("catch-all", vec![vec![]]), r("foo", vec![vec![prefix("/foo")]])]);
        assert_eq!(name_of(&t, &get("/foo/x")).as_deref(), Some("foo"));
        let m = t
            .find(&RequestView {
                method: &Method::GET,
                path: "/x",
                query: None,
                host: None,
                headers: &HeaderMap::new(),
            })
            .unwrap();
        assert_eq!(m.route.name, "catch-all");
        assert_eq!(m.matched_prefix.as_deref(), Some("/"));
    }

    #[test]
    fn matched_prefix_is_the_configured_prefix() {
        let t = table(vec![
            r("p", vec![vec![prefix("/foo/")]]),
            r("e", vec![vec![exact("/x")]]),
            r("re", vec![vec![regex("/r.*")]]),
        ]);
        let find = |path| {
            t.find(&RequestView {
                method: &Method::GET,
                path,
                query: None,
                host: None,
                headers: &HeaderMap::new(),
            })
            .unwrap()
            .matched_prefix
        };
        assert_eq!(find("/foo/bar").as_deref(), Some("/foo"));
        assert_eq!(find("/x").as_deref(), Some("/x"));
        assert_eq!(find("/rr"), None);
    }

    fn grpc(service: Option<&str>, method: Option<&str>, headers: usize) -> RouteMatch {
        let sm = |s: &str| {
            if let Some(re) = s.strip_prefix("re:") {
                StringMatch::Regex(Regex::new(re).unwrap())
            } else {
                StringMatch::Exact(s.into())
            }
        };
        RouteMatch {
            grpc: Some(GrpcMethodMatch {
                service: service.map(sm),
                method: method.map(sm),
            }),
            headers: (0..headers).map(|_| header("x-test", "1")).collect(),
            ..Default::default()
        }
    }

    fn grpc_route(name: &'static str, m: RouteMatch) -> R {
        R {
            kind: RouteKind::Grpc,
            ..r(name, vec![vec![m]])
        }
    }

    #[test]
    fn grpc_precedence() {
        // Longer exact service first, even against a shorter service with a method.
        let t = table(vec![
            grpc_route("short-svc-method", grpc(Some("a.B"), Some("Call"), 0)),
            grpc_route("long-svc", grpc(Some("a.Bc.D"), None, 0)),
        ]);
        assert_eq!(name_of(&t, &get("/a.Bc.D/Call")).as_deref(), Some("long-svc"));
        assert_eq!(name_of(&t, &get("/a.B/Call")).as_deref(), Some("short-svc-method"));
        // Same service: a method beats none; then headers.
        let t = table(vec![
            grpc_route("svc-headers", grpc(Some("a.B"), None, 2)),
            grpc_route("svc-method", grpc(Some("a.B"), Some("Call"), 0)),
            grpc_route("svc-method-header", grpc(Some("a.B"), Some("Call"), 1)),
        ]);
        assert_eq!(
            name_of(&t, &get("/a.B/Call").header("x-test", "1")).as_deref(),
            Some("svc-method-header")
        );
        assert_eq!(name_of(&t, &get("/a.B/Call")).as_deref(), Some("svc-method"));
        assert_eq!(
            name_of(&t, &get("/a.B/Other").header("x-test", "1")).as_deref(),
            Some("svc-headers")
        );
        // Regex service after exact, before none.
        let t = table(vec![
            grpc_route("none", grpc(None, Some("Call"), 0)),
            grpc_route("regex", grpc(Some("re:a\\..*"), Some("Call"), 0)),
            grpc_route("exact", grpc(Some("a.B"), Some("Call"), 0)),
        ]);
        assert_eq!(name_of(&t, &get("/a.B/Call")).as_deref(), Some("exact"));
        assert_eq!(name_of(&t, &get("/a.X/Call")).as_deref(), Some("regex"));
        assert_eq!(name_of(&t, &get("/b.X/Call")).as_deref(), Some("none"));
    }

    #[test]
    fn http_and_grpc_blocks_ordered_by_oldest_route() {
        let routes = || {
            vec![
                R {
                    order: 1,
                    ..r("http", vec![vec![prefix("/")]])
                },
                R {
                    order: 0,
                    ..grpc_route("grpc", grpc(Some("a.B"), None, 0))
                },
            ]
        };
        let t = table(routes());
        assert_eq!(name_of(&t, &get("/a.B/Call")).as_deref(), Some("grpc"));
        assert_eq!(name_of(&t, &get("/other")).as_deref(), Some("http"));
        let mut swapped = routes();
        swapped[0].order = 0;
        swapped[1].order = 1;
        let t = table(swapped);
        assert_eq!(name_of(&t, &get("/a.B/Call")).as_deref(), Some("http"));
    }

    #[test]
    fn virtual_service_keeps_document_order() {
        let vs = |name, rules| R {
            kind: RouteKind::VirtualService,
            ..r(name, rules)
        };
        let t = table(vec![
            vs("first", vec![vec![prefix("/")], vec![exact("/foo")]]),
            vs("second", vec![vec![exact("/foo")]]),
        ]);
        assert_eq!(winner(&t, &get("/foo")), Some(("first".into(), 0, 0)));
        let order: Vec<_> = t.precedence().map(|(r, rule, m)| (r.name.as_str(), rule, m)).collect();
        assert_eq!(order, [("first", 0, 0), ("first", 1, 0), ("second", 0, 0)]);
        // Hostnames still filter.
        let t = table(vec![
            R {
                hostnames: vec!["a.example"],
                ..vs("a", vec![vec![prefix("/")]])
            },
            vs("b", vec![vec![prefix("/")]]),
        ]);
        assert_eq!(name_of(&t, &get("/").host("b.example")).as_deref(), Some("b"));
        assert_eq!(name_of(&t, &get("/").host("a.example")).as_deref(), Some("a"));
    }

    #[test]
    fn most_specific_hostname_wins() {
        let t = table(vec![
            r("any", vec![vec![exact("/x")]]),
            R {
                hostnames: vec!["*.example.com"],
                ..r("short-wild", vec![vec![exact("/x")]])
            },
            R {
                hostnames: vec!["*.foo.example.com"],
                ..r("long-wild", vec![vec![prefix("/")]])
            },
            R {
                hostnames: vec!["a.foo.example.com"],
                ..r("exact", vec![vec![prefix("/only")]])
            },
        ]);
        // An exact hostname beats everything, even against a more specific path elsewhere.
        assert_eq!(
            name_of(&t, &get("/only").host("a.foo.example.com")).as_deref(),
            Some("exact")
        );
        // Falls back to the next hostname when the exact host's route has no matching rule.
        assert_eq!(
            name_of(&t, &get("/x").host("a.foo.example.com")).as_deref(),
            Some("long-wild")
        );
        assert_eq!(
            name_of(&t, &get("/x").host("b.bar.example.com")).as_deref(),
            Some("short-wild")
        );
        assert_eq!(name_of(&t, &get("/x").host("example.com")).as_deref(), Some("any"));
        assert_eq!(name_of(&t, &get("/x")).as_deref(), Some("any"));
        assert_eq!(name_of(&t, &get("/y").host("example.com")), None);
    }
}
