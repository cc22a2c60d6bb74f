//! What every layer's inner service looks like, and the one idiom they all use to call it.

use std::convert::Infallible;

use http::{Request, Response};
use tower::Service;

use crate::{Body, ResponseFuture};

/// The services the layers wrap: HTTP in, HTTP out, failures as responses, cloneable and `Send`.
pub trait HttpService:
    Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send + 'static> + Clone + Send + 'static
{
}

impl<S> HttpService for S where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send + 'static>
        + Clone
        + Send
        + 'static
{
}

/// Takes the service `poll_ready` just readied and leaves a fresh clone in its place (tower's usual way to move
/// a ready service into a future).
pub(crate) fn take_ready<S: Clone>(slot: &mut S) -> S {
    let clone = slot.clone();
    std::mem::replace(slot, clone)
}

/// Calls the ready service and boxes its future. Boxing in a plain generic function (rather than inside an
/// `async` block) keeps the inner future's type out of the async block, which rustc cannot prove `Send` for
/// (the `dyn Error` lifetime in `Body` becomes higher-ranked there).
pub(crate) fn call_ready<S: HttpService>(slot: &mut S, req: Request<Body>) -> ResponseFuture {
    Box::pin(take_ready(slot).call(req))
}

/// Readies a clone of `svc` and calls it, boxed for the same reason as [`call_ready`].
pub(crate) fn oneshot<S: HttpService>(svc: S, req: Request<Body>) -> ResponseFuture {
    Box::pin(tower::ServiceExt::oneshot(svc, req))
}
