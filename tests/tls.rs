//! gRPC over TLS with client certificates (mutual TLS), with certificates
//! made for the test by a throwaway CA.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::pki::{Pki, pki};

use std::sync::Arc;

use sandbox_snapshots::agent::{ServerTls, TlsConfig};
use sandbox_snapshots::*;
use tokio::sync::oneshot;

async fn serve(pki: &Pki, agent: Arc<MemoryHostAgent>) -> (String, oneshot::Sender<()>) {
    let tls =
        ServerTls::new(pki.server.0.clone(), pki.server.1.clone()).client_ca(pki.ca_pem.clone());
    let (tx, rx) = oneshot::channel::<()>();
    let (addr, _task) = HostAgentServer::new(agent)
        .with_tls(tls)
        .spawn("127.0.0.1:0".parse().unwrap(), async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    (addr.to_string(), tx)
}

fn target(address: &str) -> HostTarget {
    HostTarget {
        id: HostId::new(),
        address: address.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_accepts_the_right_client_and_refuses_others() {
    let pki = pki();
    let agent = Arc::new(MemoryHostAgent::new());
    let sb = SandboxId::new();
    agent.add_sandbox(sb, "running", 1, 64);
    let (addr, _stop) = serve(&pki, agent.clone()).await;

    // The right CA and a client certificate: calls go through, over TLS
    // (no scheme in the address means https when TLS is configured).
    let good = GrpcTransport::new(
        GrpcConfig::default().tls(
            TlsConfig::new(pki.ca_pem.clone())
                .client_identity(pki.client.0.clone(), pki.client.1.clone())
                .domain_name("localhost"),
        ),
    );
    let list = good
        .agent(&target(&addr))
        .unwrap()
        .list_sandboxes()
        .await
        .unwrap();
    assert_eq!(list.sandboxes.len(), 1);

    // No client certificate: refused.
    let anonymous = GrpcTransport::new(
        GrpcConfig::default().tls(TlsConfig::new(pki.ca_pem.clone()).domain_name("localhost")),
    );
    assert!(
        anonymous
            .agent(&target(&addr))
            .unwrap()
            .list_sandboxes()
            .await
            .is_err()
    );

    // A server signed by a CA we do not trust: refused.
    let other = self::pki();
    let distrustful = GrpcTransport::new(
        GrpcConfig::default().tls(
            TlsConfig::new(other.ca_pem.clone())
                .client_identity(pki.client.0.clone(), pki.client.1.clone())
                .domain_name("localhost"),
        ),
    );
    assert!(
        distrustful
            .agent(&target(&addr))
            .unwrap()
            .list_sandboxes()
            .await
            .is_err()
    );

    // Plain HTTP/2 against a TLS server: refused.
    let plain = GrpcTransport::new(GrpcConfig::default());
    assert!(
        plain
            .agent(&target(&addr))
            .unwrap()
            .list_sandboxes()
            .await
            .is_err()
    );

    assert_eq!(
        agent.calls(sandbox_snapshots::agent::AgentOp::ListSandboxes),
        1,
        "only the authenticated call reached the agent"
    );
    assert!(
        !format!(
            "{:?}",
            GrpcConfig::default().tls(TlsConfig::new("x").client_identity("c", "SECRETKEY"))
        )
        .contains("SECRETKEY")
    );
}
