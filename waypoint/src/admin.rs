//! Readiness (`:15021/healthz/ready`) and the localhost admin listener (`:15000`).
//!
//! Readiness is 200 only while config and certificates are loaded and no drain has started, so Kubernetes
//! stops sending new connections as soon as SIGTERM arrives.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::proxy::Ctx;

#[derive(Clone, Copy)]
pub enum Role {
    Readiness,
    Admin,
}

pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>, role: Role) {
    let stop = ctx.drain.token();
    loop {
        let accepted = tokio::select! {
            // Readiness keeps answering (503) during a drain; the admin listener keeps serving too.
            _ = stop.cancelled(), if false => break,
            a = listener.accept() => a,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(route(&ctx, role, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    r
}

fn ready(ctx: &Ctx) -> Response<Full<Bytes>> {
    if ctx.drain.is_draining() {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        text(StatusCode::OK, "ready\n")
    }
}

fn route(ctx: &Ctx, role: Role, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (role, req.uri().path()) {
        (_, "/healthz/ready") | (Role::Admin, "/ready") => ready(ctx),
        (Role::Admin, "/config_dump") => config_dump(ctx),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn config_dump(ctx: &Ctx) -> Response<Full<Bytes>> {
    let snapshot = ctx.config.load();
    let tls = ctx.tls.current();
    let dump = serde_json::json!({
        "snapshot": &*snapshot,
        "identity": tls.material.identity.as_ref().map(|i| i.to_string()),
        "rejectedUpdates": ctx.config.rejected_count(),
        "lastRejection": ctx.config.last_error(),
        "draining": ctx.drain.is_draining(),
        "authorization": {
            "allowed": ctx.authz_counters.allowed.load(std::sync::atomic::Ordering::Relaxed),
            "denied": ctx.authz_counters.denied.load(std::sync::atomic::Ordering::Relaxed),
            "audited": ctx.authz_counters.audited.load(std::sync::atomic::Ordering::Relaxed),
            "dryRunDenied": ctx.authz_counters.dry_run_denied.load(std::sync::atomic::Ordering::Relaxed),
        },
        "upstream": {
            "hboneConnections": ctx.upstream.hbone.connection_count(),
            "idleHttp1Connections": ctx.upstream.http.idle_h1(),
            // Per backend key: circuit breaker limits and in-use counts, each endpoint's health.
            "backends": ctx.upstream.registry.dump(),
        },
    });
    match serde_json::to_vec_pretty(&dump) {
        Ok(body) => {
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}
