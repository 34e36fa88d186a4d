//! Several control-plane replicas on one PostgreSQL database (SPEC §9):
//! real `snapshots-server` child processes sharing a fresh schema, one host
//! agent (the in-memory one, served over gRPC on loopback by this process,
//! so that the test can hold its calls and count them).
//!
//! (a) one name created through both replicas at once: one wins, the other
//!     gets 409, no orphan key;
//! (b) a replica SIGKILLed mid-create: the other adopts the operation only
//!     once the dead one's instance lease has ended, and the invariants hold;
//! (c) a backlog of deletions drained by both: each key deleted once;
//! (d) seeded random operations split across both replicas: the invariants
//!     hold once everything has drained.
//!
//! Without `SNAPSHOTS_TEST_POSTGRES_URL` each test prints a skip line (and
//! fails when `CI` is set).
#![cfg(all(feature = "server", feature = "postgres"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::Backend;
use sandbox_snapshots::agent::{AgentOp, Fault, Hold};
use sandbox_snapshots::*;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// The instance lease the replicas run with: short, so that adoption
/// happens within the test, long enough that a live replica never loses it.
const LEASE_SECS: u64 = 6;

struct Replica {
    child: Child,
    base: String,
}

struct Fleet {
    _dir: tempfile::TempDir,
    db: String,
    http: reqwest::Client,
    admin: String,
    team: String,
    key: String,
    agent: Arc<MemoryHostAgent>,
    host: HostId,
    replicas: Vec<Replica>,
    _agent_stop: tokio::sync::oneshot::Sender<()>,
}

fn server_binary() -> &'static str {
    env!("CARGO_BIN_EXE_snapshots-server")
}

/// Runs a key command of `snapshots-server` on `db`: its `name=value`
/// lines.
async fn cli(db: &str, args: &[&str]) -> HashMap<String, String> {
    common::key_values(
        Command::new(server_binary())
            .args(["--database", db])
            .args(args),
    )
    .await
}

fn field(lines: &HashMap<String, String>, name: &str) -> String {
    lines
        .get(name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name} in {lines:?}"))
}

