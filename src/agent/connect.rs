//! The Connect protocol's unary calls, over HTTP/1.1 or HTTP/2, in
//! cleartext or TLS: how the library talks to existing connect-go host
//! agents, which serve plain HTTP/1.1 and cannot be reached by a gRPC
//! client.
//!
//! A call is `POST <base>/hostagent.v1.HostAgentService/<Method>` with an
//! `application/proto` body. Success is HTTP 200 with an `application/proto`
//! body; failure is a JSON body `{"code": "...", "message": "..."}` whose
//! code is a Connect code, or, failing that (a response that is not a
//! Connect answer), a classification by the HTTP status shared with the
//! gRPC transport. Either body may be gzip-compressed
//! (`content-encoding`) when we asked for it (`accept-encoding`).

use std::future::Future;
use std::io::{Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::codegen::Service;

use super::client::{ClientConfig, HttpVersion, TlsConfig};
use super::pb::{self, wire};
use super::{
    AgentError, AgentTransport, CreateSandboxRequest, CreateSandboxResponse, CreateSnapshotRequest,
    CreateSnapshotResponse, DeleteSnapshotRequest, DestroySandboxRequest, HostAgent, HostInfo,
    HostTarget, SandboxList, SnapshotInfo,
};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
type HttpClient = Client<Timed<HttpsConnector<HttpConnector>>, Full<Bytes>>;

/// Reaches host agents with the Connect protocol. Addresses are
/// `host:port` or `http[s]://host:port[/prefix]`; without a scheme,
/// `https` is used when TLS is configured and `http` otherwise.
/// Connections are pooled per host and reused.
///
/// The HTTP spoken is [`ClientConfig::http_version`]: by default HTTP/1.1
/// in cleartext (connect-go agents serve HTTP/1.1) and, over TLS, HTTP/2
/// when the agent offers it by ALPN. With [`ClientConfig::gzip`] on,
/// requests over 1 KiB are sent with `content-encoding: gzip` and gzip
/// answers are asked for (`accept-encoding: gzip`) and decompressed within
/// the receive limit; an answer in any other encoding is an
/// [`AgentError::Protocol`].
#[derive(Clone)]
pub struct ConnectTransport {
    config: Arc<ClientConfig>,
    /// `Err` when the TLS settings are unusable: every host then fails
    /// with it, as not sent.
    client: Result<HttpClient, Arc<str>>,
}

impl std::fmt::Debug for ConnectTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectTransport")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ConnectTransport {
    /// A transport with `config`. Bad TLS material shows up as
    /// [`AgentError::Unavailable`] (not sent) on every call, as on gRPC.
    pub fn new(config: ClientConfig) -> Self {
        let client = http_client(&config).map_err(Arc::from);
        Self {
            config: Arc::new(config),
            client,
        }
    }
}

fn http_client(config: &ClientConfig) -> Result<HttpClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(config.connect_timeout));
    http.set_nodelay(true);
    let tls = match &config.tls {
        Some(tls) => rustls_config(tls)?,
        // Never used: `https` addresses are refused without TLS settings
        // (see `agent`), and the system's roots are never trusted.
        None => rustls_builder()?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    };
    let builder = HttpsConnector::<HttpConnector>::builder()
        .with_tls_config(tls)
        .https_or_http();
    let builder = match config.tls.as_ref().and_then(|t| t.domain_name.as_deref()) {
        Some(name) => {
            let name = ServerName::try_from(name.to_owned())
                .map_err(|e| format!("bad TLS domain name {name:?}: {e}"))?;
            builder.with_server_name_resolver(FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    let https = match config.http_version {
        HttpVersion::Http1 => builder.enable_http1().wrap_connector(http),
        HttpVersion::Http2 => builder.enable_http2().wrap_connector(http),
        // ALPN offers both; the client uses HTTP/2 only when it is chosen.
        HttpVersion::Auto => builder.enable_http1().enable_http2().wrap_connector(http),
    };
    let connector = Timed {
        inner: https,
        timeout: config.connect_timeout,
    };
    let mut client = Client::builder(TokioExecutor::new());
    client.pool_idle_timeout(Duration::from_secs(60));
    if config.http_version == HttpVersion::Http2 {
        // Prior knowledge in cleartext (h2c); over TLS, ALPN said `h2`.
        client.http2_only(true);
    }
    Ok(client.build(connector))
}

fn rustls_builder()
-> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, String> {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))
}

