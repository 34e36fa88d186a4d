//! `HostAgentServer` on one loopback port, driven over every protocol it
//! serves: gRPC (our `GrpcTransport`, hand-made h2c frames), gRPC-Web
//! (hand-made frames over HTTP/1.1), Connect binary (our
//! `ConnectTransport`, hand-made over h2c) and Connect JSON (hand-made over
//! HTTP/1.1 and h2c), plain and over TLS; plus the framing's edges: gzip
//! both ways, `connect-timeout-ms`, unknown routes, oversized bodies,
//! wrong tokens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::pki::{Pki, pki};

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::http::{HeaderMap, Method, Request, StatusCode, Version};
use bytes::Bytes;
use common::wire as hand;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use sandbox_snapshots::agent::{
    AgentCode, AgentOp, CreateSandboxRequest, CreateSnapshotRequest, DeleteSnapshotRequest,
    DestroySandboxRequest, Fault, Hold, HostInfo, ServerTls, SnapshotKey,
};
use sandbox_snapshots::*;
use serde_json::Value;
use tokio::sync::oneshot;

const TOKEN: &str = "s3cret";
const SERVICE: &str = "/hostagent.v1.HostAgentService";
/// A snapshot every rig holds.
const SEED: &str = "tpl-seed";
const LIMIT: usize = 64 * 1024 * 1024;

