//! A minimal Connect-protocol server (unary calls, `application/proto`) in
//! front of any `HostAgent`: what an existing connect-go host agent looks
//! like on the wire. By default HTTP/1.1 in cleartext, like connect-go;
//! [`ConnectOptions`] add HTTP/2 (h2c, or ALPN over TLS), TLS and mutual
//! TLS (tokio-rustls), and gzip answers. gzip requests are always read.
//! Every request's headers are recorded. Test support only.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sandbox_snapshots::agent::{
    CreateSandboxRequest, CreateSnapshotRequest, DeleteSnapshotRequest, DestroySandboxRequest,
    SnapshotKey,
};
use sandbox_snapshots::{AgentCode, AgentError, HostAgent, SandboxId, TeamId, TemplateId};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::wire;

const PREFIX: &str = "/hostagent.v1.HostAgentService/";

/// TLS of the test server: its certificate and key, and the CA that
/// client certificates must chain to (mutual TLS) when set.
#[derive(Clone)]
pub struct TestTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: Option<String>,
}

/// How the test server serves.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// Required as `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Serve HTTP/2 too: h2c with prior knowledge in cleartext, ALPN `h2`
    /// (next to `http/1.1`) over TLS.
    pub http2: bool,
    pub tls: Option<TestTls>,
    /// Compress every answer (success or error) with gzip when the client
    /// sent `accept-encoding: gzip`.
    pub gzip_answers: bool,
}

/// What the server saw of one request.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    /// The body as received (compressed or not).
    pub wire_len: usize,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub struct ConnectServer {
    pub addr: SocketAddr,
    /// The raw body of the last CreateSnapshot request received.
    pub last_create_body: Arc<Mutex<Option<Bytes>>>,
    /// Every request received, in order.
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct State {
    agent: Arc<dyn HostAgent>,
    token: Option<String>,
    gzip_answers: bool,
    last_create_body: Arc<Mutex<Option<Bytes>>>,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

fn tls_acceptor(tls: &TestTls, http2: bool) -> TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match &tls.client_ca_pem {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let chain = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).unwrap();
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    TlsAcceptor::from(Arc::new(config))
}

async fn serve_connection<I>(io: I, http2: bool, state: State)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
    let io = TokioIo::new(io);
    if http2 {
        // HTTP/1.1 and HTTP/2 (told apart by the h2 preface).
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await;
    }
}

impl ConnectServer {
    pub async fn start(agent: Arc<dyn HostAgent>, token: Option<&str>) -> ConnectServer {
        Self::start_on(agent, token, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(
        agent: Arc<dyn HostAgent>,
        token: Option<&str>,
        addr: SocketAddr,
    ) -> ConnectServer {
        let options = ConnectOptions {
            token: token.map(str::to_owned),
            ..ConnectOptions::default()
        };
        Self::start_with(agent, options, addr).await
    }

    pub async fn start_with(
        agent: Arc<dyn HostAgent>,
        options: ConnectOptions,
        addr: SocketAddr,
    ) -> ConnectServer {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = State {
            agent,
            token: options.token.map(|t| format!("Bearer {t}")),
            gzip_answers: options.gzip_answers,
            last_create_body: Arc::new(Mutex::new(None)),
            requests: Arc::new(Mutex::new(Vec::new())),
        };
        let (last_create_body, requests) = (state.last_create_body.clone(), state.requests.clone());
        let http2 = options.http2;
        let acceptor = options.tls.as_ref().map(|t| tls_acceptor(t, http2));
        let task = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) closes every
            // connection: the server is really gone.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    match acceptor {
                        // A refused handshake (no client certificate)
                        // ends the connection.
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                serve_connection(tls, http2, state).await;
                            }
                        }
                        None => serve_connection(stream, http2, state).await,
                    }
                });
            }
        });
        ConnectServer {
            addr,
            last_create_body,
            requests,
            task,
        }
    }

    /// What the server saw of every request so far.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// Closes the listener and every open connection.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn http_status(code: &str) -> StatusCode {
    match code {
        "canceled" => StatusCode::from_u16(499).unwrap(),
        "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
        "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
        "not_found" => StatusCode::NOT_FOUND,
        "already_exists" | "aborted" => StatusCode::CONFLICT,
        "permission_denied" => StatusCode::FORBIDDEN,
        "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
        "unimplemented" => StatusCode::NOT_IMPLEMENTED,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "unauthenticated" => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error(code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    Response::builder()
        .status(http_status(code))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn agent_error(err: AgentError) -> Response<Full<Bytes>> {
    match err {
        AgentError::Unavailable { message, .. } => error("unavailable", &message),
        AgentError::Timeout => error("deadline_exceeded", "timed out"),
        AgentError::Rejected { code, message } => error(code.as_str(), &message),
        AgentError::Protocol { message } => error("internal", &message),
        _ => error("unknown", "unknown"),
    }
}

fn ok(message: impl Message) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/proto")
        .body(Full::new(Bytes::from(message.encode_to_vec())))
        .unwrap()
}

fn invalid(what: &str) -> AgentError {
    AgentError::rejected(AgentCode::InvalidArgument, format!("invalid {what}"))
}

fn opt<T>(
    text: &str,
    parse: impl Fn(&str) -> Option<T>,
    what: &str,
) -> Result<Option<T>, AgentError> {
    if text.is_empty() {
        Ok(None)
    } else {
        parse(text).map(Some).ok_or_else(|| invalid(what))
    }
}

pub fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(body).unwrap();
    encoder.finish().unwrap()
}

