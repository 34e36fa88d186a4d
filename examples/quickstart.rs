//! Run with: cargo run --example quickstart
//!
//! The whole snapshot flow on one machine, with the embedded defaults: an
//! SQLite file under `./data/` (or the directory given as the first
//! argument) and the reference host agent running in-process over
//! `./data/agent/`. It registers a host and a sandbox (whose state is a
//! directory of files), snapshots the sandbox, overwrites the snapshot,
//! lists, restores the snapshot into a new running sandbox, deletes, and
//! prints what happened at each step. Running it again
//! reuses the same file.
//!
//! With `--grpc ADDR [--token TOKEN]` it talks to a host agent over gRPC
//! instead, e.g. one started with
//! `cargo run --example host_agent -- --listen 127.0.0.1:50051 --root ./agent-root`;
//! the sandbox's state must then exist on that agent, in
//! `ROOT/sandboxes/sb-0000000000000000000000003/`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use sandbox_snapshots::{
    Actor, AgentTransport, AuditQuery, BearerToken, Caller, DirHostAgent, ErrorCode, GrpcConfig,
    GrpcTransport, HostId, HostStatus, InProcessTransport, ListQuery, Manager, ManagerOptions,
    NewSnapshot, RestoreRequest, Sandbox, SandboxId, SandboxStatus, SnapshotManager, TeamId,
    Template, TemplateName,
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

struct Args {
    data_dir: PathBuf,
    grpc: Option<String>,
    token: Option<String>,
}

fn parse_args() -> Result<Args, Failure> {
    let mut parsed = Args {
        data_dir: PathBuf::from("data"),
        grpc: None,
        token: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--grpc" => parsed.grpc = Some(args.next().ok_or("--grpc needs an address")?),
            "--token" => parsed.token = Some(args.next().ok_or("--token needs a value")?),
            other if other.starts_with('-') => {
                return Err(format!(
                    "unknown option {other:?}; usage: quickstart [DATA_DIR] [--grpc ADDR] [--token TOKEN]"
                )
                .into());
            }
            dir => parsed.data_dir = PathBuf::from(dir),
        }
    }
    Ok(parsed)
}

/// Gives the sandbox some state on disk for the in-process agent to copy.
fn write_sandbox_state(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir.join("rootfs"))?;
    std::fs::write(dir.join("config.json"), br#"{"vcpus":2,"memory_mb":512}"#)?;
    std::fs::write(dir.join("memory.bin"), vec![0x5a; 1024 * 1024])?;
    std::fs::write(dir.join("rootfs/hello.txt"), b"hello from the sandbox\n")?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let args = parse_args()?;
    let db = args.data_dir.join("quickstart.db");

    // Fixed ids so that a second run finds the same host, team and sandbox.
    let host = HostId::parse("host-0000000000000000000000001")?;
    let team = TeamId::parse("team-0000000000000000000000002")?;
    let sandbox = SandboxId::parse("sb-0000000000000000000000003")?;

    println!("sandbox-snapshots quickstart");
    let (transport, address, agent_root): (Arc<dyn AgentTransport>, String, Option<PathBuf>) =
        match &args.grpc {
            None => {
                // The reference agent, in this process, over a local directory.
                let root = args.data_dir.join("agent");
                let agent = DirHostAgent::open(&root).await?;
                write_sandbox_state(&root.join("sandboxes").join(sandbox.to_string()))?;
                let transport = Arc::new(InProcessTransport::new());
                transport.add_host(host, Arc::new(agent));
                (transport, "in-process".to_owned(), Some(root))
            }
            Some(addr) => {
                let mut config = GrpcConfig::default();
                if let Some(token) = &args.token {
                    config = config.token(BearerToken::new(token.clone()));
                }
                (Arc::new(GrpcTransport::new(config)), addr.clone(), None)
            }
        };
    let manager = Manager::open(&db, transport, ManagerOptions::default()).await?;
    println!("  store      {}", db.display());
    println!("  host agent {address}");

    let registry = manager.registry();
    registry
        .register_host(host, address.clone(), HostStatus::Online)
        .await?;
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

    let keys = || -> String {
        agent_root
            .as_ref()
            .and_then(|root| std::fs::read_dir(root.join("snapshots")).ok())
            .map(|entries| {
                let mut names: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                names.join(", ")
            })
            .unwrap_or_else(|| "(on the remote agent)".to_owned())
    };

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
        keys(),
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
    println!("   moved to it in one transaction; then the old files were deleted");
    println!("   keys on the host now: {}", keys());

    let page = manager.list(&caller, ListQuery::new()).await?;
    println!(
        "\n4. list for {team} ({} template(s), newest first):",
        page.items.len()
    );
    for t in &page.items {
        println!("   {}", show(t));
    }

    // Restore the snapshot into a new sandbox: on the host that holds its
    // files (and can run it), registered `running`.
    let started = Instant::now();
    let restored = manager
        .restore(&caller, RestoreRequest::new(name.clone()).timeout_sec(300))
        .await?;
    println!(
        "\n5. restored {:?} into sandbox {} on {} in {:?}: {}",
        name.as_str(),
        restored.id,
        restored
            .host
            .map_or("no host".to_owned(), |h| h.to_string()),
        started.elapsed(),
        restored.status
    );
    if let Some(root) = &agent_root {
        let files = |id: SandboxId| -> Vec<(String, Vec<u8>)> {
            let dir = root.join("sandboxes").join(id.to_string());
            let mut out = Vec::new();
            for rel in ["config.json", "memory.bin", "rootfs/hello.txt"] {
                out.push((
                    rel.to_owned(),
                    std::fs::read(dir.join(rel)).unwrap_or_default(),
                ));
            }
            out
        };
        let same = files(restored.id) == files(sandbox);
        println!(
            "   its files on the host {} the snapshotted sandbox's",
            if same { "equal" } else { "DIFFER FROM" }
        );
        if !same {
            return Err("the restored sandbox's files differ from the snapshot's".into());
        }
    }
    let used = manager.get(&caller, &name).await?;
    println!(
        "   {:?} was last used at {}",
        name.as_str(),
        used.last_used_at
            .map_or("never".to_owned(), |t| t.to_string())
    );

    let deleted = manager.delete(&caller, &name).await?;
    println!(
        "\n6. deleted {:?}: files removed from {} host(s), {} still queued",
        deleted.template.name.as_str(),
        deleted.hosts_confirmed.len(),
        deleted.hosts_pending.len()
    );
    println!(
        "   keys on the host now: [{}]; templates listed: {}",
        keys(),
        manager.list(&caller, ListQuery::new()).await?.items.len()
    );

    let audit = manager
        .audit_log(&caller, AuditQuery::new().limit(5))
        .await?;
    println!("\n7. latest audit entries for {team}:");
    for e in &audit.items {
        println!(
            "   {}  {:<16} {:<8} {} ({})",
            e.created_at,
            e.action,
            e.outcome.as_str(),
            e.resource_id,
            e.metadata["name"]
                .as_str()
                .or(e.metadata["template"].as_str())
                .unwrap_or("")
        );
    }

    manager.shutdown().await;
    println!("\ndone; run it again to reuse {}", db.display());
    Ok(())
}
