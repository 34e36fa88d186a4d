//! The settings both client transports share: one builder, read by
//! [`GrpcTransport`](super::GrpcTransport) and
//! [`ConnectTransport`](super::ConnectTransport) alike.

use std::time::Duration;

use super::BearerToken;

/// Largest answer accepted by default (both transports).
pub(crate) const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Requests whose encoded message is larger than this are sent compressed
/// (when compression is on); smaller ones are not worth the CPU.
pub(crate) const COMPRESS_OVER_BYTES: usize = 1024;

/// What the transports send as `user-agent`, after any product token the
/// caller adds.
pub(crate) const USER_AGENT: &str = concat!(env!("CARGO_PKG_NAME"), "/", env!("CARGO_PKG_VERSION"));

/// TLS for connections to host agents (rustls). Agents are verified
/// against [`ca_pem`](Self::ca_pem) only: the system's roots are never
/// trusted.
#[derive(Clone)]
#[non_exhaustive]
pub struct TlsConfig {
    /// PEM of the CA that signs the agents' certificates.
    pub ca_pem: Vec<u8>,
    /// PEM certificate and key of the control plane, for mutual TLS.
    pub client_identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to verify in agents' certificates, when it differs from
    /// the host part of their address.
    pub domain_name: Option<String>,
}

impl TlsConfig {
    /// Verify agents against `ca_pem`.
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> Self {
        Self {
            ca_pem: ca_pem.into(),
            client_identity: None,
            domain_name: None,
        }
    }

    /// Present this certificate and key to agents (mutual TLS).
    pub fn client_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.client_identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Expect this name in agents' certificates.
    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field(
                "client_identity",
                &self.client_identity.as_ref().map(|_| "[redacted]"),
            )
            .field("domain_name", &self.domain_name)
            .finish_non_exhaustive()
    }
}

/// Which HTTP the Connect transport speaks. gRPC is always HTTP/2 and
/// ignores this.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpVersion {
    /// HTTP/1.1 in cleartext (what connect-go agents serve); over TLS,
    /// HTTP/2 when the agent offers it (ALPN `h2`), HTTP/1.1 otherwise.
    #[default]
    Auto,
    /// HTTP/1.1 only, in cleartext and over TLS.
    Http1,
    /// HTTP/2 only: with prior knowledge (h2c) in cleartext, ALPN `h2`
    /// over TLS.
    Http2,
}

/// Settings of the client transports, shared by gRPC and Connect.
///
/// ```
/// use std::time::Duration;
/// use sandbox_snapshots::agent::{ClientConfig, ConnectTransport, GrpcTransport, HttpVersion};
/// use sandbox_snapshots::BearerToken;
///
/// let config = ClientConfig::default()
///     .token(BearerToken::new("s3cret"))
///     .timeouts(Duration::from_secs(2), Duration::from_secs(120), Duration::from_secs(10))
///     .max_response_bytes(16 << 20);
/// let grpc = GrpcTransport::new(config.clone());
/// let connect = ConnectTransport::new(config.http_version(HttpVersion::Http2));
/// # drop((grpc, connect));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Longest a TCP connect and TLS handshake may take. Default 5 s.
    pub connect_timeout: Duration,
    /// Deadline of `CreateSnapshot` and `CreateSandbox` calls, sent to the
    /// agent (`grpc-timeout`, `connect-timeout-ms`). Default 5 min.
    pub create_timeout: Duration,
    /// Deadline of every other call. Default 30 s.
    pub call_timeout: Duration,
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<BearerToken>,
    /// TLS; cleartext when `None` and the address is not `https://`.
    pub tls: Option<TlsConfig>,
    /// Largest answer accepted (one message, after decompression); larger
    /// ones are an [`AgentError::Protocol`](super::AgentError::Protocol).
    /// Default 64 MiB (a `ListSnapshots` of a host with 56k keys is about
    /// 4.3 MB).
    pub max_response_bytes: usize,
    /// gzip: requests over 1 KiB are sent compressed, and compressed
    /// answers are asked for. Default on.
    pub gzip: bool,
    /// A product token sent before the crate's own in `user-agent`
    /// (which is always `sandbox-snapshots/<version>`).
    pub user_agent: Option<String>,
    /// The HTTP of the Connect transport. Default [`HttpVersion::Auto`].
    pub http_version: HttpVersion,
}

/// The settings of [`GrpcTransport`](super::GrpcTransport).
pub type GrpcConfig = ClientConfig;

/// The settings of [`ConnectTransport`](super::ConnectTransport).
pub type ConnectConfig = ClientConfig;

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            create_timeout: Duration::from_secs(300),
            call_timeout: Duration::from_secs(30),
            token: None,
            tls: None,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            gzip: true,
            user_agent: None,
            http_version: HttpVersion::Auto,
        }
    }
}

impl ClientConfig {
    /// Sends `token` on every call.
    pub fn token(mut self, token: BearerToken) -> Self {
        self.token = Some(token);
        self
    }

    /// Uses TLS.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets the connect timeout and the per-call deadlines.
    pub fn timeouts(mut self, connect: Duration, create: Duration, call: Duration) -> Self {
        self.connect_timeout = connect;
        self.create_timeout = create;
        self.call_timeout = call;
        self
    }

    /// Accepts answers of up to `n` bytes.
    pub fn max_response_bytes(mut self, n: usize) -> Self {
        self.max_response_bytes = n;
        self
    }

    /// Turns gzip (both directions) on or off.
    pub fn gzip(mut self, on: bool) -> Self {
        self.gzip = on;
        self
    }

    /// Sends `product` (e.g. `my-control-plane/1.2`) before the crate's
    /// own token in `user-agent`.
    pub fn user_agent(mut self, product: impl Into<String>) -> Self {
        self.user_agent = Some(product.into());
        self
    }

    /// Chooses the Connect transport's HTTP.
    pub fn http_version(mut self, version: HttpVersion) -> Self {
        self.http_version = version;
        self
    }

    /// The `user-agent` value (tonic appends its own token to it).
    pub(crate) fn user_agent_header(&self) -> String {
        match &self.user_agent {
            Some(product) => format!("{product} {USER_AGENT}"),
            None => USER_AGENT.to_owned(),
        }
    }

    /// Whether a request of `encoded_len` bytes is sent compressed.
    pub(crate) fn compress_request(&self, encoded_len: usize) -> bool {
        self.gzip && encoded_len > COMPRESS_OVER_BYTES
    }
}

/// A loopback server for the transports' unit tests: it records each
/// request's headers and body, and answers with `answer`.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod recording {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::BodyExt;
    use http_body_util::combinators::BoxBody;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    pub(crate) type Body = BoxBody<Bytes, Infallible>;
    pub(crate) type Seen = Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>;

    /// Serves HTTP/2 with prior knowledge when `h2`, HTTP/1.1 otherwise.
    pub(crate) async fn start(
        h2: bool,
        answer: fn() -> http::Response<Body>,
    ) -> (SocketAddr, Seen) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Seen::default();
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let record = record.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body: Bytes = body.collect().await.unwrap().to_bytes();
                                record.lock().unwrap().push((parts.headers, body));
                                Ok::<_, Infallible>(answer())
                            }
                        },
                    );
                    let io = TokioIo::new(stream);
                    let _ = if h2 {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await
                    } else {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await
                    };
                });
            }
        });
        (addr, seen)
    }

    pub(crate) fn gunzip(body: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(body)
            .read_to_end(&mut out)
            .unwrap();
        out
    }
}