pub fn gunzip(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(body)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

/// The answer, compressed when asked for and configured.
async fn finish(response: Response<Full<Bytes>>, compress: bool) -> Response<Full<Bytes>> {
    if !compress {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    parts
        .headers
        .insert("content-encoding", http::HeaderValue::from_static("gzip"));
    Response::from_parts(parts, Full::new(Bytes::from(gzip(&body))))
}

async fn handle(state: State, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let compress = state.gzip_answers
        && req
            .headers()
            .get_all("accept-encoding")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|e| e.trim() == "gzip");
    let response = answer(state, req).await;
    Ok(finish(response, compress).await)
}

async fn answer(state: State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::POST {
        return error("unimplemented", "POST only");
    }
    if req.headers().get("content-type").map(|v| v.as_bytes()) != Some(b"application/proto") {
        return Response::builder()
            .status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    if let Some(token) = &state.token {
        let given = req.headers().get("authorization").map(|v| v.as_bytes());
        if given != Some(token.as_bytes()) {
            return error("unauthenticated", "bad token");
        }
    }
    let deadline = req
        .headers()
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(3600));
    let Some(method) = req.uri().path().strip_prefix(PREFIX).map(str::to_owned) else {
        return error("unimplemented", "unknown service");
    };
    let version = req.version();
    let headers = req.headers().clone();
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return error("internal", "body");
    };
    state.requests.lock().unwrap().push(Recorded {
        method: method.clone(),
        version,
        headers: headers.clone(),
        wire_len: body.len(),
    });
    let body = match headers.get("content-encoding").map(|v| v.as_bytes()) {
        None | Some(b"identity") => body,
        Some(b"gzip") => match gunzip(&body) {
            Some(body) => Bytes::from(body),
            None => return error("invalid_argument", "bad gzip"),
        },
        Some(_) => return error("unimplemented", "unknown content-encoding"),
    };
    let agent = state.agent.clone();
    let call = async {
        match method.as_str() {
            "CreateSnapshot" => {
                *state.last_create_body.lock().unwrap() = Some(body.clone());
                let m =
                    wire::CreateSnapshotRequest::decode(body).map_err(|_| invalid("message"))?;
                let mut r = CreateSnapshotRequest::new(
                    SandboxId::parse(&m.sandbox_id).map_err(|_| invalid("sandbox_id"))?,
                    SnapshotKey::parse(&m.name).map_err(|_| invalid("name"))?,
                );
                r.team_id = opt(&m.team_id, |t| TeamId::parse(t).ok(), "team_id")?;
                r.template_id = opt(&m.template_id, |t| TemplateId::parse(t).ok(), "template_id")?;
                let resp = agent.create_snapshot(r).await?;
                Ok(ok(wire::CreateSnapshotResponse {
                    name: resp.key,
                    size_bytes: resp.size_bytes as i64,
                }))
            }
            "DeleteSnapshot" => {
                let m =
                    wire::DeleteSnapshotRequest::decode(body).map_err(|_| invalid("message"))?;
                let r = DeleteSnapshotRequest::new(
                    SnapshotKey::parse(&m.name).map_err(|_| invalid("name"))?,
                );
                agent.delete_snapshot(r).await?;
                Ok(ok(wire::Empty {}))
            }
            "ListSandboxes" => {
                let list = agent.list_sandboxes().await?;
                Ok(ok(wire::ListSandboxesResponse {
                    sandboxes: list
                        .sandboxes
                        .into_iter()
                        .map(|s| wire::SandboxInfo {
                            sandbox_id: s.sandbox_id,
                            status: s.status,
                            template: s.template,
                            vcpus: s.vcpus as i32,
                            memory_mb: s.memory_mb as i32,
                            host_ip: s.host_ip,
                            created_at_unix: s.created_at_unix,
                            last_active_at_unix: s.last_active_at_unix,
                            timeout_sec: s.timeout_sec,
                        })
                        .collect(),
                    auto_paused_sandbox_ids: list.auto_paused_sandbox_ids,
                }))
            }
            "ListSnapshots" => {
                let list = agent.list_snapshots().await?;
                Ok(ok(wire::ListSnapshotsResponse {
                    snapshots: list
                        .into_iter()
                        .map(|s| wire::SnapshotInfo {
                            name: s.key,
                            size_bytes: s.size_bytes as i64,
                            created_at_unix: s.created_at.map_or(0, |t| t.unix_millis() / 1000),
                        })
                        .collect(),
                }))
            }
            "CreateSandbox" => {
                let m = wire::CreateSandboxRequest::decode(body).map_err(|_| invalid("message"))?;
                let mut r = CreateSandboxRequest::new(
                    SandboxId::parse(&m.sandbox_id).map_err(|_| invalid("sandbox_id"))?,
                    SnapshotKey::parse(&m.template).map_err(|_| invalid("template"))?,
                );
                r.vcpus = u32::try_from(m.vcpus).map_err(|_| invalid("vcpus"))?;
                r.memory_mb = u32::try_from(m.memory_mb).map_err(|_| invalid("memory_mb"))?;
                r.timeout_sec = u32::try_from(m.timeout_sec).map_err(|_| invalid("timeout_sec"))?;
                r.disk_size_mb =
                    u32::try_from(m.disk_size_mb).map_err(|_| invalid("disk_size_mb"))?;
                r.team_id = opt(&m.team_id, |t| TeamId::parse(t).ok(), "team_id")?;
                r.template_id = opt(&m.template_id, |t| TemplateId::parse(t).ok(), "template_id")?;
                let resp = agent.create_sandbox(r).await?;
                Ok(ok(wire::CreateSandboxResponse {
                    sandbox_id: resp.sandbox_id,
                    status: resp.status,
                    host_ip: resp.host_ip,
                    metadata: resp.metadata.into_iter().collect(),
                }))
            }
            "DestroySandbox" => {
                let m =
                    wire::DestroySandboxRequest::decode(body).map_err(|_| invalid("message"))?;
                let r = DestroySandboxRequest::new(
                    SandboxId::parse(&m.sandbox_id).map_err(|_| invalid("sandbox_id"))?,
                );
                agent.destroy_sandbox(r).await?;
                Ok(ok(wire::Empty {}))
            }
            "GetHostInfo" => {
                let h = agent.host_info().await?;
                Ok(ok(wire::HostInfo {
                    vmm: h.vmm,
                    vmm_version: h.vmm_version,
                    snapshot_format: h.snapshot_format,
                    kernel_version: h.kernel_version,
                    cpu_vendor: h.cpu_vendor,
                    cpu_model: h.cpu_model,
                    cpu_flags: h.cpu_flags,
                    arch: h.arch,
                }))
            }
            _ => Err(AgentError::rejected(
                AgentCode::Unimplemented,
                "unknown method",
            )),
        }
    };
    match tokio::time::timeout(deadline, call).await {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => agent_error(err),
        Err(_) => error("deadline_exceeded", "deadline exceeded"),
    }
}
