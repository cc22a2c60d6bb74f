//! The readiness and admin listeners.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::Ipv4Addr;

use http::{Request, StatusCode};
use waypoint_conformance::client::{self, empty};
use waypoint_conformance::mesh::{Mesh, PodSpec, PortSpec, ServiceSpec};

async fn get(addr: std::net::SocketAddr, path: &str) -> client::Reply {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut send = client::http1(tcp).await.unwrap();
    let req = Request::get(path).header("host", "admin").body(empty()).unwrap();
    client::send1(&mut send, req).await.unwrap()
}

#[tokio::test]
async fn readiness_and_config_dump() {
    let mesh = Mesh::builder()
        .service(ServiceSpec::new("ops", "api", Ipv4Addr::new(10, 96, 8, 1)).port(PortSpec::http(80, 8080)))
        .pod(
            PodSpec::new("ops", "api-0")
                .labels(&[("app", "api")])
                .service_account("api"),
        )
        .extra_config("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w, namespace: ops}\n")
        .start()
        .await
        .unwrap();
    let ready = get(mesh.readiness_addr(), "/healthz/ready").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(
        get(mesh.readiness_addr(), "/config_dump").await.status,
        StatusCode::NOT_FOUND,
        "admin only on admin"
    );

    let dump = get(mesh.admin_addr(), "/config_dump").await;
    assert_eq!(dump.status, StatusCode::OK);
    assert_eq!(dump.headers["content-type"], "application/json");
    let json = dump.json();
    assert_eq!(json["snapshot"]["generation"], 1);
    assert_eq!(json["identity"], mesh.waypoint_identity());
    let binding = &json["snapshot"]["services"]["10.96.8.1:80"];
    assert_eq!(binding["name"], "api");
    assert_eq!(binding["hostname"], "api.ops.svc.cluster.local");
    let ep = &binding["backend"]["endpoints"][0];
    assert_eq!(ep["identity"], "spiffe://cluster.local/ns/ops/sa/api");
    assert_eq!(ep["addr"], format!("{}:8080", mesh.pod_ip("api-0")));
    assert_eq!(ep["hbone"], format!("{}:15008", mesh.pod_ip("api-0")));
    assert_eq!(json["snapshot"]["skipped"][0], "example.com/v1/Widget ops/w");
    assert_eq!(json["rejectedUpdates"], 0);
}