/// rustls settings from `tls`: its CA as the only root, its identity for
/// mutual TLS. (Also the PostgreSQL store's, for the database.)
pub(crate) fn rustls_config(tls: &TlsConfig) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&tls.ca_pem) {
        let cert = cert.map_err(|e| format!("the TLS CA cannot be read: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the TLS CA cannot be used: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the TLS CA holds no certificate".into());
    }
    let builder = rustls_builder()?.with_root_certificates(roots);
    let Some((cert, key)) = &tls.client_identity else {
        return Ok(builder.with_no_client_auth());
    };
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the TLS client certificate cannot be read: {e}"))?;
    // The key's own error text is not shown: it could quote the key.
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|_| "the TLS client key cannot be read".to_owned())?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("the TLS client identity cannot be used: {e}"))
}

/// A connector whose whole connect (TCP and the TLS handshake) is bounded:
/// a handshake that never finishes is a failed connect, not sent, instead
/// of a call that times out.
#[derive(Clone)]
struct Timed<C> {
    inner: C,
    timeout: Duration,
}

impl<C> Service<http::Uri> for Timed<C>
where
    C: Service<http::Uri, Error = BoxError>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            tokio::time::timeout(timeout, connecting)
                .await
                .map_err(|_| -> BoxError {
                    format!("connect timed out after {timeout:?}").into()
                })?
        })
    }
}

impl AgentTransport for ConnectTransport {
    fn agent(&self, host: &HostTarget) -> Result<Arc<dyn HostAgent>, AgentError> {
        if host.address.is_empty() {
            return Err(AgentError::not_sent(format!(
                "host {} has no address",
                host.id
            )));
        }
        let base = if host.address.contains("://") {
            host.address.trim_end_matches('/').to_owned()
        } else if self.config.tls.is_some() {
            format!("https://{}", host.address)
        } else {
            format!("http://{}", host.address)
        };
        if base.starts_with("https://") {
            if self.config.tls.is_none() {
                return Err(AgentError::not_sent(format!(
                    "host {}: an https address needs TLS settings (a CA to trust)",
                    host.id
                )));
            }
        } else if base.starts_with("http://") {
            if self.config.tls.is_some() {
                // The token would go in cleartext to an agent that was
                // meant to be reached over TLS.
                return Err(AgentError::not_sent(format!(
                    "host {}: TLS is configured but the address says http://",
                    host.id
                )));
            }
        } else {
            return Err(AgentError::not_sent(format!(
                "host {}: the Connect transport speaks http and https only",
                host.id
            )));
        }
        Ok(Arc::new(ConnectAgent {
            base,
            config: self.config.clone(),
            client: self.client.clone(),
        }))
    }
}

/// `body` compressed with gzip.
fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body)?;
    encoder.finish()
}

/// `body` decompressed, refused once it grows past `limit`: a small body
/// that expands without end stops there.
fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, AgentError> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(body)
        .take(u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| AgentError::Protocol {
            message: format!("the gzip answer cannot be decompressed: {e}"),
        })?;
    if out.len() > limit {
        return Err(over_limit(limit));
    }
    Ok(out)
}

fn over_limit(limit: usize) -> AgentError {
    AgentError::Protocol {
        message: format!("the answer is over the {limit} byte limit"),
    }
}

/// `e` and the errors under it, for logs (hyper's errors name only their
/// kind).
fn with_sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        text = format!("{text}: {e}");
        source = e.source();
    }
    text
}

struct ConnectAgent {
    base: String,
    config: Arc<ClientConfig>,
    /// `Err`: the TLS settings are unusable.
    client: Result<HttpClient, Arc<str>>,
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    code: String,
    #[serde(default)]
    message: String,
}

