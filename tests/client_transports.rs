//! Both client transports, in every way they can be set up, against our
//! `HostAgentServer` on loopback ports (SPEC §5, "Wire features both client
//! transports have"): gRPC in cleartext, TLS and mutual TLS; Connect over
//! HTTP/1.1, h2c, TLS (HTTP/2 by ALPN, and HTTP/1.1 when asked) and mutual
//! TLS. Each setup runs every RPC, every error code an agent can answer, a
//! wrong token, a deadline that expires, an answer over 4 MiB, and a
//! compressed request and answer.
//!
//! Requests over 1 KiB (the only ones our clients compress) cannot be made
//! through the `HostAgent` trait: ids and keys are short. The compressed
//! request of each setup is made by hand on the same kind of connection
//! (HTTP version, TLS, client certificate), with exactly the encoding
//! headers our clients send; the clients' side of it is checked by the unit
//! tests of `agent::grpc` and `agent::connect`.
//!
//! Our server has no way to show the headers of the requests it gets, so
//! what our Connect client puts on the wire (user-agent, accept-encoding,
//! the HTTP version) is checked against the test Connect server, which
//! records them. Servers of our own making check the rest: gzip answers,
//! whether asked for or not, a zip bomb that must hit the receive limit,
//! and a TLS handshake that never finishes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::pki::{Pki, pki};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::connect_server::{ConnectOptions, ConnectServer, Recorded, TestTls, gunzip, gzip};
use common::wire;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sandbox_snapshots::agent::{
    AgentOp, ClientConfig, CreateSandboxRequest, CreateSnapshotRequest, DeleteSnapshotRequest,
    DestroySandboxRequest, Fault, Hold, HostInfo, HttpVersion, ServerTls, SnapshotKey, TlsConfig,
};
use sandbox_snapshots::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// Long enough never to fire on loopback (a hang fails the test instead
/// of stalling it), except where a test shortens it on purpose.
const DEADLINE: Duration = Duration::from_secs(10);

const USER_AGENT: &str = concat!("sandbox-snapshots/", env!("CARGO_PKG_VERSION"));

const SERVICE: &str = "/hostagent.v1.HostAgentService";

// ------------------------------------------------------------------ PKI

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

const CONNECT_SETUPS: [Setup; 5] = [
    Setup::ConnectHttp1,
    Setup::ConnectH2c,
    Setup::ConnectTls,
    Setup::ConnectTlsHttp1,
    Setup::ConnectMutualTls,
];

impl Setup {
    fn is_connect(self) -> bool {
        CONNECT_SETUPS.contains(&self)
    }

    fn tls(self) -> bool {
        !matches!(self, Setup::Grpc | Setup::ConnectHttp1 | Setup::ConnectH2c)
    }

    fn mutual(self) -> bool {
        matches!(self, Setup::GrpcMutualTls | Setup::ConnectMutualTls)
    }

    /// The HTTP version on the wire.
    fn wire_version(self) -> ::http::Version {
        match self {
            Setup::ConnectHttp1 | Setup::ConnectTlsHttp1 => ::http::Version::HTTP_11,
            _ => ::http::Version::HTTP_2,
        }
    }
}

enum Server {
    /// Our `HostAgentServer`.
    Ours(oneshot::Sender<()>, JoinHandle<std::io::Result<()>>),
    /// The test Connect server, which records request headers.
    Recording(ConnectServer),
}

struct Rig {
    setup: Setup,
    agent: Arc<MemoryHostAgent>,
    pki: Pki,
    port: u16,
    server: Server,
}

impl Rig {
    /// Our server in front of a `MemoryHostAgent`, as `setup` needs it.
    async fn start(setup: Setup, token: Option<&str>) -> Rig {
        let pki = pki();
        let agent = Arc::new(MemoryHostAgent::new());
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
        Rig::new(setup, agent, pki, addr.port(), Server::Ours(stop, task))
    }

    /// The recording test server instead, for the Connect setups.
    async fn recording(setup: Setup) -> Rig {
        assert!(setup.is_connect(), "{setup:?}");
        let pki = pki();
        let agent = Arc::new(MemoryHostAgent::new());
        let tls = setup.tls().then(|| TestTls {
            cert_pem: pki.server.0.clone(),
            key_pem: pki.server.1.clone(),
            client_ca_pem: setup.mutual().then(|| pki.ca_pem.clone()),
        });
        let options = ConnectOptions {
            token: None,
            http2: setup != Setup::ConnectHttp1,
            tls,
            gzip_answers: true,
        };
        let server =
            ConnectServer::start_with(agent.clone(), options, "127.0.0.1:0".parse().unwrap()).await;
        let port = server.addr.port();
        Rig::new(setup, agent, pki, port, Server::Recording(server))
    }

