//! Routing: the compiled model ([`model`]), the match table ([`table`]) that picks a rule for a request, and
//! the tower layer ([`RouteLayer`]) that runs it.

mod layer;
mod matching;
pub mod model;
mod precedence;
pub mod table;

pub use layer::{RouteLayer, RouteService};
pub use model::*;
pub use table::{Matched, RequestView, RouteTable};
