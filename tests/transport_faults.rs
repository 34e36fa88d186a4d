//! How the gRPC and Connect transports classify failures that are not the
//! agent's answer (SPEC §5, "Transports are classified by what the caller
//! should do next"), against real servers on loopback ports: nothing
//! listening, a name that does not resolve, a failed TLS handshake, a
//! connection dropped mid-call, an HTTP/1.1-only server, an answer in an
//! encoding never asked for, the Go agent mux's plain-text 404, an agent answering
//! "canceled", and answers over the receive limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::connect_server::ConnectServer;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sandbox_snapshots::agent::{AgentOp, Fault, ServerTls, TlsConfig};
use sandbox_snapshots::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// Long enough never to fire on loopback; a hang fails the test instead of
/// stalling it.
const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Grpc,
    Connect,
}

fn agent(kind: Kind, address: &str) -> Arc<dyn HostAgent> {
    agent_with(kind, address, None, None)
}

fn agent_with(
    kind: Kind,
    address: &str,
    tls: Option<TlsConfig>,
    max_response_bytes: Option<usize>,
) -> Arc<dyn HostAgent> {
    let transport: Box<dyn AgentTransport> = match kind {
        Kind::Grpc => {
            let mut config = GrpcConfig::default().timeouts(DEADLINE, DEADLINE, DEADLINE);
            if let Some(tls) = tls {
                config = config.tls(tls);
            }
            if let Some(n) = max_response_bytes {
                config = config.max_response_bytes(n);
            }
            Box::new(GrpcTransport::new(config))
        }
        Kind::Connect => {
            let mut config = ConnectConfig::default().timeouts(DEADLINE, DEADLINE, DEADLINE);
            if let Some(tls) = tls {
                config = config.tls(tls);
            }
            if let Some(n) = max_response_bytes {
                config = config.max_response_bytes(n);
            }
            Box::new(ConnectTransport::new(config))
        }
    };
    transport
        .agent(&HostTarget {
            id: HostId::new(),
            address: address.to_owned(),
        })
        .unwrap()
}

/// A loopback port where nothing listens (bound, then released).
fn dead_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

// ------------------------------------------------------------ hand servers

type Body = BoxBody<Bytes, Infallible>;

/// What a hand server does with a request.
#[derive(Clone, Copy, Debug)]
enum Reply {
    /// Reads the whole request, then closes the connection unanswered.
    Drop,
    /// What the Go agent's `http.ServeMux` answers for an unknown route.
    Plain404,
    /// A 200 answer compressed with brotli, which is never asked for
    /// (only gzip is): gRPC over h2c, Connect over HTTP/1.1.
    UnaskedEncoding,
    /// A 200 with an empty HTML body, as a proxy's page: not a Connect
    /// answer, though an empty body would decode as an empty message.
    Html200,
}

#[derive(Clone, Copy, Debug)]
enum Http {
    /// HTTP/1.1 only.
    H1,
    /// HTTP/2 cleartext with prior knowledge (what gRPC clients speak).
    H2c,
}

/// A hyper server on a loopback port that answers every request with
/// `reply`. Dropping it closes the listener and every connection.
struct HandServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for HandServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn reply_body(http: Http, reply: Reply) -> Response<Body> {
    match reply {
        Reply::Drop => unreachable!("the connection is dropped instead"),
        Reply::Plain404 => Response::builder()
            .status(404)
            .header("content-type", "text/plain; charset=utf-8")
            .header("x-content-type-options", "nosniff")
            .body(Full::new(Bytes::from_static(b"404 page not found\n")).boxed())
            .unwrap(),
        Reply::Html200 => Response::builder()
            .status(200)
            .header("content-type", "text/html")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap(),
        Reply::UnaskedEncoding if matches!(http, Http::H1) => Response::builder()
            .status(200)
            .header("content-type", "application/proto")
            .header("content-encoding", "br")
            .body(Full::new(Bytes::from_static(&[0x1f, 0x8b, 8, 0])).boxed())
            .unwrap(),
        Reply::UnaskedEncoding => {
            // Compressed-flag 1, length 5, five bytes.
            let frame = Bytes::from_static(&[1, 0, 0, 0, 5, 1, 2, 3, 4, 5]);
            let mut trailers = ::http::HeaderMap::new();
            trailers.insert("grpc-status", ::http::HeaderValue::from_static("0"));
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(frame)),
                Ok(Frame::trailers(trailers)),
            ];
            Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .header("grpc-encoding", "br")
                .body(StreamBody::new(tokio_stream::iter(frames)).boxed())
                .unwrap()
        }
    }
}

