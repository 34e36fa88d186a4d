//! End to end with the host agent as a separate process (the `host_agent`
//! example binary) reached over gRPC on loopback: create → files under its
//! root → list → delete → files gone; kill the agent, delete another
//! snapshot → queued; restart the agent → the background worker finishes.
//! And the README's `curl` line (Connect JSON) against the same example.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::{caller, eventually, fast_options, name};
use sandbox_snapshots::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Starts the agent and waits for its `listening on ADDR` line.
async fn start_agent(root: &Path, listen: &str, token: &str) -> (Child, String) {
    let mut child = Command::new(common::example_binary("host_agent"))
        .args(["--listen", listen, "--root"])
        .arg(root)
        .args(["--token", token])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the agent starts within 30 s")
        .unwrap()
        .expect("the agent prints its address");
    let addr = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (child, addr)
}

fn snapshot_dir(root: &Path, t: &Template) -> PathBuf {
    root.join("snapshots").join(t.id.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_and_agent_in_separate_processes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("agent");
    let (mut agent, addr) = start_agent(&root, "127.0.0.1:0", "e2e-token").await;

    let transport = Arc::new(GrpcTransport::new(
        GrpcConfig::default().token(BearerToken::new("e2e-token")),
    ));
    let manager = Manager::open(dir.path().join("s.db"), transport, fast_options())
        .await
        .unwrap();
    let registry = manager.registry();
    let host = HostId::new();
    registry
        .register_host(host, addr.clone(), HostStatus::Online)
        .await
        .unwrap();

    let team = TeamId::new();
    let sb = SandboxId::new();
    let state = root.join("sandboxes").join(sb.to_string());
    std::fs::create_dir_all(state.join("disk")).unwrap();
    std::fs::write(state.join("memory.bin"), vec![7u8; 64 * 1024]).unwrap();
    std::fs::write(state.join("disk/rootfs.img"), b"rootfs").unwrap();
    registry
        .register_sandbox(Sandbox::new(
            sb,
            team,
            Some(host),
            SandboxStatus::Running,
            1,
            256,
        ))
        .await
        .unwrap();

    // Create: the files are under the agent's root, keyed by template id.
    let one = manager
        .create(&caller(team), NewSnapshot::new(sb, Some(name("one"))))
        .await
        .unwrap();
    let files = snapshot_dir(&root, &one);
    assert_eq!(
        std::fs::read(files.join("memory.bin")).unwrap(),
        vec![7u8; 64 * 1024]
    );
    assert_eq!(
        std::fs::read(files.join("disk/rootfs.img")).unwrap(),
        b"rootfs"
    );
    assert!(
        one.size_bytes >= 64 * 1024,
        "allocated size {}",
        one.size_bytes
    );
    assert_eq!(
        registry.sandbox(sb).await.unwrap().unwrap().status,
        SandboxStatus::Paused
    );

    let listed = manager.list(&caller(team), ListQuery::new()).await.unwrap();
    assert_eq!(listed.items, vec![one.clone()]);

    // Delete: the files are gone from the agent's root.
    let deleted = manager.delete(&caller(team), &name("one")).await.unwrap();
    assert_eq!(deleted.hosts_confirmed, vec![host]);
    assert!(!files.exists());

    // Kill the agent; a delete made meanwhile is queued.
    let two = manager
        .create(&caller(team), NewSnapshot::new(sb, Some(name("two"))))
        .await
        .unwrap();
    let files = snapshot_dir(&root, &two);
    assert!(files.exists());
    agent.kill().await.unwrap();
    let deleted = manager.delete(&caller(team), &name("two")).await.unwrap();
    assert_eq!(deleted.hosts_pending, vec![host]);
    assert!(
        manager
            .list(&caller(team), ListQuery::new())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let pending = manager.pending_deletions().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].template_id, two.id);
    assert!(files.exists(), "the files wait for the agent");

    // Restart the agent on the same address: the worker finishes the job.
    let (_agent, again) = start_agent(&root, &addr, "e2e-token").await;
    assert_eq!(again, addr);
    eventually("the worker deletes the queued files", || async {
        !files.exists() && manager.pending_deletions().await.unwrap().is_empty()
    })
    .await;
    assert!(
        std::fs::read_dir(root.join("snapshots"))
            .unwrap()
            .next()
            .is_none()
    );
    manager.shutdown().await;
}

/// The `curl` line of the README (between `<!-- curl:begin -->` and
/// `<!-- curl:end -->`), with the agent's real address for the README's
/// `127.0.0.1:50051`.
fn readme_curl_line(addr: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let block = readme
        .split("<!-- curl:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- curl:end -->").next())
        .expect("README.md has a curl block");
    let lines: Vec<&str> = block
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("```"))
        .collect();
    assert_eq!(lines.len(), 1, "one curl line: {lines:?}");
    assert!(lines[0].starts_with("curl "), "{lines:?}");
    assert!(lines[0].contains("127.0.0.1:50051"), "{lines:?}");
    lines[0].replace("127.0.0.1:50051", addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_curl_line_creates_a_snapshot_over_connect_json() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("agent-root");
    // The README's set-up: a sandbox's state under the agent's root.
    let state = root.join("sandboxes/sb-0000000000000000000000003");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("memory.bin"), b"state\n").unwrap();
    let (_agent, addr) = start_agent(&root, "127.0.0.1:0", "s3cret").await;

    let line = readme_curl_line(&addr);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("bash")
            .args(["-c", &line])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("curl answers within 30 s")
    .expect("bash and curl are installed");
    assert!(out.status.success(), "{line}: {out:?}");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(answer["name"], "tpl-curl", "{answer}");
    assert!(answer["sizeBytes"].as_str().is_some(), "{answer}");
    assert_eq!(
        std::fs::read(root.join("snapshots/tpl-curl/memory.bin")).unwrap(),
        b"state\n"
    );

    // The same line with a wrong token is a Connect error.
    let wrong = line.replace("Bearer s3cret", "Bearer wrong");
    let out = Command::new("bash")
        .args(["-c", &wrong])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["code"], "unauthenticated", "{answer}");
}
