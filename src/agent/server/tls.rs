//! TLS for the host-agent server with rustls: the configuration from
//! [`ServerTls`], and the accepted connections as a stream for tonic.
//!
//! tonic's own TLS offers only ALPN `h2`, which an HTTP/1.1 client (a
//! gRPC-Web or Connect client, `curl --http1.1`) cannot agree to; here both
//! `h2` and `http/1.1` are offered. Handshakes run on their own tasks, so a
//! slow client does not hold up the others.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use super::ServerTls;

/// TLS handshakes in progress at once, at most.
const MAX_HANDSHAKES: usize = 256;

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshake is done, waiting for the server to take
/// them.
const QUEUE: usize = 64;

fn invalid(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}: {e}"))
}

/// The rustls configuration: the agent's certificate, client certificates
/// required when a client CA is set (mutual TLS), ALPN `h2` and
/// `http/1.1`.
fn config(tls: &ServerTls) -> std::io::Result<ServerConfig> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("bad TLS certificate", e))?;
    if certs.is_empty() {
        return Err(invalid("bad TLS certificate", "no certificate in the PEM"));
    }
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|e| invalid("bad TLS key", e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS", e))?;
    let builder = match &tls.client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                roots
                    .add(cert.map_err(|e| invalid("bad client CA", e))?)
                    .map_err(|e| invalid("bad client CA", e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| invalid("bad client CA", e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| invalid("bad TLS certificate or key", e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// TLS connections whose handshake is done, for tonic's server.
pub(super) type Incoming = ReceiverStream<std::io::Result<TlsStream<TcpStream>>>;

/// Accepts on `listener` and hands over TLS connections as a stream. The
/// accept loop ends, closing the listener, once the stream is dropped;
/// the handle tells when it has.
pub(super) fn incoming(
    listener: TcpListener,
    tls: &ServerTls,
) -> std::io::Result<(Incoming, JoinHandle<()>)> {
    let acceptor = TlsAcceptor::from(Arc::new(config(tls)?));
    let (tx, rx) = mpsc::channel(QUEUE);
    let task = tokio::spawn(accept_loop(listener, acceptor, tx));
    Ok((ReceiverStream::new(rx), task))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<std::io::Result<TlsStream<TcpStream>>>,
) {
    // Dropped with the loop: handshakes still running are abandoned.
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            () = tx.closed() => break,
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            // At most this many handshakes at once: connections that never
            // say hello wait in the kernel's backlog instead of taking file
            // descriptors and tasks without bound.
            accepted = listener.accept(), if handshakes.len() < MAX_HANDSHAKES => {
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a
                        // little rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                handshakes.spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}
