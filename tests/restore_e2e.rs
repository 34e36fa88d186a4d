//! Restore end to end (SPEC §7): the manager snapshots a sandbox on the
//! reference agent (`DirHostAgent`) and restores the snapshot into a new
//! sandbox, over gRPC (our tonic server on a loopback port) and over the
//! Connect protocol (a connect-go-like HTTP/1.1 server), and the new
//! sandbox's files on the host equal the snapshotted sandbox's, byte for
//! byte. A failed restore's VM is destroyed on the host through the same
//! transport.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::connect_server::ConnectServer;
use common::{caller, eventually, fast_options, name};
use sandbox_snapshots::*;
use tokio::sync::oneshot;

/// Every entry under `dir`, relative: file contents, `dir`, or a link.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(base).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(rel, format!("-> {}", target.display()).into_bytes());
            } else if meta.is_dir() {
                out.insert(rel, b"dir".to_vec());
                walk(base, &path, out);
            } else {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[derive(Debug, Clone, Copy)]
enum Wire {
    Grpc,
    Connect,
}

async fn snapshot_then_restore(wire: Wire) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("agent");
    let agent = Arc::new(DirHostAgent::open(&root).await.unwrap());
    let source = SandboxId::new();
    let state = root.join("sandboxes").join(source.to_string());
    std::fs::create_dir_all(state.join("rootfs/etc")).unwrap();
    std::fs::write(state.join("memory.bin"), vec![0xa5; 3 * 1024 * 1024 + 17]).unwrap();
    std::fs::write(state.join("rootfs/etc/hostname"), b"box\n").unwrap();
    std::os::unix::fs::symlink("etc/hostname", state.join("rootfs/name")).unwrap();
    let (transport, address, _server) = serve(wire, agent.clone()).await;

    let manager = Manager::open(dir.path().join("s.db"), transport, fast_options())
        .await
        .unwrap();
    let host = HostId::new();
    let team = TeamId::new();
    let registry = manager.registry();
    registry
        .register_host(host, address, HostStatus::Online)
        .await
        .unwrap();
    registry
        .register_sandbox(Sandbox::new(
            source,
            team,
            Some(host),
            SandboxStatus::Running,
            2,
            512,
        ))
        .await
        .unwrap();
    let snapshot = manager
        .create(
            &caller(team),
            NewSnapshot::new(source, Some(name("golden"))),
        )
        .await
        .unwrap();
    let expected = tree(&state);

    let restored = manager
        .restore(
            &caller(team),
            RestoreRequest::new(name("golden")).timeout_sec(120),
        )
        .await
        .unwrap();
    assert_eq!(restored.status, SandboxStatus::Running, "{wire:?}");
    assert_eq!(restored.host, Some(host));
    assert_eq!(
        restored.template.as_ref().map(TemplateName::as_str),
        Some("golden")
    );
    assert_eq!((restored.vcpus, restored.memory_mb), (2, 512));
    assert_ne!(restored.id, source);
    let copy = root.join("sandboxes").join(restored.id.to_string());
    assert_eq!(tree(&copy), expected, "{wire:?}: the restored files differ");
    assert_eq!(
        manager.sandbox(&caller(team), restored.id).await.unwrap(),
        restored
    );
    let listed = agent.list_sandboxes().await.unwrap();
    assert!(
        listed
            .sandboxes
            .iter()
            .any(|s| s.sandbox_id == restored.id.to_string() && s.status == "running"),
        "{wire:?}: {listed:?}"
    );
    // What produced the snapshot was recorded (from the agent's answer
    // over gRPC; from GetHostInfo's cache over Connect), and the template
    // was used.
    let shown = manager.get(&caller(team), &name("golden")).await.unwrap();
    assert_eq!(shown.id, snapshot.id);
    assert_eq!(
        shown.compat.as_ref().map(|c| c.vmm.as_str()),
        Some("dir"),
        "{wire:?}"
    );
    assert!(shown.last_used_at.is_some());

    // A restore whose answer is lost after the VM started, on a host that
    // then hides it (as if it had not started yet): the caller is told it
    // failed, and the VM is destroyed on the host through the transport.
    let lost = SandboxId::new();
    let failing = Arc::new(LateAgent {
        inner: agent.clone(),
    });
    let (transport, address, _server2) = serve(wire, failing).await;
    let manager2_dir = tempfile::tempdir().unwrap();
    let mut options = fast_options();
    options.late_write_grace = Duration::from_millis(50);
    let manager2 = Manager::open(manager2_dir.path().join("s.db"), transport, options)
        .await
        .unwrap();
    let host2 = HostId::new();
    manager2
        .registry()
        .register_host(host2, address, HostStatus::Online)
        .await
        .unwrap();
    let base = NewTemplate::new(team, name("base"), TemplateType::Base).on_hosts([host2]);
    let base = manager2.registry().register_template(base).await.unwrap();
    // The base template's files are the snapshot's, under its key.
    copy_dir(
        &root.join("snapshots").join(snapshot.id.to_string()),
        &root.join("snapshots").join(base.id.to_string()),
    );
    let err = manager2
        .restore(
            &caller(team),
            RestoreRequest::new(name("base")).sandbox_id(lost),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::AgentError, "{wire:?}: {err:?}");
    assert!(manager2.sandbox(&caller(team), lost).await.is_err());
    eventually("the lost VM is destroyed on the host", || async {
        let _ = manager2.run_pending_work().await;
        !root.join("sandboxes").join(lost.to_string()).exists()
            && manager2.pending_destroys().await.unwrap().is_empty()
    })
    .await;
    manager2.shutdown().await;
    manager.shutdown().await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        let target = to.join(entry.file_name());
        if meta.is_dir() {
            copy_dir(&entry.path(), &target);
        } else if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), target).unwrap();
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The reference agent, except that `CreateSandbox` starts the VM and then
/// answers Internal, and `ListSandboxes` does not list a sandbox it
/// started that way (as an agent that registers a VM only once it booted).
struct LateAgent {
    inner: Arc<DirHostAgent>,
}