    fn new(setup: Setup, agent: Arc<MemoryHostAgent>, pki: Pki, port: u16, server: Server) -> Rig {
        Rig {
            setup,
            agent,
            pki,
            port,
            server,
        }
    }

    /// How this setup spells the address of `port`. Each TLS spelling
    /// once: an `https://` URL with the name to verify given apart (the
    /// certificate names `localhost`, not the IP), and a bare
    /// `localhost:port`, https because TLS is set.
    fn address(&self, port: u16) -> String {
        match self.setup {
            Setup::ConnectTls | Setup::ConnectTlsHttp1 => format!("https://127.0.0.1:{port}"),
            Setup::ConnectMutualTls | Setup::GrpcMutualTls => format!("localhost:{port}"),
            _ => format!("127.0.0.1:{port}"),
        }
    }

    /// The client settings of this setup, with its client certificate
    /// under mutual TLS.
    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::default().timeouts(DEADLINE, DEADLINE, DEADLINE);
        if self.setup.tls() {
            let mut tls = TlsConfig::new(self.pki.ca_pem.clone());
            if matches!(
                self.setup,
                Setup::ConnectTls | Setup::ConnectTlsHttp1 | Setup::GrpcTls
            ) {
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
        self.client_at(config, self.port)
    }

    /// A client of this setup that connects to `port` (a relay's).
    fn client_at(&self, config: ClientConfig, port: u16) -> Arc<dyn HostAgent> {
        let transport: Box<dyn AgentTransport> = if self.setup.is_connect() {
            Box::new(ConnectTransport::new(config))
        } else {
            Box::new(GrpcTransport::new(config))
        };
        transport
            .agent(&HostTarget {
                id: HostId::new(),
                address: self.address(port),
            })
            .unwrap()
    }

    /// The requests the recording server saw.
    fn recorded(&self) -> Vec<Recorded> {
        match &self.server {
            Server::Recording(server) => server.recorded(),
            Server::Ours(..) => panic!("our server records nothing"),
        }
    }

    async fn stop(self) {
        match self.server {
            Server::Ours(stop, task) => {
                let _ = stop.send(());
                task.await.unwrap().unwrap();
            }
            Server::Recording(server) => server.stop().await,
        }
    }
}

// ------------------------------------------------------ calls by hand

/// The client of calls made by hand.
type RawClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

impl Rig {
    /// A client of our own making on this setup's kind of connection: its
    /// HTTP version, TLS and client certificate.
    fn raw_client(&self) -> RawClient {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.pki.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let tls = if self.setup.mutual() {
            let (cert, key) = &self.pki.client;
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        } else {
            builder.with_no_client_auth()
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
                ServerName::try_from("localhost").unwrap(),
            ));
        let h2 = self.setup.wire_version() == ::http::Version::HTTP_2;
        let connector = if h2 {
            connector.enable_http2().build()
        } else {
            connector.enable_http1().build()
        };
        Client::builder(TokioExecutor::new())
            .http2_only(h2 && !self.setup.tls())
            .build(connector)
    }

    /// Calls `method` with `message` gzip-compressed, asking for a gzip
    /// answer, as our clients do: `grpc-encoding`/`grpc-accept-encoding`
    /// on gRPC, `content-encoding`/`accept-encoding` on Connect. Returns
    /// whether the answer came compressed, and its message.
    async fn call_gzipped(&self, method: &str, message: &[u8]) -> (bool, Bytes) {
        let scheme = if self.setup.tls() { "https" } else { "http" };
        let request = Request::post(format!(
            "{scheme}://127.0.0.1:{}{SERVICE}/{method}",
            self.port
        ));
        let (request, body) = if self.setup.is_connect() {
            let request = request
                .header("content-type", "application/proto")
                .header("connect-protocol-version", "1")
                .header("content-encoding", "gzip")
                .header("accept-encoding", "gzip");
            (request, gzip(message))
        } else {
            let request = request
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("grpc-encoding", "gzip")
                .header("grpc-accept-encoding", "gzip");
            (request, frame(1, &gzip(message)))
        };
        let response = self
            .raw_client()
            .request(request.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let what = format!("{:?} {method}", self.setup);
        assert_eq!(response.status(), 200, "{what}");
        assert_eq!(response.version(), self.setup.wire_version(), "{what}");
        let encoding = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.as_bytes() == b"gzip")
        };
        if self.setup.is_connect() {
            let gzipped = encoding("content-encoding").unwrap_or(false);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let plain = if gzipped {
                gunzip(&body).unwrap().into()
            } else {
                body
            };
            return (gzipped, plain);
        }
        assert!(encoding("grpc-encoding").unwrap_or(true), "{what}");
        let collected = response.into_body().collect().await.unwrap();
        let status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .cloned();
        assert_eq!(
            status.as_ref().map(|v| v.as_bytes()),
            Some(&b"0"[..]),
            "{what}"
        );
        let body = collected.to_bytes();
        let len = usize::try_from(u32::from_be_bytes(body[1..5].try_into().unwrap())).unwrap();
        assert_eq!(body.len(), 5 + len, "{what}: one message");
        let payload = body.slice(5..);
        match body[0] {
            0 => (false, payload),
            1 => (true, gunzip(&payload).unwrap().into()),
            flags => panic!("{what}: frame flags {flags}"),
        }
    }
}