impl HandServer {
    async fn start(http: Http, reply: Reply) -> HandServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(async move {
                    // Notified by the handler when the request has been
                    // read and the connection is to be dropped unanswered.
                    let hang_up = Arc::new(Notify::new());
                    let signal = hang_up.clone();
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let signal = signal.clone();
                        async move {
                            let _ = req.into_body().collect().await;
                            if let Reply::Drop = reply {
                                signal.notify_one();
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, Infallible>(reply_body(http, reply))
                        }
                    });
                    let io = TokioIo::new(stream);
                    match http {
                        Http::H1 => {
                            let conn = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service);
                            tokio::select! {
                                _ = conn => {}
                                () = hang_up.notified() => {}
                            }
                        }
                        Http::H2c => {
                            let conn =
                                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                    .serve_connection(io, service);
                            tokio::select! {
                                _ = conn => {}
                                () = hang_up.notified() => {}
                            }
                        }
                    }
                });
            }
        });
        HandServer { addr, task }
    }
}

/// An HTTP/1.1-only Go server (`net/http` without h2c): it reads the h2c
/// preface as a request `PRI * HTTP/2.0`, which `http.ServeMux` answers
/// with a 400 and `Connection: close`, then closes the way Go does (stop
/// writing, drain what the client still sends).
async fn go_http1_server() -> HandServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            connections.spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0_u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                assert!(head.starts_with(b"PRI * HTTP/2.0\r\n"));
                let answer = "HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\
                              Content-Length: 0\r\n\r\n";
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
                while let Ok(1..) = stream.read(&mut buf).await {}
            });
        }
    });
    HandServer { addr, task }
}

/// A TCP server that accepts connections and closes them at once.
async fn slamming_server() -> HandServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    HandServer { addr, task }
}

// --------------------------------------------------------- real servers

/// Our `HostAgentServer` in front of `agent` on a loopback port, stopped
/// when the returned guard is dropped.
async fn grpc_server(agent: Arc<MemoryHostAgent>, tls: Option<ServerTls>) -> (String, HandServer) {
    let mut server = HostAgentServer::new(agent);
    if let Some(tls) = tls {
        server = server.with_tls(tls);
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        server
            .serve(listener, std::future::pending())
            .await
            .unwrap();
    });
    (addr.to_string(), HandServer { addr, task })
}

/// A CA, and a `localhost` server certificate and key it signed.
fn pki() -> (String, ServerTls) {
    let p = common::pki::pki();
    (p.ca_pem, ServerTls::new(p.server.0, p.server.1))
}

// ------------------------------------------------------------------ tests

/// Refused, unresolvable, TLS handshake failed: provably never delivered,
/// on both transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_before_the_request_is_sent_are_not_sent() {
    let slamming = slamming_server().await;
    let (_, server_tls) = pki();
    let (other_ca, _) = pki();
    let (tls_addr, _tls_server) =
        grpc_server(Arc::new(MemoryHostAgent::new()), Some(server_tls)).await;
    let tls = |ca: &str| Some(TlsConfig::new(ca.to_owned()).domain_name("localhost"));
    let cases: Vec<(&str, Kind, String, Option<TlsConfig>)> = vec![
        ("refused", Kind::Grpc, dead_port(), None),
        ("refused", Kind::Connect, dead_port(), None),
        ("dns", Kind::Grpc, "no-such-host.invalid:1".into(), None),
        ("dns", Kind::Connect, "no-such-host.invalid:1".into(), None),
        (
            "tls against a server that hangs up",
            Kind::Grpc,
            slamming.addr.to_string(),
            tls("unused"),
        ),
        (
            "tls against a server of another CA",
            Kind::Grpc,
            tls_addr.clone(),
            tls(&other_ca),
        ),
        (
            "tls against a server that hangs up",
            Kind::Connect,
            slamming.addr.to_string(),
            tls("unused"),
        ),
        (
            "tls against a server of another CA",
            Kind::Connect,
            tls_addr.clone(),
            tls(&other_ca),
        ),
        (
            "https to a port where nothing listens",
            Kind::Connect,
            format!("https://{}", dead_port()),
            tls(&other_ca),
        ),
    ];
    for (what, kind, address, tls) in cases {
        let err = agent_with(kind, &address, tls, None)
            .list_sandboxes()
            .await
            .unwrap_err();
        assert!(
            matches!(err, AgentError::Unavailable { not_sent: true, .. }),
            "{what} over {kind:?}: {err:?}"
        );
    }
}

