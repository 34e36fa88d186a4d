//! The gRPC client transport (tonic): one lazily connected channel per host,
//! reused for every call and replaced when the host's address changes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::codec::CompressionEncoding;
use tonic::codegen::Service;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::client::{COMPRESS_OVER_BYTES, ClientConfig};
use super::pb::{self, ClientVerdict, SentStatus, wire};
use super::{
    AgentError, AgentTransport, BearerToken, CreateSandboxRequest, CreateSandboxResponse,
    CreateSnapshotRequest, CreateSnapshotResponse, DeleteSnapshotRequest, DestroySandboxRequest,
    HostAgent, HostInfo, HostTarget, SandboxList, SnapshotInfo,
};
use crate::ids::HostId;

type Client = wire::host_agent_service_client::HostAgentServiceClient<Checked>;

/// Reaches host agents over gRPC. Addresses are `host:port` or a URL
/// (`http://…`, `https://…`); without a scheme, `https` is used when TLS is
/// configured and `http` otherwise.
///
/// With [`ClientConfig::gzip`] on, requests over 1 KiB are sent with
/// `grpc-encoding: gzip` and gzip answers are asked for
/// (`grpc-accept-encoding`); an answer in any other encoding is an
/// [`AgentError::Protocol`].
pub struct GrpcTransport {
    config: ClientConfig,
    tls: Option<ClientTlsConfig>,
    channels: Mutex<HashMap<HostId, (String, Checked)>>,
}

impl std::fmt::Debug for GrpcTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTransport")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl GrpcTransport {
    /// A transport with `config`. Bad TLS material shows up as
    /// [`AgentError::Unavailable`] on the first call to a host.
    pub fn new(config: ClientConfig) -> Self {
        let tls = config.tls.as_ref().map(|t| {
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&t.ca_pem));
            if let Some((cert, key)) = &t.client_identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            if let Some(name) = &t.domain_name {
                tls = tls.domain_name(name.clone());
            }
            tls
        });
        Self {
            config,
            tls,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn uri(&self, address: &str) -> String {
        if address.contains("://") {
            address.to_owned()
        } else if self.tls.is_some() {
            format!("https://{address}")
        } else {
            format!("http://{address}")
        }
    }

    fn channel(&self, host: &HostTarget) -> Result<Checked, AgentError> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((address, channel)) = channels.get(&host.id)
            && *address == host.address
        {
            return Ok(channel.clone());
        }
        if host.address.is_empty() {
            return Err(AgentError::not_sent(format!(
                "host {} has no address",
                host.id
            )));
        }
        if self.tls.is_some() && host.address.starts_with("http://") {
            // The token would go in cleartext to an agent that was meant
            // to be reached over TLS.
            return Err(AgentError::not_sent(format!(
                "host {}: TLS is configured but the address says http://",
                host.id
            )));
        }
        let bad = |e: tonic::transport::Error| {
            AgentError::not_sent(format!("bad agent address for host {}: {e}", host.id))
        };
        let mut endpoint = Endpoint::from_shared(self.uri(&host.address))
            .map_err(bad)?
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .user_agent(self.config.user_agent_header())
            .map_err(bad)?;
        if let Some(tls) = &self.tls {
            let tls = tls.clone().timeout(self.config.connect_timeout);
            endpoint = endpoint.tls_config(tls).map_err(bad)?;
        }
        // The connect timeout is the TCP connector's (not the endpoint's,
        // which tonic enforces outside its `ConnectError`): a connect that
        // times out is then "not sent" like any other connect failure.
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.config.connect_timeout));
        let http1_peer = Arc::new(AtomicBool::new(false));
        let connector = SniffingConnector {
            http,
            http1_peer: http1_peer.clone(),
        };
        // Connects on first use and reconnects by itself after failures.
        let channel = Checked {
            channel: endpoint.connect_with_connector_lazy(connector),
            http1_peer,
            gzip_asked: self.config.gzip,
        };
        channels.insert(host.id, (host.address.clone(), channel.clone()));
        Ok(channel)
    }
}