/// A server in front of a seeded in-memory agent, stopped on drop.
struct Rig {
    addr: SocketAddr,
    agent: Arc<MemoryHostAgent>,
    /// A running sandbox on the agent.
    sandbox: SandboxId,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Rig {
    async fn new() -> Rig {
        Self::with_server(|s| s).await
    }

    async fn with_server(configure: impl FnOnce(HostAgentServer) -> HostAgentServer) -> Rig {
        let agent = Arc::new(MemoryHostAgent::new());
        let sandbox = SandboxId::new();
        agent.add_sandbox(sandbox, "running", 2, 512);
        agent.put_snapshot(SEED, 4096, None);
        agent.add_base_template("base-ubuntu");
        agent.set_host_info(Some(
            HostInfo::new("firecracker", "1.7.0", "4.0.0", "x86_64").kernel("6.1.0"),
        ));
        let server =
            configure(HostAgentServer::new(agent.clone()).with_token(BearerToken::new(TOKEN)));
        let (stop, stopped) = oneshot::channel::<()>();
        let (addr, task) = server
            .spawn("127.0.0.1:0".parse().unwrap(), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        Rig {
            addr,
            agent,
            sandbox,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn target(&self) -> HostTarget {
        HostTarget {
            id: HostId::new(),
            address: self.addr.to_string(),
        }
    }

    /// Stops the server and waits until it has finished.
    async fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

// ------------------------------------------------------------ raw HTTP

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Http {
    H1,
    H2c,
}

const BOTH: [Http; 2] = [Http::H1, Http::H2c];

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {:?} {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The Connect error code of an error answer.
    fn connect_code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }

    /// `grpc-status`, from the headers (trailers-only) or the trailers.
    fn grpc_status(&self) -> Option<String> {
        self.headers
            .get("grpc-status")
            .or_else(|| self.trailers.as_ref()?.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

async fn send(
    http: Http,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    send_with_method(http, addr, Method::POST, path, headers, body).await
}

async fn send_with_method(
    http: Http,
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(http == Http::H2c)
        .build_http::<Full<Bytes>>();
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body.into())).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(request))
        .await
        .expect("an answer within 20 s")
        .unwrap();
    collect(response).await
}

async fn collect<B>(response: ::http::Response<B>) -> Reply
where
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

fn auth() -> String {
    format!("Bearer {TOKEN}")
}

/// A Connect JSON call with the right token.
async fn connect_json(http: Http, addr: SocketAddr, method: &str, body: &str) -> Reply {
    let auth = auth();
    send(
        http,
        addr,
        &format!("{SERVICE}/{method}"),
        &[
            ("content-type", "application/json"),
            ("connect-protocol-version", "1"),
            ("authorization", &auth),
        ],
        body.to_owned(),
    )
    .await
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// A length-prefixed gRPC / gRPC-Web frame.
fn frame(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The frames of a gRPC / gRPC-Web body: (flags, payload).
fn frames(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        out.push((body[0], body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    assert!(body.is_empty(), "a partial frame is left: {body:?}");
    out
}

// --------------------------------------------- our clients, every RPC

#[derive(Debug, Clone, Copy)]
enum Ours {
    Grpc,
    Connect,
}

fn transport(kind: Ours, token: &str) -> Arc<dyn AgentTransport> {
    let token = BearerToken::new(token);
    match kind {
        Ours::Grpc => Arc::new(GrpcTransport::new(GrpcConfig::default().token(token))),
        Ours::Connect => Arc::new(ConnectTransport::new(ConnectConfig::default().token(token))),
    }
}

fn key(k: &str) -> SnapshotKey {
    SnapshotKey::parse(k).unwrap()
}

/// Every RPC, an error code and a wrong token, through one of our clients.
async fn every_rpc_through(kind: Ours) {
    let rig = Rig::new().await;
    let agent = transport(kind, TOKEN).agent(&rig.target()).unwrap();
    let what = format!("{kind:?}");

    let info = agent.host_info().await.unwrap();
    assert_eq!(
        (info.vmm.as_str(), info.kernel_version.as_str()),
        ("firecracker", "6.1.0"),
        "{what}"
    );
    let sandboxes = agent.list_sandboxes().await.unwrap();
    assert!(
        sandboxes
            .sandboxes
            .iter()
            .any(|s| s.sandbox_id == rig.sandbox.to_string() && s.status == "running"),
        "{what}: {sandboxes:?}"
    );
    let created = agent
        .create_snapshot(CreateSnapshotRequest::new(rig.sandbox, key("tpl-ours")))
        .await
        .unwrap();
    assert_eq!(created.key, "tpl-ours", "{what}");
    assert_eq!(created.compat.map(|c| c.vmm), Some("firecracker".into()));
    let listed = agent.list_snapshots().await.unwrap();
    let mut keys: Vec<_> = listed.iter().map(|s| s.key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["tpl-ours", SEED], "{what}");
    agent
        .delete_snapshot(DeleteSnapshotRequest::new(key("tpl-ours")))
        .await
        .unwrap();
    assert!(!rig.agent.has_snapshot("tpl-ours"), "{what}");
    let restored = SandboxId::new();
    let started = agent
        .create_sandbox(CreateSandboxRequest::new(restored, key(SEED)))
        .await
        .unwrap();
    assert_eq!(started.sandbox_id, restored.to_string(), "{what}");
    agent
        .destroy_sandbox(DestroySandboxRequest::new(restored))
        .await
        .unwrap();
    assert_eq!(rig.agent.sandbox_status(restored), None, "{what}");

    let missing = agent
        .delete_snapshot(DeleteSnapshotRequest::new(key("tpl-missing")))
        .await
        .unwrap_err();
    assert_eq!(
        missing.code(),
        Some(AgentCode::NotFound),
        "{what}: {missing}"
    );
    let taken = agent
        .create_sandbox(CreateSandboxRequest::new(rig.sandbox, key(SEED)))
        .await
        .unwrap_err();
    assert_eq!(
        taken.code(),
        Some(AgentCode::AlreadyExists),
        "{what}: {taken}"
    );

    let wrong = transport(kind, "wrong").agent(&rig.target()).unwrap();
    let err = wrong.list_snapshots().await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(AgentCode::Unauthenticated),
        "{what}: {err}"
    );
}

#[tokio::test]
async fn our_grpc_client_runs_every_rpc() {
    every_rpc_through(Ours::Grpc).await;
}

#[tokio::test]
async fn our_connect_client_runs_every_rpc() {
    every_rpc_through(Ours::Connect).await;
}

// ------------------------------------------- Connect JSON, every RPC

struct JsonCase {
    name: &'static str,
    method: &'static str,
    body: String,
    status: u16,
    /// Fields of the answer (a path into the JSON, the value) or, for an
    /// error, `("code", …)`.
    expect: Vec<(&'static str, Value)>,
}

fn json_cases(rig: &Rig) -> Vec<JsonCase> {
    let sb = rig.sandbox.to_string();
    let fresh = SandboxId::new().to_string();
    let case = |name, method, body: Value, status, expect| JsonCase {
        name,
        method,
        body: body.to_string(),
        status,
        expect,
    };
    vec![
        case(
            "create a snapshot",
            "CreateSnapshot",
            serde_json::json!({"sandboxId": sb, "name": "tpl-json"}),
            200,
            vec![
                ("/name", "tpl-json".into()),
                // int64 is a string in proto3 JSON.
                ("/sizeBytes", ((512 + 16) << 20).to_string().into()),
                ("/compat/vmm", "firecracker".into()),
            ],
        ),
        case(
            "proto field names are accepted too",
            "CreateSnapshot",
            serde_json::json!({"sandbox_id": sb, "name": "tpl-snake", "team_id": ""}),
            200,
            vec![("/name", "tpl-snake".into())],
        ),
        case(
            "delete a snapshot",
            "DeleteSnapshot",
            serde_json::json!({"name": SEED, "someNewerField": 1}),
            200,
            vec![("", serde_json::json!({}))],
        ),
        case(
            "list sandboxes",
            "ListSandboxes",
            serde_json::json!({}),
            200,
            vec![
                ("/sandboxes/0/sandboxId", sb.clone().into()),
                ("/sandboxes/0/vcpus", 2.into()),
                ("/sandboxes/0/memoryMb", 512.into()),
            ],
        ),
        case(
            "create a sandbox",
            "CreateSandbox",
            serde_json::json!({"sandboxId": fresh, "template": SEED, "vcpus": 1}),
            200,
            vec![
                ("/sandboxId", fresh.clone().into()),
                ("/status", "running".into()),
            ],
        ),
        case(
            "destroy a sandbox",
            "DestroySandbox",
            serde_json::json!({"sandboxId": sb}),
            200,
            vec![("", serde_json::json!({}))],
        ),
        case(
            "list snapshots",
            "ListSnapshots",
            serde_json::json!({}),
            200,
            vec![
                ("/snapshots/0/name", SEED.into()),
                ("/snapshots/0/sizeBytes", "4096".into()),
            ],
        ),
        case(
            "host info",
            "GetHostInfo",
            serde_json::json!({}),
            200,
            vec![
                ("/vmm", "firecracker".into()),
                ("/snapshotFormat", "4.0.0".into()),
                ("/kernelVersion", "6.1.0".into()),
            ],
        ),
        case(
            "a missing snapshot is not_found",
            "DeleteSnapshot",
            serde_json::json!({"name": "tpl-missing"}),
            404,
            vec![("/code", "not_found".into())],
        ),
        case(
            "a malformed id is invalid_argument",
            "CreateSnapshot",
            serde_json::json!({"sandboxId": "sb-nope", "name": "tpl-x"}),
            400,
            vec![("/code", "invalid_argument".into())],
        ),
        case(
            "an existing sandbox is already_exists",
            "CreateSandbox",
            serde_json::json!({"sandboxId": sb, "template": SEED}),
            409,
            vec![("/code", "already_exists".into())],
        ),
        case(
            "a missing sandbox is not_found",
            "DestroySandbox",
            serde_json::json!({"sandboxId": fresh}),
            404,
            vec![("/code", "not_found".into())],
        ),
        JsonCase {
            name: "malformed JSON is invalid_argument",
            method: "ListSnapshots",
            body: "{".into(),
            status: 400,
            expect: vec![("/code", "invalid_argument".into())],
        },
        case(
            "a field of the wrong type is invalid_argument",
            "CreateSandbox",
            serde_json::json!({"sandboxId": fresh, "template": SEED, "vcpus": "many"}),
            400,
            vec![("/code", "invalid_argument".into())],
        ),
    ]
}

#[tokio::test]
async fn connect_json_every_rpc_over_http1_and_h2c() {
    let rows = json_cases(&Rig::new().await).len();
    for http in BOTH {
        for i in 0..rows {
            // A fresh agent per row: rows do not depend on each other.
            let rig = Rig::new().await;
            let case = json_cases(&rig).swap_remove(i);
            let reply = connect_json(http, rig.addr, case.method, &case.body).await;
            let row = format!("{http:?} {}", case.name);
            assert_eq!(reply.status.as_u16(), case.status, "{row}: {reply:?}");
            let expected_type = "application/json";
            assert_eq!(reply.header("content-type"), Some(expected_type), "{row}");
            let json = reply.json();
            for (path, value) in &case.expect {
                assert_eq!(json.pointer(path), Some(value), "{row}: {json}");
            }
        }
    }
}

// ----------------------------------------------- Connect binary, h2c

#[tokio::test]
async fn connect_binary_over_h2c() {
    let rig = Rig::new().await;
    let auth = auth();
    let headers = [
        ("content-type", "application/proto"),
        ("authorization", auth.as_str()),
    ];
    let request = hand::CreateSnapshotRequest {
        sandbox_id: rig.sandbox.to_string(),
        name: "tpl-bin".into(),
        ..Default::default()
    };
    let reply = send(
        Http::H2c,
        rig.addr,
        &format!("{SERVICE}/CreateSnapshot"),
        &headers,
        request.encode_to_vec(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.header("content-type"), Some("application/proto"));
    let answer = hand::CreateSnapshotResponse::decode(reply.body.clone()).unwrap();
    assert_eq!(answer.name, "tpl-bin");

    let reply = send(
        Http::H2c,
        rig.addr,
        &format!("{SERVICE}/ListSnapshots"),
        &headers,
        hand::Empty {}.encode_to_vec(),
    )
    .await;
    let list = hand::ListSnapshotsResponse::decode(reply.body.clone()).unwrap();
    let mut names: Vec<_> = list.snapshots.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["tpl-bin", SEED]);

    // Errors are JSON whatever the codec.
    let request = hand::DeleteSnapshotRequest {
        name: "tpl-missing".into(),
        ..Default::default()
    };
    let reply = send(
        Http::H2c,
        rig.addr,
        &format!("{SERVICE}/DeleteSnapshot"),
        &headers,
        request.encode_to_vec(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.connect_code(), "not_found");
}

// ------------------------------------------------------------ gRPC-Web

async fn grpc_web(
    addr: SocketAddr,
    method: &str,
    token: &str,
    message: Vec<u8>,
) -> (Reply, Vec<(u8, Vec<u8>)>) {
    let auth = format!("Bearer {token}");
    let reply = send(
        Http::H1,
        addr,
        &format!("{SERVICE}/{method}"),
        &[
            ("content-type", "application/grpc-web+proto"),
            ("x-grpc-web", "1"),
            ("authorization", &auth),
        ],
        frame(0, &message),
    )
    .await;
    let frames = frames(&reply.body);
    (reply, frames)
}

/// The `grpc-status` of a gRPC-Web answer: in its headers when it has no
/// message, else in the trailer frame (flag 0x80).
fn web_status(reply: &Reply, frames: &[(u8, Vec<u8>)]) -> String {
    if let Some(status) = reply.grpc_status() {
        return status;
    }
    let (_, trailer) = frames
        .iter()
        .find(|(flags, _)| flags & 0x80 != 0)
        .expect("a trailer frame");
    let text = String::from_utf8_lossy(trailer);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("grpc-status:"))
        .map(|s| s.trim().to_owned())
        .expect("grpc-status in the trailers")
}

#[tokio::test]
async fn grpc_web_over_http1() {
    let rig = Rig::new().await;
    let request = hand::CreateSnapshotRequest {
        sandbox_id: rig.sandbox.to_string(),
        name: "tpl-web".into(),
        ..Default::default()
    };
    let (reply, frames) =
        grpc_web(rig.addr, "CreateSnapshot", TOKEN, request.encode_to_vec()).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/grpc-web")),
        "{reply:?}"
    );
    assert_eq!(web_status(&reply, &frames), "0");
    let answer = hand::CreateSnapshotResponse::decode(&frames[0].1[..]).unwrap();
    assert_eq!(answer.name, "tpl-web");

    let (reply, frames) = grpc_web(rig.addr, "ListSandboxes", TOKEN, Vec::new()).await;
    assert_eq!(web_status(&reply, &frames), "0");
    let list = hand::ListSandboxesResponse::decode(&frames[0].1[..]).unwrap();
    assert_eq!(list.sandboxes[0].sandbox_id, rig.sandbox.to_string());

    let missing = hand::DeleteSnapshotRequest {
        name: "tpl-missing".into(),
        ..Default::default()
    };
    let (reply, frames) =
        grpc_web(rig.addr, "DeleteSnapshot", TOKEN, missing.encode_to_vec()).await;
    assert_eq!(web_status(&reply, &frames), "5", "NOT_FOUND: {reply:?}");

    let (reply, frames) = grpc_web(rig.addr, "ListSnapshots", "wrong", Vec::new()).await;
    assert_eq!(
        web_status(&reply, &frames),
        "16",
        "UNAUTHENTICATED: {reply:?}"
    );
}

// ------------------------------------------------------ gRPC by hand

async fn grpc_raw(addr: SocketAddr, path: &str, extra: &[(&str, &str)], body: Vec<u8>) -> Reply {
    let auth = auth();
    let mut headers = vec![
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("authorization", auth.as_str()),
    ];
    headers.extend_from_slice(extra);
    send(Http::H2c, addr, path, &headers, body).await
}

#[tokio::test]
async fn grpc_gzip_both_ways() {
    let rig = Rig::new().await;
    for i in 0..100 {
        rig.agent
            .put_snapshot(&format!("tpl-{i:03}-padding-padding"), 1 << 20, None);
    }
    let reply = grpc_raw(
        rig.addr,
        &format!("{SERVICE}/ListSnapshots"),
        &[("grpc-encoding", "gzip"), ("grpc-accept-encoding", "gzip")],
        frame(1, &gzip(&hand::Empty {}.encode_to_vec())),
    )
    .await;
    assert_eq!(reply.grpc_status().as_deref(), Some("0"), "{reply:?}");
    assert_eq!(reply.header("grpc-encoding"), Some("gzip"));
    let frames = frames(&reply.body);
    assert_eq!(frames[0].0, 1, "the answer is compressed");
    let list = hand::ListSnapshotsResponse::decode(&gunzip(&frames[0].1)[..]).unwrap();
    assert_eq!(list.snapshots.len(), 101);
}

#[tokio::test]
async fn grpc_deadline_expires_on_the_server() {
    let rig = Rig::new().await;
    let hold = Hold::new();
    rig.agent
        .inject(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()));
    let request = hand::CreateSnapshotRequest {
        sandbox_id: rig.sandbox.to_string(),
        name: "tpl-late".into(),
        ..Default::default()
    };
    let started = Instant::now();
    let reply = grpc_raw(
        rig.addr,
        &format!("{SERVICE}/CreateSnapshot"),
        &[("grpc-timeout", "200m")],
        frame(0, &request.encode_to_vec()),
    )
    .await;
    // tonic answers an expired deadline with CANCELLED; DEADLINE_EXCEEDED
    // would do as well.
    let status = reply.grpc_status();
    assert!(
        matches!(status.as_deref(), Some("1" | "4")),
        "status {status:?}: {reply:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    hold.release();
}

// ------------------------------------------------------- Connect gzip

#[tokio::test]
async fn connect_gzip_request_and_answer() {
    let rig = Rig::new().await;
    for i in 0..100 {
        rig.agent
            .put_snapshot(&format!("tpl-{i:03}-padding-padding"), 1 << 20, None);
    }
    let auth = auth();
    for http in BOTH {
        // A compressed request.
        let body = serde_json::json!({"sandboxId": rig.sandbox.to_string(), "name": format!("tpl-gz-{http:?}").to_lowercase()});
        let reply = send(
            http,
            rig.addr,
            &format!("{SERVICE}/CreateSnapshot"),
            &[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
                ("authorization", &auth),
            ],
            gzip(body.to_string().as_bytes()),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{http:?}: {reply:?}");
        assert_eq!(
            reply.header("content-encoding"),
            None,
            "{http:?}: not asked"
        );

        // A large answer, asked for compressed: compressed.
        let list = |accept: Option<&'static str>| {
            let auth = auth.clone();
            async move {
                let mut headers = vec![
                    ("content-type", "application/proto"),
                    ("authorization", auth.as_str()),
                ];
                if let Some(a) = accept {
                    headers.push(("accept-encoding", a));
                }
                send(
                    http,
                    rig.addr,
                    &format!("{SERVICE}/ListSnapshots"),
                    &headers,
                    Vec::new(),
                )
                .await
            }
        };
        let reply = list(Some("br, gzip")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("content-encoding"), Some("gzip"), "{http:?}");
        let plain = gunzip(&reply.body);
        assert!(reply.body.len() < plain.len() / 2);
        let decoded = hand::ListSnapshotsResponse::decode(&plain[..]).unwrap();
        assert!(decoded.snapshots.len() > 100, "{http:?}");

        // Not asked: not compressed.
        let reply = list(None).await;
        assert_eq!(reply.header("content-encoding"), None, "{http:?}");
        hand::ListSnapshotsResponse::decode(reply.body.clone()).unwrap();

        // A small answer is sent as it is.
        let reply = send(
            http,
            rig.addr,
            &format!("{SERVICE}/DeleteSnapshot"),
            &[
                ("content-type", "application/json"),
                ("accept-encoding", "gzip"),
                ("authorization", &auth),
            ],
            format!(
                r#"{{"name":"tpl-{:03}-padding-padding"}}"#,
                if http == Http::H1 { 1 } else { 2 }
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.header("content-encoding"), None);
        assert_eq!(&reply.body[..], b"{}");
    }
}

#[tokio::test]
async fn connect_refuses_bad_compression() {
    let rig = Rig::new().await;
    let auth = auth();
    let path = format!("{SERVICE}/ListSnapshots");
    let bomb = gzip(&vec![b' '; LIMIT + 1]);
    let cases: [(&str, &str, Vec<u8>, u16, &str); 3] = [
        (
            "an unknown encoding",
            "br",
            b"{}".to_vec(),
            501,
            "unimplemented",
        ),
        (
            "a broken gzip body",
            "gzip",
            b"not gzip".to_vec(),
            400,
            "invalid_argument",
        ),
        (
            "a body over the limit once inflated",
            "gzip",
            bomb,
            429,
            "resource_exhausted",
        ),
    ];
    for (name, encoding, body, status, code) in cases {
        let reply = send(
            Http::H1,
            rig.addr,
            &path,
            &[
                ("content-type", "application/json"),
                ("content-encoding", encoding),
                ("authorization", &auth),
            ],
            body,
        )
        .await;
        assert_eq!(reply.status.as_u16(), status, "{name}: {reply:?}");
        assert_eq!(reply.connect_code(), code, "{name}");
        if encoding == "br" {
            assert_eq!(reply.header("accept-encoding"), Some("gzip"), "{name}");
        }
    }
}

// ------------------------------------------------ connect-timeout-ms

#[tokio::test]
async fn connect_timeout_ms_is_the_deadline() {
    let rig = Rig::new().await;
    let hold = Hold::new();
    rig.agent
        .inject(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()));
    let auth = auth();
    let body = serde_json::json!({"sandboxId": rig.sandbox.to_string(), "name": "tpl-late"});
    let call = |timeout: &'static str| {
        let (auth, body) = (auth.clone(), body.to_string());
        async move {
            send(
                Http::H1,
                rig.addr,
                &format!("{SERVICE}/CreateSnapshot"),
                &[
                    ("content-type", "application/json"),
                    ("connect-timeout-ms", timeout),
                    ("authorization", &auth),
                ],
                body,
            )
            .await
        }
    };
    let started = Instant::now();
    let reply = call("200").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{reply:?}");
    assert_eq!(reply.connect_code(), "deadline_exceeded");
    assert!(started.elapsed() >= Duration::from_millis(200));

    let reply = call("soon").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert_eq!(reply.connect_code(), "invalid_argument");
    hold.release();
}

// ------------------------------------------------------ unknown routes

#[tokio::test]
async fn unknown_routes_answer_like_real_servers() {
    /// What the request looks like.
    #[derive(Clone, Copy, PartialEq)]
    enum As {
        Connect,
        Grpc,
        Text,
        Nothing,
    }
    struct Case {
        name: &'static str,
        http: Http,
        method: Method,
        path: String,
        as_: As,
        status: u16,
        /// The Connect code or the grpc-status; empty for neither.
        code: &'static str,
    }
    let rig = Rig::new().await;
    let auth = auth();
    let method_path = format!("{SERVICE}/ListSnapshots");
    let unknown_method = format!("{SERVICE}/Nope");
    let other = "/other.v1.Other/Call".to_owned();
    let case = |name, http, method, path: &String, as_, status, code| Case {
        name,
        http,
        method,
        path: path.clone(),
        as_,
        status,
        code,
    };
    let cases = [
        case(
            "connect: unknown method",
            Http::H1,
            Method::POST,
            &unknown_method,
            As::Connect,
            404,
            "unimplemented",
        ),
        case(
            "connect: unknown service",
            Http::H2c,
            Method::POST,
            &other,
            As::Connect,
            404,
            "unimplemented",
        ),
        case(
            "connect: not POST",
            Http::H1,
            Method::PUT,
            &method_path,
            As::Connect,
            405,
            "unimplemented",
        ),
        case(
            "grpc: unknown method",
            Http::H2c,
            Method::POST,
            &unknown_method,
            As::Grpc,
            200,
            "12",
        ),
        case(
            "grpc: unknown service",
            Http::H2c,
            Method::POST,
            &other,
            As::Grpc,
            200,
            "12",
        ),
        case(
            "no RPC content type at a method",
            Http::H1,
            Method::POST,
            &method_path,
            As::Text,
            415,
            "",
        ),
        case(
            "plain GET of /",
            Http::H1,
            Method::GET,
            &"/".to_owned(),
            As::Nothing,
            404,
            "",
        ),
    ];
    for c in cases {
        let headers: Vec<(&str, &str)> = match c.as_ {
            As::Connect => vec![
                ("content-type", "application/json"),
                ("authorization", &auth),
            ],
            As::Grpc => vec![
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("authorization", &auth),
            ],
            As::Text => vec![("content-type", "text/plain")],
            As::Nothing => vec![],
        };
        let reply =
            send_with_method(c.http, rig.addr, c.method, &c.path, &headers, Vec::new()).await;
        let name = c.name;
        assert_eq!(reply.status.as_u16(), c.status, "{name}: {reply:?}");
        match c.as_ {
            As::Grpc => assert_eq!(reply.grpc_status().as_deref(), Some(c.code), "{name}"),
            As::Connect => assert_eq!(reply.connect_code(), c.code, "{name}"),
            As::Text => {
                let accepted = reply.header("accept-post").unwrap_or_default();
                assert!(accepted.contains("application/json"), "{name}: {accepted}");
            }
            As::Nothing => {}
        }
    }
}

// ------------------------------------------------------ oversized body

#[tokio::test]
async fn oversized_bodies_are_resource_exhausted() {
    let rig = Rig::new().await;
    let auth = auth();
    let headers = [
        ("content-type", "application/proto"),
        ("authorization", auth.as_str()),
    ];
    let reply = send(
        Http::H2c,
        rig.addr,
        &format!("{SERVICE}/ListSnapshots"),
        &headers,
        vec![0u8; LIMIT + 1],
    )
    .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{reply:?}");
    assert_eq!(reply.connect_code(), "resource_exhausted");

    // Exactly at the limit is read (and is then not a valid message).
    let reply = send(
        Http::H2c,
        rig.addr,
        &format!("{SERVICE}/ListSnapshots"),
        &headers,
        vec![0xffu8; LIMIT],
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert_eq!(reply.connect_code(), "invalid_argument");
}

// --------------------------------------------------------- wrong token

#[tokio::test]
async fn a_wrong_or_missing_token_is_unauthenticated_on_every_protocol() {
    let rig = Rig::new().await;
    let path = format!("{SERVICE}/ListSnapshots");
    for token in [Some("Bearer wrong"), Some("Basic czNjcmV0"), None] {
        let with = |mut headers: Vec<(&'static str, &'static str)>| {
            if let Some(t) = token {
                headers.push(("authorization", t));
            }
            headers
        };
        for http in BOTH {
            for content_type in ["application/json", "application/proto"] {
                let reply = send(
                    http,
                    rig.addr,
                    &path,
                    &with(vec![("content-type", content_type)]),
                    Vec::new(),
                )
                .await;
                let row = format!("connect {content_type} {http:?} {token:?}");
                assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{row}: {reply:?}");
                assert_eq!(reply.connect_code(), "unauthenticated", "{row}");
            }
        }
        let reply = send(
            Http::H1,
            rig.addr,
            &path,
            &with(vec![("content-type", "application/grpc-web+proto")]),
            frame(0, &[]),
        )
        .await;
        let f = frames(&reply.body);
        assert_eq!(web_status(&reply, &f), "16", "grpc-web {token:?}");
        let reply = send(
            Http::H2c,
            rig.addr,
            &path,
            &with(vec![
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]),
            frame(0, &[]),
        )
        .await;
        assert_eq!(reply.grpc_status().as_deref(), Some("16"), "grpc {token:?}");
    }
    assert_eq!(rig.agent.calls(AgentOp::ListSnapshots), 0);
}

// --------------------------------------------------- graceful shutdown

#[tokio::test]
async fn shutdown_finishes_connect_calls_in_progress() {
    let mut rig = Rig::new().await;
    let hold = Hold::new();
    rig.agent
        .inject(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()));
    let addr = rig.addr;
    let body = serde_json::json!({"sandboxId": rig.sandbox.to_string(), "name": "tpl-slow"});
    let call = tokio::spawn(async move {
        connect_json(Http::H1, addr, "CreateSnapshot", &body.to_string()).await
    });
    hold.arrived(1).await;
    let stop = rig.stop.take().unwrap();
    let _ = stop.send(());
    hold.release();
    let reply = call.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    rig.shut_down().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the port is closed"
    );
}

// ----------------------------------------------------------------- TLS

/// A TLS connection to the rig offering `alpn`, with the client
/// certificate when `client_cert`.
async fn tls_connect(
    addr: SocketAddr,
    pki: &Pki,
    alpn: &[&[u8]],
    client_cert: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = if client_cert {
        builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(pki.client.0.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(pki.client.1.as_bytes()).unwrap(),
            )
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

async fn tls_call(
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    h2: bool,
    request: Request<Full<Bytes>>,
) -> Reply {
    let io = TokioIo::new(stream);
    let response = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender.send_request(request).await.unwrap()
    };
    collect(response).await
}

#[tokio::test]
async fn tls_serves_every_protocol_over_h2_and_http1_with_mutual_tls() {
    let pki = pki();
    let tls =
        ServerTls::new(pki.server.0.clone(), pki.server.1.clone()).client_ca(pki.ca_pem.clone());
    let rig = Rig::with_server(|s| s.with_tls(tls)).await;
    let auth = auth();
    let connect = |version| {
        Request::post(format!("https://localhost{SERVICE}/ListSnapshots"))
            .version(version)
            .header("content-type", "application/json")
            .header("authorization", &auth)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };

    for (alpn, h2) in [(&b"h2"[..], true), (&b"http/1.1"[..], false)] {
        let stream = tls_connect(rig.addr, &pki, &[alpn], true).await.unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn));
        let version = if h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let reply = tls_call(stream, h2, connect(version)).await;
        assert_eq!(reply.status, StatusCode::OK, "{alpn:?}: {reply:?}");
        assert_eq!(reply.json()["snapshots"][0]["name"], SEED, "{alpn:?}");
    }

    // gRPC-Web over TLS with HTTP/1.1.
    let stream = tls_connect(rig.addr, &pki, &[b"http/1.1"], true)
        .await
        .unwrap();
    let request = Request::post(format!("https://localhost{SERVICE}/ListSnapshots"))
        .header("content-type", "application/grpc-web+proto")
        .header("authorization", &auth)
        .body(Full::new(Bytes::from(frame(0, &[]))))
        .unwrap();
    let reply = tls_call(stream, false, request).await;
    let f = frames(&reply.body);
    assert_eq!(web_status(&reply, &f), "0", "{reply:?}");
    let list = hand::ListSnapshotsResponse::decode(&f[0].1[..]).unwrap();
    assert_eq!(list.snapshots[0].name, SEED);

    // gRPC over TLS: our client (mutual TLS).
    let grpc = GrpcTransport::new(
        GrpcConfig::default().token(BearerToken::new(TOKEN)).tls(
            sandbox_snapshots::agent::TlsConfig::new(pki.ca_pem.clone())
                .client_identity(pki.client.0.clone(), pki.client.1.clone())
                .domain_name("localhost"),
        ),
    );
    let snapshots = grpc
        .agent(&rig.target())
        .unwrap()
        .list_snapshots()
        .await
        .unwrap();
    assert_eq!(snapshots[0].key, SEED);

    // Without a client certificate: no call gets through.
    let refused = match tls_connect(rig.addr, &pki, &[b"h2"], false).await {
        Err(_) => true,
        Ok(stream) => {
            let io = TokioIo::new(stream);
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await {
                Err(_) => true,
                Ok((mut sender, conn)) => {
                    tokio::spawn(conn);
                    sender.send_request(connect(Version::HTTP_2)).await.is_err()
                }
            }
        }
    };
    assert!(refused, "a client without a certificate is refused");
}

/// The bearer token is checked on the headers: a gRPC (or gRPC-Web) call
/// without it is refused before its body is read — here, a body that never
/// ends. Over HTTP/1.1 the refusal waits a bounded few seconds for it.
#[tokio::test]
async fn a_grpc_call_without_the_token_is_refused_before_its_body_is_read() {
    let rig = Rig::new().await;
    for (content_type, http2) in [
        ("application/grpc", true),
        ("application/grpc-web+proto", true),
        // Over HTTP/1.1 a little of the body is waited for (so that a
        // client still writing is not cut off), but not for ever.
        ("application/grpc-web+proto", false),
    ] {
        let (tx, rx) = tokio::sync::mpsc::channel::<
            Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
        >(1);
        // One frame header promising a large message, and then nothing.
        tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(&[
            0, 0, 0x10, 0, 0,
        ]))))
        .await
        .unwrap();
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let client = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build_http();
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}{SERVICE}/ListSandboxes", rig.addr))
            .header("content-type", content_type)
            .header("te", "trailers")
            .header("authorization", "Bearer wrong")
            .body(body)
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(20), client.request(request))
            .await
            .expect("answered while the body is still open")
            .unwrap();
        assert_eq!(
            response.headers().get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"16"[..]),
            "{content_type}: {:?}",
            response.headers()
        );
        assert_eq!(
            response.headers().get("content-type").map(|v| v.as_bytes()),
            Some(content_type.as_bytes())
        );
        drop(tx);
    }
    assert_eq!(rig.agent.calls(AgentOp::ListSandboxes), 0);
}

/// A snapshot's description of what produced it that a client would refuse
/// (here, a control character) is dropped by the server, not allowed to
/// fail a snapshot that was taken.
#[tokio::test]
async fn a_bad_compat_is_dropped_not_a_failed_snapshot() {
    let rig = Rig::new().await;
    rig.agent
        .set_host_info(Some(HostInfo::new("fire\ncracker", "1", "1", "x86_64")));
    let client = transport(Ours::Grpc, TOKEN).agent(&rig.target()).unwrap();
    let made = client
        .create_snapshot(CreateSnapshotRequest::new(
            rig.sandbox,
            key("tpl-bad-compat"),
        ))
        .await
        .unwrap();
    assert_eq!(made.compat, None);
    assert!(rig.agent.has_snapshot("tpl-bad-compat"));
}
