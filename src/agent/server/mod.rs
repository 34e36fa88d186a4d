//! Serves any [`HostAgent`] over gRPC, gRPC-Web and the Connect protocol
//! on one port: the adapter between the generated tonic service and the
//! domain trait, and the dispatch that picks a protocol by content type.
//!
//! - `application/grpc*`: tonic (gRPC over HTTP/2; gRPC-Web over HTTP/1.1
//!   or HTTP/2 through `tonic-web`).
//! - `application/proto`, `application/json`: Connect unary calls
//!   ([`connect`]), answered by the same [`Adapter`] methods.
//!
//! HTTP/1.1 and h2c (and TLS, with ALPN `h2` and `http/1.1`) share the
//! port: tonic's server detects the HTTP version of each connection.

mod connect;
mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tower_layer::Layer as _;

use super::pb::{self, wire};
use super::{BearerToken, HostAgent, HostInfo};

/// Largest request message accepted, on every protocol (compressed or
/// not): the same as our clients' default receive limit. Larger ones are
/// ResourceExhausted.
pub(crate) const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

/// Serves a host agent (package `hostagent.v1`, service
/// `HostAgentService`) over gRPC, gRPC-Web and the Connect protocol
/// (unary; binary and JSON codecs), HTTP/1.1 and h2c on one port, or TLS.
/// Requests are validated (ids, keys) before they reach the agent; agent
/// errors become the matching gRPC or Connect codes. Requests and answers
/// may be gzip-compressed on every protocol.
///
/// A Connect call with `curl`:
///
/// ```sh
/// curl -s -H 'content-type: application/json' -H 'authorization: Bearer s3cret' \
///   -d '{"sandboxId":"sb-…","name":"tpl-…"}' \
///   http://127.0.0.1:50051/hostagent.v1.HostAgentService/CreateSnapshot
/// ```
///
/// ```no_run
/// use std::sync::Arc;
/// use sandbox_snapshots::agent::{HostAgentServer, MemoryHostAgent};
///
/// # async fn serve() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
/// HostAgentServer::new(Arc::new(MemoryHostAgent::new()))
///     .serve(listener, async { let _ = tokio::signal::ctrl_c().await; })
///     .await
/// # }
/// ```
#[derive(Clone)]
pub struct HostAgentServer {
    agent: Arc<dyn HostAgent>,
    token: Option<BearerToken>,
    tls: Option<ServerTls>,
}

/// TLS for the host-agent server (rustls).
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerTls {
    /// PEM certificate chain of the agent.
    pub cert_pem: Vec<u8>,
    /// PEM private key of the agent.
    pub key_pem: Vec<u8>,
    /// PEM CA that client certificates must chain to; when set, clients
    /// without a valid certificate are refused (mutual TLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl ServerTls {
    /// Serve with this certificate and key.
    pub fn new(cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        Self {
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            client_ca_pem: None,
        }
    }

    /// Require client certificates signed by `ca_pem`.
    pub fn client_ca(mut self, ca_pem: impl Into<Vec<u8>>) -> Self {
        self.client_ca_pem = Some(ca_pem.into());
        self
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("key_pem", &"[redacted]")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for HostAgentServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAgentServer")
            .field("token", &self.token)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl HostAgentServer {
    /// Serves `agent`, without authentication.
    pub fn new(agent: Arc<dyn HostAgent>) -> Self {
        Self {
            agent,
            token: None,
            tls: None,
        }
    }

    /// Serves over TLS (and mutual TLS when the config has a client CA).
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Requires `authorization: Bearer <token>` on every call
    /// (Unauthenticated otherwise).
    pub fn with_token(mut self, token: BearerToken) -> Self {
        self.token = Some(token);
        self
    }

    /// The gRPC service alone as tonic routes, to mount next to other
    /// services (TLS is then the hosting server's business; the token
    /// check stays). gRPC-Web and the Connect protocol are served by
    /// [`serve`](Self::serve) only.
    pub fn into_routes(self) -> tonic::service::Routes {
        // No limit on answers: a `ListSnapshots` of a full host is several
        // MB, and clients set their own receive limit (64 MiB by default
        // for ours). tonic's default is the same; it is set here so that
        // it stays so. gzip both ways when the client asks for it.
        tonic::service::Routes::new(
            wire::host_agent_service_server::HostAgentServiceServer::new(Adapter(self))
                .max_encoding_message_size(usize::MAX)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip),
        )
    }

    /// Serves on `listener` until `shutdown` completes, then finishes the
    /// calls in progress.
    ///
    /// # Errors
    ///
    /// A TLS configuration that cannot be used (unreadable certificate,
    /// key or CA), before anything is served.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        // HTTP/1.1 for gRPC-Web and Connect; HTTP/2 (h2c or ALPN) for all.
        // Keepalive pings find dead HTTP/2 peers, so that their
        // connections do not stay open for ever.
        let server = tonic::transport::Server::builder()
            .accept_http1(true)
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)));
        match self.tls.clone() {
            None => {
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                server
                    .serve_with_incoming_shutdown(self.dispatch(), incoming, shutdown)
                    .await
                    .map_err(std::io::Error::other)
            }
            Some(tls) => {
                let (incoming, acceptor) = tls::incoming(listener, &tls)?;
                let served = server
                    .serve_with_incoming_shutdown(self.dispatch(), incoming, shutdown)
                    .await
                    .map_err(std::io::Error::other);
                // The incoming stream is gone: the accept loop closes the
                // listener; wait for it so that the port is free on return.
                let _ = acceptor.await;
                served
            }
        }
    }

    fn dispatch(self) -> Dispatch {
        Dispatch {
            grpc: tonic_web::GrpcWebLayer::new().layer(self.clone().into_routes()),
            connect: Adapter(self),
        }
    }

    /// Binds `addr` (port 0 picks a free port) and serves in a background
    /// task until `shutdown` completes. Returns the bound address.
    pub async fn spawn(
        self,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let task = tokio::spawn(self.serve(listener, shutdown));
        Ok((local, task))
    }

    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if token.matches(given) {
            Ok(())
        } else {
            Err(Status::unauthenticated("missing or invalid bearer token"))
        }
    }
}

