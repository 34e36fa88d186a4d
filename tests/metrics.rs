//! `GET /metrics` (SPEC §10) through the server's real router on a loopback
//! port: a create, a failed create and a delete are each counted, with
//! their agent calls, the worker's passes and the backlog gauges; only an
//! admin key may read them, and `--metrics-listen`'s router needs none.
//!
//! The Prometheus recorder is global to the test binary: assertions are on
//! deltas, or on labels unique to this test (its host's id).
#![cfg(feature = "server")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::eventually;
use reqwest::StatusCode;
use sandbox_snapshots::agent::{AgentOp, Fault};
use sandbox_snapshots::http::ApiState;
use sandbox_snapshots::*;
use serde_json::{Value, json};

/// The sum of the samples of `name` whose labels include all of `labels`
/// (0 when there is none).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, set) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let has = |k: &str, v: &str| {
            set.split(',')
                .filter_map(|pair| pair.split_once('='))
                .any(|(lk, lv)| lk == k && lv.trim_matches('"') == v)
        };
        if labels.iter().all(|(k, v)| has(k, v)) {
            total += value.parse::<f64>().unwrap();
        }
    }
    total
}

struct Server {
    _dir: tempfile::TempDir,
    base: String,
    http: reqwest::Client,
    agent: Arc<MemoryHostAgent>,
    host: HostId,
    admin: String,
    team: TeamId,
    team_key: String,
}

