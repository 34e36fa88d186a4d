//! One host-agent transport suite, run against (a) the in-process
//! transport, (b) the gRPC client → a real tonic server on a loopback port,
//! and (c) the Connect client → a Connect server on a loopback port — each
//! in front of the same in-memory agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::connect_server::ConnectServer;
use prost::Message;
use sandbox_snapshots::agent::{
    AgentOp, CreateSnapshotRequest, DeleteSnapshotRequest, Fault, SnapshotKey,
};
use sandbox_snapshots::*;
use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    InProcess,
    Grpc,
    Connect,
}

enum Server {
    InProcess(Arc<InProcessTransport>),
    Grpc(
        oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ),
    Connect(ConnectServer),
}

struct Rig {
    _kind: Kind,
    agent: Arc<MemoryHostAgent>,
    transport: Arc<dyn AgentTransport>,
    target: HostTarget,
    server: Server,
}

impl Rig {
    async fn new(kind: Kind, server_token: Option<&str>, client_token: Option<&str>) -> Rig {
        let agent = Arc::new(MemoryHostAgent::new());
        let id = HostId::new();
        let deadline = Duration::from_millis(500);
        let (transport, address, server): (Arc<dyn AgentTransport>, String, Server) = match kind {
            Kind::InProcess => {
                let t = Arc::new(InProcessTransport::new());
                t.add_host(id, agent.clone());
                (t.clone(), "in-process".into(), Server::InProcess(t))
            }
            Kind::Grpc => {
                let mut server = HostAgentServer::new(agent.clone());
                if let Some(t) = server_token {
                    server = server.with_token(BearerToken::new(t));
                }
                let (stop_tx, stop_rx) = oneshot::channel::<()>();
                let (addr, task) = server
                    .spawn("127.0.0.1:0".parse().unwrap(), async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .unwrap();
                let mut config = GrpcConfig::default().timeouts(deadline, deadline, deadline);
                if let Some(t) = client_token {
                    config = config.token(BearerToken::new(t));
                }
                (
                    Arc::new(GrpcTransport::new(config)),
                    addr.to_string(),
                    Server::Grpc(stop_tx, task),
                )
            }
            Kind::Connect => {
                let server = ConnectServer::start(agent.clone(), server_token).await;
                let mut config = ConnectConfig::default().timeouts(deadline, deadline, deadline);
                if let Some(t) = client_token {
                    config = config.token(BearerToken::new(t));
                }
                (
                    Arc::new(ConnectTransport::new(config)),
                    server.addr.to_string(),
                    Server::Connect(server),
                )
            }
        };
        Rig {
            _kind: kind,
            agent,
            transport,
            target: HostTarget { id, address },
            server,
        }
    }

    fn client(&self) -> Arc<dyn HostAgent> {
        self.transport.agent(&self.target).unwrap()
    }

    async fn stop_server(self) -> (Arc<dyn AgentTransport>, HostTarget) {
        match self.server {
            Server::InProcess(t) => t.remove_host(self.target.id),
            Server::Grpc(stop, task) => {
                let _ = stop.send(());
                task.await.unwrap().unwrap();
            }
            Server::Connect(server) => server.stop().await,
        }
        (self.transport, self.target)
    }
}

fn request(sandbox: SandboxId) -> (CreateSnapshotRequest, TemplateId) {
    let tpl = TemplateId::new();
    (
        CreateSnapshotRequest::for_template(sandbox, TeamId::new(), tpl),
        tpl,
    )
}

async fn suite(kind: Kind) {
    let rig = Rig::new(kind, None, None).await;
    let client = rig.client();

    // Create, then the host reports the snapshot and the paused VM.
    let sb = SandboxId::new();
    rig.agent.add_sandbox(sb, "running", 2, 256);
    let (req, tpl) = request(sb);
    let created = client.create_snapshot(req).await.unwrap();
    assert_eq!(created.key, tpl.to_string(), "{kind:?}");
    assert_eq!(created.size_bytes, (256 + 16) * 1024 * 1024);
    assert!(rig.agent.has_snapshot(&tpl.to_string()));
    let sandboxes = client.list_sandboxes().await.unwrap();
    assert_eq!(sandboxes.sandboxes.len(), 1);
    assert_eq!(sandboxes.sandboxes[0].sandbox_id, sb.to_string());
    assert_eq!(sandboxes.sandboxes[0].status, "paused");
    assert_eq!(
        (
            sandboxes.sandboxes[0].vcpus,
            sandboxes.sandboxes[0].memory_mb
        ),
        (2, 256)
    );
    let snapshots = client.list_snapshots().await.unwrap();
    assert_eq!(snapshots.len(), 1);
    assert_eq!(snapshots[0].key, tpl.to_string());
    assert_eq!(snapshots[0].size_bytes, created.size_bytes);
    assert!(snapshots[0].created_at.is_some());

    // Delete, and a second delete is NotFound.
    let del = DeleteSnapshotRequest::new(SnapshotKey::for_template(tpl));
    client.delete_snapshot(del.clone()).await.unwrap();
    assert!(!rig.agent.has_snapshot(&tpl.to_string()));
    let err = client.delete_snapshot(del).await.unwrap_err();
    assert_eq!(err.code(), Some(AgentCode::NotFound), "{kind:?}: {err:?}");

    // NotFound: an unknown sandbox.
    let err = client
        .create_snapshot(request(SandboxId::new()).0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(AgentCode::NotFound), "{kind:?}: {err:?}");
    assert!(err.is_definite_rejection());

    // FailedPrecondition: a stopped sandbox.
    let stopped = SandboxId::new();
    rig.agent.add_sandbox(stopped, "stopped", 1, 128);
    let err = client
        .create_snapshot(request(stopped).0)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(AgentCode::FailedPrecondition),
        "{kind:?}: {err:?}"
    );

