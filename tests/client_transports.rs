//! Both client transports, in every way they can be set up, against real
//! servers on loopback ports (SPEC §5, "Wire features both client
//! transports have"): gRPC in cleartext, TLS and mutual TLS against our
//! `HostAgentServer`; Connect over HTTP/1.1, h2c, TLS (HTTP/2 by ALPN, and
//! HTTP/1.1 when asked) and mutual TLS against the test Connect server
//! (which answers gzip when asked). Each setup runs every RPC, a wrong
//! token, a deadline that expires and an answer over 4 MiB. Then: mutual
//! TLS refusing a client without its certificate, compressed answers on
//! both transports, and a zip bomb that must hit the receive limit.
//!
//! Requests over 1 KiB cannot be made through the `HostAgent` trait (keys
//! and ids are short): their compression is checked by the unit tests of
//! `agent::grpc` and `agent::connect`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::connect_server::{ConnectOptions, ConnectServer, Recorded, TestTls};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use sandbox_snapshots::agent::{
    AgentOp, ClientConfig, CreateSandboxRequest, CreateSnapshotRequest, DeleteSnapshotRequest,
    DestroySandboxRequest, Fault, Hold, HostInfo, HttpVersion, ServerTls, SnapshotKey, TlsConfig,
};
use sandbox_snapshots::*;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// Long enough never to fire on loopback (a hang fails the test instead
/// of stalling it), except where a test shortens it on purpose.
const DEADLINE: Duration = Duration::from_secs(10);

const USER_AGENT: &str = concat!("sandbox-snapshots/", env!("CARGO_PKG_VERSION"));

// ------------------------------------------------------------------ PKI

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn leaf(names: &[&str], ca: &CertifiedIssuer<'_, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A throwaway CA, a `localhost` server certificate and a client one.
fn pki() -> Pki {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    Pki {
        ca_pem: ca.pem(),
        server: leaf(&["localhost"], &ca),
        client: leaf(&["control-plane"], &ca),
    }
}

// ---------------------------------------------------------------- setups

/// One way of reaching an agent: a client transport so configured, and
/// the server it talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Grpc,
    GrpcTls,
    GrpcMutualTls,
    ConnectHttp1,
    ConnectH2c,
    /// TLS, HTTP/2 chosen by ALPN.
    ConnectTls,
    /// TLS to a server that offers HTTP/2, the client asking for HTTP/1.1.
    ConnectTlsHttp1,
    ConnectMutualTls,
}

impl Setup {
    fn is_connect(self) -> bool {
        !matches!(self, Setup::Grpc | Setup::GrpcTls | Setup::GrpcMutualTls)
    }

    fn tls(self) -> bool {
        !matches!(self, Setup::Grpc | Setup::ConnectHttp1 | Setup::ConnectH2c)
    }

    fn mutual(self) -> bool {
        matches!(self, Setup::GrpcMutualTls | Setup::ConnectMutualTls)
    }

    /// The HTTP version a Connect server should see.
    fn wire_version(self) -> ::http::Version {
        match self {
            Setup::ConnectH2c | Setup::ConnectTls | Setup::ConnectMutualTls => {
                ::http::Version::HTTP_2
            }
            _ => ::http::Version::HTTP_11,
        }
    }
}

enum Server {
    Grpc(oneshot::Sender<()>, JoinHandle<std::io::Result<()>>),
    Connect(ConnectServer),
}

struct Rig {
    setup: Setup,
    agent: Arc<MemoryHostAgent>,
    pki: Pki,
    address: String,
    server: Server,
}