impl ConnectAgent {
    async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        message: Req,
        timeout: Duration,
    ) -> Result<Resp, AgentError> {
        let uri = format!("{}/{}/{method}", self.base, pb::SERVICE);
        let limit = self.config.max_response_bytes;
        let mut builder = http::Request::post(&uri)
            .header(http::header::CONTENT_TYPE, "application/proto")
            .header(http::header::USER_AGENT, self.config.user_agent_header())
            .header("connect-protocol-version", "1")
            .header("connect-timeout-ms", timeout.as_millis().to_string());
        if let Some(token) = &self.config.token {
            builder = builder.header(http::header::AUTHORIZATION, token.header_value());
        }
        let mut body = message.encode_to_vec();
        if self.config.gzip {
            builder = builder.header(http::header::ACCEPT_ENCODING, "gzip");
        }
        if self.config.compress_request(body.len()) {
            body = gzip(&body)
                .map_err(|e| AgentError::not_sent(format!("compressing the request: {e}")))?;
            builder = builder.header(http::header::CONTENT_ENCODING, "gzip");
        }
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| AgentError::not_sent(format!("bad agent address {uri}: {e}")))?;
        let client = self
            .client
            .as_ref()
            .map_err(|e| AgentError::not_sent(format!("cannot connect to {}: {e}", self.base)))?;
        let exchange = async {
            let response = client.request(request).await.map_err(|e| {
                let why = with_sources(&e);
                if e.is_connect() {
                    // Refused, unresolvable, timed out, TLS handshake
                    // failed: never sent.
                    AgentError::not_sent(format!("cannot connect to {}: {why}", self.base))
                } else {
                    // Sent, or maybe sent, and the connection failed.
                    AgentError::unavailable(format!("connection to {} failed: {why}", self.base))
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, limit)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<LengthLimitError>() {
                        over_limit(limit)
                    } else {
                        // The connection was lost while the answer arrived.
                        AgentError::unavailable(format!("reading the answer: {e}"))
                    }
                })?
                .to_bytes();
            Ok::<_, AgentError>((parts, body))
        };
        let (parts, mut body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| AgentError::Timeout)??;
        match parts.headers.get(http::header::CONTENT_ENCODING) {
            None => {}
            Some(encoding) if encoding.as_bytes() == b"identity" => {}
            Some(encoding) if self.config.gzip && encoding.as_bytes() == b"gzip" => {
                // Always off the async threads: a small body can expand to
                // the whole receive limit.
                body = tokio::task::spawn_blocking(move || gunzip(&body, limit))
                    .await
                    .map_err(|e| AgentError::Protocol {
                        message: format!("decompressing the answer failed: {e}"),
                    })??
                    .into();
            }
            Some(encoding) => {
                return Err(AgentError::Protocol {
                    message: format!(
                        "the answer is compressed with {:?}, which was not asked for",
                        String::from_utf8_lossy(encoding.as_bytes())
                    ),
                });
            }
        }
        if parts.status == http::StatusCode::OK {
            // A 200 that is not a Connect answer (a proxy's page, an empty
            // body from something else) must not decode as an empty
            // message: a delete that never happened would read as done.
            let proto = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| {
                    v.split(';')
                        .next()
                        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/proto"))
                });
            if !proto {
                return Err(AgentError::Protocol {
                    message: format!("the {method} answer is not application/proto"),
                });
            }
            return Resp::decode(body).map_err(|e| AgentError::Protocol {
                message: format!("undecodable {method} response: {e}"),
            });
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(err) => Err(pb::connect_code_to_error(&err.code, err.message)),
            // Not a Connect error (a proxy's page, the Go agent's mux
            // answering an unknown route with a plain-text 404).
            Err(_) => Err(pb::http_status_to_error(parts.status)),
        }
    }
}

