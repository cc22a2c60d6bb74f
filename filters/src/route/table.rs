//! Rule selection with Gateway API precedence. (Implementation in progress.)

use std::sync::Arc;

use http::{HeaderMap, Method};

use super::model::{Route, Rule};

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
    /// For `ReplacePrefixMatch`: the prefix that matched (`None` when the match was not a prefix match).
    pub matched_prefix: Option<String>,
}

/// All rules of all routes attached to one parent, sorted by precedence once when the snapshot is built.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub routes: Vec<Arc<Route>>,
}

impl RouteTable {
    pub fn new(routes: Vec<Arc<Route>>) -> RouteTable {
        RouteTable { routes }
    }

    pub fn find(&self, _req: &RequestView<'_>) -> Option<Matched> {
        None
    }
}