impl AgentTransport for GrpcTransport {
    fn agent(&self, host: &HostTarget) -> Result<Arc<dyn HostAgent>, AgentError> {
        Ok(Arc::new(self.grpc_agent(host)?))
    }
}

impl GrpcTransport {
    fn grpc_agent(&self, host: &HostTarget) -> Result<GrpcAgent, AgentError> {
        let channel = self.channel(host)?;
        let mut client =
            Client::new(channel).max_decoding_message_size(self.config.max_response_bytes);
        if self.config.gzip {
            client = client.accept_compressed(CompressionEncoding::Gzip);
        }
        Ok(GrpcAgent {
            client,
            token: self.config.token.as_ref().map(BearerToken::header_value),
            create_timeout: self.config.create_timeout,
            call_timeout: self.config.call_timeout,
            gzip: self.config.gzip,
        })
    }
}

/// A client for one host's agent.
struct GrpcAgent {
    client: Client,
    token: Option<String>,
    create_timeout: Duration,
    call_timeout: Duration,
    gzip: bool,
}

impl GrpcAgent {
    /// One call: `call` is the generated client method. The deadline is
    /// sent to the agent and also kept here, over the whole answer.
    async fn call<Req, Resp, Fut>(
        &self,
        message: Req,
        timeout: Duration,
        call: impl FnOnce(Client, tonic::Request<Req>) -> Fut,
    ) -> Result<Resp, AgentError>
    where
        Req: prost::Message,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        // tonic compresses every message of a client that compresses:
        // the choice is made per call, from this message's size.
        let mut client = self.client.clone();
        if self.gzip && message.encoded_len() > COMPRESS_OVER_BYTES {
            client = client.send_compressed(CompressionEncoding::Gzip);
        }
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        if let Some(token) = &self.token {
            let value = token.parse().map_err(|_| AgentError::Protocol {
                message: "the bearer token is not a valid header value".into(),
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        let sent = SentStatus::default();
        request.extensions_mut().insert(sent.clone());
        match tokio::time::timeout(timeout, call(client, request)).await {
            Err(_) => Err(AgentError::Timeout),
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(pb::status_to_error(status, &sent)),
        }
    }
}

/// The channel with a look at each answer before tonic reads it.
///
/// tonic reads any HTTP response as gRPC: a plain-text 404 from the Go
/// agent's mux is parsed as frames and comes out Internal; a `grpc-encoding`
/// we did not ask for comes out Unimplemented. Both would then pass for
/// the agent's own answer. Here, a response that is not gRPC (status not
/// 200 or a content type that is not `application/grpc*`, and no
/// `grpc-status`) is classified by its HTTP status, an unasked encoding is
/// a protocol error — as a [`ClientVerdict`] service error, which tonic
/// keeps in the `Status`'s source chain. And every `grpc-status` the agent
/// sends (headers or trailers) is recorded in the call's [`SentStatus`].
#[derive(Clone)]
struct Checked {
    channel: Channel,
    /// Set when the server of the current connection answered our h2c
    /// preface in HTTP/1 (see [`Sniff`]).
    http1_peer: Arc<AtomicBool>,
    /// Whether gzip answers were asked for.
    gzip_asked: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl Service<http::Request<tonic::body::Body>> for Checked {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.channel.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let sent = request
            .extensions()
            .get::<SentStatus>()
            .cloned()
            .unwrap_or_default();
        let call = self.channel.call(request);
        let http1_peer = self.http1_peer.clone();
        let gzip_asked = self.gzip_asked;
        Box::pin(async move {
            let response = match call.await {
                Ok(response) => response,
                // The connection died because the server speaks HTTP/1.1
                // only: h2 reports a frame error or a closed connection,
                // but the answer was just not HTTP/2.
                Err(e) if http1_peer.load(Ordering::SeqCst) && !failed_to_connect(&e) => {
                    return Err(ClientVerdict(AgentError::Protocol {
                        message: format!(
                            "the agent answered in HTTP/1.1; it does not serve gRPC here ({e})"
                        ),
                    })
                    .into());
                }
                Err(e) => return Err(e.into()),
            };
            check_answer(&response, gzip_asked).map_err(ClientVerdict)?;
            if let Some(value) = response.headers().get(GRPC_STATUS) {
                sent.record(value);
            }
            Ok(response.map(|body| {
                tonic::body::Body::new(body.map_frame(move |frame| {
                    if let Some(value) = frame.trailers_ref().and_then(|t| t.get(GRPC_STATUS)) {
                        sent.record(value);
                    }
                    frame
                }))
            }))
        })
    }
}

const GRPC_STATUS: &str = "grpc-status";

/// Whether `err` is (or was caused by) a failure to connect: nothing was
/// sent, whatever an earlier connection's peer spoke.
fn failed_to_connect(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// The TCP connector of gRPC channels: hyper's, with a [`Sniff`] on
/// cleartext (h2c) connections.
#[derive(Clone)]
struct SniffingConnector {
    http: HttpConnector,
    http1_peer: Arc<AtomicBool>,
}

impl Service<http::Uri> for SniffingConnector {
    type Response = TokioIo<Sniff>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        // Under TLS the bytes are encrypted, and a server without HTTP/2
        // fails the ALPN check while connecting.
        let cleartext = uri.scheme_str() == Some("http");
        let http1_peer = self.http1_peer.clone();
        // A new connection: what the last peer spoke no longer tells.
        http1_peer.store(false, Ordering::SeqCst);
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            Ok(TokioIo::new(Sniff {
                tcp,
                http1_peer: cleartext.then_some(http1_peer),
            }))
        })
    }
}