/// The agent read the request, then the connection died: unavailable, and
/// it may have been delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_mid_call_is_unavailable_and_maybe_delivered() {
    for (kind, http) in [(Kind::Grpc, Http::H2c), (Kind::Connect, Http::H1)] {
        let server = HandServer::start(http, Reply::Drop).await;
        let err = agent(kind, &server.addr.to_string())
            .list_sandboxes()
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                AgentError::Unavailable {
                    not_sent: false,
                    ..
                }
            ),
            "{kind:?}: {err:?}"
        );
    }
}

/// What the Go agent's mux answers for an unknown route is Unimplemented
/// on both transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_text_404_is_unimplemented_on_both_transports() {
    for (kind, http) in [(Kind::Grpc, Http::H2c), (Kind::Connect, Http::H1)] {
        let server = HandServer::start(http, Reply::Plain404).await;
        let err = agent(kind, &server.addr.to_string())
            .list_snapshots()
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(AgentCode::Unimplemented),
            "{kind:?}: {err:?}"
        );
    }
}

/// Answers the client cannot understand are protocol errors, never the
/// agent's rejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_cannot_be_understood_are_protocol_errors() {
    for (what, kind, server) in [
        (
            "an HTTP/1.1-only Go agent",
            Kind::Grpc,
            go_http1_server().await,
        ),
        (
            "an unasked encoding",
            Kind::Grpc,
            HandServer::start(Http::H2c, Reply::UnaskedEncoding).await,
        ),
        (
            "an unasked encoding",
            Kind::Connect,
            HandServer::start(Http::H1, Reply::UnaskedEncoding).await,
        ),
    ] {
        let err = agent(kind, &server.addr.to_string())
            .list_sandboxes()
            .await
            .unwrap_err();
        assert!(
            matches!(err, AgentError::Protocol { .. }),
            "{what} over {kind:?}: {err:?}"
        );
    }
}

/// hyper's HTTP/1.1-only server closes the connection on the h2c preface
/// without a byte of answer: on the wire that is a server hanging up, like
/// a proxy without a backend — unavailable, never a rejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_server_that_hangs_up_on_the_h2c_preface_is_unavailable() {
    let server = HandServer::start(Http::H1, Reply::Plain404).await;
    let err = agent(Kind::Grpc, &server.addr.to_string())
        .list_sandboxes()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AgentError::Unavailable {
                not_sent: false,
                ..
            }
        ),
        "{err:?}"
    );
}

/// An agent answering "canceled" cut the call off: a timeout (outcome
/// unknown) on both transports, not a rejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceled_is_a_timeout_on_both_transports() {
    for kind in [Kind::Grpc, Kind::Connect] {
        let memory = Arc::new(MemoryHostAgent::new());
        memory.inject(
            AgentOp::ListSandboxes,
            Fault::Fail(AgentError::rejected(AgentCode::Cancelled, "canceled")),
        );
        let (address, _grpc, _connect) = match kind {
            Kind::Grpc => {
                let (address, server) = grpc_server(memory.clone(), None).await;
                (address, Some(server), None)
            }
            Kind::Connect => {
                let server = ConnectServer::start(memory.clone(), None).await;
                (server.addr.to_string(), None, Some(server))
            }
        };
        let err = agent(kind, &address).list_sandboxes().await.unwrap_err();
        assert_eq!(err, AgentError::Timeout, "{kind:?}");
        assert_eq!(memory.calls(AgentOp::ListSandboxes), 1, "{kind:?}");
    }
}