impl Server {
    async fn start() -> Server {
        let handle = sandbox_snapshots::http::install_prometheus().unwrap();
        // Idempotent: a second server in the same process shares it.
        let _again = sandbox_snapshots::http::install_prometheus().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let agent = Arc::new(MemoryHostAgent::new());
        let transport = Arc::new(InProcessTransport::new());
        let host = HostId::new();
        transport.add_host(host, agent.clone());
        let manager = Manager::open(
            dir.path().join("metrics.db"),
            transport,
            common::fast_options(),
        )
        .await
        .unwrap();
        manager
            .registry()
            .register_host(host, "in-process", HostStatus::Online)
            .await
            .unwrap();
        let state = ApiState::new(manager).with_metrics(handle);
        let admin = state
            .keys()
            .create_key(TeamId::PLATFORM, "admin", true)
            .await
            .unwrap()
            .reveal()
            .to_owned();
        let team = state.keys().create_team("acme").await.unwrap();
        let team_key = state
            .keys()
            .create_key(team, "k", false)
            .await
            .unwrap()
            .reveal()
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(sandbox_snapshots::http::serve(
            listener,
            state,
            std::future::pending(),
        ));
        Server {
            _dir: dir,
            base,
            http: reqwest::Client::new(),
            agent,
            host,
            admin,
            team,
            team_key,
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, String) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.text().await.unwrap())
    }

    async fn scrape(&self) -> String {
        let response = self
            .http
            .get(format!("{}/metrics", self.base))
            .header("x-api-key", &self.admin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        response.text().await.unwrap()
    }

    async fn sandbox(&self) -> SandboxId {
        let id = SandboxId::new();
        self.agent.add_sandbox(id, "running", 2, 512);
        let (code, body) = self
            .send(
                reqwest::Method::POST,
                "/v1/admin/sandboxes",
                Some(&self.admin),
                Some(json!({
                    "id": id.to_string(), "team_id": self.team.to_string(),
                    "host_id": self.host.to_string(), "status": "running",
                    "vcpus": 2, "memory_mb": 512
                })),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
        id
    }

    async fn create(&self, sandbox: SandboxId, name: &str) -> (StatusCode, Value) {
        let (code, body) = self
            .send(
                reqwest::Method::POST,
                "/v1/snapshots",
                Some(&self.team_key),
                Some(json!({ "sandbox_id": sandbox.to_string(), "name": name })),
            )
            .await;
        (code, serde_json::from_str(&body).unwrap())
    }
}

fn operations(text: &str, kind: &str, outcome: &str) -> f64 {
    sample(
        text,
        "snapshots_operations_total",
        &[("kind", kind), ("outcome", outcome)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_a_failed_create_and_a_delete_are_each_counted() {
    let server = Server::start().await;
    let host = server.host.to_string();
    let before = server.scrape().await;

    // A create that succeeds.
    let sandbox = server.sandbox().await;
    let (code, body) = server.create(sandbox, "metrics-ok").await;
    assert_eq!(code, StatusCode::CREATED, "{body}");

    // A create the agent rejects.
    server.agent.inject_times(
        AgentOp::CreateSnapshot,
        Fault::Fail(AgentError::rejected(AgentCode::Internal, "x")),
        1,
    );
    let other = server.sandbox().await;
    let (code, body) = server.create(other, "metrics-failed").await;
    assert!(code.is_server_error(), "{code} {body}");
    let failed_code = body["error"]["code"].as_str().unwrap().to_owned();

    // A delete.
    let (code, body) = server
        .send(
            reqwest::Method::DELETE,
            "/v1/snapshots/metrics-ok",
            Some(&server.team_key),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::NO_CONTENT, "{body}");

    let delta = |after: &str, kind: &str, outcome: &str| {
        operations(after, kind, outcome) - operations(&before, kind, outcome)
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let after = loop {
        let text = server.scrape().await;
        let deleted = sample(
            &text,
            "snapshots_agent_calls_total",
            &[
                ("host", &host),
                ("call", "delete_snapshot"),
                ("result", "ok"),
            ],
        );
        if deleted >= 1.0 {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the delete's agent call is not counted: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };

    assert_eq!(delta(&after, "create", "success"), 1.0, "{after}");
    assert_eq!(delta(&after, "create", &failed_code), 1.0, "{after}");
    assert_eq!(delta(&after, "delete", "success"), 1.0, "{after}");
    // Latency histograms with the same labels.
    for (kind, outcome) in [
        ("create", "success"),
        ("create", failed_code.as_str()),
        ("delete", "success"),
    ] {
        let labels = [("kind", kind), ("outcome", outcome)];
        let count = sample(
            &after,
            "snapshots_operation_duration_seconds_count",
            &labels,
        ) - sample(
            &before,
            "snapshots_operation_duration_seconds_count",
            &labels,
        );
        assert_eq!(count, 1.0, "{kind} {outcome}: {after}");
        assert!(
            sample(
                &after,
                "snapshots_operation_duration_seconds_bucket",
                &[("kind", kind), ("outcome", outcome), ("le", "+Inf")]
            ) >= 1.0,
            "{after}"
        );
    }
    // The agent calls, by this test's host and result.
    let calls = |call: &str, result: &str| {
        sample(
            &after,
            "snapshots_agent_calls_total",
            &[("host", &host), ("call", call), ("result", result)],
        )
    };
    assert_eq!(calls("create_snapshot", "ok"), 1.0, "{after}");
    assert_eq!(
        calls("create_snapshot", "rejected_internal"),
        1.0,
        "{after}"
    );

    // The worker's passes, and the backlogs it reports on each.
    let passes = sample(&after, "snapshots_janitor_passes_total", &[]);
    eventually("a janitor pass is counted", || {
        let server = &server;
        async move {
            let text = server.scrape().await;
            sample(&text, "snapshots_janitor_passes_total", &[]) > passes
                && text.contains("snapshots_queued_deletions ")
                && text.contains("snapshots_queued_deletions_oldest_age_seconds ")
                && text.contains("snapshots_open_operations ")
                && text.contains("snapshots_open_operations_oldest_age_seconds ")
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_an_admin_key() {
    let server = Server::start().await;
    let (code, body) = server
        .send(reqwest::Method::GET, "/metrics", None, None)
        .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let (code, body) = server
        .send(
            reqwest::Method::GET,
            "/metrics",
            Some(&server.team_key),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_separate_metrics_listener_needs_no_key() {
    let handle = sandbox_snapshots::http::install_prometheus().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(sandbox_snapshots::http::serve_metrics(
        listener,
        handle,
        std::future::pending(),
    ));
    let http = reqwest::Client::new();
    let response = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Nothing else is served there.
    let response = http
        .get(format!("http://{addr}/v1/snapshots"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}
