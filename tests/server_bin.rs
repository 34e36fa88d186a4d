//! The `snapshots-server` binary as a self-hoster runs it: key commands,
//! configuration from the environment, serving, revocation, SIGTERM.
#![cfg(feature = "server")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_snapshots-server");

async fn run(data: &std::path::Path, args: &[&str]) -> HashMap<String, String> {
    common::key_values(Command::new(BIN).args(args).env("SNAPSHOTS_DATA_DIR", data)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_binary_from_key_creation_to_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let team = run(&data, &["create-team", "--name", "acme"]).await;
    assert!(team["team_id"].starts_with("team-"));
    assert!(team["key_id"].starts_with("key-"));
    assert!(team["api_key"].starts_with("sk-"));
    let admin = run(&data, &["create-admin-key"]).await;

    // No subcommand: serve, configured from the environment.
    let mut server = Command::new(BIN)
        .env("SNAPSHOTS_DATA_DIR", &data)
        .env("SNAPSHOTS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let addr = line.strip_prefix("listening on ").unwrap().to_owned();
    assert!(
        !addr.ends_with(":8080"),
        "SNAPSHOTS_LISTEN was honoured: {addr}"
    );
    let http = reqwest::Client::new();
    let get = |path: &str, key: &str| {
        http.get(format!("http://{addr}{path}"))
            .header("X-API-Key", key)
            .send()
    };
    assert_eq!(get("/healthz", "").await.unwrap().status(), 200);
    assert_eq!(
        get("/v1/snapshots", &team["api_key"])
            .await
            .unwrap()
            .status(),
        200
    );
    let hosts: serde_json::Value = get("/v1/admin/hosts", &admin["api_key"])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        hosts[0]["id"], "host-0000000000000000000000001",
        "the local host"
    );

    // Revoking from the command line while the server runs takes effect.
    run(&data, &["revoke-key", "--key", &team["key_id"]]).await;
    assert_eq!(
        get("/v1/snapshots", &team["api_key"])
            .await
            .unwrap()
            .status(),
        401
    );

    // SIGTERM: a clean exit.
    let pid = server.id().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), server.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "graceful exit: {status:?}");
}