/// A `ListSnapshots` of a very full host is over tonic's default 4 MiB
/// limit and under ours; a configured limit refuses it as a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_are_received_up_to_the_configured_limit() {
    use prost::Message;
    const KEYS: usize = 60_000;
    let memory = Arc::new(MemoryHostAgent::new());
    let created = 1_700_000_000;
    let mut wire = common::wire::ListSnapshotsResponse::default();
    for i in 0..KEYS {
        // Team-scoped keys, about as long as real ones get.
        let key = format!("team-{i:026}-tpl-{i:026}-v1");
        memory.put_snapshot(
            &key,
            1 << 30,
            Some(Timestamp::from_unix_millis(created * 1000)),
        );
        wire.snapshots.push(common::wire::SnapshotInfo {
            name: key,
            size_bytes: 1 << 30,
            created_at_unix: created,
        });
    }
    assert!(
        wire.encoded_len() > 4 * 1024 * 1024,
        "{}",
        wire.encoded_len()
    );
    let (grpc_address, _grpc) = grpc_server(memory.clone(), None).await;
    let connect = ConnectServer::start(memory.clone(), None).await;
    for (kind, address) in [
        (Kind::Grpc, grpc_address),
        (Kind::Connect, connect.addr.to_string()),
    ] {
        let list = agent(kind, &address).list_snapshots().await.unwrap();
        assert_eq!(list.len(), KEYS, "{kind:?}");
        let err = agent_with(kind, &address, None, Some(1024))
            .list_snapshots()
            .await
            .unwrap_err();
        assert!(
            matches!(err, AgentError::Protocol { .. }),
            "{kind:?}: {err:?}"
        );
    }
    connect.stop().await;
}

/// Once a host's channel has met an HTTP/1.1-only peer, a later refused
/// connection (the agent went down) is still "not sent", not a protocol
/// error: what the last peer spoke says nothing about a connect that
/// failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_after_an_http1_peer_is_still_not_sent() {
    let server = go_http1_server().await;
    let client = agent(Kind::Grpc, &server.addr.to_string());
    let err = client.list_sandboxes().await.unwrap_err();
    assert!(matches!(err, AgentError::Protocol { .. }), "{err:?}");
    drop(server);
    // The listener is closed with the server's task; wait for the port to
    // refuse (aborting is asynchronous), without a fixed sleep.
    let addr = go_http1_addr_closed(&client).await;
    assert!(addr.is_not_sent(), "{addr:?}");
}

/// Calls until the answer is no longer the old peer's, and returns it.
async fn go_http1_addr_closed(client: &Arc<dyn HostAgent>) -> AgentError {
    for _ in 0..1000 {
        let err = client.list_sandboxes().await.unwrap_err();
        if !matches!(err, AgentError::Protocol { .. }) {
            return err;
        }
        tokio::task::yield_now().await;
    }
    panic!("the closed port kept answering as the HTTP/1.1 peer did");
}

/// A 200 that is not a Connect answer (a proxy's empty page) is a protocol
/// error, not an empty `DeleteSnapshotResponse`: a delete that never
/// happened must not read as done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_that_is_not_a_connect_answer_is_a_protocol_error() {
    let server = HandServer::start(Http::H1, Reply::Html200).await;
    let err = agent(Kind::Connect, &server.addr.to_string())
        .delete_snapshot(sandbox_snapshots::agent::DeleteSnapshotRequest::new(
            sandbox_snapshots::agent::SnapshotKey::parse("tpl-x").unwrap(),
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Protocol { .. }), "{err:?}");
}

/// With TLS configured, an address that says `http://` is refused before
/// anything is sent: the token must not go out in cleartext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_configured_with_an_http_address_is_refused_unsent() {
    let (ca, _server_tls) = pki();
    for kind in [Kind::Grpc, Kind::Connect] {
        let tls = TlsConfig::new(ca.clone().into_bytes());
        let transport: Box<dyn AgentTransport> = match kind {
            Kind::Grpc => Box::new(GrpcTransport::new(GrpcConfig::default().tls(tls))),
            Kind::Connect => Box::new(ConnectTransport::new(ConnectConfig::default().tls(tls))),
        };
        let target = HostTarget {
            id: HostId::new(),
            address: format!("http://{}", dead_port()),
        };
        let err = match transport.agent(&target) {
            Err(err) => err,
            Ok(client) => client.list_sandboxes().await.unwrap_err(),
        };
        assert!(err.is_not_sent(), "{kind:?}: {err:?}");
        assert!(err.to_string().contains("http://"), "{kind:?}: {err}");
    }
}
