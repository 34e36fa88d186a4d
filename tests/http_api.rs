//! The HTTP API, driven with a real HTTP client against the real server on a
//! loopback port: every row of the SPEC §3 tables, authentication, team
//! isolation, pagination, exact JSON, and a client that goes away
//! mid-snapshot.
#![cfg(feature = "server")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::eventually;
use reqwest::{Method, StatusCode};
use sandbox_snapshots::agent::{AgentOp, Fault, Hold};
use sandbox_snapshots::http::{ApiState, NEXT_CURSOR_HEADER};
use sandbox_snapshots::*;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

struct Api {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    base: String,
    http: reqwest::Client,
    manager: Manager,
    state: ApiState,
    agent: Arc<MemoryHostAgent>,
    host: HostId,
    admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

struct Team {
    id: TeamId,
    key: String,
}

impl Api {
    async fn start() -> Api {
        let mut options = common::fast_options();
        options.store.busy_timeout = Duration::from_millis(300);
        Self::start_with(options).await
    }

    async fn start_with(options: ManagerOptions) -> Api {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("api.db");
        let agent = Arc::new(MemoryHostAgent::new());
        let transport = Arc::new(InProcessTransport::new());
        let host = HostId::new();
        transport.add_host(host, agent.clone());
        let manager = Manager::open(&db, transport, options).await.unwrap();
        manager
            .registry()
            .register_host(host, "in-process", HostStatus::Online)
            .await
            .unwrap();
        let state = ApiState::new(manager.clone());
        let admin = state
            .keys()
            .create_key(TeamId::PLATFORM, "admin", true)
            .await
            .unwrap()
            .reveal()
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = state.clone();
        let server = tokio::spawn(async move {
            sandbox_snapshots::http::serve(listener, serving, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Api {
            _dir: dir,
            db,
            base,
            http: reqwest::Client::new(),
            manager,
            state,
            agent,
            host,
            admin,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// A platform base template (no files needed for what these tests do).
    async fn platform_base(&self, name: &str) {
        self.manager
            .registry()
            .register_template(NewTemplate::new(
                TeamId::PLATFORM,
                TemplateName::parse(name).unwrap(),
                TemplateType::Base,
            ))
            .await
            .unwrap();
    }

    async fn team(&self) -> Team {
        let id = self.state.keys().create_team("acme").await.unwrap();
        let key = self.state.keys().create_key(id, "k", false).await.unwrap();
        Team {
            id,
            key: key.reveal().to_owned(),
        }
    }

    async fn sandbox(&self, team: &Team, status: SandboxStatus) -> SandboxId {
        let id = SandboxId::new();
        self.agent.add_sandbox(id, status.as_str(), 2, 512);
        let (code, _) = self
            .send(
                Method::POST,
                "/v1/admin/sandboxes",
                Some(&self.admin),
                Some(json!({
                    "id": id.to_string(), "team_id": team.id.to_string(),
                    "host_id": self.host.to_string(), "status": status.as_str(),
                    "vcpus": 2, "memory_mb": 512
                })),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED);
        id
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.header("X-API-Key", key);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        request.send().await.unwrap()
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map(|b| b.to_string());
        let response = self.raw(method, path, key, body.as_deref()).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"))
        };
        (status, value)
    }

    async fn create(&self, team: &Team, sandbox: SandboxId, name: &str) -> (StatusCode, Value) {
        self.send(
            Method::POST,
            "/v1/snapshots",
            Some(&team.key),
            Some(json!({ "sandbox_id": sandbox.to_string(), "name": name })),
        )
        .await
    }

    async fn names(&self, team: &Team) -> Vec<String> {
        let (status, body) = self
            .send(Method::GET, "/v1/snapshots", Some(&team.key), None)
            .await;
        assert_eq!(status, StatusCode::OK);
        body.as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    }
}

#[track_caller]
fn assert_error(got: (StatusCode, Value), status: u16, code: &str, message: Option<&str>) {
    assert_eq!(got.0.as_u16(), status, "{:?}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{:?}", got.1);
    let obj = got.1.as_object().unwrap();
    assert_eq!(obj.len(), 1, "only the error member: {:?}", got.1);
    assert_eq!(got.1["error"].as_object().unwrap().len(), 2, "{:?}", got.1);
    if let Some(message) = message {
        assert_eq!(got.1["error"]["message"], message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_rows_of_the_spec_table() {
    let api = Api::start().await;
    let a = api.team().await;
    let b = api.team().await;
    let sb = api.sandbox(&a, SandboxStatus::Running).await;
    let key = Some(a.key.as_str());

    let raw = api
        .raw(Method::POST, "/v1/snapshots", key, Some("{not json"))
        .await;
    let got = (raw.status(), raw.json::<Value>().await.unwrap());
    assert_error(got, 400, "invalid_request", Some("invalid JSON body"));
    assert_error(
        api.send(
            Method::POST,
            "/v1/snapshots",
            key,
            Some(json!({"name": "x"})),
        )
        .await,
        400,
        "invalid_request",
        Some("sandbox_id is required"),
    );
    assert_error(
        api.send(
            Method::POST,
            "/v1/snapshots",
            key,
            Some(json!({"sandbox_id": "sb-nope"})),
        )
        .await,
        400,
        "invalid_request",
        Some("invalid sandbox_id"),
    );
    let got = api.create(&a, sb, "../etc").await;
    assert_eq!(got.0, StatusCode::BAD_REQUEST);
    assert!(
        got.1["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid snapshot name: ")
    );

    // Success: 201 and the exact template object, byte for byte.
    let response = api
        .raw(
            Method::POST,
            "/v1/snapshots",
            key,
            Some(&json!({ "sandbox_id": sb.to_string(), "name": "snap" }).to_string()),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["content-type"], "application/json");
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    let created_at = body["created_at"].as_str().unwrap().to_owned();
    assert_eq!(
        text,
        format!(
            r#"{{"name":"snap","type":"snapshot","vcpus":2,"memory_mb":512,"size_bytes":{},"created_at":"{created_at}","platform":false,"state":"ready","hosts":1,"compat":{{"vmm":"memory","vmm_version":"{}","snapshot_format":"memory-1","arch":"{}"}}}}"#,
            (512 + 16) * 1024 * 1024,
            env!("CARGO_PKG_VERSION"),
            std::env::consts::ARCH,
        )
    );
    assert_eq!(
        created_at.len(),
        20,
        "RFC 3339 in seconds, UTC: {created_at}"
    );
    assert!(created_at.ends_with('Z') && created_at.as_bytes()[10] == b'T');

    // The error body, byte for byte.
    let response = api.raw(Method::POST, "/v1/snapshots", key, Some("[")).await;
    assert_eq!(
        response.text().await.unwrap(),
        r#"{"error":{"code":"invalid_request","message":"invalid JSON body"}}"#
    );

    // An empty name is generated.
    api.agent.set_sandbox_status(sb, "running");
    let (status, body) = api.create(&a, sb, "").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(body["name"].as_str().unwrap().starts_with("template-"));

    assert_error(
        api.create(&a, sb, "snap").await,
        409,
        "already_exists",
        Some("snapshot name already exists; use ?overwrite=true to replace"),
    );
    let (status, body) = api
        .send(
            Method::POST,
            "/v1/snapshots?overwrite=true",
            key,
            Some(json!({ "sandbox_id": sb.to_string(), "name": "snap" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    assert_error(
        api.create(&b, sb, "x").await,
        404,
        "not_found",
        Some("sandbox not found"),
    );
    let stopped = api.sandbox(&a, SandboxStatus::Stopped).await;
    assert_error(
        api.create(&a, stopped, "x").await,
        409,
        "invalid_state",
        Some("sandbox must be running or paused"),
    );
    let (code, _) = api
        .send(
            Method::PATCH,
            &format!("/v1/admin/hosts/{}", api.host),
            Some(&api.admin),
            Some(json!({"status": "offline"})),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_error(api.create(&a, sb, "x").await, 503, "host_unavailable", None);
    api.send(
        Method::PATCH,
        &format!("/v1/admin/hosts/{}", api.host),
        Some(&api.admin),
        Some(json!({"status": "online"})),
    )
    .await;

    for (agent_code, status, code) in [
        (AgentCode::NotFound, 404, "not_found"),
        (AgentCode::InvalidArgument, 400, "invalid_request"),
        (AgentCode::FailedPrecondition, 409, "conflict"),
        (AgentCode::Internal, 502, "agent_error"),
    ] {
        api.agent.inject_times(
            AgentOp::CreateSnapshot,
            Fault::Fail(AgentError::rejected(agent_code, "/secret/path detail")),
            1,
        );
        let got = api.create(&a, sb, "agentfail").await;
        assert!(
            !got.1.to_string().contains("/secret/path"),
            "no internals leak: {}",
            got.1
        );
        assert_error(got, status, code, None);
    }

    // A store failure: another connection holds the write lock past the
    // busy timeout.
    let blocker = rusqlite::Connection::open(&api.db).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    assert_error(api.create(&a, sb, "dbfail").await, 500, "db_error", None);
    blocker.execute_batch("ROLLBACK").unwrap();
    assert!(!api.names(&a).await.contains(&"dbfail".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_get_rows_with_platform_templates_and_filters() {
    let api = Api::start().await;
    let a = api.team().await;
    let sb = api.sandbox(&a, SandboxStatus::Running).await;
    api.platform_base("base-image").await;
    api.create(&a, sb, "mine").await;

    let (status, body) = api
        .send(Method::GET, "/v1/snapshots", Some(&a.key), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let items = body.as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["name"], "mine", "newest first");
    // vcpus and memory_mb are omitted when 0.
    let created_at = items[1]["created_at"].clone();
    assert_eq!(
        items[1],
        json!({"name": "base-image", "type": "base", "size_bytes": 0, "created_at": created_at,
               "platform": true, "state": "ready", "hosts": 0})
    );

    let (_, snaps) = api
        .send(
            Method::GET,
            "/v1/snapshots?type=snapshot",
            Some(&a.key),
            None,
        )
        .await;
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    let (_, bases) = api
        .send(Method::GET, "/v1/snapshots?type=base", Some(&a.key), None)
        .await;
    assert_eq!(bases.as_array().unwrap().len(), 1);
    assert_error(
        api.send(Method::GET, "/v1/snapshots?type=image", Some(&a.key), None)
            .await,
        400,
        "invalid_request",
        None,
    );
    for bad in ["limit=abc", "limit=0", "limit=-1", "limit=1&cursor=garbage"] {
        assert_error(
            api.send(
                Method::GET,
                &format!("/v1/snapshots?{bad}"),
                Some(&a.key),
                None,
            )
            .await,
            400,
            "invalid_request",
            None,
        );
    }

    let (status, one) = api
        .send(Method::GET, "/v1/snapshots/mine", Some(&a.key), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one, items[0]);
    let (status, _) = api
        .send(Method::GET, "/v1/snapshots/base-image", Some(&a.key), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_error(
        api.send(Method::GET, "/v1/snapshots/nope", Some(&a.key), None)
            .await,
        404,
        "not_found",
        Some("template not found"),
    );
    assert_error(
        api.send(Method::GET, "/v1/snapshots/.hidden", Some(&a.key), None)
            .await,
        400,
        "invalid_request",
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_across_pages_has_no_duplicates_or_gaps() {
    let api = Api::start().await;
    let a = api.team().await;
    let sb = api.sandbox(&a, SandboxStatus::Running).await;
    for i in 0..17 {
        let (status, _) = api.create(&a, sb, &format!("p{i:02}")).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let all = api.names(&a).await;
    assert_eq!(all.len(), 17);
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 17);

    let mut seen = Vec::new();
    let mut path = "/v1/snapshots?limit=5".to_owned();
    let mut pages = 0;
    loop {
        let response = api.raw(Method::GET, &path, Some(&a.key), None).await;
        assert_eq!(response.status(), StatusCode::OK);
        let next = response
            .headers()
            .get(NEXT_CURSOR_HEADER)
            .map(|v| v.to_str().unwrap().to_owned());
        let body: Value = response.json().await.unwrap();
        let page = body.as_array().unwrap();
        assert!(page.len() <= 5);
        seen.extend(page.iter().map(|t| t["name"].as_str().unwrap().to_owned()));
        pages += 1;
        match next {
            Some(cursor) => {
                path = format!("/v1/snapshots?limit=5&cursor={}", urlencode(&cursor));
            }
            None => break,
        }
    }
    assert_eq!(pages, 4);
    assert_eq!(seen, all, "same order, nothing missing or repeated");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_rows_and_the_audit_log() {
    let api = Api::start().await;
    let a = api.team().await;
    let sb = api.sandbox(&a, SandboxStatus::Running).await;
    api.platform_base("platform-one").await;
    api.create(&a, sb, "doomed").await;

    assert_error(
        api.send(Method::DELETE, "/v1/snapshots/.x", Some(&a.key), None)
            .await,
        400,
        "invalid_request",
        None,
    );
    assert_error(
        api.send(Method::DELETE, "/v1/snapshots/a%20b", Some(&a.key), None)
            .await,
        400,
        "invalid_request",
        None,
    );
    assert_error(
        api.send(Method::DELETE, "/v1/snapshots/ghost", Some(&a.key), None)
            .await,
        404,
        "not_found",
        Some("template not found"),
    );
    assert_error(
        api.send(
            Method::DELETE,
            "/v1/snapshots/platform-one",
            Some(&a.key),
            None,
        )
        .await,
        403,
        "forbidden",
        Some("platform templates cannot be deleted here"),
    );
    let response = api
        .raw(Method::DELETE, "/v1/snapshots/doomed", Some(&a.key), None)
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(response.text().await.unwrap().is_empty());
    assert!(api.agent.snapshot_keys().is_empty(), "files deleted");
    assert_eq!(api.names(&a).await, vec!["platform-one"]);

    let (status, audit) = api
        .send(Method::GET, "/v1/audit-logs", Some(&a.key), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let entries = audit.as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["action"], "snapshot.delete");
    assert_eq!(entries[0]["metadata"]["name"], "doomed");
    assert_eq!(entries[0]["resource_type"], "template");
    assert!(
        entries[0]["resource_id"]
            .as_str()
            .unwrap()
            .starts_with("tpl-")
    );
    assert_eq!(entries[0]["actor"]["type"], "api_key");
    assert_eq!(entries[1]["action"], "snapshot.create");
    // The reference's field names for the same facts (SPEC §4 item 8).
    for e in entries {
        assert_eq!(e["status"], "success", "{e}");
        assert_eq!(e["scope"], "team", "{e}");
        assert_eq!(e["actor_type"], e["actor"]["type"], "{e}");
        assert_eq!(e["actor_id"], e["actor"]["id"], "{e}");
        assert_eq!(e["actor_name"], e["actor"]["name"], "{e}");
    }
    let (_, filtered) = api
        .send(
            Method::GET,
            "/v1/audit-logs?action=snapshot.create&resource_type=template",
            Some(&a.key),
            None,
        )
        .await;
    assert_eq!(filtered.as_array().unwrap().len(), 1);
    let first = api
        .raw(Method::GET, "/v1/audit-logs?limit=1", Some(&a.key), None)
        .await;
    let cursor = first.headers()[NEXT_CURSOR_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    let (_, second) = api
        .send(
            Method::GET,
            &format!("/v1/audit-logs?limit=1&cursor={cursor}"),
            Some(&a.key),
            None,
        )
        .await;
    assert_eq!(second.as_array().unwrap()[0]["action"], "snapshot.create");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_admin_authorization() {
    let api = Api::start().await;
    let a = api.team().await;
    let unauthorized = Some("missing or invalid API key");
    // The key with the last digit of its secret changed (always: a key
    // whose secret has no `a` stayed itself under `replace('a', "b")`).
    let (rest, last) = a.key.split_at(a.key.len() - 1);
    let wrong_secret = format!("{rest}{}", if last == "0" { "1" } else { "0" });
    for key in [None, Some(""), Some("sk-nope"), Some(wrong_secret.as_str())] {
        assert_error(
            api.send(Method::GET, "/v1/snapshots", key, None).await,
            401,
            "unauthorized",
            unauthorized,
        );
    }
    // A tampered secret with a real key id is refused too.
    let tampered = format!(
        "{}{}",
        &a.key[..a.key.len() - 1],
        if a.key.ends_with('0') { '1' } else { '0' }
    );
    assert_error(
        api.send(Method::GET, "/v1/snapshots", Some(&tampered), None)
            .await,
        401,
        "unauthorized",
        None,
    );
    assert_eq!(
        api.send(Method::GET, "/v1/snapshots", Some(&a.key), None)
            .await
            .0,
        StatusCode::OK
    );

    // Team keys get 403 on admin endpoints; admin keys get through.
    assert_error(
        api.send(Method::GET, "/v1/admin/hosts", Some(&a.key), None)
            .await,
        403,
        "forbidden",
        None,
    );
    assert_error(
        api.send(Method::GET, "/v1/admin/hosts", None, None).await,
        401,
        "unauthorized",
        None,
    );
    let (status, hosts) = api
        .send(Method::GET, "/v1/admin/hosts", Some(&api.admin), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(hosts[0]["id"], api.host.to_string());

    // Teams and keys over the admin API; a key is shown once and works.
    let (status, created) = api
        .send(
            Method::POST,
            "/v1/admin/teams",
            Some(&api.admin),
            Some(json!({"name": "beta"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let beta_key = created["api_key"].as_str().unwrap();
    assert_eq!(
        api.send(Method::GET, "/v1/snapshots", Some(beta_key), None)
            .await
            .0,
        StatusCode::OK
    );

    // Keys are stored hashed: the secret is nowhere in the database file.
    let conn = rusqlite::Connection::open(&api.db).unwrap();
    let stored: Vec<Vec<u8>> = conn
        .prepare("SELECT secret_hash FROM api_keys")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(stored.len(), 3);
    let secret = beta_key.rsplit('-').next().unwrap();
    for hash in &stored {
        assert_eq!(hash.len(), 32);
        assert!(
            !hash
                .windows(8)
                .any(|w| secret.as_bytes().windows(8).any(|s| s == w))
        );
    }
    let db_bytes = std::fs::read(&api.db).unwrap();
    let wal = std::fs::read(api.db.with_extension("db-wal")).unwrap_or_default();
    for bytes in [&db_bytes, &wal] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "secret stored in clear"
        );
    }

    // Revoked keys stop working.
    let id = ApiKeyId::parse(created["key_id"].as_str().unwrap()).unwrap();
    api.state.keys().revoke(id).await.unwrap();
    assert_error(
        api.send(Method::GET, "/v1/snapshots", Some(beta_key), None)
            .await,
        401,
        "unauthorized",
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_are_isolated_over_http() {
    let api = Api::start().await;
    let (a, b) = (api.team().await, api.team().await);
    let sa = api.sandbox(&a, SandboxStatus::Running).await;
    let sb = api.sandbox(&b, SandboxStatus::Running).await;
    api.create(&a, sa, "private").await;

    assert!(api.names(&b).await.is_empty());
    assert_error(
        api.send(Method::GET, "/v1/snapshots/private", Some(&b.key), None)
            .await,
        404,
        "not_found",
        None,
    );
    assert_error(
        api.send(Method::DELETE, "/v1/snapshots/private", Some(&b.key), None)
            .await,
        404,
        "not_found",
        None,
    );
    assert_error(
        api.create(&b, sa, "steal").await,
        404,
        "not_found",
        Some("sandbox not found"),
    );
    let (status, _) = api
        .send(
            Method::POST,
            "/v1/snapshots?overwrite=true",
            Some(&b.key),
            Some(json!({"sandbox_id": sb.to_string(), "name": "private"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "B's own template of that name");
    assert_eq!(api.names(&a).await, vec!["private"]);
    assert_eq!(api.agent.snapshot_keys().len(), 2, "A's files untouched");
    let (_, audit_b) = api
        .send(Method::GET, "/v1/audit-logs", Some(&b.key), None)
        .await;
    assert_eq!(audit_b.as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_wrong_methods_and_large_bodies_get_json_errors() {
    let api = Api::start().await;
    let a = api.team().await;
    assert_error(
        api.send(Method::GET, "/v2/nothing", Some(&a.key), None)
            .await,
        404,
        "not_found",
        Some("no such route"),
    );
    assert_error(
        api.send(Method::PUT, "/v1/snapshots", Some(&a.key), None)
            .await,
        405,
        "method_not_allowed",
        None,
    );
    let big = format!(
        "{{\"sandbox_id\":\"{}\",\"name\":\"x\"}}",
        "a".repeat(100 * 1024)
    );
    let response = api
        .raw(Method::POST, "/v1/snapshots", Some(&a.key), Some(&big))
        .await;
    assert_error(
        (response.status(), response.json().await.unwrap()),
        413,
        "payload_too_large",
        None,
    );
    let (status, health) = api.send(Method::GET, "/healthz", None, None).await;
    assert_eq!((status, health), (StatusCode::OK, json!({"status": "ok"})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_manage_the_registry_and_platform_templates() {
    let api = Api::start().await;
    let a = api.team().await;
    let admin = Some(api.admin.as_str());
    let (status, host) = api
        .send(
            Method::POST,
            "/v1/admin/hosts",
            admin,
            Some(json!({"address": "10.0.0.7:50051", "status": "pending"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(host["status"], "pending");
    let (_, host) = api
        .send(
            Method::PATCH,
            &format!("/v1/admin/hosts/{}", host["id"].as_str().unwrap()),
            admin,
            Some(json!({"status": "draining"})),
        )
        .await;
    assert_eq!(host["status"], "draining");
    assert_error(
        api.send(
            Method::POST,
            "/v1/admin/hosts",
            admin,
            Some(json!({"status": "sideways"})),
        )
        .await,
        400,
        "invalid_request",
        None,
    );

    // A platform template from a platform sandbox: visible to teams,
    // deletable only by admins.
    let psb = SandboxId::new();
    api.agent.add_sandbox(psb, "running", 1, 256);
    api.send(
        Method::POST,
        "/v1/admin/sandboxes",
        admin,
        Some(json!({"id": psb.to_string(), "team_id": TeamId::PLATFORM.to_string(), "host_id": api.host.to_string(), "vcpus": 1, "memory_mb": 256})),
    )
    .await;
    let (status, tpl) = api
        .send(
            Method::POST,
            "/v1/admin/templates",
            admin,
            Some(json!({"sandbox_id": psb.to_string(), "name": "golden"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{tpl}");
    assert_eq!(tpl["platform"], true);
    assert_eq!(api.names(&a).await, vec!["golden"]);
    let sa = api.sandbox(&a, SandboxStatus::Running).await;
    assert_error(
        api.create(&a, sa, "golden").await,
        409,
        "name_reserved",
        None,
    );
    let (status, sandbox) = api
        .send(
            Method::GET,
            &format!("/v1/admin/sandboxes/{psb}"),
            admin,
            None,
        )
        .await;
    assert_eq!(
        (status, sandbox["status"].clone()),
        (StatusCode::OK, json!("paused"))
    );
    let response = api
        .raw(Method::DELETE, "/v1/admin/templates/golden", admin, None)
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(api.names(&a).await.is_empty());
    let (status, pending) = api
        .send(Method::GET, "/v1/admin/pending", admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        pending,
        json!({"deletions": [], "operations": [], "destroys": []})
    );
}

/// A client that disconnects while its snapshot is being taken does not
/// abort it: the template is recorded and the sandbox is paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnecting_mid_snapshot_does_not_abort_it() {
    let api = Api::start().await;
    let a = api.team().await;
    let sb = api.sandbox(&a, SandboxStatus::Running).await;
    let hold = Hold::new();
    api.agent
        .inject_times(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()), 1);

    let body = json!({"sandbox_id": sb.to_string(), "name": "survivor"}).to_string();
    let request = format!(
        "POST /v1/snapshots HTTP/1.1\r\nhost: test\r\nx-api-key: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        a.key,
        body.len()
    );
    let mut socket = tokio::net::TcpStream::connect(api.base.trim_start_matches("http://"))
        .await
        .unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), hold.arrived(1))
        .await
        .unwrap();
    drop(socket); // the client goes away mid-snapshot
    tokio::time::sleep(Duration::from_millis(50)).await;
    hold.release();
    eventually("the snapshot is recorded anyway", || async {
        api.send(Method::GET, "/v1/snapshots/survivor", Some(&a.key), None)
            .await
            .0
            == StatusCode::OK
    })
    .await;
    let sandbox = api.manager.registry().sandbox(sb).await.unwrap().unwrap();
    assert_eq!(sandbox.status, SandboxStatus::Paused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_templates_cannot_be_deleted_on_the_team_endpoint_even_by_admins() {
    let api = Api::start().await;
    api.platform_base("shared").await;
    assert_error(
        api.send(
            Method::DELETE,
            "/v1/snapshots/shared",
            Some(&api.admin),
            None,
        )
        .await,
        403,
        "forbidden",
        Some("platform templates cannot be deleted here"),
    );
    let response = api
        .raw(
            Method::DELETE,
            "/v1/admin/templates/shared",
            Some(&api.admin),
            None,
        )
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_must_be_json_objects() {
    let api = Api::start().await;
    let a = api.team().await;
    // As in the reference, `null` and null members are empty, not malformed.
    for body in ["null", "{\"sandbox_id\": null, \"name\": null}"] {
        let response = api
            .raw(Method::POST, "/v1/snapshots", Some(&a.key), Some(body))
            .await;
        assert_error(
            (response.status(), response.json().await.unwrap()),
            400,
            "invalid_request",
            Some("sandbox_id is required"),
        );
    }
    // A path parameter that does not decode is a JSON 400 too.
    for path in ["/v1/snapshots/%FF", "/v1/admin/sandboxes/%C3%28"] {
        let key = if path.contains("admin") {
            &api.admin
        } else {
            &a.key
        };
        let response = api.raw(Method::GET, path, Some(key), None).await;
        assert_error(
            (response.status(), response.json().await.unwrap()),
            400,
            "invalid_request",
            None,
        );
    }
    for body in ["[]", "42", "\"text\"", "{\"sandbox_id\": 7}"] {
        let response = api
            .raw(Method::POST, "/v1/snapshots", Some(&a.key), Some(body))
            .await;
        assert_error(
            (response.status(), response.json().await.unwrap()),
            400,
            "invalid_request",
            Some("invalid JSON body"),
        );
    }
}

/// Shutting the server down lets a snapshot in flight finish and record
/// its result before `serve` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_snapshots_in_flight_finish() {
    let mut api = Api::start().await;
    let a = api.team().await;
    let sb = api.sandbox(&a, SandboxStatus::Running).await;
    let hold = Hold::new();
    api.agent
        .inject_times(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()), 1);
    let request = tokio::spawn(
        reqwest::Client::new()
            .post(format!("{}/v1/snapshots", api.base))
            .header("X-API-Key", a.key.clone())
            .body(json!({"sandbox_id": sb.to_string(), "name": "inflight"}).to_string())
            .send(),
    );
    tokio::time::timeout(Duration::from_secs(10), hold.arrived(1))
        .await
        .unwrap();
    let _ = api.stop.take().unwrap().send(());
    let server = api.server.take().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !server.is_finished(),
        "serve waits for the snapshot in flight"
    );
    hold.release();
    let response = request.await.unwrap().unwrap();
    assert_eq!(
        response.status(),
        StatusCode::CREATED,
        "the request in flight is answered"
    );
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    // The result is in the file.
    assert_eq!(
        common::count(
            &api.db,
            "SELECT count(*) FROM templates WHERE state = 'ready'"
        ),
        1
    );
}

/// A `POST` with headers, answered as (status, headers, body text).
async fn post_with(
    api: &Api,
    path: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let mut request = api
        .http
        .post(format!("{}{path}", api.base))
        .header("X-API-Key", key)
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    (status, headers, response.text().await.unwrap())
}

/// Polls an operation until it is no longer running.
async fn settled(api: &Api, team: &Team, location: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, op) = api.send(Method::GET, location, Some(&team.key), None).await;
        assert_eq!(status, StatusCode::OK, "{op}");
        if op["state"] != "running" {
            return op;
        }
        assert!(tokio::time::Instant::now() < deadline, "{op}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_over_http_replay_the_first_answer() {
    let api = Api::start().await;
    let team = api.team().await;
    let sandbox = api.sandbox(&team, SandboxStatus::Running).await;
    let body = json!({ "sandbox_id": sandbox.to_string(), "name": "keyed" }).to_string();
    let key = [("Idempotency-Key", "order-42")];

    // Malformed keys: 400, nothing done.
    let long = "k".repeat(256);
    for bad in ["", long.as_str(), "tab\there"] {
        let (status, _, text) = post_with(
            &api,
            "/v1/snapshots",
            &team.key,
            &[("Idempotency-Key", bad)],
            &body,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {text}");
        assert!(text.contains("Idempotency-Key"), "{text}");
    }
    assert_eq!(api.agent.calls(AgentOp::CreateSnapshot), 0);

    let (status, headers, first) = post_with(&api, "/v1/snapshots", &team.key, &key, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert!(headers.get("idempotent-replayed").is_none());
    let (status, headers, again) = post_with(&api, "/v1/snapshots", &team.key, &key, &body).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(again, first, "byte for byte");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(api.agent.calls(AgentOp::CreateSnapshot), 1);

    // The same key with another body, or another query: 422.
    // (The same JSON, other bytes: the body is compared byte for byte.)
    let other = format!("{{\"sandbox_id\": \"{sandbox}\", \"name\": \"keyed\"}}");
    let (status, _, text) = post_with(&api, "/v1/snapshots", &team.key, &key, &other).await;
    assert_eq!(status.as_u16(), 422, "{text}");
    assert!(text.contains("idempotency_key_reused"), "{text}");
    let (status, _, _) =
        post_with(&api, "/v1/snapshots?overwrite=true", &team.key, &key, &body).await;
    assert_eq!(status.as_u16(), 422);
    assert_eq!(api.agent.calls(AgentOp::CreateSnapshot), 1);

    // Another team's same key is its own.
    let other_team = api.team().await;
    let theirs = api.sandbox(&other_team, SandboxStatus::Running).await;
    let body2 = json!({ "sandbox_id": theirs.to_string(), "name": "keyed" }).to_string();
    let (status, _, _) = post_with(&api, "/v1/snapshots", &other_team.key, &key, &body2).await;
    assert_eq!(status, StatusCode::CREATED);

    // While the first runs: 409 `idempotency_in_progress`.
    let hold = Hold::new();
    api.agent
        .inject(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()));
    let slow = json!({ "sandbox_id": sandbox.to_string(), "name": "slow" }).to_string();
    let slow_key = [("Idempotency-Key", "slow-1")];
    let first = {
        let (http, base, key, body) = (
            api.http.clone(),
            api.base.clone(),
            team.key.clone(),
            slow.clone(),
        );
        tokio::spawn(async move {
            http.post(format!("{base}/v1/snapshots"))
                .header("X-API-Key", key)
                .header("Idempotency-Key", "slow-1")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    hold.arrived(1).await;
    let (status, _, text) = post_with(&api, "/v1/snapshots", &team.key, &slow_key, &slow).await;
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
    assert!(text.contains("idempotency_in_progress"), "{text}");
    hold.release();
    assert_eq!(first.await.unwrap(), StatusCode::CREATED);
    api.agent.clear_faults();

    // A failure is replayed too, with its status and body.
    api.agent.inject(
        AgentOp::CreateSnapshot,
        Fault::Fail(AgentError::rejected(AgentCode::Internal, "boom")),
    );
    let failing = json!({ "sandbox_id": sandbox.to_string(), "name": "fails" }).to_string();
    let fail_key = [("Idempotency-Key", "fail-1")];
    let (status, _, first) = post_with(&api, "/v1/snapshots", &team.key, &fail_key, &failing).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{first}");
    api.agent.clear_faults();
    let calls = api.agent.calls(AgentOp::CreateSnapshot);
    let (status, headers, again) =
        post_with(&api, "/v1/snapshots", &team.key, &fail_key, &failing).await;
    assert_eq!((status, again), (StatusCode::BAD_GATEWAY, first));
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(api.agent.calls(AgentOp::CreateSnapshot), calls);

    // Restores the same way.
    let restore = json!({ "template": "keyed" }).to_string();
    let rkey = [("Idempotency-Key", "restore-1")];
    let (status, _, first) = post_with(&api, "/v1/sandboxes", &team.key, &rkey, &restore).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (_, _, again) = post_with(&api, "/v1/sandboxes", &team.key, &rkey, &restore).await;
    assert_eq!(again, first);
    assert_eq!(api.agent.calls(AgentOp::CreateSandbox), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn respond_async_answers_202_and_the_operation_is_polled() {
    let api = Api::start().await;
    let team = api.team().await;
    let sandbox = api.sandbox(&team, SandboxStatus::Running).await;
    let prefer = ("Prefer", "respond-async");

    // A slow agent: 202 while the host still works.
    let hold = Hold::new();
    api.agent
        .inject(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()));
    let body = json!({ "sandbox_id": sandbox.to_string(), "name": "async" }).to_string();
    let (status, headers, text) = post_with(
        &api,
        "/v1/snapshots",
        &team.key,
        &[prefer, ("Idempotency-Key", "a-1")],
        &body,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    let accepted: Value = serde_json::from_str(&text).unwrap();
    let id = accepted["operation_id"].as_str().unwrap().to_owned();
    assert_eq!(
        accepted,
        json!({ "operation_id": id, "kind": "snapshot.create", "state": "running" })
    );
    let location = headers["location"].to_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/operations/{id}"));
    assert_eq!(headers["preference-applied"], "respond-async");
    hold.arrived(1).await;
    let (_, running) = api
        .send(Method::GET, &location, Some(&team.key), None)
        .await;
    assert_eq!(running["state"], "running");
    // A retry under the key replays the 202.
    let (status, headers, again) = post_with(
        &api,
        "/v1/snapshots",
        &team.key,
        &[prefer, ("Idempotency-Key", "a-1")],
        &body,
    )
    .await;
    assert_eq!((status, again), (StatusCode::ACCEPTED, text));
    assert_eq!(headers["location"].to_str().unwrap(), location);
    // Another team's key sees nothing.
    let other = api.team().await;
    let (status, _) = api
        .send(Method::GET, &location, Some(&other.key), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api
        .send(Method::GET, "/v1/operations/op-nope", Some(&team.key), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    hold.release();
    let done = settled(&api, &team, &location).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let (_, got) = api
        .send(Method::GET, "/v1/snapshots/async", Some(&team.key), None)
        .await;
    assert_eq!(done["template"], got);
    assert!(done["finished_at"].is_string() && done.get("error").is_none());
    assert_eq!(api.agent.calls(AgentOp::CreateSnapshot), 1);

    // A failing agent: `failed` with the error object.
    api.agent.clear_faults();
    api.agent.inject(
        AgentOp::CreateSnapshot,
        Fault::Fail(AgentError::rejected(AgentCode::Internal, "boom")),
    );
    let body = json!({ "sandbox_id": sandbox.to_string(), "name": "async-fails" }).to_string();
    let (status, headers, _) = post_with(&api, "/v1/snapshots", &team.key, &[prefer], &body).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let failed = settled(&api, &team, headers["location"].to_str().unwrap()).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "agent_error");
    assert!(failed["error"]["message"].is_string() && failed.get("template").is_none());
    api.agent.clear_faults();

    // Errors found before the start are answered at once, not 202.
    let (status, _, text) = post_with(&api, "/v1/snapshots", &team.key, &[prefer], &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    let missing = json!({ "sandbox_id": SandboxId::new().to_string(), "name": "x" }).to_string();
    let (status, _, _) = post_with(&api, "/v1/snapshots", &team.key, &[prefer], &missing).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A restore, started and polled to its sandbox.
    let restore = json!({ "template": "async" }).to_string();
    let (status, headers, _) =
        post_with(&api, "/v1/sandboxes", &team.key, &[prefer], &restore).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let done = settled(&api, &team, headers["location"].to_str().unwrap()).await;
    assert_eq!(done["kind"], "sandbox.restore");
    assert_eq!(done["sandbox"]["status"], "running", "{done}");
    let path = format!(
        "/v1/sandboxes/{}",
        done["sandbox"]["sandbox_id"].as_str().unwrap()
    );
    let (status, got) = api.send(Method::GET, &path, Some(&team.key), None).await;
    assert_eq!((status, &got), (StatusCode::OK, &done["sandbox"]));
}