impl Rig {
    async fn start(setup: Setup, token: Option<&str>) -> Rig {
        let pki = pki();
        let agent = Arc::new(MemoryHostAgent::new());
        let (port, server) = if setup.is_connect() {
            let tls = setup.tls().then(|| TestTls {
                cert_pem: pki.server.0.clone(),
                key_pem: pki.server.1.clone(),
                client_ca_pem: setup.mutual().then(|| pki.ca_pem.clone()),
            });
            let options = ConnectOptions {
                token: token.map(str::to_owned),
                http2: setup != Setup::ConnectHttp1,
                tls,
                gzip_answers: true,
            };
            let server =
                ConnectServer::start_with(agent.clone(), options, "127.0.0.1:0".parse().unwrap())
                    .await;
            (server.addr.port(), Server::Connect(server))
        } else {
            let mut server = HostAgentServer::new(agent.clone());
            if let Some(t) = token {
                server = server.with_token(BearerToken::new(t));
            }
            if setup.tls() {
                let mut tls = ServerTls::new(pki.server.0.clone(), pki.server.1.clone());
                if setup.mutual() {
                    tls = tls.client_ca(pki.ca_pem.clone());
                }
                server = server.with_tls(tls);
            }
            let (stop, stopped) = oneshot::channel::<()>();
            let (addr, task) = server
                .spawn("127.0.0.1:0".parse().unwrap(), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            (addr.port(), Server::Grpc(stop, task))
        };
        // Each TLS spelling once: an `https://` URL with the name to
        // verify given apart (the certificate names `localhost`, not the
        // IP), and a bare `localhost:port`, https because TLS is set.
        let address = match setup {
            Setup::ConnectTls | Setup::ConnectTlsHttp1 => format!("https://127.0.0.1:{port}"),
            Setup::ConnectMutualTls | Setup::GrpcMutualTls => format!("localhost:{port}"),
            _ => format!("127.0.0.1:{port}"),
        };
        Rig {
            setup,
            agent,
            pki,
            address,
            server,
        }
    }

    /// The client settings of this setup, with its client certificate
    /// under mutual TLS.
    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::default().timeouts(DEADLINE, DEADLINE, DEADLINE);
        if self.setup.tls() {
            let mut tls = TlsConfig::new(self.pki.ca_pem.clone());
            if self.address.starts_with("https://127.0.0.1") || self.setup == Setup::GrpcTls {
                tls = tls.domain_name("localhost");
            }
            if self.setup.mutual() {
                tls = tls.client_identity(self.pki.client.0.clone(), self.pki.client.1.clone());
            }
            config = config.tls(tls);
        }
        config.http_version(match self.setup {
            Setup::ConnectH2c => HttpVersion::Http2,
            Setup::ConnectTlsHttp1 => HttpVersion::Http1,
            _ => HttpVersion::Auto,
        })
    }

    fn client(&self, config: ClientConfig) -> Arc<dyn HostAgent> {
        let transport: Box<dyn AgentTransport> = if self.setup.is_connect() {
            Box::new(ConnectTransport::new(config))
        } else {
            Box::new(GrpcTransport::new(config))
        };
        transport
            .agent(&HostTarget {
                id: HostId::new(),
                address: self.address.clone(),
            })
            .unwrap()
    }

    /// The requests the Connect server saw (none are recorded for gRPC).
    fn recorded(&self) -> Vec<Recorded> {
        match &self.server {
            Server::Connect(server) => server.recorded(),
            Server::Grpc(..) => Vec::new(),
        }
    }

    async fn stop(self) {
        match self.server {
            Server::Grpc(stop, task) => {
                let _ = stop.send(());
                task.await.unwrap().unwrap();
            }
            Server::Connect(server) => server.stop().await,
        }
    }
}

// ----------------------------------------------------------------- cases

