//! Tower layers for the waypoint's L7 policies. Each policy is one layer with its own compiled config type,
//! so the dependency arrow points one way (waypoint → filters) and each layer is testable with plain structs.
//! Routing, header rewrites, redirects, retries, timeouts and authorization land here issue by issue.