    // InvalidArgument, and an internal error, travel with their codes.
    for code in [
        AgentCode::InvalidArgument,
        AgentCode::Internal,
        AgentCode::AlreadyExists,
    ] {
        rig.agent.inject_times(
            AgentOp::CreateSnapshot,
            Fault::Fail(AgentError::rejected(code, "injected")),
            1,
        );
        let err = client.create_snapshot(request(sb).0).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{kind:?}: {err:?}");
    }
    // An agent-side "unavailable" is Unavailable on every transport.
    rig.agent.inject_times(
        AgentOp::ListSandboxes,
        Fault::Fail(AgentError::unavailable("vmm restarting")),
        1,
    );
    let err = client.list_sandboxes().await.unwrap_err();
    assert!(
        matches!(err, AgentError::Unavailable { .. }),
        "{kind:?}: {err:?}"
    );

    // An agent without the ListSnapshots extension answers Unimplemented.
    rig.agent.set_list_snapshots_supported(false);
    let err = client.list_snapshots().await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(AgentCode::Unimplemented),
        "{kind:?}: {err:?}"
    );
    rig.agent.set_list_snapshots_supported(true);

    // Deadline exceeded: the transport's own deadline (500 ms here) cuts off
    // a slow agent. The in-process transport has none: the manager's
    // timeouts apply to it (tested in tests/create.rs).
    if kind != Kind::InProcess {
        rig.agent.inject_times(
            AgentOp::CreateSnapshot,
            Fault::Delay(Duration::from_secs(5)),
            1,
        );
        let err = client.create_snapshot(request(sb).0).await.unwrap_err();
        assert_eq!(err, AgentError::Timeout, "{kind:?}");
    }

    // The server stops: calls fail as Unavailable, through a cached client
    // and through a fresh one.
    let (transport, target) = rig.stop_server().await;
    let err = client.list_sandboxes().await.unwrap_err();
    assert!(
        matches!(err, AgentError::Unavailable { .. }),
        "{kind:?}: {err:?}"
    );
    let err = match transport.agent(&target) {
        Ok(fresh) => fresh.list_sandboxes().await.unwrap_err(),
        Err(err) => err,
    };
    assert!(
        matches!(err, AgentError::Unavailable { .. }),
        "{kind:?}: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_in_process() {
    suite(Kind::InProcess).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_grpc() {
    suite(Kind::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_connect() {
    suite(Kind::Connect).await;
}

async fn token_suite(kind: Kind) {
    for (client_token, accepted) in [
        (Some("s3cret"), true),
        (Some("wrong"), false),
        (None, false),
    ] {
        let rig = Rig::new(kind, Some("s3cret"), client_token).await;
        let result = rig.client().list_sandboxes().await;
        if accepted {
            result.unwrap();
        } else {
            let err = result.unwrap_err();
            assert_eq!(
                err.code(),
                Some(AgentCode::Unauthenticated),
                "{kind:?}: {err:?}"
            );
            assert_eq!(
                rig.agent.calls(AgentOp::ListSandboxes),
                0,
                "refused before the agent"
            );
        }
        rig.stop_server().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_over_grpc() {
    token_suite(Kind::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_over_connect() {
    token_suite(Kind::Connect).await;
}

#[test]
fn tokens_never_show_in_debug_output() {
    let config = GrpcConfig::default().token(BearerToken::new("s3cret-value"));
    assert!(!format!("{config:?}").contains("s3cret"));
    let config = ConnectConfig::default().token(BearerToken::new("s3cret-value"));
    assert!(!format!("{config:?}").contains("s3cret"));
}

/// Existing agents decode CreateSnapshotRequest by field number: the bytes
/// our client puts on the wire use fields 1–4 in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_snapshot_request_golden_bytes_on_the_wire() {
    let rig = Rig::new(Kind::Connect, None, None).await;
    let sb = SandboxId::parse("sb-0000000000000000000000001").unwrap();
    let team = TeamId::parse("team-000000000000000000000000t").unwrap();
    let tpl = TemplateId::parse("tpl-000000000000000000000000p").unwrap();
    rig.agent.add_sandbox(sb, "running", 1, 1);
    rig.client()
        .create_snapshot(CreateSnapshotRequest::for_template(sb, team, tpl))
        .await
        .unwrap();
    let body = rig.last_body();
    let mut expected = Vec::new();
    for (tag, text) in [
        (0x0a_u8, "sb-0000000000000000000000001"),
        (0x12, "tpl-000000000000000000000000p"),
        (0x1a, "team-000000000000000000000000t"),
        (0x22, "tpl-000000000000000000000000p"),
    ] {
        expected.push(tag);
        expected.push(u8::try_from(text.len()).unwrap());
        expected.extend_from_slice(text.as_bytes());
    }
    assert_eq!(body.as_ref(), expected.as_slice());
    // And the hand-written message of an existing agent reads it back.
    let decoded = common::wire::CreateSnapshotRequest::decode(body).unwrap();
    assert_eq!(decoded.name, tpl.to_string());
    assert_eq!(decoded.team_id, team.to_string());
}

impl Rig {
    fn last_body(&self) -> bytes::Bytes {
        match &self.server {
            Server::Connect(s) => s.last_create_body.lock().unwrap().clone().unwrap(),
            _ => panic!("only the Connect server records bodies"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_channels_are_reused_and_replaced_when_the_address_changes() {
    let (agent_a, agent_b) = (
        Arc::new(MemoryHostAgent::new()),
        Arc::new(MemoryHostAgent::new()),
    );
    let sb = SandboxId::new();
    agent_a.add_sandbox(sb, "running", 1, 1);
    agent_b.add_sandbox(sb, "stopped", 1, 1);
    let mut stops = Vec::new();
    let mut addrs = Vec::new();
    for agent in [agent_a.clone(), agent_b.clone()] {
        let (tx, rx) = oneshot::channel::<()>();
        let (addr, _task) = HostAgentServer::new(agent)
            .spawn("127.0.0.1:0".parse().unwrap(), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        stops.push(tx);
        addrs.push(addr.to_string());
    }
    let transport = GrpcTransport::new(GrpcConfig::default());
    let id = HostId::new();
    let at = |address: &str| HostTarget {
        id,
        address: address.to_owned(),
    };
    for _ in 0..3 {
        let list = transport
            .agent(&at(&addrs[0]))
            .unwrap()
            .list_sandboxes()
            .await
            .unwrap();
        assert_eq!(list.sandboxes[0].status, "running");
    }
    let list = transport
        .agent(&at(&addrs[1]))
        .unwrap()
        .list_sandboxes()
        .await
        .unwrap();
    assert_eq!(
        list.sandboxes[0].status, "stopped",
        "the new address is used"
    );
    assert_eq!(agent_a.calls(AgentOp::ListSandboxes), 3);
    assert_eq!(agent_b.calls(AgentOp::ListSandboxes), 1);
    // An address without a host part is refused, not panicked on.
    let err = match transport.agent(&at("")) {
        Ok(_) => panic!("empty address accepted"),
        Err(e) => e,
    };
    assert!(matches!(err, AgentError::Unavailable { .. }));
    let err = match transport.agent(&at("http://[::1")) {
        Ok(_) => panic!("bad address accepted"),
        Err(e) => e,
    };
    assert!(matches!(err, AgentError::Unavailable { .. }));
}

/// The server validates what arrives on the wire before an agent sees it:
/// a raw gRPC call with a path-like key is InvalidArgument.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_server_refuses_bad_ids_and_keys_from_the_wire() {
    let agent = Arc::new(MemoryHostAgent::new());
    let (tx, rx) = oneshot::channel::<()>();
    let (addr, _task) = HostAgentServer::new(agent.clone())
        .spawn("127.0.0.1:0".parse().unwrap(), async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let path =
        ::http::uri::PathAndQuery::from_static("/hostagent.v1.HostAgentService/DeleteSnapshot");
    for name in ["../etc", "a/b", "..", ".x", ""] {
        grpc.ready().await.unwrap();
        let status = grpc
            .unary::<_, common::wire::Empty, _>(
                tonic::Request::new(common::wire::DeleteSnapshotRequest {
                    name: name.into(),
                    ..Default::default()
                }),
                path.clone(),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name:?}");
    }
    assert_eq!(
        agent.calls(AgentOp::DeleteSnapshot),
        0,
        "nothing reached the agent"
    );
    let _ = tx.send(());
}

/// Path escapes sent on the wire to the reference agent are refused, and
/// nothing outside its root is read, written or removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_escapes_against_the_reference_agent_touch_nothing_outside_its_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(outside.join("snapshots/victim")).unwrap();
    std::fs::write(outside.join("secret"), b"keep me").unwrap();
    std::fs::write(outside.join("snapshots/victim/data"), b"keep me too").unwrap();
    let agent = Arc::new(DirHostAgent::open(&root).await.unwrap());
    let sb = SandboxId::new();
    std::fs::create_dir_all(root.join("sandboxes").join(sb.to_string())).unwrap();

    let (tx, rx) = oneshot::channel::<()>();
    let (addr, _task) = HostAgentServer::new(agent)
        .spawn("127.0.0.1:0".parse().unwrap(), async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let escapes = [
        "../outside",
        "../../outside",
        "../outside/snapshots/victim",
        "..",
        ".",
        "/etc",
        "victim/../../outside",
        "a\0b",
    ];
    for bad in escapes {
        grpc.ready().await.unwrap();
        let status = grpc
            .unary::<_, common::wire::Empty, _>(
                tonic::Request::new(common::wire::DeleteSnapshotRequest {
                    name: bad.into(),
                    ..Default::default()
                }),
                ::http::uri::PathAndQuery::from_static(
                    "/hostagent.v1.HostAgentService/DeleteSnapshot",
                ),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "delete {bad:?}"
        );
        for (sandbox_id, key) in [
            (sb.to_string(), bad.to_owned()),
            (bad.to_owned(), "ok-key".to_owned()),
        ] {
            grpc.ready().await.unwrap();
            let status = grpc
                .unary::<_, common::wire::CreateSnapshotResponse, _>(
                    tonic::Request::new(common::wire::CreateSnapshotRequest {
                        sandbox_id,
                        name: key,
                        ..Default::default()
                    }),
                    ::http::uri::PathAndQuery::from_static(
                        "/hostagent.v1.HostAgentService/CreateSnapshot",
                    ),
                    tonic_prost::ProstCodec::default(),
                )
                .await
                .unwrap_err();
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "create {bad:?}"
            );
        }
    }
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"keep me");
    assert_eq!(
        std::fs::read(outside.join("snapshots/victim/data")).unwrap(),
        b"keep me too"
    );
    let mut top: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, vec!["outside", "root"], "nothing new outside the root");
    assert!(
        std::fs::read_dir(root.join("snapshots"))
            .unwrap()
            .next()
            .is_none()
    );
    let _ = tx.send(());
}