/// Every RPC of `HostAgent`, answers and one error each way they come.
async fn every_rpc(setup: Setup) {
    let rig = Rig::start(setup, Some("right")).await;
    let client = rig.client(rig.config().token(BearerToken::new("right")));
    let what = format!("{setup:?}");

    let sb = SandboxId::new();
    rig.agent.add_sandbox(sb, "running", 2, 256);
    let tpl = TemplateId::new();
    let created = client
        .create_snapshot(CreateSnapshotRequest::for_template(sb, TeamId::new(), tpl))
        .await
        .expect(&what);
    assert_eq!(created.key, tpl.to_string(), "{what}");
    assert_eq!(created.size_bytes, (256 + 16) * 1024 * 1024, "{what}");

    let list = client.list_sandboxes().await.expect(&what);
    assert_eq!(list.sandboxes.len(), 1, "{what}");
    assert_eq!(list.sandboxes[0].status, "paused", "{what}");

    let snapshots = client.list_snapshots().await.expect(&what);
    assert_eq!(snapshots.len(), 1, "{what}");
    assert_eq!(snapshots[0].key, tpl.to_string(), "{what}");

    let restored = SandboxId::new();
    let mut req = CreateSandboxRequest::new(restored, SnapshotKey::for_template(tpl));
    req.vcpus = 2;
    req.memory_mb = 256;
    let started = client.create_sandbox(req.clone()).await.expect(&what);
    assert_eq!(started.sandbox_id, restored.to_string(), "{what}");
    assert_eq!(started.status, "running", "{what}");
    let again = client.create_sandbox(req).await.unwrap_err();
    assert_eq!(
        again.code(),
        Some(AgentCode::AlreadyExists),
        "{what}: {again:?}"
    );

    let info = HostInfo::new("firecracker", "1.7.0", "fc-v2", "x86_64").kernel("6.1.0");
    rig.agent.set_host_info(Some(info.clone()));
    assert_eq!(client.host_info().await.expect(&what), info, "{what}");

    client
        .destroy_sandbox(DestroySandboxRequest::new(restored))
        .await
        .expect(&what);
    assert_eq!(rig.agent.sandbox_status(restored), None, "{what}");

    client
        .delete_snapshot(DeleteSnapshotRequest::new(SnapshotKey::for_template(tpl)))
        .await
        .expect(&what);
    assert!(!rig.agent.has_snapshot(&tpl.to_string()), "{what}");
    let missing = CreateSandboxRequest::new(SandboxId::new(), SnapshotKey::for_template(tpl));
    let err = client.create_sandbox(missing).await.unwrap_err();
    assert_eq!(err.code(), Some(AgentCode::NotFound), "{what}: {err:?}");

    // What the Connect server saw: our user-agent, gzip asked for, small
    // requests sent uncompressed, the HTTP version of the setup.
    let recorded = rig.recorded();
    assert_eq!(recorded.len(), if setup.is_connect() { 9 } else { 0 });
    for r in &recorded {
        assert_eq!(
            r.header("user-agent"),
            Some(USER_AGENT),
            "{what} {}",
            r.method
        );
        assert_eq!(
            r.header("accept-encoding"),
            Some("gzip"),
            "{what} {}",
            r.method
        );
        assert_eq!(r.header("content-encoding"), None, "{what} {}", r.method);
        assert_eq!(r.version, setup.wire_version(), "{what} {}", r.method);
    }
    rig.stop().await;
}

/// A wrong or missing token is the agent's Unauthenticated, and the agent
/// never sees the call.
async fn wrong_token(setup: Setup) {
    let rig = Rig::start(setup, Some("right")).await;
    for config in [rig.config().token(BearerToken::new("wrong")), rig.config()] {
        let err = rig.client(config).list_sandboxes().await.unwrap_err();
        assert!(
            matches!(
                err,
                AgentError::Rejected {
                    code: AgentCode::Unauthenticated,
                    ..
                }
            ),
            "{setup:?}: {err:?}"
        );
    }
    assert_eq!(rig.agent.calls(AgentOp::ListSandboxes), 0, "{setup:?}");
    rig.stop().await;
}

/// An agent that does not answer within the deadline: a timeout.
async fn deadline(setup: Setup) {
    let rig = Rig::start(setup, None).await;
    let hold = Hold::new();
    rig.agent
        .inject(AgentOp::ListSandboxes, Fault::Hold(hold.clone()));
    let short = Duration::from_millis(300);
    let client = rig.client(rig.config().timeouts(DEADLINE, DEADLINE, short));
    let err = client.list_sandboxes().await.unwrap_err();
    assert_eq!(err, AgentError::Timeout, "{setup:?}");
    hold.release();
    rig.stop().await;
}

/// A `ListSnapshots` over 4 MiB (tonic's own default) is received under
/// the 64 MiB default; under a 1 MiB limit it is a protocol error — over
/// Connect after decompression, since it travels gzipped.
async fn large_answer(setup: Setup) {
    const KEYS: usize = 60_000;
    let rig = Rig::start(setup, None).await;
    for i in 0..KEYS {
        rig.agent
            .put_snapshot(&format!("team-{i:026}-tpl-{i:026}-v1"), 1 << 30, None);
    }
    let list = rig.client(rig.config()).list_snapshots().await.unwrap();
    assert_eq!(list.len(), KEYS, "{setup:?}");
    let err = rig
        .client(rig.config().max_response_bytes(1 << 20))
        .list_snapshots()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::Protocol { message } if message.contains("limit")),
        "{setup:?}: {err:?}"
    );
    rig.stop().await;
}

