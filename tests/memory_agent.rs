//! `MemoryHostAgent`'s restore calls, fault injection on them, and what it
//! says of itself — the test double the manager's restore tests build on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sandbox_snapshots::agent::{
    AgentOp, CreateSandboxRequest, CreateSnapshotRequest, DestroySandboxRequest, Fault, HostInfo,
    SnapshotKey,
};
use sandbox_snapshots::{AgentCode, AgentError, HostAgent, MemoryHostAgent, SandboxId};

fn key(s: &str) -> SnapshotKey {
    SnapshotKey::parse(s).unwrap()
}

#[tokio::test]
async fn sandboxes_start_from_snapshots_or_base_templates_and_are_destroyed() {
    let agent = MemoryHostAgent::new();
    let source = SandboxId::new();
    agent.add_sandbox(source, "running", 2, 512);
    agent
        .create_snapshot(CreateSnapshotRequest::new(source, key("tpl-a")))
        .await
        .unwrap();
    agent.add_base_template("ubuntu");

    for template in ["tpl-a", "ubuntu"] {
        let id = SandboxId::new();
        let mut request = CreateSandboxRequest::new(id, key(template));
        request.vcpus = 4;
        request.memory_mb = 1024;
        let answer = agent.create_sandbox(request.clone()).await.unwrap();
        assert_eq!(
            (answer.sandbox_id.as_str(), answer.status.as_str()),
            (id.to_string().as_str(), "running")
        );
        assert_eq!(agent.sandbox_status(id).as_deref(), Some("running"));
        let again = agent.create_sandbox(request).await.unwrap_err();
        assert_eq!(again.code(), Some(AgentCode::AlreadyExists), "{template}");
        agent
            .destroy_sandbox(DestroySandboxRequest::new(id))
            .await
            .unwrap();
        assert_eq!(agent.sandbox_status(id), None);
        let gone = agent
            .destroy_sandbox(DestroySandboxRequest::new(id))
            .await
            .unwrap_err();
        assert_eq!(gone.code(), Some(AgentCode::NotFound));
    }
    let missing = agent
        .create_sandbox(CreateSandboxRequest::new(SandboxId::new(), key("tpl-nope")))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Some(AgentCode::NotFound));
    assert_eq!(agent.calls(AgentOp::CreateSandbox), 5);
    assert_eq!(agent.calls(AgentOp::DestroySandbox), 4);
}

#[tokio::test]
async fn faults_reach_the_restore_calls() {
    let agent = MemoryHostAgent::new();
    agent.add_base_template("base");
    let id = SandboxId::new();
    // Before the work: nothing started.
    agent.inject_times(
        AgentOp::CreateSandbox,
        Fault::Fail(AgentError::rejected(AgentCode::Internal, "x")),
        1,
    );
    let err = agent
        .create_sandbox(CreateSandboxRequest::new(id, key("base")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(AgentCode::Internal));
    assert_eq!(agent.sandbox_status(id), None);
    // After the work: the VM runs though the answer is an error.
    agent.inject_times(
        AgentOp::CreateSandbox,
        Fault::FailAfter(AgentError::Timeout),
        1,
    );
    let err = agent
        .create_sandbox(CreateSandboxRequest::new(id, key("base")))
        .await
        .unwrap_err();
    assert_eq!(err, AgentError::Timeout);
    assert_eq!(agent.sandbox_status(id).as_deref(), Some("running"));
    agent.inject_times(
        AgentOp::DestroySandbox,
        Fault::Fail(AgentError::unavailable("down")),
        1,
    );
    assert!(
        agent
            .destroy_sandbox(DestroySandboxRequest::new(id))
            .await
            .is_err()
    );
    assert_eq!(agent.sandbox_status(id).as_deref(), Some("running"));
    agent
        .destroy_sandbox(DestroySandboxRequest::new(id))
        .await
        .unwrap();
}

#[tokio::test]
async fn host_info_is_settable_and_snapshots_carry_it() {
    let agent = MemoryHostAgent::new();
    let default = agent.host_info().await.unwrap();
    assert_eq!(default.vmm, "memory");
    let info = HostInfo::new("firecracker", "1.7.0", "4.0.0", "x86_64")
        .kernel("6.1.0")
        .cpu("GenuineIntel", "Xeon", ["avx2", "sse4_2"]);
    agent.set_host_info(Some(info.clone()));
    assert_eq!(agent.host_info().await.unwrap(), info);
    let sb = SandboxId::new();
    agent.add_sandbox(sb, "running", 1, 64);
    let made = agent
        .create_snapshot(CreateSnapshotRequest::new(sb, key("tpl-c")))
        .await
        .unwrap();
    assert_eq!(made.compat, Some(info));

    agent.set_host_info(None);
    let unknown = agent.host_info().await.unwrap_err();
    assert_eq!(unknown.code(), Some(AgentCode::Unimplemented));
    agent.inject_times(AgentOp::GetHostInfo, Fault::Fail(AgentError::Timeout), 1);
    assert_eq!(agent.host_info().await.unwrap_err(), AgentError::Timeout);

    // The Go agent has no GetHostInfo and its snapshots say nothing.
    let go = MemoryHostAgent::go_like();
    assert_eq!(
        go.host_info().await.unwrap_err().code(),
        Some(AgentCode::Unimplemented)
    );
    go.add_sandbox(sb, "running", 1, 64);
    let made = go
        .create_snapshot(CreateSnapshotRequest::new(sb, key("tpl-d")))
        .await
        .unwrap();
    assert_eq!(made.compat, None);
}

#[test]
fn host_info_limits_are_checked() {
    let ok = HostInfo::new("firecracker", "1.7.0", "4.0.0", "x86_64");
    assert!(ok.validate().is_ok());
    assert!(!ok.is_unknown());
    assert!(HostInfo::default().is_unknown());
    let long = HostInfo::new("f".repeat(257), "1", "1", "x86_64");
    assert!(long.validate().unwrap_err().contains("vmm"));
    let control = HostInfo::new("fire\ncracker", "1", "1", "x86_64");
    assert!(control.validate().unwrap_err().contains("vmm"));
    let flags = ok.clone().cpu("v", "m", ["has space"]);
    assert!(flags.validate().unwrap_err().contains("cpu_flags"));
    let many = ok.cpu("v", "m", (0..1025).map(|i| format!("f{i}")));
    assert!(many.validate().unwrap_err().contains("cpu_flags"));
}