#[async_trait]
impl HostAgent for ConnectAgent {
    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, AgentError> {
        let resp: wire::CreateSnapshotResponse = self
            .call(
                "CreateSnapshot",
                wire::CreateSnapshotRequest::from(req),
                self.config.create_timeout,
            )
            .await?;
        resp.try_into()
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<(), AgentError> {
        let _: wire::DeleteSnapshotResponse = self
            .call(
                "DeleteSnapshot",
                wire::DeleteSnapshotRequest::from(req),
                self.config.call_timeout,
            )
            .await?;
        Ok(())
    }

    async fn list_sandboxes(&self) -> Result<SandboxList, AgentError> {
        let resp: wire::ListSandboxesResponse = self
            .call(
                "ListSandboxes",
                wire::ListSandboxesRequest {},
                self.config.call_timeout,
            )
            .await?;
        resp.try_into()
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentError> {
        let resp: wire::ListSnapshotsResponse = self
            .call(
                "ListSnapshots",
                wire::ListSnapshotsRequest {},
                self.config.call_timeout,
            )
            .await?;
        pb::snapshots_from_wire(resp)
    }

    async fn create_sandbox(
        &self,
        req: CreateSandboxRequest,
    ) -> Result<CreateSandboxResponse, AgentError> {
        let resp: wire::CreateSandboxResponse = self
            .call(
                "CreateSandbox",
                wire::CreateSandboxRequest::from(req),
                self.config.create_timeout,
            )
            .await?;
        Ok(resp.into())
    }

    async fn destroy_sandbox(&self, req: DestroySandboxRequest) -> Result<(), AgentError> {
        let _: wire::DestroySandboxResponse = self
            .call(
                "DestroySandbox",
                wire::DestroySandboxRequest::from(req),
                self.config.call_timeout,
            )
            .await?;
        Ok(())
    }

    async fn host_info(&self) -> Result<HostInfo, AgentError> {
        let resp: wire::HostInfo = self
            .call(
                "GetHostInfo",
                wire::GetHostInfoRequest {},
                self.config.call_timeout,
            )
            .await?;
        Ok(pb::host_info_from_wire(Some(resp))?.unwrap_or_default())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::agent::client::{USER_AGENT, recording};
    use crate::ids::HostId;

    fn answer() -> http::Response<recording::Body> {
        http::Response::builder()
            .header(http::header::CONTENT_TYPE, "application/proto")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap()
    }

    /// Requests over 1 KiB go out gzipped, smaller ones as they are; gzip
    /// answers are asked for; the user-agent names the crate.
    #[tokio::test]
    async fn requests_over_1_kib_are_compressed_and_gzip_is_asked_for() {
        let (addr, seen) = recording::start(false, answer).await;
        let host = HostTarget {
            id: HostId::new(),
            address: addr.to_string(),
        };
        for (gzip, template_len, compressed) in
            [(true, 10, false), (true, 2000, true), (false, 2000, false)]
        {
            let config = ClientConfig::default().gzip(gzip).user_agent("tests/1");
            let transport = ConnectTransport::new(config.clone());
            let agent = ConnectAgent {
                base: format!("http://{}", host.address),
                config: Arc::new(config),
                client: transport.client,
            };
            let message = wire::CreateSandboxRequest {
                template: "t".repeat(template_len),
                ..Default::default()
            };
            let encoded = message.encode_to_vec();
            let _: wire::CreateSandboxResponse = agent
                .call("CreateSandbox", message, Duration::from_secs(10))
                .await
                .unwrap();
            let (headers, body) = seen.lock().unwrap().pop().unwrap();
            let case = format!("gzip {gzip}, {template_len} byte template");
            let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
            assert_eq!(
                header("user-agent"),
                Some(format!("tests/1 {USER_AGENT}").as_str()),
                "{case}"
            );
            assert_eq!(header("accept-encoding") == Some("gzip"), gzip, "{case}");
            assert_eq!(
                header("content-encoding") == Some("gzip"),
                compressed,
                "{case}"
            );
            let payload = if compressed {
                recording::gunzip(&body)
            } else {
                body.to_vec()
            };
            assert_eq!(payload, encoded, "{case}");
        }
    }
}