/// One `#[tokio::test]` per setup and case.
macro_rules! matrix {
    ($($module:ident: $setup:expr,)*) => {$(
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_rpc() {
                super::every_rpc($setup).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_wrong_token_is_unauthenticated() {
                super::wrong_token($setup).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_expired_deadline_is_a_timeout() {
                super::deadline($setup).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn answers_over_4_mib_are_received_up_to_the_limit() {
                super::large_answer($setup).await;
            }
        }
    )*};
}

matrix! {
    grpc: Setup::Grpc,
    grpc_tls: Setup::GrpcTls,
    grpc_mutual_tls: Setup::GrpcMutualTls,
    connect_http1: Setup::ConnectHttp1,
    connect_h2c: Setup::ConnectH2c,
    connect_tls_h2: Setup::ConnectTls,
    connect_tls_http1: Setup::ConnectTlsHttp1,
    connect_mutual_tls: Setup::ConnectMutualTls,
}

/// Under mutual TLS a client without the certificate is refused, and a
/// client that trusts another CA fails before sending: never the agent's
/// answer, and the agent never sees the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_the_certificate() {
    for setup in [Setup::GrpcMutualTls, Setup::ConnectMutualTls] {
        let rig = Rig::start(setup, None).await;
        let mut anonymous = rig.config();
        anonymous.tls = Some(TlsConfig::new(rig.pki.ca_pem.clone()));
        let err = rig.client(anonymous).list_sandboxes().await.unwrap_err();
        assert!(
            matches!(err, AgentError::Unavailable { .. }),
            "{setup:?}: {err:?}"
        );
        let mut distrustful = rig.config();
        distrustful.tls = Some(
            TlsConfig::new(pki().ca_pem)
                .client_identity(rig.pki.client.0.clone(), rig.pki.client.1.clone()),
        );
        let err = rig.client(distrustful).list_sandboxes().await.unwrap_err();
        assert!(err.is_not_sent(), "{setup:?}: {err:?}");
        assert_eq!(rig.agent.calls(AgentOp::ListSandboxes), 0, "{setup:?}");
        rig.stop().await;
    }
}

/// Connect refuses an `https://` address without TLS settings (the
/// system's roots are never trusted), and both transports refuse to use
/// bad TLS material: before sending anything.
#[tokio::test]
async fn tls_settings_that_cannot_work_are_not_sent() {
    let transport = ConnectTransport::new(ClientConfig::default());
    let err = transport
        .agent(&HostTarget {
            id: HostId::new(),
            address: "https://localhost:1".into(),
        })
        .err()
        .unwrap();
    assert!(err.is_not_sent(), "{err:?}");
    // Unusable TLS material: every call fails the same way, on both.
    let bad = ClientConfig::default().tls(TlsConfig::new("not a pem"));
    let transports: [Box<dyn AgentTransport>; 2] = [
        Box::new(GrpcTransport::new(bad.clone())),
        Box::new(ConnectTransport::new(bad)),
    ];
    for transport in transports {
        let client = transport
            .agent(&HostTarget {
                id: HostId::new(),
                address: "localhost:1".into(),
            })
            .unwrap();
        let err = client.list_sandboxes().await.unwrap_err();
        assert!(err.is_not_sent(), "{err:?}");
    }
}

// ------------------------------------------------- hand-made gzip answers

type Body = BoxBody<Bytes, Infallible>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// gRPC over h2c.
    Grpc,
    /// Connect over HTTP/1.1.
    Connect,
}

/// A server that answers every call with `gzipped` (a gzip stream, which
/// may be a bomb) as a compressed answer, whatever was asked for.
struct GzipServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for GzipServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn gzip_answer(protocol: Protocol, gzipped: Bytes) -> Response<Body> {
    match protocol {
        Protocol::Connect => Response::builder()
            .status(200)
            .header("content-type", "application/proto")
            .header("content-encoding", "gzip")
            .body(Full::new(gzipped).boxed())
            .unwrap(),
        Protocol::Grpc => {
            let mut frame = vec![1];
            frame.extend_from_slice(&u32::try_from(gzipped.len()).unwrap().to_be_bytes());
            frame.extend_from_slice(&gzipped);
            let mut trailers = ::http::HeaderMap::new();
            trailers.insert("grpc-status", ::http::HeaderValue::from_static("0"));
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from(frame))),
                Ok(Frame::trailers(trailers)),
            ];
            Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .header("grpc-encoding", "gzip")
                .body(StreamBody::new(tokio_stream::iter(frames)).boxed())
                .unwrap()
        }
    }
}

