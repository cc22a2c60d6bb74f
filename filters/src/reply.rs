//! Bodies and local replies shared by the layers.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};

use crate::Body;
use crate::context::ResponseFlag;

pub fn empty_body() -> Body {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed()
}

pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A reply the proxy makes itself: plain-text body, and the Envoy response flag when there is one.
pub fn local_reply(status: StatusCode, flag: Option<&'static str>, body: &'static str) -> Response<Body> {
    let mut response = Response::new(if body.is_empty() { empty_body() } else { full_body(body) });
    *response.status_mut() = status;
    if !body.is_empty() {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    if let Some(flag) = flag {
        response.extensions_mut().insert(ResponseFlag(flag));
    }
    response
}