/// A length-prefixed gRPC frame.
fn frame(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A TCP relay to `port` that counts the bytes coming back: what a client
/// behind it received, TLS and all. Stops when dropped.
struct Relay {
    port: u16,
    received: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    async fn to(port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_port = listener.local_addr().unwrap().port();
        let received = Arc::new(AtomicUsize::new(0));
        let counter = received.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                connections.spawn(async move {
                    let server = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let up = tokio::io::copy(&mut from_client, &mut to_server);
                    let down = async {
                        let mut buf = vec![0; 64 * 1024];
                        while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                            counter.fetch_add(n, Ordering::SeqCst);
                            if to_client.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = to_client.shutdown().await;
                    };
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Relay {
            port: relay_port,
            received,
            task,
        }
    }

    /// Bytes received so far, and the count reset.
    fn take(&self) -> usize {
        self.received.swap(0, Ordering::SeqCst)
    }
}

// ----------------------------------------------------------------- cases

/// The calls of `HostAgent`.
const OPS: [AgentOp; 7] = [
    AgentOp::CreateSnapshot,
    AgentOp::DeleteSnapshot,
    AgentOp::ListSandboxes,
    AgentOp::ListSnapshots,
    AgentOp::CreateSandbox,
    AgentOp::DestroySandbox,
    AgentOp::GetHostInfo,
];

/// Makes the call `op` with well-formed arguments, for its outcome only.
async fn call(client: &dyn HostAgent, op: AgentOp) -> Result<(), AgentError> {
    let sandbox = SandboxId::new();
    let key = SnapshotKey::for_template(TemplateId::new());
    match op {
        AgentOp::CreateSnapshot => client
            .create_snapshot(CreateSnapshotRequest::for_template(
                sandbox,
                TeamId::new(),
                TemplateId::new(),
            ))
            .await
            .map(drop),
        AgentOp::DeleteSnapshot => {
            client
                .delete_snapshot(DeleteSnapshotRequest::new(key))
                .await
        }
        AgentOp::ListSandboxes => client.list_sandboxes().await.map(drop),
        AgentOp::ListSnapshots => client.list_snapshots().await.map(drop),
        AgentOp::CreateSandbox => client
            .create_sandbox(CreateSandboxRequest::new(sandbox, key))
            .await
            .map(drop),
        AgentOp::DestroySandbox => {
            client
                .destroy_sandbox(DestroySandboxRequest::new(sandbox))
                .await
        }
        AgentOp::GetHostInfo => client.host_info().await.map(drop),
    }
}

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

    let base = SandboxId::new();
    rig.agent.add_base_template("base-ubuntu");
    let from_base = CreateSandboxRequest::new(base, SnapshotKey::parse("base-ubuntu").unwrap());
    client.create_sandbox(from_base).await.expect(&what);
    assert_eq!(rig.agent.sandbox_status(base).as_deref(), Some("running"));

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
    rig.stop().await;
}

/// What our client reads back when the agent behind our server fails with
/// `sent` (src/agent/pb.rs): a code is the same code, except Cancelled,
/// which is a timeout on both transports (the call was cut off); an
/// unavailable agent is unavailable, the request delivered; an agent's
/// timeout is deadline-exceeded, a timeout; an agent's protocol error is
/// the server's Internal.
fn read_back(sent: &AgentError) -> AgentError {
    match sent.clone() {
        AgentError::Rejected {
            code: AgentCode::Cancelled,
            ..
        } => AgentError::Timeout,
        AgentError::Protocol { message } => AgentError::rejected(AgentCode::Internal, message),
        other => other,
    }
}

/// Each error, injected once into one RPC (taking the RPCs in turn), reads
/// back as [`read_back`] says, message included.
async fn every_error_code(setup: Setup) {
    let rig = Rig::start(setup, None).await;
    let client = rig.client(rig.config());
    let errors = common::CODES
        .iter()
        .map(|&code| AgentError::rejected(code, format!("injected {code:?}")))
        .chain([
            AgentError::unavailable("injected: the VMM is down"),
            AgentError::Timeout,
            AgentError::Protocol {
                message: "injected: the VMM answered nonsense".into(),
            },
        ]);
    for (i, sent) in errors.enumerate() {
        let op = OPS[i % OPS.len()];
        rig.agent.inject_times(op, Fault::Fail(sent.clone()), 1);
        let got = call(&*client, op).await.unwrap_err();
        assert_eq!(got, read_back(&sent), "{setup:?} {op:?}: sent {sent:?}");
    }
    rig.stop().await;
}

/// A wrong or missing token is the agent's Unauthenticated, and the agent
/// never sees the call.
async fn wrong_token(setup: Setup) {
    let rig = Rig::start(setup, Some("right")).await;
    for config in [rig.config().token(BearerToken::new("wrong")), rig.config()] {
        let err = rig.client(config).list_sandboxes().await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(AgentCode::Unauthenticated),
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
    assert_eq!(rig.agent.calls(AgentOp::ListSandboxes), 1, "{setup:?}");
    hold.release();
    rig.stop().await;
}

/// Puts `n` snapshots with long keys on the agent: about 70 bytes each in
/// a `ListSnapshots` answer.
fn fill(agent: &MemoryHostAgent, n: usize) {
    for i in 0..n {
        agent.put_snapshot(&format!("team-{i:026}-tpl-{i:026}-v1"), 1 << 30, None);
    }
}

/// A `ListSnapshots` over 4 MiB (tonic's own default) is received under
/// the 64 MiB default; under a 1 MiB limit it is a protocol error (after
/// decompression: it travels gzipped).
async fn large_answer(setup: Setup) {
    const KEYS: usize = 60_000;
    let rig = Rig::start(setup, None).await;
    fill(&rig.agent, KEYS);
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

/// A gzip request is read (the snapshot it asks for is made); a large
/// answer asked for in gzip comes gzipped, to a call by hand and to our
/// client.
async fn compressed(setup: Setup) {
    let rig = Rig::start(setup, None).await;
    let sandbox = SandboxId::new();
    rig.agent.add_sandbox(sandbox, "running", 2, 256);
    let key = SnapshotKey::for_template(TemplateId::new());
    let request = wire::CreateSnapshotRequest {
        sandbox_id: sandbox.to_string(),
        name: key.as_str().to_owned(),
        ..Default::default()
    };
    let (_, answer) = rig
        .call_gzipped("CreateSnapshot", &request.encode_to_vec())
        .await;
    let created = wire::CreateSnapshotResponse::decode(answer).unwrap();
    assert_eq!(created.name, key.as_str(), "{setup:?}");
    assert!(rig.agent.has_snapshot(key.as_str()), "{setup:?}");

    fill(&rig.agent, 999);
    let (gzipped, answer) = rig.call_gzipped("ListSnapshots", &[]).await;
    assert!(gzipped, "{setup:?}: a 70 kB answer asked for in gzip");
    let list = wire::ListSnapshotsResponse::decode(answer).unwrap();
    assert_eq!(list.snapshots.len(), 1000, "{setup:?}");

    // Our client asks for gzip and reads the gzip answer: it receives far
    // fewer bytes than with gzip off.
    let relay = Relay::to(rig.port).await;
    let mut received = Vec::new();
    for gzip in [true, false] {
        let client = rig.client_at(rig.config().gzip(gzip), relay.port);
        assert_eq!(
            client.list_snapshots().await.unwrap().len(),
            1000,
            "{setup:?}"
        );
        received.push(relay.take());
    }
    assert!(received[1] > list.encoded_len(), "{setup:?}: {received:?}");
    assert!(received[0] < received[1] / 4, "{setup:?}: {received:?}");
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
            async fn every_error_code_reads_back() {
                super::every_error_code($setup).await;
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

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn gzip_requests_and_answers() {
                super::compressed($setup).await;
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

/// What a Connect server sees of our Connect client, in every setup: our
/// user-agent, gzip asked for, small requests sent uncompressed, the HTTP
/// version of the setup. (On the recording server: ours shows no headers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_requests_carry_our_headers() {
    for setup in CONNECT_SETUPS {
        let rig = Rig::recording(setup).await;
        let client = rig.client(rig.config());
        for op in OPS {
            let _ = call(&*client, op).await;
        }
        let recorded = rig.recorded();
        assert_eq!(recorded.len(), OPS.len(), "{setup:?}");
        for r in &recorded {
            let what = format!("{setup:?} {}", r.method);
            assert_eq!(r.header("user-agent"), Some(USER_AGENT), "{what}");
            assert_eq!(r.header("accept-encoding"), Some("gzip"), "{what}");
            assert_eq!(r.header("content-encoding"), None, "{what}");
            assert_eq!(r.version, setup.wire_version(), "{what}");
        }
        rig.stop().await;
    }
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
    let mut list = common::wire::ListSandboxesResponse::default();
    list.sandboxes.push(common::wire::SandboxInfo {
        sandbox_id: SandboxId::new().to_string(),
        status: "running".into(),
        vcpus: 2,
        memory_mb: 512,
        ..Default::default()
    });
    let gzipped = Bytes::from(gzip(&list.encode_to_vec()));
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
