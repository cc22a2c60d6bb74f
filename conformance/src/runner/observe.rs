//! A response turned into what the checks compare: status, response headers, and the echo's description of
//! the request that reached it (ECHO-FORMAT.md): echo-basic JSON for the Gateway profile, Istio-style
//! `Key=value` text for the mesh profile, possibly inside a gRPC frame.

use std::collections::BTreeMap;

use serde_json::Value;

use super::request::HttpResponse;

/// What the echo said it received. All fields empty when the proxy answered itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EchoView {
    /// Request URI as received (path and query).
    pub path: String,
    pub host: String,
    pub method: String,
    pub proto: String,
    pub namespace: String,
    /// The answering pod (`pod` / `Hostname`).
    pub pod: String,
    /// Lower-case name → values.
    pub headers: BTreeMap<String, Vec<String>>,
}

impl EchoView {
    pub fn header(&self, name: &str) -> Option<&Vec<String>> {
        self.headers.get(&name.to_ascii_lowercase())
    }
}

#[derive(Debug, Clone)]
pub struct Observed {
    /// HTTP status; for gRPC, 200 when the call returned OK (the echo client's convention).
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub echo: EchoView,
    pub grpc_status: Option<u32>,
}

impl Observed {
    pub fn location(&self) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("location"))
            .map(|(_, v)| v.as_str())
    }
}

/// The Gateway harness: the body is an echo only when `Content-Type` is exactly `application/json`;
/// otherwise every field is empty and the method is the request's.
pub fn gateway(response: HttpResponse, request_method: &str) -> Observed {
    let is_json = response
        .headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("content-type") && v == "application/json");
    let echo = if is_json {
        json_echo(&response.body)
    } else {
        EchoView {
            method: request_method.to_string(),
            ..EchoView::default()
        }
    };
    Observed {
        status: response.status,
        headers: response.headers,
        echo,
        grpc_status: None,
    }
}

/// The mesh harness: `Key=value` lines of the body; gRPC responses are unwrapped first.
pub fn mesh(response: HttpResponse, grpc: bool) -> Observed {
    if !grpc {
        let echo = text_echo(&String::from_utf8_lossy(&response.body));
        return Observed {
            status: response.status,
            headers: response.headers,
            echo,
            grpc_status: None,
        };
    }
    let grpc_status = response
        .trailers
        .iter()
        .chain(response.headers.iter())
        .find(|(n, _)| n.eq_ignore_ascii_case("grpc-status"))
        .and_then(|(_, v)| v.trim().parse::<u32>().ok());
    let status = match (response.status, grpc_status) {
        (200, Some(0)) => 200,
        (200, Some(code)) => grpc_to_http(code),
        // No grpc-status at all: not a gRPC answer; keep what HTTP said (e.g. a proxy's 503).
        (200, None) => 0,
        (other, _) => other,
    };
    let echo = grpc_payload(&response.body)
        .map(|text| text_echo(&text))
        .unwrap_or_default();
    Observed {
        status,
        headers: response.headers,
        echo,
        grpc_status,
    }
}

pub fn json_echo(body: &[u8]) -> EchoView {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return EchoView::default();
    };
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Some(map) = v.get("headers").and_then(Value::as_object) {
        for (name, values) in map {
            let values = match values {
                Value::Array(items) => items.iter().filter_map(|i| i.as_str().map(str::to_string)).collect(),
                Value::String(one) => vec![one.clone()],
                _ => Vec::new(),
            };
            headers.entry(name.to_ascii_lowercase()).or_default().extend(values);
        }
    }
    EchoView {
        path: s("path"),
        host: s("host"),
        method: s("method"),
        proto: s("proto"),
        namespace: s("namespace"),
        pod: s("pod"),
        headers,
    }
}

/// Istio echo text: the first `Key=` of each scalar wins; `RequestHeader=Name:value` accumulates. A leading
/// `[0 body] `-style prefix (what the echo client prints) is tolerated.
pub fn text_echo(text: &str) -> EchoView {
    let mut echo = EchoView::default();
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        let line = match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
            Some((_, rest)) => rest,
            None => line,
        };
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key == "RequestHeader" {
            if let Some((name, v)) = value.split_once(':') {
                echo.headers
                    .entry(name.to_ascii_lowercase())
                    .or_default()
                    .push(v.to_string());
            }
            continue;
        }
        if !seen.insert(key.to_string()) {
            continue;
        }
        let slot = match key {
            "URL" => &mut echo.path,
            "Host" => &mut echo.host,
            "Method" => &mut echo.method,
            "Proto" => &mut echo.proto,
            "Namespace" => &mut echo.namespace,
            "Hostname" => &mut echo.pod,
            _ => continue,
        };
        *slot = value.to_string();
    }
    echo
}

