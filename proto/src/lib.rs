//! Wire types for protocols no kept crate provides: the Istio CA service and Istio workload discovery (added with
//! the features that speak them), and the few Envoy ext_authz messages ([`ext_authz`]).

pub mod ext_authz;