async fn start_replica(db: &str, dir: &std::path::Path) -> Replica {
    let mut command = Command::new(server_binary());
    command
        .args([
            "--database",
            db,
            "--agent",
            "grpc",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--instance-lease", &LEASE_SECS.to_string()])
        .arg("--data-dir")
        .arg(dir)
        // REPLICA_RUST_LOG=info shows what the replicas do.
        .env(
            "RUST_LOG",
            std::env::var("REPLICA_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
    let (child, line) = common::spawn_first_line(&mut command, "a replica").await;
    let addr = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Replica {
        child,
        base: format!("http://{addr}"),
    }
}

impl Fleet {
    /// Two replicas on a fresh schema, one host, one team. `None` when
    /// there is no PostgreSQL server (outside CI).
    async fn start(replicas: usize) -> Option<Fleet> {
        Self::start_with(replicas, common::Mode::Ours).await
    }

    /// The same, with a host agent that behaves like ours or like the Go
    /// agent (lists only running VMs, every failure Internal, no
    /// `ListSnapshots`).
    async fn start_with(replicas: usize, mode: common::Mode) -> Option<Fleet> {
        let Backend::Postgres(base) = Backend::postgres()? else {
            unreachable!()
        };
        let db = common::postgres::fresh_schema(&base).await;
        let dir = tempfile::tempdir().unwrap();
        let admin = field(&cli(&db, &["create-admin-key"]).await, "api_key");
        let team_lines = cli(&db, &["create-team", "--name", "replicas"]).await;
        let (team, key) = (field(&team_lines, "team_id"), field(&team_lines, "api_key"));

        let agent = Arc::new(mode.agent());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr, _task) = HostAgentServer::new(agent.clone())
            .spawn("127.0.0.1:0".parse().unwrap(), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        let mut started = Vec::new();
        for i in 0..replicas {
            let data = dir.path().join(format!("replica-{i}"));
            started.push(start_replica(&db, &data).await);
        }
        let fleet = Fleet {
            _dir: dir,
            db,
            http: reqwest::Client::new(),
            admin,
            team,
            key,
            agent,
            host: HostId::new(),
            replicas: started,
            _agent_stop: stop,
        };
        let (status, body) = fleet
            .admin_call(
                0,
                reqwest::Method::POST,
                "/v1/admin/hosts",
                json!({"id": fleet.host.to_string(), "address": addr.to_string()}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        Some(fleet)
    }

    async fn call(
        &self,
        replica: usize,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.replicas[replica].base);
        let mut request = self.http.request(method, url).header("x-api-key", key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn admin_call(
        &self,
        replica: usize,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> (u16, Value) {
        self.call(replica, &self.admin, method, path, Some(body))
            .await
    }

    /// A running sandbox of the team on the host, known to the agent and
    /// registered through replica 0.
    async fn sandbox(&self) -> SandboxId {
        let id = SandboxId::new();
        self.agent.add_sandbox(id, "running", 2, 512);
        let (status, body) = self
            .admin_call(
                0,
                reqwest::Method::POST,
                "/v1/admin/sandboxes",
                json!({"id": id.to_string(), "team_id": self.team,
                       "host_id": self.host.to_string(), "status": "running"}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        id
    }

    async fn create(&self, replica: usize, sandbox: SandboxId, name: &str) -> (u16, Value) {
        self.call(
            replica,
            &self.key,
            reqwest::Method::POST,
            "/v1/snapshots",
            Some(json!({"sandbox_id": sandbox.to_string(), "name": name})),
        )
        .await
    }

    async fn overwrite(&self, replica: usize, sandbox: SandboxId, name: &str) -> (u16, Value) {
        self.call(
            replica,
            &self.key,
            reqwest::Method::POST,
            "/v1/snapshots?overwrite=true",
            Some(json!({"sandbox_id": sandbox.to_string(), "name": name})),
        )
        .await
    }

    async fn delete(&self, replica: usize, name: &str) -> u16 {
        self.call(
            replica,
            &self.key,
            reqwest::Method::DELETE,
            &format!("/v1/snapshots/{name}"),
            None,
        )
        .await
        .0
    }

    /// `GET path` through `replica` with `key`: the JSON of a 200.
    async fn get(&self, replica: usize, key: &str, path: &str) -> Value {
        let (status, body) = self
            .call(replica, key, reqwest::Method::GET, path, None)
            .await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// The team's visible template names, through `replica`.
    async fn templates(&self, replica: usize) -> Vec<String> {
        let body = self.get(replica, &self.key, "/v1/snapshots").await;
        let items = body.as_array().cloned().unwrap_or_default();
        items
            .iter()
            .map(|t| t["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    async fn open_operations(&self, replica: usize) -> Vec<Value> {
        let body = self.get(replica, &self.admin, "/v1/admin/operations").await;
        body.as_array().cloned().unwrap_or_default()
    }

    async fn pending(&self, replica: usize) -> Vec<Value> {
        let body = self.get(replica, &self.admin, "/v1/admin/pending").await;
        body["deletions"].as_array().cloned().unwrap_or_default()
    }

    async fn count(&self, sql: &str) -> i64 {
        common::postgres::count(&self.db, sql).await
    }

    /// The ids (`tpl-…`, the keys of their files) of the ready templates.
    async fn ready_ids(&self) -> HashSet<String> {
        let (client, conn) = tokio_postgres::connect(&self.db, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .query("SELECT id FROM templates WHERE state = 'ready'", &[])
            .await
            .unwrap()
            .iter()
            .map(|row| {
                let bytes: Vec<u8> = row.get(0);
                let uuid = uuid::Uuid::from_slice(&bytes).unwrap();
                TemplateId::from_uuid(uuid).to_string()
            })
            .collect()
    }

    /// SPEC §4a, from outside, once nothing is open: names are unique, the
    /// host holds the files of every visible template, every key on the
    /// host belongs to a visible template or is queued for deletion, and
    /// no sandbox is `snapshotting`.
    async fn assert_settled(&self, replica: usize) {
        let templates = self.templates(replica).await;
        let names: HashSet<&String> = templates.iter().collect();
        assert_eq!(names.len(), templates.len(), "one template per name");
        let ready = self.ready_ids().await;
        assert_eq!(ready.len(), templates.len(), "{templates:?}");
        let keys: HashSet<String> = self.agent.snapshot_keys().into_iter().collect();
        let queued: HashSet<String> = self
            .pending(replica)
            .await
            .iter()
            .filter_map(|d| d["template_id"].as_str().map(str::to_owned))
            .collect();
        for id in &ready {
            assert!(keys.contains(id), "files of the visible {id} missing");
        }
        for key in &keys {
            assert!(
                ready.contains(key) || queued.contains(key),
                "orphan key {key}"
            );
        }
        assert_eq!(
            self.count("SELECT count(*) FROM sandboxes WHERE status = 'snapshotting'")
                .await,
            0
        );
        assert_eq!(self.count("SELECT count(*) FROM operations").await, 0);
    }

    /// Waits (at most 30 s: an adoption takes up to a lease and a third)
    /// until no operation is open and no deletion is due within a minute.
    /// (A key whose create failed ambiguously waits out the late-write
    /// grace, 5 min by default, before it is deleted: it stays queued.)
    async fn drained(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let horizon = Timestamp::now().unix_millis() + 60_000;
            let open = self.count("SELECT count(*) FROM operations").await;
            let due = self
                .count(&format!(
                    "SELECT count(*) FROM placements
                     WHERE state = 'deleting' AND next_attempt < {horizon}"
                ))
                .await;
            if open == 0 && due == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replicas did not drain: {open} open operations, {due} deletions due"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_one_name_created_through_both_at_once() {
    let Some(fleet) = Fleet::start(2).await else {
        return;
    };
    for round in 0..5 {
        let name = format!("same-{round}");
        let (a, b) = (fleet.sandbox().await, fleet.sandbox().await);
        // Both creates reach the agent's gate only if both got past the
        // name check: hold them so that they overlap.
        let hold = Hold::new();
        fleet
            .agent
            .inject_times(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()), 2);
        let (first, second, ()) = tokio::join!(
            fleet.create(0, a, &name),
            fleet.create(1, b, &name),
            async {
                hold.arrived(1).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                hold.release();
            }
        );
        let mut statuses = [first.0, second.0];
        statuses.sort_unstable();
        assert_eq!(statuses, [201, 409], "round {round}: {first:?} {second:?}");
        let loser = if first.0 == 409 { &first.1 } else { &second.1 };
        assert_eq!(loser["error"]["code"], "already_exists", "{loser}");
        fleet.agent.clear_faults();
        let templates = fleet.templates(1).await;
        assert_eq!(
            templates.iter().filter(|n| **n == name).count(),
            1,
            "{templates:?}"
        );
    }
    // No orphan key: the host holds exactly the visible templates.
    fleet.drained().await;
    fleet.assert_settled(0).await;
    assert_eq!(fleet.agent.calls(AgentOp::CreateSnapshot), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_mid_create_is_adopted_only_after_its_lease() {
    killed_mid_create(common::Mode::Ours).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_mid_create_against_a_go_like_agent() {
    killed_mid_create(common::Mode::GoLike).await;
}

async fn killed_mid_create(mode: common::Mode) {
    let Some(mut fleet) = Fleet::start_with(2, mode).await else {
        return;
    };
    let sandbox = fleet.sandbox().await;
    let hold = Hold::new();
    fleet
        .agent
        .inject(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()));
    // Replica 0 starts the create; the agent holds it.
    let creating = {
        let http = fleet.http.clone();
        let url = format!("{}/v1/snapshots", fleet.replicas[0].base);
        let key = fleet.key.clone();
        tokio::spawn(async move {
            http.post(url)
                .header("x-api-key", key)
                .json(&json!({"sandbox_id": sandbox.to_string(), "name": "adopt-me"}))
                .send()
                .await
        })
    };
    hold.arrived(1).await;
    // The journal entry names its owner: replica 0's instance.
    let open = fleet.open_operations(1).await;
    assert_eq!(open.len(), 1, "{open:?}");
    let owner = open[0]["owner"].as_str().unwrap_or_default().to_owned();
    assert!(owner.starts_with("inst-"), "{open:?}");

    fleet.replicas[0].child.kill().await.unwrap();
    let killed_at = tokio::time::Instant::now();
    assert!(
        creating.await.unwrap().is_err(),
        "the caller lost its replica"
    );

    // Replica 1 leaves the entry alone while the dead replica's lease may
    // still run: it was renewed at most a third of a lease before the kill,
    // so it lasts at least two thirds of a lease after it. Meanwhile
    // replica 1's worker is woken again and again (a host coming online
    // wakes it), so it has every chance to adopt too early.
    let window = Duration::from_millis(LEASE_SECS * 1000 * 2 / 3 - 700);
    while killed_at.elapsed() < window {
        let (status, body) = fleet
            .admin_call(
                1,
                reqwest::Method::POST,
                "/v1/admin/hosts",
                json!({"address": "127.0.0.1:1", "status": "online"}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        tokio::time::sleep(Duration::from_millis(250)).await;
        let open = fleet.open_operations(1).await;
        assert_eq!(open.len(), 1, "adopted before the lease ended: {open:?}");
        assert_eq!(
            open[0]["owner"],
            owner.as_str(),
            "adopted before the lease ended"
        );
    }
    assert_eq!(
        fleet
            .count("SELECT count(*) FROM sandboxes WHERE status = 'snapshotting'")
            .await,
        1
    );

    // After the lease, replica 1 adopts and resolves it: the host never
    // finished the snapshot, so it is rolled back and the sandbox released.
    fleet.agent.clear_faults();
    hold.release();
    fleet.drained().await;
    fleet.assert_settled(1).await;
    assert!(fleet.templates(1).await.is_empty());
    // The name is free again, and a create through the survivor works.
    let (status, body) = fleet.create(1, sandbox, "adopt-me").await;
    assert_eq!(status, 201, "{body}");
    fleet.assert_settled(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_backlog_of_deletions_is_drained_once_per_key() {
    let Some(fleet) = Fleet::start(2).await else {
        return;
    };
    const N: usize = 40;
    let sandbox = fleet.sandbox().await;
    for i in 0..N {
        let (status, body) = fleet.create(i % 2, sandbox, &format!("bulk-{i}")).await;
        assert_eq!(status, 201, "{body}");
    }
    // The host is down while the templates are deleted: every deletion is
    // queued on both replicas' shared queue.
    fleet.agent.set_unavailable(true);
    for i in 0..N {
        assert_eq!(fleet.delete(i % 2, &format!("bulk-{i}")).await, 204);
    }
    assert_eq!(fleet.pending(0).await.len(), N);
    let before = fleet.agent.calls(AgentOp::DeleteSnapshot);
    fleet.agent.set_unavailable(false);
    fleet.drained().await;
    let calls = fleet.agent.calls(AgentOp::DeleteSnapshot) - before;
    assert!(fleet.agent.snapshot_keys().is_empty());
    // Every key is gone, and there were exactly as many successful calls
    // as keys: none was deleted twice by the two replicas.
    assert_eq!(calls, N, "DeleteSnapshot calls after the host came back");
    fleet.assert_settled(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_seeded_random_operations_across_both() {
    let Some(fleet) = Fleet::start(2).await else {
        return;
    };
    let seed: u64 = std::env::var("REPLICA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0001);
    eprintln!("replica random test seed {seed} (REPLICA_SEED to repeat)");
    let mut rng = seed;
    let mut next = move |n: u64| {
        // xorshift64*: deterministic per seed.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
    };
    let sandboxes = [
        fleet.sandbox().await,
        fleet.sandbox().await,
        fleet.sandbox().await,
        fleet.sandbox().await,
    ];
    let names = ["r-a", "r-b", "r-c"];
    for _round in 0..12 {
        // A few faults of the kinds a real fleet has.
        match next(4) {
            0 => fleet.agent.inject_times(
                AgentOp::CreateSnapshot,
                Fault::Fail(AgentError::rejected(AgentCode::Internal, "boom")),
                1,
            ),
            1 => fleet.agent.inject_times(
                AgentOp::DeleteSnapshot,
                Fault::Fail(AgentError::unavailable("host restarting")),
                2,
            ),
            _ => {}
        }
        // Eight operations at once, spread over both replicas.
        let mut calls = Vec::new();
        for i in 0..8 {
            let replica = usize::try_from(next(2)).unwrap();
            let sandbox = sandboxes[usize::try_from(next(4)).unwrap()];
            let name = names[usize::try_from(next(3)).unwrap()];
            let op = next(3);
            let fleet = &fleet;
            calls.push(async move {
                let status = match op {
                    0 => fleet.create(replica, sandbox, name).await.0,
                    1 => fleet.overwrite(replica, sandbox, name).await.0,
                    _ => fleet.delete(replica, name).await,
                };
                (i, status)
            });
        }
        for (i, status) in futures_util::future::join_all(calls).await {
            assert!(
                [201, 204, 404, 409, 500, 502, 503].contains(&status),
                "call {i}: {status}"
            );
        }
        fleet.agent.clear_faults();
    }
    fleet.agent.clear_faults();
    fleet.agent.set_unavailable(false);
    fleet.drained().await;
    fleet.assert_settled(0).await;
    fleet.assert_settled(1).await;
}
