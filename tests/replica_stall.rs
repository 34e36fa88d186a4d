//! A replica that stalls past its lease while its own create is in flight
//! (a GC pause, a partition from the database) and then resumes: another
//! replica has adopted the entry meanwhile. What the stalled replica's
//! caller is told must still be the truth (SPEC §4a "The caller's answer
//! is the truth").
//!
//! Two managers in this process share one PostgreSQL schema. They reach
//! the same host through two transports: the second replica's reaches the
//! memory agent directly; the first one's wraps it, so that its
//! `CreateSnapshot` call can be held and then answered as lost.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{Backend, Db, caller, fast_options, name};
use sandbox_snapshots::agent::{
    AgentError, CreateSnapshotRequest, CreateSnapshotResponse, DeleteSnapshotRequest, HostAgent,
    SandboxList, SnapshotInfo,
};
use sandbox_snapshots::*;
use tokio::sync::watch;

/// The memory agent as the stalled replica sees it: `CreateSnapshot`
/// reports its arrival, waits for the gate, then answers with a timeout
/// (the reply was lost, or the stalled process's own deadline fired).
struct LostReply {
    inner: Arc<MemoryHostAgent>,
    arrived: watch::Sender<bool>,
    gate: watch::Sender<bool>,
}

#[async_trait]
impl HostAgent for LostReply {
    async fn create_snapshot(
        &self,
        _req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, AgentError> {
        self.arrived.send_replace(true);
        let mut gate = self.gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
        Err(AgentError::Timeout)
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<(), AgentError> {
        self.inner.delete_snapshot(req).await
    }

    async fn list_sandboxes(&self) -> Result<SandboxList, AgentError> {
        self.inner.list_sandboxes().await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentError> {
        self.inner.list_snapshots().await
    }
}

/// Replica A's create is in flight; A stalls past its lease; replica B
/// adopts the entry, finds the key complete on the host and rolls the
/// create forward (the template is ready). A resumes, its agent call
/// answers with an ambiguous error, and its `fail_create` finds the entry
/// closed. A must not then tell its caller that the create failed while
/// the template exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_replica_never_reports_a_failure_for_a_create_another_rolled_forward() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Db::fresh(&backend, dir.path()).await;
    let Db::Postgres(url) = &db else {
        unreachable!("a PostgreSQL backend")
    };
    let agent = Arc::new(MemoryHostAgent::new());
    let host = HostId::new();
    let lost = Arc::new(LostReply {
        inner: agent.clone(),
        arrived: watch::channel(false).0,
        gate: watch::channel(false).0,
    });
    let (transport_a, transport_b) = (
        Arc::new(InProcessTransport::new()),
        Arc::new(InProcessTransport::new()),
    );
    transport_a.add_host(host, lost.clone());
    transport_b.add_host(host, agent.clone());
    let mut options = fast_options();
    // Long enough that A's own heartbeat does not renew the lease the test
    // ends by hand (it renews every third of it).
    options.instance_lease = Duration::from_secs(120);
    let a = db.open(transport_a, options.clone()).await.unwrap();
    let b = db.open(transport_b, options).await.unwrap();
    a.registry()
        .register_host(host, "in-process", HostStatus::Online)
        .await
        .unwrap();
    let team = TeamId::new();
    let sandbox = SandboxId::new();
    agent.add_sandbox(sandbox, "running", 2, 512);
    a.registry()
        .register_sandbox(Sandbox::new(
            sandbox,
            team,
            Some(host),
            SandboxStatus::Running,
            2,
            512,
        ))
        .await
        .unwrap();

    let creating = {
        let a = a.clone();
        tokio::spawn(async move {
            a.create(
                &caller(team),
                NewSnapshot::parse(&sandbox.to_string(), "stalled").unwrap(),
            )
            .await
        })
    };
    let _ = lost.arrived.subscribe().wait_for(|a| *a).await;
    let open = b.open_operations().await.unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    let template = open[0].template_id;
    // The host finished writing the snapshot (the VM is left paused); the
    // reply to A is what gets lost.
    agent.put_snapshot(&template.to_string(), 528 * 1024 * 1024, None);
    agent.set_sandbox_status(sandbox, "paused");

    // A stalls past its lease: its lease ends without a renewal.
    end_lease_of_owners(url, "operations").await;
    // B adopts the entry and rolls it forward.
    common::eventually("B rolls the adopted create forward", || async {
        b.run_pending_work().await.unwrap();
        b.get(&caller(team), &name("stalled")).await.is_ok()
    })
    .await;

    // A resumes: its agent call answers with an ambiguous error.
    lost.gate.send_replace(true);
    let answer = creating.await.unwrap();
    let visible = b.get(&caller(team), &name("stalled")).await;
    assert!(
        answer.is_ok() || visible.is_err(),
        "A's caller was told the create failed ({answer:?}), yet it took effect: {visible:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Replica A's restore is in flight (its `CreateSandbox` held); A stalls
/// past its lease; replica B adopts the restore, finds no VM on the host,
/// rolls it back and destroys the sandbox (NotFound: nothing there yet).
/// A resumes and its `CreateSandbox` succeeds: the VM runs, and A's
/// `end_restore` finds the entry closed. A's caller is told the restore
/// failed, so that VM must not run on (SPEC §4a "Restore").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_replica_never_leaves_a_vm_running_for_a_restore_another_rolled_back() {
    use sandbox_snapshots::agent::{AgentOp, Fault, Hold};
    let Some(backend) = Backend::postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Db::fresh(&backend, dir.path()).await;
    let Db::Postgres(url) = &db else {
        unreachable!("a PostgreSQL backend")
    };
    let agent = Arc::new(MemoryHostAgent::new());
    let host = HostId::new();
    let transport = Arc::new(InProcessTransport::new());
    transport.add_host(host, agent.clone());
    let mut options = fast_options();
    // Long enough that A's own heartbeat does not renew the lease the test
    // ends by hand (it renews every third of it).
    options.instance_lease = Duration::from_secs(120);
    let a = db.open(transport.clone(), options.clone()).await.unwrap();
    let b = db.open(transport, options).await.unwrap();
    a.registry()
        .register_host(host, "in-process", HostStatus::Online)
        .await
        .unwrap();
    let team = TeamId::new();
    let template = a
        .registry()
        .register_template(
            NewTemplate::new(team, name("snap"), TemplateType::Snapshot)
                .shape(2, 512)
                .on_hosts([host]),
        )
        .await
        .unwrap();
    agent.put_snapshot(&template.id.to_string(), 1 << 20, None);

    let hold = Hold::new();
    agent.inject_times(AgentOp::CreateSandbox, Fault::Hold(hold.clone()), 1);
    let sandbox = SandboxId::new();
    let restoring = {
        let a = a.clone();
        tokio::spawn(async move {
            a.restore(
                &caller(team),
                RestoreRequest::new(name("snap")).sandbox_id(sandbox),
            )
            .await
        })
    };
    hold.arrived(1).await;

    // A stalls past its lease: its lease ends without a renewal.
    end_lease_of_owners(url, "restores").await;
    // B adopts the restore, rolls it back and destroys the (absent) VM.
    common::eventually("B rolls the adopted restore back", || async {
        b.run_pending_work().await.unwrap();
        db.count("SELECT count(*) FROM restores").await == 0
            && b.pending_destroys().await.unwrap().is_empty()
            && agent.calls(AgentOp::DestroySandbox) >= 1
    })
    .await;

    // A resumes: the host starts the VM and answers A's call.
    hold.release();
    let answer = restoring.await.unwrap();
    if answer.is_err() {
        common::eventually("the VM A's caller was told failed is gone", || async {
            let _ = a.run_pending_work().await;
            let _ = b.run_pending_work().await;
            agent.sandbox_status(sandbox).is_none()
        })
        .await;
    } else {
        let registered = b.registry().sandbox(sandbox).await.unwrap();
        assert_eq!(
            registered.map(|s| s.status),
            Some(SandboxStatus::Running),
            "A's caller was told it runs: {answer:?}"
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Ends the instance leases of the owners of the entries of `table`
/// (`operations` or `restores`), as if they had stalled past them.
async fn end_lease_of_owners(url: &str, table: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let sql =
        format!("UPDATE instances SET lease_until = 0 WHERE id IN (SELECT owner FROM {table})");
    client.execute(sql.as_str(), &[]).await.unwrap();
}
