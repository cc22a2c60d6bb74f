//! Wire types for protocols no kept crate provides: the Istio CA service and Istio workload discovery.
//! They are added with the features that speak them (certificates from istiod, xDS).
