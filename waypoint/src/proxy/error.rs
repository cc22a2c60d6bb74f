//! Every way a request or tunnel can fail, mapped once to an HTTP status and Envoy's short response flag (the
//! flag is what Istio telemetry reports in `response_flags`).

use http::StatusCode;

use waypoint_filters::breaker::Overflow;

use crate::hbone::client::HboneError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no service bound to {0}")]
    NoRoute(String),
    #[error("no healthy upstream for {0}")]
    NoHealthyUpstream(String),
    #[error("upstream connect failure: {0}")]
    UpstreamConnect(String),
    #[error("upstream identity mismatch: {0}")]
    IdentityMismatch(String),
    #[error("upstream reset: {0}")]
    UpstreamReset(String),
    /// HTTP/2 `REFUSED_STREAM`: the endpoint did not process the request (safe to retry anywhere).
    #[error("upstream refused the stream: {0}")]
    UpstreamRefusedStream(String),
    #[error("upstream request timeout")]
    UpstreamTimeout,
    /// A circuit breaker limit of the backend (`connectionPool`) is full.
    #[error("upstream overflow: {0}")]
    Overflow(Overflow),
    #[error("bad request: {0}")]
    BadRequest(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute(_) => StatusCode::NOT_FOUND,
            ProxyError::NoHealthyUpstream(_)
            | ProxyError::UpstreamConnect(_)
            | ProxyError::IdentityMismatch(_)
            | ProxyError::UpstreamReset(_)
            | ProxyError::UpstreamRefusedStream(_)
            | ProxyError::Overflow(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// Envoy's short response flag.
    pub fn flag(&self) -> &'static str {
        match self {
            ProxyError::NoRoute(_) => "NR",
            ProxyError::NoHealthyUpstream(_) => "UH",
            ProxyError::UpstreamConnect(_) | ProxyError::IdentityMismatch(_) => "UF",
            ProxyError::UpstreamReset(_) | ProxyError::UpstreamRefusedStream(_) => "UR",
            ProxyError::UpstreamTimeout => "UT",
            ProxyError::Overflow(_) => "UO",
            ProxyError::BadRequest(_) => "DPE",
        }
    }

    /// The body of the local reply, worded as Envoy words it so existing runbooks still match.
    pub fn body(&self) -> &'static str {
        match self {
            ProxyError::NoRoute(_) => "route not found\n",
            ProxyError::NoHealthyUpstream(_) => "no healthy upstream\n",
            ProxyError::UpstreamConnect(_) | ProxyError::IdentityMismatch(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure\n"
            }
            ProxyError::UpstreamReset(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination\n"
            }
            ProxyError::UpstreamRefusedStream(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: remote refused stream reset\n"
            }
            ProxyError::UpstreamTimeout => "upstream request timeout\n",
            ProxyError::Overflow(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: overflow\n"
            }
            ProxyError::BadRequest(_) => "bad request\n",
        }
    }
}

impl From<HboneError> for ProxyError {
    fn from(e: HboneError) -> Self {
        match e {
            HboneError::IdentityMismatch { .. } => ProxyError::IdentityMismatch(e.to_string()),
            HboneError::H2 { .. } => ProxyError::UpstreamReset(e.to_string()),
            _ => ProxyError::UpstreamConnect(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_statuses() {
        let cases = [
            (ProxyError::NoRoute("x".into()), 404, "NR"),
            (ProxyError::NoHealthyUpstream("x".into()), 503, "UH"),
            (ProxyError::UpstreamConnect("x".into()), 503, "UF"),
            (ProxyError::IdentityMismatch("x".into()), 503, "UF"),
            (ProxyError::UpstreamReset("x".into()), 503, "UR"),
            (ProxyError::UpstreamRefusedStream("x".into()), 503, "UR"),
            (ProxyError::UpstreamTimeout, 504, "UT"),
            (ProxyError::Overflow(Overflow::Pending), 503, "UO"),
        ];
        for (e, status, flag) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
            assert_eq!(e.flag(), flag, "{e}");
        }
    }
}