/// A connection that looks at the first bytes the server sends. An HTTP/2
/// server starts with a SETTINGS frame, whose first byte (of a 24-bit
/// length under 16 KiB) is 0; an HTTP/1.1-only server answering our
/// preface starts with `HTTP/1.1 400 …`. h2 then reports a frame size
/// error or a closed connection; this tells [`Checked`] what it was.
struct Sniff {
    tcp: TcpStream,
    /// Until the first bytes arrive.
    http1_peer: Option<Arc<AtomicBool>>,
}

impl AsyncRead for Sniff {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.tcp).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if !new.is_empty()
            && let Some(flag) = this.http1_peer.take()
        {
            let n = new.len().min(5);
            if new[..n] == b"HTTP/"[..n] {
                flag.store(true, Ordering::SeqCst);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Sniff {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Whether `response` is a gRPC answer we can read (see [`Checked`]).
fn check_answer<B>(response: &http::Response<B>, gzip_asked: bool) -> Result<(), AgentError> {
    let headers = response.headers();
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .map(http::HeaderValue::as_bytes)
        .unwrap_or_default();
    let grpc_content = content_type == b"application/grpc"
        || content_type.starts_with(b"application/grpc+")
        || content_type.starts_with(b"application/grpc;");
    let is_grpc = response.status() == http::StatusCode::OK && grpc_content;
    if !is_grpc && !headers.contains_key(GRPC_STATUS) {
        return Err(pb::http_status_to_error(response.status()));
    }
    // Only gzip is ever asked for (`grpc-accept-encoding`), and only when
    // configured: anything else cannot be trusted to be read right.
    if let Some(encoding) = headers.get("grpc-encoding")
        && encoding.as_bytes() != b"identity"
        && !(gzip_asked && encoding.as_bytes() == b"gzip")
    {
        return Err(AgentError::Protocol {
            message: format!(
                "the answer is compressed with {:?}, which was not asked for",
                String::from_utf8_lossy(encoding.as_bytes())
            ),
        });
    }
    Ok(())
}

#[async_trait]
impl HostAgent for GrpcAgent {
    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, AgentError> {
        let message = wire::CreateSnapshotRequest::from(req);
        self.call(message, self.create_timeout, |mut c, r| async move {
            c.create_snapshot(r).await
        })
        .await?
        .try_into()
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<(), AgentError> {
        let message = wire::DeleteSnapshotRequest::from(req);
        self.call(message, self.call_timeout, |mut c, r| async move {
            c.delete_snapshot(r).await
        })
        .await?;
        Ok(())
    }

    async fn list_sandboxes(&self) -> Result<SandboxList, AgentError> {
        let message = wire::ListSandboxesRequest {};
        self.call(message, self.call_timeout, |mut c, r| async move {
            c.list_sandboxes(r).await
        })
        .await?
        .try_into()
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentError> {
        let message = wire::ListSnapshotsRequest {};
        let response = self
            .call(message, self.call_timeout, |mut c, r| async move {
                c.list_snapshots(r).await
            })
            .await?;
        pb::snapshots_from_wire(response)
    }

    async fn create_sandbox(
        &self,
        req: CreateSandboxRequest,
    ) -> Result<CreateSandboxResponse, AgentError> {
        // Starting a VM from a snapshot takes as long as making one.
        let message = wire::CreateSandboxRequest::from(req);
        let response = self
            .call(message, self.create_timeout, |mut c, r| async move {
                c.create_sandbox(r).await
            })
            .await?;
        Ok(response.into())
    }

    async fn destroy_sandbox(&self, req: DestroySandboxRequest) -> Result<(), AgentError> {
        let message = wire::DestroySandboxRequest::from(req);
        self.call(message, self.call_timeout, |mut c, r| async move {
            c.destroy_sandbox(r).await
        })
        .await?;
        Ok(())
    }

    async fn host_info(&self) -> Result<HostInfo, AgentError> {
        let message = wire::GetHostInfoRequest {};
        let response = self
            .call(message, self.call_timeout, |mut c, r| async move {
                c.get_host_info(r).await
            })
            .await?;
        Ok(pb::host_info_from_wire(Some(response))?.unwrap_or_default())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use prost::Message;

    use super::*;
    use crate::agent::client::{USER_AGENT, recording};

    /// An empty `CreateSandboxResponse`, uncompressed.
    fn answer() -> http::Response<recording::Body> {
        let mut trailers = http::HeaderMap::new();
        trailers.insert(GRPC_STATUS, http::HeaderValue::from_static("0"));
        let frames = vec![
            Ok(hyper::body::Frame::data(Bytes::from_static(&[
                0, 0, 0, 0, 0,
            ]))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ];
        http::Response::builder()
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(StreamBody::new(tokio_stream::iter(frames)).boxed())
            .unwrap()
    }

    /// Requests over 1 KiB go out gzipped, smaller ones as they are; gzip
    /// answers are asked for; the user-agent names the crate.
    #[tokio::test]
    async fn requests_over_1_kib_are_compressed_and_gzip_is_asked_for() {
        let (addr, seen) = recording::start(true, answer).await;
        let host = HostTarget {
            id: HostId::new(),
            address: addr.to_string(),
        };
        for (gzip, template_len, compressed) in
            [(true, 10, false), (true, 2000, true), (false, 2000, false)]
        {
            let agent = GrpcTransport::new(ClientConfig::default().gzip(gzip))
                .grpc_agent(&host)
                .unwrap();
            let message = wire::CreateSandboxRequest {
                template: "t".repeat(template_len),
                ..Default::default()
            };
            let encoded = message.encode_to_vec();
            agent
                .call(message, Duration::from_secs(10), |mut c, r| async move {
                    c.create_sandbox(r).await
                })
                .await
                .unwrap();
            let (headers, body) = seen.lock().unwrap().pop().unwrap();
            let case = format!("gzip {gzip}, {template_len} byte template");
            let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
            assert!(
                header("user-agent").unwrap().starts_with(USER_AGENT),
                "{case}: {headers:?}"
            );
            assert_eq!(
                header("grpc-accept-encoding").is_some_and(|v| v.contains("gzip")),
                gzip,
                "{case}: {headers:?}"
            );
            assert_eq!(
                header("grpc-encoding") == Some("gzip"),
                compressed,
                "{case}"
            );
            assert_eq!(body[0] == 1, compressed, "{case}: the compressed flag");
            let payload = if compressed {
                recording::gunzip(&body[5..])
            } else {
                body[5..].to_vec()
            };
            assert_eq!(payload, encoded, "{case}");
        }
    }
}