impl GzipServer {
    async fn start(protocol: Protocol, gzipped: Bytes) -> GzipServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let gzipped = gzipped.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let gzipped = gzipped.clone();
                        async move {
                            let _ = req.into_body().collect().await;
                            Ok::<_, Infallible>(gzip_answer(protocol, gzipped))
                        }
                    });
                    let io = TokioIo::new(stream);
                    let _ = match protocol {
                        Protocol::Connect => {
                            hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .await
                        }
                        Protocol::Grpc => {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, service)
                                .await
                        }
                    };
                });
            }
        });
        GzipServer { addr, task }
    }

    fn client(&self, protocol: Protocol, config: ClientConfig) -> Arc<dyn HostAgent> {
        let config = config.timeouts(DEADLINE, DEADLINE, DEADLINE);
        let transport: Box<dyn AgentTransport> = match protocol {
            Protocol::Grpc => Box::new(GrpcTransport::new(config)),
            Protocol::Connect => Box::new(ConnectTransport::new(config)),
        };
        transport
            .agent(&HostTarget {
                id: HostId::new(),
                address: self.addr.to_string(),
            })
            .unwrap()
    }
}

/// A gzip answer is read when gzip was asked for (the default), and is a
/// protocol error when it was not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_answers_are_read_only_when_asked_for() {
    use prost::Message;
    let mut list = common::wire::ListSandboxesResponse::default();
    list.sandboxes.push(common::wire::SandboxInfo {
        sandbox_id: SandboxId::new().to_string(),
        status: "running".into(),
        vcpus: 2,
        memory_mb: 512,
        ..Default::default()
    });
    let gzipped = Bytes::from(common::connect_server::gzip(&list.encode_to_vec()));
    for protocol in [Protocol::Grpc, Protocol::Connect] {
        let server = GzipServer::start(protocol, gzipped.clone()).await;
        let got = server
            .client(protocol, ClientConfig::default())
            .list_sandboxes()
            .await
            .unwrap();
        assert_eq!(got.sandboxes.len(), 1, "{protocol:?}");
        assert_eq!(got.sandboxes[0].memory_mb, 512, "{protocol:?}");
        let err = server
            .client(protocol, ClientConfig::default().gzip(false))
            .list_sandboxes()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, AgentError::Protocol { message } if message.contains("not asked for")),
            "{protocol:?}: {err:?}"
        );
    }
}

/// A gzip stream of `chunks` MiB of zeros, about 1 KiB a MiB. Its trailer
/// (CRC and length) is not filled in: a reader that honours its limit
/// stops long before it.
fn zip_bomb(chunks: usize) -> Bytes {
    let mut deflate = flate2::Compress::new(flate2::Compression::best(), false);
    let mut chunk = Vec::with_capacity(16 * 1024);
    deflate
        .compress_vec(&vec![0; 1 << 20], &mut chunk, flate2::FlushCompress::Sync)
        .unwrap();
    // A sync flush ends on a byte boundary: the chunk can be repeated.
    let mut bomb = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    for _ in 0..chunks {
        bomb.extend_from_slice(&chunk);
    }
    // A final empty fixed-Huffman block, then the trailer.
    bomb.extend_from_slice(&[0x03, 0x00]);
    bomb.extend_from_slice(&[0; 8]);
    Bytes::from(bomb)
}

/// A small answer that expands to 1 GiB is refused at the receive limit
/// (64 MiB by default), on both transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zip_bomb_answer_hits_the_receive_limit() {
    let bomb = zip_bomb(1024);
    assert!(bomb.len() < 2 << 20, "{}", bomb.len());
    for protocol in [Protocol::Grpc, Protocol::Connect] {
        let server = GzipServer::start(protocol, bomb.clone()).await;
        let err = server
            .client(protocol, ClientConfig::default())
            .list_sandboxes()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, AgentError::Protocol { message } if message.contains("limit")),
            "{protocol:?}: {err:?}"
        );
    }
}

/// A server that accepts the connection and never says a word: the TLS
/// handshake is bounded by the connect timeout, so the call fails as not
/// sent, well before its own deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_never_finishes_is_not_sent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    let config = ClientConfig::default()
        .tls(TlsConfig::new(pki().ca_pem).domain_name("localhost"))
        .timeouts(Duration::from_millis(200), DEADLINE, DEADLINE);
    let transports: [(&str, Box<dyn AgentTransport>); 2] = [
        ("grpc", Box::new(GrpcTransport::new(config.clone()))),
        ("connect", Box::new(ConnectTransport::new(config))),
    ];
    for (what, transport) in transports {
        let client = transport
            .agent(&HostTarget {
                id: HostId::new(),
                address: addr.to_string(),
            })
            .unwrap();
        let err = client.list_sandboxes().await.unwrap_err();
        assert!(err.is_not_sent(), "{what}: {err:?}");
    }
    silent.abort();
}
