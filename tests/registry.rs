//! The host and sandbox registry the embedding application feeds, on each
//! store (SQLite and PostgreSQL, see [`conformance!`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use sandbox_snapshots::*;

conformance!(
    hosts_register_update_and_heartbeat,
    sandboxes_register_and_change_status,
);

async fn hosts_register_update_and_heartbeat(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let registry = env.manager.registry();
    let h = HostId::new();
    let host = registry
        .register_host(h, "10.0.0.9:50051", HostStatus::Pending)
        .await
        .unwrap();
    assert_eq!(
        (host.id, host.address.as_str(), host.status),
        (h, "10.0.0.9:50051", HostStatus::Pending)
    );
    assert_eq!(host.last_heartbeat, None);

    registry.heartbeat(h).await.unwrap();
    let host = registry.host(h).await.unwrap().unwrap();
    assert_eq!(
        host.status,
        HostStatus::Online,
        "a heartbeat brings a pending host online"
    );
    assert!(host.last_heartbeat.is_some());

    registry
        .set_host_status(h, HostStatus::Draining)
        .await
        .unwrap();
    registry.heartbeat(h).await.unwrap();
    assert_eq!(
        registry.host(h).await.unwrap().unwrap().status,
        HostStatus::Draining,
        "a heartbeat does not undo draining"
    );
    registry
        .set_host_address(h, "10.0.0.10:50051")
        .await
        .unwrap();
    assert_eq!(
        registry.host(h).await.unwrap().unwrap().address,
        "10.0.0.10:50051"
    );

    let all = registry.hosts().await.unwrap();
    assert_eq!(all.len(), 2, "the env's host and this one");
    let err = registry
        .set_host_status(HostId::new(), HostStatus::Online)
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound);
}

async fn sandboxes_register_and_change_status(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let registry = env.manager.registry();
    let team = TeamId::new();
    let id = SandboxId::new();
    registry
        .register_sandbox(Sandbox::new(
            id,
            team,
            Some(env.host),
            SandboxStatus::Starting,
            4,
            2048,
        ))
        .await
        .unwrap();
    let sb = registry.sandbox(id).await.unwrap().unwrap();
    assert_eq!(
        (sb.team, sb.host, sb.status, sb.vcpus, sb.memory_mb),
        (team, Some(env.host), SandboxStatus::Starting, 4, 2048)
    );

    registry
        .set_sandbox_status(id, SandboxStatus::Running)
        .await
        .unwrap();
    let err = registry
        .compare_and_set_sandbox_status(id, SandboxStatus::Paused, SandboxStatus::Stopped)
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.http_status()),
        (ErrorCode::InvalidState, 409)
    );
    let sb = registry
        .compare_and_set_sandbox_status(id, SandboxStatus::Running, SandboxStatus::Paused)
        .await
        .unwrap();
    assert_eq!(sb.status, SandboxStatus::Paused);

    // Only a snapshot operation may take a sandbox to `snapshotting`.
    let err = registry
        .set_sandbox_status(id, SandboxStatus::Snapshotting)
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 409);
    for (why, id, host, status, code) in [
        (
            "registered snapshotting",
            id,
            env.host,
            SandboxStatus::Snapshotting,
            ErrorCode::InvalidRequest,
        ),
        // A sandbox on an unknown host is refused.
        (
            "on an unknown host",
            SandboxId::new(),
            HostId::new(),
            SandboxStatus::Running,
            ErrorCode::NotFound,
        ),
    ] {
        let err = registry
            .register_sandbox(Sandbox::new(id, team, Some(host), status, 1, 1))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{why}: {err:?}");
    }

    registry.remove_sandbox(id).await.unwrap();
    assert!(registry.sandbox(id).await.unwrap().is_none());
    assert_eq!(
        registry.remove_sandbox(id).await.unwrap_err().code(),
        ErrorCode::NotFound
    );
}
