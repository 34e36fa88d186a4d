//! Run with: cargo run --example quickstart
//!
//! The whole snapshot flow on one machine, with the embedded defaults: an
//! SQLite file under `./data/` (or the directory given as the first
//! argument) and an in-process host agent. It registers a host and a
//! sandbox, snapshots the sandbox, overwrites the snapshot, lists, deletes,
//! and prints what happened at each step. Running it again reuses the same
//! file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use sandbox_snapshots::{
    Actor, AuditQuery, Caller, ErrorCode, HostId, HostStatus, InProcessTransport, ListQuery,
    ManagerOptions, MemoryHostAgent, NewSnapshot, Sandbox, SandboxId, SandboxStatus,
    SnapshotManager, SqliteSnapshotManager, TeamId, Template, TemplateName,
};

type Failure = Box<dyn std::error::Error + Send + Sync>;

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn show(t: &Template) -> String {
    format!(
        "{:<12} {:<9} {:>10}  {:>2} vCPU {:>5} MiB  {}{}",
        t.name,
        t.template_type,
        mib(t.size_bytes),
        t.vcpus,
        t.memory_mb,
        t.created_at,
        if t.is_platform() { "  (platform)" } else { "" }
    )
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let data_dir = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from("data"), PathBuf::from);
    let db = data_dir.join("quickstart.db");

    // Fixed ids so that a second run finds the same host, team and sandbox.
    let host = HostId::parse("host-0000000000000000000000001")?;
    let team = TeamId::parse("team-0000000000000000000000002")?;
    let sandbox = SandboxId::parse("sb-0000000000000000000000003")?;

    // The host agent runs in this process; a real deployment would reach
    // remote agents over gRPC instead.
    let agent = Arc::new(MemoryHostAgent::new());
    let transport = Arc::new(InProcessTransport::new());
    transport.add_host(host, agent.clone());

    println!("sandbox-snapshots quickstart");
    let manager = SqliteSnapshotManager::open(&db, transport, ManagerOptions::default()).await?;
    println!("  store      {}", db.display());

    let registry = manager.registry();
    registry
        .register_host(host, "in-process", HostStatus::Online)
        .await?;
    agent.add_sandbox(sandbox, "running", 2, 512);
    registry
        .register_sandbox(Sandbox::new(
            sandbox,
            team,
            Some(host),
            SandboxStatus::Running,
            2,
            512,
        ))
        .await?;
    println!("\n1. registered host {host} (online)");
    println!("   and sandbox {sandbox} of {team}: running, 2 vCPU, 512 MiB");

    let caller = Caller::new(
        team,
        Actor::User {
            id: "quickstart".into(),
            name: "Quickstart".into(),
        },
    );
    let name = TemplateName::parse("demo")?;

    let started = Instant::now();
    let first = match manager
        .create(&caller, NewSnapshot::new(sandbox, Some(name.clone())))
        .await
    {
        Ok(t) => t,
        Err(e) if e.code() == ErrorCode::AlreadyExists => {
            // Left over from an interrupted earlier run: replace it.
            println!("\n   ({name:?} exists from an earlier run; overwriting it)");
            manager
                .create(
                    &caller,
                    NewSnapshot::new(sandbox, Some(name.clone())).overwrite(true),
                )
                .await?
        }
        Err(e) => return Err(e.into()),
    };
    let status = registry.sandbox(sandbox).await?.map(|s| s.status);
    println!(
        "\n2. created snapshot {:?} -> {} ({}) in {:?}",
        first.name.as_str(),
        first.id,
        mib(first.size_bytes),
        started.elapsed()
    );
    println!(
        "   files on the host under key {}; sandbox is now {}",
        agent.snapshot_keys().join(", "),
        status.map_or("unknown".to_owned(), |s| s.to_string())
    );

    let started = Instant::now();
    let second = manager
        .create(
            &caller,
            NewSnapshot::new(sandbox, Some(name.clone())).overwrite(true),
        )
        .await?;
    println!(
        "\n3. overwrote {:?} -> {} in {:?}: the new snapshot was taken first, then the name",
        second.name.as_str(),
        second.id,
        started.elapsed()
    );
    println!("   moved to it in one transaction; the old files are deleted in the background");
    manager.run_pending_work().await?;
    println!(
        "   keys on the host now: {}",
        agent.snapshot_keys().join(", ")
    );

    let page = manager.list(&caller, ListQuery::new()).await?;
    println!(
        "\n4. list for {team} ({} template(s), newest first):",
        page.items.len()
    );
    for t in &page.items {
        println!("   {}", show(t));
    }

    let deleted = manager.delete(&caller, &name).await?;
    println!(
        "\n5. deleted {:?}: files removed from {} host(s), {} still queued",
        deleted.template.name.as_str(),
        deleted.hosts_confirmed.len(),
        deleted.hosts_pending.len()
    );
    println!(
        "   keys on the host now: [{}]; templates listed: {}",
        agent.snapshot_keys().join(", "),
        manager.list(&caller, ListQuery::new()).await?.items.len()
    );

    let audit = manager
        .audit_log(&caller, AuditQuery::new().limit(5))
        .await?;
    println!("\n6. latest audit entries for {team}:");
    for e in &audit.items {
        println!(
            "   {}  {:<16} {:<8} {} ({})",
            e.created_at,
            e.action,
            e.outcome.as_str(),
            e.resource_id,
            e.metadata["name"].as_str().unwrap_or("")
        );
    }

    manager.shutdown().await;
    println!("\ndone; run it again to reuse {}", db.display());
    Ok(())
}