#[async_trait::async_trait]
impl HostAgent for LateAgent {
    async fn create_snapshot(
        &self,
        req: agent::CreateSnapshotRequest,
    ) -> Result<agent::CreateSnapshotResponse, AgentError> {
        self.inner.create_snapshot(req).await
    }

    async fn delete_snapshot(&self, req: agent::DeleteSnapshotRequest) -> Result<(), AgentError> {
        self.inner.delete_snapshot(req).await
    }

    async fn list_sandboxes(&self) -> Result<agent::SandboxList, AgentError> {
        let mut list = self.inner.list_sandboxes().await?;
        list.sandboxes.clear();
        Ok(list)
    }

    async fn create_sandbox(
        &self,
        req: agent::CreateSandboxRequest,
    ) -> Result<agent::CreateSandboxResponse, AgentError> {
        self.inner.create_sandbox(req).await?;
        Err(AgentError::rejected(
            AgentCode::Internal,
            "booted, then lost the answer",
        ))
    }

    async fn destroy_sandbox(&self, req: agent::DestroySandboxRequest) -> Result<(), AgentError> {
        self.inner.destroy_sandbox(req).await
    }
}

/// `agent` behind a real server on a loopback port, and the client
/// transport that reaches it; dropping the guard stops the server.
async fn serve(
    wire: Wire,
    agent: Arc<dyn HostAgent>,
) -> (
    Arc<dyn AgentTransport>,
    String,
    Box<dyn std::any::Any + Send>,
) {
    match wire {
        Wire::Grpc => {
            let (stop, stopped) = oneshot::channel::<()>();
            let (addr, _task) = HostAgentServer::new(agent)
                .spawn("127.0.0.1:0".parse().unwrap(), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            let transport = Arc::new(GrpcTransport::new(GrpcConfig::default()));
            (transport, addr.to_string(), Box::new(stop))
        }
        Wire::Connect => {
            let server = ConnectServer::start(agent, None).await;
            let transport = Arc::new(ConnectTransport::new(ConnectConfig::default()));
            (transport, server.addr.to_string(), Box::new(server))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_restore_over_grpc() {
    snapshot_then_restore(Wire::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_restore_over_connect() {
    snapshot_then_restore(Wire::Connect).await;
}
