//! Secrets never reach the logs: API keys sent to the HTTP API and bearer
//! tokens sent to host agents, with every log level enabled.
#![cfg(feature = "server")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use sandbox_snapshots::http::ApiState;
use sandbox_snapshots::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_agent_tokens_are_never_logged() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    // An agent behind gRPC with a token, so the token crosses the wire.
    let token = "agent-token-9f8e7d6c5b4a";
    let agent = Arc::new(MemoryHostAgent::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, _server) = HostAgentServer::new(agent.clone())
        .with_token(BearerToken::new(token))
        .spawn("127.0.0.1:0".parse().unwrap(), async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let transport = Arc::new(GrpcTransport::new(
        GrpcConfig::default().token(BearerToken::new(token)),
    ));
    let manager = Manager::open(dir.path().join("s.db"), transport, common::fast_options())
        .await
        .unwrap();
    let host = HostId::new();
    manager
        .registry()
        .register_host(host, addr.to_string(), HostStatus::Online)
        .await
        .unwrap();

    let state = ApiState::new(manager.clone());
    let team = state.keys().create_team("t").await.unwrap();
    let key = state.keys().create_key(team, "k", false).await.unwrap();
    let secret = key.reveal().to_owned();
    let sb = SandboxId::new();
    agent.add_sandbox(sb, "running", 1, 64);
    manager
        .registry()
        .register_sandbox(Sandbox::new(
            sb,
            team,
            Some(host),
            SandboxStatus::Running,
            1,
            64,
        ))
        .await
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(sandbox_snapshots::http::serve(
        listener,
        state,
        std::future::pending(),
    ));
    let http = reqwest::Client::new();
    let created = http
        .post(format!("{base}/v1/snapshots"))
        .header("X-API-Key", &secret)
        .body(format!("{{\"sandbox_id\":\"{sb}\",\"name\":\"s\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    // The secret with its last character changed (to one it is not).
    let last = if secret.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &secret[..secret.len() - 1]);
    let refused = http
        .get(format!("{base}/v1/snapshots"))
        .header("X-API-Key", &wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let _ = stop.send(());

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("/v1/snapshots"),
        "the requests were logged at all"
    );
    let secret_part = secret.rsplit('-').next().unwrap();
    for needle in [secret_part, &wrong[wrong.len() - 64..], token] {
        assert!(
            !text.contains(needle),
            "a secret reached the logs: {needle}"
        );
    }
}