/// The text inside the response's gRPC messages: raw text (this project's echo), or the `message` string of
/// an Istio `EchoResponse` protobuf (field 1).
pub fn grpc_payload(body: &[u8]) -> Option<String> {
    let mut rest = body;
    let mut out = String::new();
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let message = rest.get(5..5 + len)?;
        rest = &rest[5 + len..];
        out.push_str(&protobuf_message_field(message).unwrap_or_else(|| String::from_utf8_lossy(message).into_owned()));
    }
    (!out.is_empty()).then_some(out)
}

/// Field 1 (length-delimited) of a protobuf message, when the bytes are one.
fn protobuf_message_field(message: &[u8]) -> Option<String> {
    if message.first() != Some(&0x0a) {
        return None;
    }
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let b = *message.get(i)?;
        len |= ((b & 0x7f) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
    let text = message.get(i..i + len)?;
    String::from_utf8(text.to_vec()).ok()
}

/// gRPC status → the HTTP status a gRPC-aware client reports (the inverse of the usual HTTP→gRPC mapping).
pub fn grpc_to_http(code: u32) -> u16 {
    match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;

    fn response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
        HttpResponse {
            status,
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            body: Bytes::copy_from_slice(body),
            trailers: Vec::new(),
        }
    }

    #[test]
    fn gateway_reads_json_only_with_the_exact_content_type() {
        let body = br#"{"path":"/v2?x=1","host":"h","method":"GET","headers":{"X-A":["1","2"]},"namespace":"ns","pod":"p-1-2"}"#;
        let o = gateway(response(200, &[("content-type", "application/json")], body), "GET");
        assert_eq!(o.echo.path, "/v2?x=1");
        assert_eq!(o.echo.header("x-a").unwrap(), &vec!["1".to_string(), "2".to_string()]);
        let o = gateway(
            response(200, &[("content-type", "application/json; charset=utf-8")], body),
            "OPTIONS",
        );
        assert_eq!(
            o.echo,
            EchoView {
                method: "OPTIONS".into(),
                ..EchoView::default()
            }
        );
    }

    #[test]
    fn text_echo_first_key_wins_and_headers_accumulate() {
        let echo = text_echo(
            "ServiceVersion=v2\nURL=/a?b\nHost=echo\n[0 body] Namespace=mesh\nRequestHeader=X-A:1\nRequestHeader=X-A:2\nRequestHeader=Version:two\nHostname=echo-v2-x-y\nHostname=other\n",
        );
        assert_eq!(echo.path, "/a?b");
        assert_eq!(echo.namespace, "mesh");
        assert_eq!(echo.pod, "echo-v2-x-y");
        assert_eq!(echo.header("X-A").unwrap().join(","), "1,2");
    }

    #[test]
    fn grpc_frames_and_statuses() {
        let text = b"Hostname=echo-v1-a-b\nRequestHeader=X-Test-Case:set\n";
        let mut body = vec![0, 0, 0, 0, text.len() as u8];
        body.extend_from_slice(text);
        let mut r = response(200, &[("content-type", "application/grpc")], &body);
        r.trailers = vec![("grpc-status".into(), "0".into())];
        let o = mesh(r.clone(), true);
        assert_eq!((o.status, o.echo.pod.as_str()), (200, "echo-v1-a-b"));
        r.trailers = vec![("grpc-status".into(), "14".into())];
        assert_eq!(mesh(r.clone(), true).status, 503);
        r.trailers.clear();
        assert_eq!(mesh(r, true).status, 0);
        // An Istio EchoResponse protobuf: field 1, length 5.
        let proto = [0u8, 0, 0, 0, 7, 0x0a, 5, b'a', b'=', b'b', b'c', b'd'];
        assert_eq!(grpc_payload(&proto).unwrap(), "a=bcd");
        assert_eq!(mesh(response(503, &[], b"no healthy upstream"), true).status, 503);
    }
}
