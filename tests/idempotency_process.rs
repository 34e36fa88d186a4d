//! An idempotent create across a crash of the real `snapshots-server`
//! process, on each store (see [`conformance!`]): the client sends the
//! create and drops the connection before the answer; the server is killed
//! with SIGKILL and started again; the retry with the same
//! `Idempotency-Key` gets the same template, and the host did the work
//! once (one snapshot key on disk, one `snapshot.create` in the audit log).
//! Then a create killed while in flight: whatever recovery makes of it, a
//! retry answers it again and never snapshots a second time.
#![cfg(feature = "server")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_snapshots-server");

conformance!(a_lost_answer_retried_after_a_sigkill_and_a_restart_is_the_same_template);

struct Site {
    data: PathBuf,
    database: String,
}

impl Site {
    fn command(&self) -> Command {
        let mut command = Command::new(BIN);
        command
            .env("SNAPSHOTS_DATA_DIR", &self.data)
            .env("SNAPSHOTS_DATABASE", &self.database)
            .env(
                "RUST_LOG",
                std::env::var("TEST_SERVER_LOG").unwrap_or("warn".into()),
            );
        command
    }

    async fn serve(&self) -> (Child, String) {
        let mut command = self.command();
        command.env("SNAPSHOTS_LISTEN", "127.0.0.1:0");
        let (child, line) = spawn_first_line(&mut command, "snapshots-server").await;
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        (child, format!("http://{addr}"))
    }
}

async fn sigkill(mut child: Child) {
    child.start_kill().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success(), "killed: {status:?}");
}

/// Sends a create and returns the connection, whose answer is never read
/// (the caller drops it: the answer is lost). Dropped before the server
/// dispatched the request, it would be no request at all.
async fn send_unread(
    base: &str,
    key: &str,
    idempotency_key: &str,
    body: &str,
) -> tokio::net::TcpStream {
    let addr = base.strip_prefix("http://").unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /v1/snapshots HTTP/1.1\r\nhost: {addr}\r\nx-api-key: {key}\r\n\
         idempotency-key: {idempotency_key}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    stream
}

async fn retry(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    idempotency_key: &str,
    body: &str,
) -> (u16, bool, Value) {
    let response = http
        .post(format!("{base}/v1/snapshots"))
        .header("X-API-Key", key)
        .header("Idempotency-Key", idempotency_key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    (status, replayed, response.json().await.unwrap())
}

/// The snapshot keys the local host's agent holds (whole or being
/// written).
fn keys_on_disk(data: &Path) -> usize {
    std::fs::read_dir(data.join("agent").join("snapshots"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

async fn creates_audited(http: &reqwest::Client, base: &str, key: &str) -> Vec<Value> {
    let entries: Value = http
        .get(format!("{base}/v1/audit-logs?action=snapshot.create"))
        .header("X-API-Key", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    entries.as_array().unwrap().clone()
}

async fn a_lost_answer_retried_after_a_sigkill_and_a_restart_is_the_same_template(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::fresh(&backend, dir.path()).await;
    let site = Site {
        data: dir.path().join("data"),
        database: db.url(),
    };
    let team = key_values(site.command().args(["create-team", "--name", "acme"])).await;
    let admin = key_values(site.command().arg("create-admin-key")).await;
    let (key, team_id) = (team["api_key"].clone(), team["team_id"].clone());
    let (server, base) = site.serve().await;
    let http = reqwest::Client::new();

    let sandbox = "sb-0000000000000000000000007";
    let state = site.data.join("agent").join("sandboxes").join(sandbox);
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("memory.bin"), vec![7u8; 1 << 20]).unwrap();
    let registered = http
        .post(format!("{base}/v1/admin/sandboxes"))
        .header("X-API-Key", &admin["api_key"])
        .json(&json!({ "id": sandbox, "team_id": team_id,
                       "host_id": "host-0000000000000000000000001",
                       "vcpus": 2, "memory_mb": 512 }))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);

    // The answer is lost: the client never reads it, and hangs up.
    let body = json!({ "sandbox_id": sandbox, "name": "kept" }).to_string();
    let unread = send_unread(&base, &key, "retry-1", &body).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let template: Value = loop {
        let response = http
            .get(format!("{base}/v1/snapshots/kept"))
            .header("X-API-Key", &key)
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            break response.json().await.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the create never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    drop(unread);
    sigkill(server).await;

    let (server, base) = site.serve().await;
    let (status, replayed, again) = retry(&http, &base, &key, "retry-1", &body).await;
    assert_eq!(status, 201, "{again}");
    assert!(replayed, "answered from the record, not done again");
    assert_eq!(again, template, "the same template");
    assert_eq!(keys_on_disk(&site.data), 1, "one snapshot on the host");
    assert_eq!(creates_audited(&http, &base, &key).await.len(), 1);

    // Killed while in flight: recovery rolls it forward or back; either
    // way the retries answer it, and the host is not asked again.
    let body = json!({ "sandbox_id": sandbox, "name": "in-flight" }).to_string();
    let unread = send_unread(&base, &key, "retry-2", &body).await;
    sigkill(server).await;
    drop(unread);
    let (server, base) = site.serve().await;
    let before = keys_on_disk(&site.data);
    let (first_status, _, first) = loop {
        let answer = retry(&http, &base, &key, "retry-2", &body).await;
        // Still being recovered: the first request is running.
        if answer.0 != 409 || answer.2["error"]["code"] != "idempotency_in_progress" {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (status, _, again) = retry(&http, &base, &key, "retry-2", &body).await;
    assert_eq!((status, &again), (first_status, &first));
    let audited = creates_audited(&http, &base, &key).await.len();
    match first_status {
        // It reached the server and was recovered or finished: one more
        // create at most, answered the same each time.
        201 => {
            assert_eq!(first["name"], "in-flight");
            assert_eq!(audited, 2);
        }
        // It never reached the server before the kill: the retry was the
        // first request, and did the work itself.
        s if s >= 400 => {
            assert!(first["error"]["code"].is_string(), "{first}");
            assert!(audited <= 2);
        }
        s => panic!("unexpected {s}: {first}"),
    }
    assert!(keys_on_disk(&site.data) <= before.max(2));
    drop(server);
}