#[derive(Clone)]
struct Adapter(HostAgentServer);

/// Every request of a connection, by protocol (see the module docs).
#[derive(Clone)]
struct Dispatch {
    grpc: tonic_web::GrpcWebService<tonic::service::Routes>,
    connect: Adapter,
}

/// The protocol of a request, by its content type.
enum Protocol {
    /// gRPC or gRPC-Web.
    Grpc,
    /// A Connect unary call with this codec.
    Connect(connect::Codec),
    /// Neither.
    Other,
}

impl Protocol {
    fn of(headers: &http::HeaderMap) -> Self {
        let Some(value) = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        else {
            return Self::Other;
        };
        let value = value.trim().to_ascii_lowercase();
        if value.starts_with("application/grpc") {
            return Self::Grpc;
        }
        connect::Codec::from_content_type(&value).map_or(Self::Other, Self::Connect)
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower_service::Service<http::Request<Body>> for Dispatch {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Each call clones the inner service and waits for it to be ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match Protocol::of(request.headers()) {
            Protocol::Grpc => {
                // The token is checked on the headers, before tonic reads
                // (and decompresses) a body for a caller without one.
                if let Some(token) = &self.connect.0.token {
                    let given = request
                        .headers()
                        .get(http::header::AUTHORIZATION)
                        .map(|v| v.as_bytes())
                        .unwrap_or_default();
                    if !token.matches(given) {
                        let refusal = grpc_refusal(&request);
                        if request.version() >= http::Version::HTTP_2 {
                            // HTTP/2 lets the answer come before the body
                            // ends (the rest of the stream is reset).
                            return Box::pin(std::future::ready(Ok(refusal)));
                        }
                        // Over HTTP/1.1 (gRPC-Web) a client still writing
                        // its body would see the connection close under
                        // it: read a small body first, discarding it; a
                        // larger one is not read, and the connection goes.
                        // A body that trickles is given a few seconds,
                        // not its connection for ever.
                        let body = request.into_body();
                        return Box::pin(async move {
                            use http_body_util::BodyExt as _;
                            let drain =
                                http_body_util::Limited::new(body, REFUSED_BODY_BYTES).collect();
                            let _ = tokio::time::timeout(REFUSED_BODY_WAIT, drain).await;
                            Ok(refusal)
                        });
                    }
                }
                let mut grpc = self.grpc.clone();
                Box::pin(async move {
                    use tower_service::Service;
                    std::future::poll_fn(|cx| {
                        Service::<http::Request<Body>>::poll_ready(&mut grpc, cx)
                    })
                    .await?;
                    grpc.call(request).await
                })
            }
            Protocol::Connect(codec) => {
                let adapter = self.connect.clone();
                Box::pin(async move { Ok(connect::handle(&adapter, codec, request).await) })
            }
            Protocol::Other => Box::pin(std::future::ready(Ok(connect::not_rpc(&request)))),
        }
    }
}

/// How much of an unauthenticated HTTP/1.1 request's body is read (and
/// thrown away) before it is refused.
const REFUSED_BODY_BYTES: usize = 64 * 1024;

/// How long an unauthenticated HTTP/1.1 request's body is waited for
/// before it is refused anyway.
const REFUSED_BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A trailers-only gRPC (or gRPC-Web) answer: unauthenticated.
fn grpc_refusal(request: &http::Request<Body>) -> http::Response<Body> {
    let mut response =
        Status::unauthenticated("missing or invalid bearer token").into_http::<Body>();
    if let Some(content_type) = request.headers().get(http::header::CONTENT_TYPE) {
        // gRPC-Web clients expect their own content type back.
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, content_type.clone());
    }
    response
}

/// One log line per call: the method, what it was about, how it ended.
fn logged<T>(
    method: &str,
    subject: &str,
    started: Instant,
    result: Result<T, Status>,
) -> Result<T, Status> {
    let ms = started.elapsed().as_millis();
    match &result {
        Ok(_) => tracing::info!(method, subject, ms, "ok"),
        Err(status) => {
            tracing::info!(method, subject, ms, code = ?status.code(), message = status.message(), "failed")
        }
    }
    result
}

