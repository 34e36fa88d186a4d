//! The gRPC client transport (tonic): one lazily connected channel per host,
//! reused for every call and replaced when the host's address changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::pb::{self, wire};
use super::{
    AgentError, AgentTransport, BearerToken, CreateSnapshotRequest, CreateSnapshotResponse,
    DeleteSnapshotRequest, HostAgent, HostTarget, SandboxList, SnapshotInfo,
};
use crate::ids::HostId;

type Client = wire::host_agent_service_client::HostAgentServiceClient<Channel>;

/// TLS for gRPC connections to host agents (rustls).
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

/// Settings of the gRPC transport.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GrpcConfig {
    /// Longest a TCP (and TLS) connect may take. Default 5 s.
    pub connect_timeout: Duration,
    /// Deadline of a `CreateSnapshot` call, sent to the agent as the gRPC
    /// deadline. Default 5 min.
    pub create_timeout: Duration,
    /// Deadline of every other call. Default 30 s.
    pub call_timeout: Duration,
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<BearerToken>,
    /// TLS; plain HTTP/2 when `None`.
    pub tls: Option<TlsConfig>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            create_timeout: Duration::from_secs(300),
            call_timeout: Duration::from_secs(30),
            token: None,
            tls: None,
        }
    }
}

impl GrpcConfig {
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

    /// Sets the per-call deadlines.
    pub fn timeouts(mut self, connect: Duration, create: Duration, call: Duration) -> Self {
        self.connect_timeout = connect;
        self.create_timeout = create;
        self.call_timeout = call;
        self
    }
}

/// Reaches host agents over gRPC. Addresses are `host:port` or a URL
/// (`http://…`, `https://…`); without a scheme, `https` is used when TLS is
/// configured and `http` otherwise.
pub struct GrpcTransport {
    config: GrpcConfig,
    tls: Option<ClientTlsConfig>,
    channels: Mutex<HashMap<HostId, (String, Channel)>>,
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
    pub fn new(config: GrpcConfig) -> Self {
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

    fn channel(&self, host: &HostTarget) -> Result<Channel, AgentError> {
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
        let bad = |e: tonic::transport::Error| {
            AgentError::not_sent(format!("bad agent address for host {}: {e}", host.id))
        };
        let mut endpoint = Endpoint::from_shared(self.uri(&host.address))
            .map_err(bad)?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(bad)?;
        }
        // Connects on first use and reconnects by itself after failures.
        let channel = endpoint.connect_lazy();
        channels.insert(host.id, (host.address.clone(), channel.clone()));
        Ok(channel)
    }
}

impl AgentTransport for GrpcTransport {
    fn agent(&self, host: &HostTarget) -> Result<Arc<dyn HostAgent>, AgentError> {
        let channel = self.channel(host)?;
        Ok(Arc::new(GrpcAgent {
            client: Client::new(channel),
            token: self.config.token.as_ref().map(BearerToken::header_value),
            create_timeout: self.config.create_timeout,
            call_timeout: self.config.call_timeout,
        }))
    }
}

/// A client for one host's agent.
struct GrpcAgent {
    client: Client,
    token: Option<String>,
    create_timeout: Duration,
    call_timeout: Duration,
}

impl GrpcAgent {
    fn request<T>(&self, message: T, timeout: Duration) -> Result<tonic::Request<T>, AgentError> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        if let Some(token) = &self.token {
            let value = token.parse().map_err(|_| AgentError::Protocol {
                message: "the bearer token is not a valid header value".into(),
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

#[async_trait]
impl HostAgent for GrpcAgent {
    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, AgentError> {
        let request = self.request(wire::CreateSnapshotRequest::from(req), self.create_timeout)?;
        let response = self
            .client
            .clone()
            .create_snapshot(request)
            .await
            .map_err(pb::status_to_error)?;
        response.into_inner().try_into()
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<(), AgentError> {
        let request = self.request(wire::DeleteSnapshotRequest::from(req), self.call_timeout)?;
        self.client
            .clone()
            .delete_snapshot(request)
            .await
            .map_err(pb::status_to_error)?;
        Ok(())
    }

    async fn list_sandboxes(&self) -> Result<SandboxList, AgentError> {
        let request = self.request(wire::ListSandboxesRequest {}, self.call_timeout)?;
        let response = self
            .client
            .clone()
            .list_sandboxes(request)
            .await
            .map_err(pb::status_to_error)?;
        response.into_inner().try_into()
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentError> {
        let request = self.request(wire::ListSnapshotsRequest {}, self.call_timeout)?;
        let response = self
            .client
            .clone()
            .list_snapshots(request)
            .await
            .map_err(pb::status_to_error)?;
        pb::snapshots_from_wire(response.into_inner())
    }
}
