//! Routing: the compiled model ([`model`]) and the match table ([`table`]) that picks a rule for a request.

pub mod model;
pub mod table;

pub use model::*;
pub use table::{Matched, RequestView, RouteTable};