impl Adapter {
    /// One call: the token check, the request validated into domain terms,
    /// the agent's work, the answer back in wire terms, one log line.
    async fn call<Req, D, Fut, Out, Resp>(
        &self,
        method: &str,
        subject: String,
        request: Request<Req>,
        work: impl FnOnce(Arc<dyn HostAgent>, D) -> Fut,
        answer: impl FnOnce(Out) -> Resp,
    ) -> Result<Response<Resp>, Status>
    where
        D: TryFrom<Req, Error = super::AgentError>,
        Fut: Future<Output = Result<Out, super::AgentError>>,
    {
        let started = Instant::now();
        let result = async {
            self.0.check(&request)?;
            let req = D::try_from(request.into_inner()).map_err(pb::error_to_status)?;
            let out = work(self.0.agent.clone(), req)
                .await
                .map_err(pb::error_to_status)?;
            Ok(Response::new(answer(out)))
        }
        .await;
        logged(method, &subject, started, result)
    }
}

/// A request without fields: nothing to validate.
struct Empty;

macro_rules! empty_request {
    ($($ty:ty),+) => {$(
        impl TryFrom<$ty> for Empty {
            type Error = super::AgentError;
            fn try_from(_: $ty) -> Result<Self, Self::Error> {
                Ok(Empty)
            }
        }
    )+};
}
empty_request!(
    wire::ListSandboxesRequest,
    wire::ListSnapshotsRequest,
    wire::GetHostInfoRequest
);

#[tonic::async_trait]
impl wire::host_agent_service_server::HostAgentService for Adapter {
    async fn create_snapshot(
        &self,
        request: Request<wire::CreateSnapshotRequest>,
    ) -> Result<Response<wire::CreateSnapshotResponse>, Status> {
        let r = request.get_ref();
        let subject = format!("{} -> {}", r.sandbox_id, r.name);
        self.call(
            "CreateSnapshot",
            subject,
            request,
            |agent, req| async move {
                let mut answer = agent.create_snapshot(req).await?;
                // Checked like `GetHostInfo`'s: a description the client
                // would refuse must not fail a snapshot that was taken.
                if let Some(Err(err)) = answer.compat.as_ref().map(HostInfo::validate) {
                    tracing::warn!(error = %err, "dropping a bad compat from a snapshot's answer");
                    answer.compat = None;
                }
                Ok(answer)
            },
            Into::into,
        )
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<wire::DeleteSnapshotRequest>,
    ) -> Result<Response<wire::DeleteSnapshotResponse>, Status> {
        let subject = request.get_ref().name.clone();
        self.call(
            "DeleteSnapshot",
            subject,
            request,
            |agent, req| async move { agent.delete_snapshot(req).await },
            |()| wire::DeleteSnapshotResponse {},
        )
        .await
    }

    async fn list_sandboxes(
        &self,
        request: Request<wire::ListSandboxesRequest>,
    ) -> Result<Response<wire::ListSandboxesResponse>, Status> {
        self.call(
            "ListSandboxes",
            String::new(),
            request,
            |agent, Empty| async move { agent.list_sandboxes().await },
            Into::into,
        )
        .await
    }

    async fn create_sandbox(
        &self,
        request: Request<wire::CreateSandboxRequest>,
    ) -> Result<Response<wire::CreateSandboxResponse>, Status> {
        let r = request.get_ref();
        let subject = format!("{} -> {}", r.template, r.sandbox_id);
        self.call(
            "CreateSandbox",
            subject,
            request,
            |agent, req| async move { agent.create_sandbox(req).await },
            Into::into,
        )
        .await
    }

    async fn destroy_sandbox(
        &self,
        request: Request<wire::DestroySandboxRequest>,
    ) -> Result<Response<wire::DestroySandboxResponse>, Status> {
        let subject = request.get_ref().sandbox_id.clone();
        self.call(
            "DestroySandbox",
            subject,
            request,
            |agent, req| async move { agent.destroy_sandbox(req).await },
            |()| wire::DestroySandboxResponse {},
        )
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<wire::ListSnapshotsRequest>,
    ) -> Result<Response<wire::ListSnapshotsResponse>, Status> {
        self.call(
            "ListSnapshots",
            String::new(),
            request,
            |agent, Empty| async move { agent.list_snapshots().await },
            pb::snapshots_to_wire,
        )
        .await
    }

    async fn get_host_info(
        &self,
        request: Request<wire::GetHostInfoRequest>,
    ) -> Result<Response<wire::HostInfo>, Status> {
        self.call(
            "GetHostInfo",
            String::new(),
            request,
            |agent, Empty| async move {
                let info = agent.host_info().await?;
                // An agent's own answer is checked like one from the wire.
                info.validate().map_err(|e| {
                    super::AgentError::rejected(
                        super::AgentCode::Internal,
                        format!("bad host info: {e}"),
                    )
                })?;
                Ok(info)
            },
            Into::into,
        )
        .await
    }
}
