//! Keeps `openapi.json` (the document served at `GET /openapi.json`) in sync
//! with the HTTP server in `src/http`:
//!
//! - the document is OpenAPI 3 JSON whose `$ref`s all resolve, and every
//!   operation is described (operationId, summary, description, security,
//!   path parameters, the cursor header on paged lists, the error codes of
//!   `src/error.rs`);
//! - the server serves the file byte for byte;
//! - every documented (path, method) is routed, answers with a documented
//!   status, and undocumented ones get the router's fallback answers;
//! - the route table in `src/http/*.rs` names exactly the documented paths
//!   and methods;
//! - real objects and error bodies from the server validate against the
//!   documented schemas.
//!
//! The checks that talk to the server start the real router on a loopback
//! port and drive it with a real HTTP client (`reqwest`).
#![cfg(feature = "server")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use sandbox_snapshots::http::{ApiState, OPENAPI_JSON};
use sandbox_snapshots::{
    ErrorCode, HostId, InProcessTransport, Manager, ManagerOptions, MemoryHostAgent, SandboxId,
    TeamId,
};
use serde_json::{Value, json};
use tempfile::TempDir;

/// The header of an asynchronous start.
const PREFER_ASYNC: (&str, &str) = ("Prefer", "respond-async");

/// The methods the checks try on every documented path.
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// Paths without a route that a client might plausibly try.
const UNDOCUMENTED: &[(&str, &str)] = &[
    ("put", "/v1/snapshots"),
    ("delete", "/v1/snapshots"),
    ("patch", "/v1/snapshots"),
    ("post", "/v1/snapshots/{name}"),
    ("put", "/v1/snapshots/{name}"),
    ("patch", "/v1/snapshots/{name}"),
    ("get", "/v1/snapshots/{name}/restore"),
    ("post", "/v1/audit-logs"),
    ("delete", "/v1/audit-logs"),
    ("get", "/v1/admin"),
    ("get", "/v1/admin/teams"),
    ("get", "/v1/admin/teams/{team_id}"),
    ("delete", "/v1/admin/teams/{team_id}"),
    ("get", "/v1/admin/teams/{team_id}/keys"),
    ("get", "/v1/admin/hosts/{host_id}"),
    ("delete", "/v1/admin/hosts/{host_id}"),
    ("get", "/v1/admin/sandboxes"),
    ("delete", "/v1/admin/sandboxes/{sandbox_id}"),
    ("get", "/v1/admin/templates"),
    ("get", "/v1/admin/templates/{name}"),
    ("post", "/v1/admin/pending"),
    ("post", "/healthz"),
    ("post", "/openapi.json"),
    ("get", "/"),
    ("get", "/v1"),
    ("get", "/v1/snapshot"),
    ("get", "/v1/templates"),
    ("get", "/v1/snapshots/a/b"),
    ("get", "/openapi.yaml"),
];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn document_text() -> String {
    std::fs::read_to_string(repo_root().join("openapi.json")).expect("openapi.json is readable")
}

fn document() -> Value {
    serde_json::from_str(&document_text()).expect("openapi.json parses as JSON")
}

/// One documented operation.
struct Operation {
    path: String,
    method: String,
    op: Value,
    /// Parameters of the path item and of the operation together.
    parameters: Vec<Value>,
}

impl Operation {
    fn label(&self) -> String {
        format!("{} {}", self.method.to_uppercase(), self.path)
    }

    fn documents(&self, status: u16) -> bool {
        self.op["responses"].get(status.to_string()).is_some()
    }

    fn has_body(&self) -> bool {
        self.op.get("requestBody").is_some()
    }
}

fn operations(doc: &Value) -> Vec<Operation> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths is an object") {
        let shared = item
            .get("parameters")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" || method == "summary" || method == "description" {
                continue;
            }
            let mut parameters = shared.clone();
            if let Some(own) = op.get("parameters").and_then(Value::as_array) {
                parameters.extend(own.iter().cloned());
            }
            out.push(Operation {
                path: path.clone(),
                method: method.clone(),
                op: op.clone(),
                parameters,
            });
        }
    }
    out
}

fn documented_routes(doc: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut routes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for op in operations(doc) {
        routes.entry(op.path).or_default().insert(op.method);
    }
    routes
}

fn operation<'a>(ops: &'a [Operation], method: &str, path: &str) -> &'a Operation {
    ops.iter()
        .find(|o| o.method == method && o.path == path)
        .unwrap_or_else(|| panic!("{method} {path} is not documented"))
}

// ------------------------------------------------------------ schema check

/// Follows a local `$ref`.
fn resolve<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    reference
        .strip_prefix('#')
        .and_then(|pointer| doc.pointer(pointer))
        .unwrap_or_else(|| panic!("$ref {reference} does not resolve"))
}

/// RFC 3339 date-time: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range.clone())
            .is_some_and(|d| d.len() == range.len() && d.iter().all(u8::is_ascii_digit))
    };
    if !(digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && b.get(7) == Some(&b'-')
        && digits(8..10)
        && matches!(b.get(10), Some(b'T' | b't'))
        && digits(11..13)
        && b.get(13) == Some(&b':')
        && digits(14..16)
        && b.get(16) == Some(&b':')
        && digits(17..19))
    {
        return false;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z' | b'z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            digits(i + 1..i + 3)
                && b.get(i + 3) == Some(&b':')
                && digits(i + 4..i + 6)
                && i + 6 == b.len()
        }
        _ => false,
    }
}

/// A small JSON-schema checker for the subset the document uses: `$ref`,
/// `type`, `nullable`, `enum`, `required`, `properties`,
/// `additionalProperties`, `items`, `minimum`/`maximum`, `minLength`/
/// `maxLength` and `format: date-time`. Patterns are not checked.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        check(doc, resolve(doc, reference), value, at, errors);
        return;
    }
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) && schema.get("type").is_some() {
            errors.push(format!("{at}: null where the schema does not allow it"));
        }
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        errors.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    let kind = schema.get("type").and_then(Value::as_str);
    let type_ok = match kind {
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some(other) => {
            errors.push(format!("{at}: the schema has an unknown type {other:?}"));
            true
        }
    };
    if !type_ok {
        errors.push(format!(
            "{at}: {value} is not of type {}",
            kind.unwrap_or("?")
        ));
        return;
    }
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
        && value.as_f64().is_some_and(|v| v < min)
    {
        errors.push(format!("{at}: {value} is below the minimum {min}"));
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
        && value.as_f64().is_some_and(|v| v > max)
    {
        errors.push(format!("{at}: {value} is above the maximum {max}"));
    }
    if let Some(s) = value.as_str() {
        let len = u64::try_from(s.chars().count()).unwrap();
        if schema
            .get("minLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| len < m)
        {
            errors.push(format!("{at}: {s:?} is shorter than minLength"));
        }
        if schema
            .get("maxLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| len > m)
        {
            errors.push(format!("{at}: {s:?} is longer than maxLength"));
        }
        if schema.get("format").and_then(Value::as_str) == Some("date-time") && !is_rfc3339(s) {
            errors.push(format!("{at}: {s:?} is not an RFC 3339 date-time"));
        }
    }
    if let Some(object) = value.as_object() {
        let properties = schema.get("properties").and_then(Value::as_object);
        for key in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(key) {
                errors.push(format!("{at}: required key {key:?} is missing"));
            }
        }
        for (key, item) in object {
            let path = format!("{at}.{key}");
            match properties.and_then(|p| p.get(key)) {
                Some(property) => check(doc, property, item, &path, errors),
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        errors.push(format!(
                            "{at}: key {key:?} is not in the schema's properties"
                        ));
                    }
                    Some(extra @ Value::Object(_)) => check(doc, extra, item, &path, errors),
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            check(doc, items, item, &format!("{at}[{i}]"), errors);
        }
    }
}

fn assert_valid(doc: &Value, schema: &Value, value: &Value, what: &str) {
    let mut errors = Vec::new();
    check(doc, schema, value, "$", &mut errors);
    assert!(
        errors.is_empty(),
        "{what}: {value} does not match its schema:\n{}",
        errors.join("\n")
    );
}

fn component(doc: &Value, name: &str) -> Value {
    doc["components"]["schemas"]
        .get(name)
        .unwrap_or_else(|| panic!("component schema {name} is missing"))
        .clone()
}

// ------------------------------------------------------------------ server

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    /// Asserts the status, showing the body when it is another.
    fn assert_status(&self, status: u16) {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The router's own answers for unknown routes and wrong methods.
    fn is_fallback(&self) -> bool {
        if self.status != 404 && self.status != 405 {
            return false;
        }
        let Ok(body) = serde_json::from_slice::<Value>(&self.body) else {
            return false;
        };
        (self.status == 404 && body["error"]["message"] == "no such route")
            || (self.status == 405 && body["error"]["code"] == "method_not_allowed")
    }
}

struct Server {
    base: String,
    client: reqwest::Client,
    state: ApiState,
    admin_key: String,
    agent: Arc<MemoryHostAgent>,
    host: HostId,
    _dir: TempDir,
}

impl Server {
    /// The real router on a loopback port, over a manager with one
    /// in-memory host agent (registered in the transport, not yet in the
    /// registry) and an admin key.
    async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let transport = Arc::new(InProcessTransport::new());
        let agent = Arc::new(MemoryHostAgent::new());
        let host = HostId::new();
        transport.add_host(host, agent.clone());
        let manager = Manager::open(
            dir.path().join("snapshots.db"),
            transport,
            ManagerOptions::default(),
        )
        .await
        .unwrap();
        let state = ApiState::new(manager);
        let admin_key = state
            .keys()
            .create_key(TeamId::PLATFORM, "t", true)
            .await
            .unwrap()
            .reveal()
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(sandbox_snapshots::http::serve(
            listener,
            state.clone(),
            std::future::pending(),
        ));
        Server {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            state,
            admin_key,
            agent,
            host,
            _dir: dir,
        }
    }

    /// A new team and a (non-admin) key for it.
    async fn team_key(&self) -> (TeamId, String) {
        let team = self.state.keys().create_team("team").await.unwrap();
        let key = self
            .state
            .keys()
            .create_key(team, "k", false)
            .await
            .unwrap();
        (team, key.reveal().to_owned())
    }

    async fn send_raw(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Reply {
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.header("X-API-Key", key);
        }
        if let Some(body) = body {
            request = request.header(CONTENT_TYPE, "application/json").body(body);
        }
        let response = request.send().await.unwrap();
        Reply {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.bytes().await.unwrap().to_vec(),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        self.send_raw(
            method,
            path,
            key,
            body.map(|b| serde_json::to_vec(b).unwrap()),
        )
        .await
    }

    async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        self.send(method, path, Some(self.admin_key.as_str()), body)
            .await
    }

    /// A request with extra headers (and a JSON body, if any).
    async fn send_with(
        &self,
        method: &str,
        path: &str,
        key: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Reply {
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("X-API-Key", key);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        Reply {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.bytes().await.unwrap().to_vec(),
        }
    }

    /// Registers the agent's host, a team with a key, and a running
    /// sandbox of it on the host (`vcpus`, `memory_mb`): (team, key,
    /// sandbox).
    async fn team_with_sandbox(&self, vcpus: u32, memory_mb: u32) -> (TeamId, String, SandboxId) {
        let host = self.host.to_string();
        let reply = self
            .admin(
                "post",
                "/v1/admin/hosts",
                Some(&json!({ "id": host, "address": "in-process" })),
            )
            .await;
        assert_eq!(reply.status, 201);
        let (team, key) = self.team_key().await;
        let sandbox = SandboxId::new();
        self.agent.add_sandbox(sandbox, "running", vcpus, memory_mb);
        let body = json!({ "id": sandbox.to_string(), "team_id": team.to_string(),
                           "host_id": host, "status": "running",
                           "vcpus": vcpus, "memory_mb": memory_mb });
        let reply = self.admin("post", "/v1/admin/sandboxes", Some(&body)).await;
        assert_eq!(reply.status, 201);
        (team, key, sandbox)
    }
}

/// A documented path with its parameters filled with syntactically valid
/// values.
fn fill(path: &str) -> String {
    let filled = path
        .replace("{name}", "probe-template")
        .replace("{team_id}", &TeamId::new().to_string())
        .replace("{host_id}", &HostId::new().to_string())
        .replace("{sandbox_id}", &SandboxId::new().to_string())
        .replace(
            "{operation_id}",
            &sandbox_snapshots::OperationId::new().to_string(),
        );
    assert!(
        !filled.contains('{'),
        "{path} has a path parameter this test does not know how to fill"
    );
    filled
}

fn assert_content_type(reply: &Reply, expected: &str, op: &Operation) {
    let content_type = reply
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with(expected),
        "{} {}: content-type {content_type:?}",
        op.label(),
        reply.status
    );
}

/// Checks `reply` against what the document says `method path` answers
/// with its status, and returns the body (JSON, or `Null` when empty).
fn check_reply(doc: &Value, ops: &[Operation], method: &str, path: &str, reply: &Reply) -> Value {
    let op = operation(ops, method, path);
    let response = op.op["responses"]
        .get(reply.status.to_string())
        .unwrap_or_else(|| {
            panic!(
                "{} answered {} which is not documented: {}",
                op.label(),
                reply.status,
                String::from_utf8_lossy(&reply.body)
            )
        });
    let response = match response.get("$ref").and_then(Value::as_str) {
        Some(reference) => resolve(doc, reference),
        None => response,
    };
    if response.pointer("/content/text~1plain").is_some() {
        assert_content_type(reply, "text/plain", op);
        return Value::Null;
    }
    match response.pointer("/content/application~1json/schema") {
        Some(schema) => {
            assert_content_type(reply, "application/json", op);
            let body = reply.json();
            assert_valid(
                doc,
                schema,
                &body,
                &format!("{} {}", op.label(), reply.status),
            );
            body
        }
        None => {
            assert!(
                reply.body.is_empty(),
                "{} {} is documented without a body but has one",
                op.label(),
                reply.status
            );
            Value::Null
        }
    }
}

// ------------------------------------------------------------------- tests

#[test]
fn document_is_openapi_3_and_every_ref_resolves() {
    let doc = document();
    let version = doc["openapi"].as_str().expect("`openapi` is a string");
    assert!(version.starts_with("3."), "openapi version {version}");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());

    fn walk(doc: &Value, value: &Value, found: &mut usize) {
        match value {
            Value::Object(map) => {
                if let Some(reference) = map.get("$ref") {
                    let reference = reference.as_str().expect("$ref is a string");
                    assert!(
                        reference.starts_with("#/components/"),
                        "$ref {reference} does not point at a component"
                    );
                    resolve(doc, reference);
                    *found += 1;
                }
                map.values().for_each(|v| walk(doc, v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(doc, v, found)),
            _ => {}
        }
    }
    let mut found = 0;
    walk(&doc, &doc, &mut found);
    assert!(found > 10, "only {found} $refs: the walk is broken");

    // The document is kept pretty-printed with a 2-space indent: one value
    // per line, each nested 2 spaces deeper than its container.
    let text = document_text();
    assert!(
        text.starts_with("{\n  \"") && text.ends_with("}\n"),
        "not pretty-printed"
    );
    assert!(!text.contains('\t'), "tabs in openapi.json");
    let mut depth = 0usize;
    for (n, line) in text.lines().enumerate() {
        let body = line.trim_start_matches(' ');
        if body.starts_with('}') || body.starts_with(']') {
            depth = depth.checked_sub(1).expect("unbalanced brackets");
        }
        let indent = line.len() - body.len();
        assert_eq!(
            indent,
            2 * depth,
            "openapi.json line {}: not a 2-space indent",
            n + 1
        );
        if body.ends_with('{') || body.ends_with('[') {
            depth += 1;
        }
    }
    assert_eq!(depth, 0);
}

#[test]
fn every_operation_is_described() {
    let doc = document();
    let ops = operations(&doc);
    assert!(!ops.is_empty());
    let mut ids = BTreeSet::new();
    for op in &ops {
        let label = op.label();
        let id = op.op["operationId"]
            .as_str()
            .unwrap_or_else(|| panic!("{label}: no operationId"));
        assert!(
            ids.insert(id.to_owned()),
            "{label}: operationId {id} is used twice"
        );
        for field in ["summary", "description"] {
            assert!(
                op.op[field].as_str().is_some_and(|s| !s.trim().is_empty()),
                "{label}: no {field}"
            );
        }
        assert!(
            op.op["responses"]
                .as_object()
                .is_some_and(|r| !r.is_empty()),
            "{label}: no responses"
        );
        // Every `{param}` of the path is declared as a path parameter, and
        // every declared path parameter is in the path.
        let in_path: BTreeSet<String> = op
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_owned)
            .collect();
        let declared: BTreeSet<String> = op
            .parameters
            .iter()
            .filter(|p| p["in"] == "path")
            .map(|p| {
                assert_eq!(p["required"], true, "{label}: path parameters are required");
                p["name"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(in_path, declared, "{label}: path parameters");
        // Every error status documents the Error schema.
        for (status, response) in op.op["responses"].as_object().unwrap() {
            let code: u16 = status
                .parse()
                .unwrap_or_else(|_| panic!("{label}: status {status}"));
            if code >= 400 {
                assert_eq!(
                    response.pointer("/content/application~1json/schema/$ref"),
                    Some(&json!("#/components/schemas/Error")),
                    "{label} {status}: not the Error schema"
                );
            }
        }
    }

    // Security: the API key scheme everywhere but /healthz and /openapi.json.
    let scheme = &doc["components"]["securitySchemes"]["ApiKey"];
    assert_eq!(scheme["type"], "apiKey");
    assert_eq!(scheme["in"], "header");
    assert!(
        scheme["name"]
            .as_str()
            .unwrap()
            .eq_ignore_ascii_case("x-api-key")
    );
    for op in &ops {
        let security = op.op.get("security").unwrap_or(&doc["security"]);
        let open = op.path == "/healthz" || op.path == "/openapi.json";
        if open {
            assert_eq!(security, &json!([]), "{} needs no key", op.label());
        } else {
            assert_eq!(
                security,
                &json!([{ "ApiKey": [] }]),
                "{} needs a key",
                op.label()
            );
            assert!(op.documents(401), "{} does not document 401", op.label());
            assert!(op.documents(500), "{} does not document 500", op.label());
        }
        if op.path.starts_with("/v1/admin") {
            assert!(op.documents(403), "{} does not document 403", op.label());
        }
        if op.has_body() {
            assert!(
                op.documents(413),
                "{} has a body but does not document 413",
                op.label()
            );
        }
    }

    // Paged lists: `limit` and `cursor` go with the `X-Next-Cursor` header.
    for op in &ops {
        let names: BTreeSet<&str> = op
            .parameters
            .iter()
            .filter(|p| p["in"] == "query")
            .filter_map(|p| p["name"].as_str())
            .collect();
        let paged = names.contains("limit");
        assert_eq!(
            paged,
            names.contains("cursor"),
            "{}: limit without cursor",
            op.label()
        );
        let header = op.op["responses"]["200"]["headers"]
            .as_object()
            .is_some_and(|h| h.keys().any(|k| k.eq_ignore_ascii_case("x-next-cursor")));
        assert_eq!(
            paged,
            header,
            "{}: X-Next-Cursor header vs limit/cursor",
            op.label()
        );
    }
    let paged: BTreeSet<String> = ops
        .iter()
        .filter(|o| o.parameters.iter().any(|p| p["name"] == "limit"))
        .map(Operation::label)
        .collect();
    assert_eq!(
        paged,
        BTreeSet::from([
            "GET /v1/audit-logs".to_owned(),
            "GET /v1/snapshots".to_owned()
        ])
    );
}

/// The string literals of `ErrorCode::as_str` in `src/error.rs`.
fn error_codes_in_source() -> BTreeSet<String> {
    let source = std::fs::read_to_string(repo_root().join("src/error.rs")).unwrap();
    let start = source
        .find("fn as_str")
        .expect("ErrorCode::as_str in src/error.rs");
    let body = &source[start..];
    let end = body
        .find("fn http_status")
        .expect("ErrorCode::http_status after as_str");
    body[..end]
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn error_schema_lists_every_error_code() {
    let doc = document();
    let error = component(&doc, "Error");
    assert_eq!(error["required"], json!(["error"]));
    assert_eq!(error["additionalProperties"], false);
    let detail = &error["properties"]["error"];
    assert_eq!(detail["required"], json!(["code", "message"]));
    assert_eq!(detail["additionalProperties"], false);
    assert_eq!(detail["properties"]["message"]["type"], "string");
    let documented: BTreeSet<String> = detail["properties"]["code"]["enum"]
        .as_array()
        .expect("code is an enum")
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();

    let in_source = error_codes_in_source();
    assert!(
        in_source.len() >= 13,
        "scan of src/error.rs found only {in_source:?}"
    );
    assert_eq!(
        documented, in_source,
        "Error.code enum vs ErrorCode::as_str"
    );
    for code in ErrorCode::ALL {
        assert!(
            documented.contains(code.as_str()),
            "{code} is not documented"
        );
    }

    // The template object of SPEC §3, with §7's and §8's additions.
    let template = component(&doc, "Template");
    assert_eq!(
        template["required"],
        json!([
            "name",
            "type",
            "size_bytes",
            "created_at",
            "platform",
            "state",
            "hosts"
        ])
    );
    assert_eq!(template["additionalProperties"], false);
    let keys: BTreeSet<&str> = template["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "name",
            "type",
            "vcpus",
            "memory_mb",
            "size_bytes",
            "created_at",
            "platform",
            "state",
            "hosts",
            "compat",
            "last_used_at",
            "expires_at"
        ])
    );
    assert_eq!(
        template["properties"]["type"]["enum"],
        json!(["base", "snapshot"])
    );
    assert_eq!(template["properties"]["created_at"]["format"], "date-time");
    assert_eq!(template["properties"]["platform"]["type"], "boolean");
    for name in ["AuditEntry", "Host", "Sandbox", "ApiKeyCreated", "Pending"] {
        assert_eq!(component(&doc, name)["type"], "object", "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_serves_the_file_byte_for_byte() {
    let server = Server::start().await;
    let file = std::fs::read(repo_root().join("openapi.json")).unwrap();
    assert_eq!(
        OPENAPI_JSON.as_bytes(),
        &file[..],
        "the binary embeds a stale openapi.json"
    );
    let reply = server.send("get", "/openapi.json", None, None).await;
    assert_eq!(reply.status, 200);
    let content_type = reply.headers.get(CONTENT_TYPE).unwrap().to_str().unwrap();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    assert_eq!(
        reply.body, file,
        "GET /openapi.json differs from openapi.json"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed() {
    let doc = document();
    let ops = operations(&doc);
    let server = Server::start().await;
    let mut failures = Vec::new();
    for op in &ops {
        let body = op.has_body().then(|| json!({}));
        let reply = server
            .admin(&op.method, &fill(&op.path), body.as_ref())
            .await;
        let text = String::from_utf8_lossy(&reply.body);
        if reply.is_fallback() {
            failures.push(format!(
                "{}: not routed ({} {text})",
                op.label(),
                reply.status
            ));
        } else if !op.documents(reply.status) {
            failures.push(format!(
                "{}: undocumented status {} {text}",
                op.label(),
                reply.status
            ));
        } else {
            check_reply(&doc, &ops, &op.method, &op.path, &reply);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undocumented_methods_and_paths_get_the_fallback() {
    let doc = document();
    let routes = documented_routes(&doc);
    let error = component(&doc, "Error");
    let server = Server::start().await;
    let mut failures = Vec::new();

    // Every method the document does not name, on every path the document
    // or the route table names, plus the plausible undocumented routes.
    let mut paths: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    paths.extend(source_routes().into_keys());
    let mut probes: BTreeSet<(String, String)> = BTreeSet::new();
    for path in &paths {
        for method in METHODS {
            if !routes.get(path).is_some_and(|m| m.contains(method)) {
                probes.insert((method.to_owned(), path.clone()));
            }
        }
    }
    for (method, path) in UNDOCUMENTED {
        assert!(
            !routes.get(*path).is_some_and(|m| m.contains(*method)),
            "{method} {path} is documented: take it off this test's list"
        );
        probes.insert(((*method).to_owned(), (*path).to_owned()));
    }
    for (method, path) in &probes {
        let body = (method != "get" && method != "delete").then(|| json!({}));
        let reply = server.admin(method, &fill(path), body.as_ref()).await;
        if reply.is_fallback() {
            assert_valid(
                &doc,
                &error,
                &reply.json(),
                &format!("fallback for {method} {path}"),
            );
        } else {
            failures.push(format!(
                "{} {path} is routed but not documented: {} {}",
                method.to_uppercase(),
                reply.status,
                String::from_utf8_lossy(&reply.body)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Index of the `)` that closes the call whose arguments start `text`.
fn closing_paren(text: &str) -> usize {
    let mut depth = 1usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced .route( call: {text}");
}

/// The routes of `source` (a file of `src/http`): each `.route("path", …)`
/// with the methods of its method router.
fn scan_routes(file: &str, source: &str, routes: &mut BTreeMap<String, BTreeSet<String>>) {
    for unsupported in [
        ".nest(",
        ".nest_service(",
        ".route_service(",
        ".fallback_service(",
    ] {
        assert!(
            !source.contains(unsupported),
            "{file} uses {unsupported}: teach tests/openapi.rs to read it"
        );
    }
    let mut rest = source;
    while let Some(at) = rest.find(".route(") {
        let call = &rest[at + ".route(".len()..];
        let end = closing_paren(call);
        let args = &call[..end];
        rest = &call[end..];
        let trimmed = args.trim_start();
        assert!(
            trimmed.starts_with('"'),
            "{file}: a .route( call without a literal path: {args}"
        );
        let path = trimmed[1..].split('"').next().unwrap().to_owned();
        // Method names called in the method router, outside the path.
        let router = &trimmed[path.len() + 2..];
        let bytes = router.as_bytes();
        let mut methods = BTreeSet::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i].is_ascii_alphabetic() || bytes[i] == b'_' {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                let word = &router[start..i];
                if bytes.get(i) == Some(&b'(') {
                    match word {
                        "get" | "post" | "put" | "patch" | "delete" | "head" | "options"
                        | "trace" => {
                            methods.insert(word.to_owned());
                        }
                        "any" | "on" | "any_service" | "on_service" => {
                            panic!("{file}: {path} uses {word}(: methods cannot be read")
                        }
                        _ => {}
                    }
                }
            } else {
                i += 1;
            }
        }
        assert!(
            !methods.is_empty(),
            "{file}: no methods found for {path}: {args}"
        );
        routes.entry(path).or_default().extend(methods);
    }
}

/// The route table of `src/http/*.rs`: path → methods.
fn source_routes() -> BTreeMap<String, BTreeSet<String>> {
    let dir = repo_root().join("src/http");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    let mut in_source = BTreeMap::new();
    for file in &files {
        let source = std::fs::read_to_string(file).unwrap();
        scan_routes(&file.display().to_string(), &source, &mut in_source);
    }
    assert!(in_source.len() >= 10, "the scan found only {in_source:?}");
    in_source
}

#[test]
fn route_table_in_source_matches_the_document() {
    let in_source = source_routes();
    let documented = documented_routes(&document());
    let mut differences = Vec::new();
    for (path, methods) in &in_source {
        match documented.get(path) {
            None => differences.push(format!("{path} ({methods:?}) is routed but not documented")),
            Some(doc) if doc != methods => {
                differences.push(format!("{path}: routed {methods:?}, documented {doc:?}"));
            }
            Some(_) => {}
        }
    }
    for (path, methods) in &documented {
        if !in_source.contains_key(path) {
            differences.push(format!("{path} ({methods:?}) is documented but not routed"));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_match_the_documented_security() {
    let doc = document();
    let ops = operations(&doc);
    let server = Server::start().await;
    let (_team, team_key) = server.team_key().await;
    let mut failures = Vec::new();
    for op in &ops {
        let body = op.has_body().then(|| json!({}));
        let path = fill(&op.path);
        let secured = op.op.get("security").unwrap_or(&doc["security"]) != &json!([]);
        let bad_key = format!("sk-{}-{}", "0".repeat(25), "0".repeat(64));
        for key in [None, Some("not-a-key"), Some(bad_key.as_str())] {
            let reply = server.send(&op.method, &path, key, body.as_ref()).await;
            if secured {
                if reply.status == 401 {
                    let body = check_reply(&doc, &ops, &op.method, &op.path, &reply);
                    assert_eq!(body["error"]["code"], "unauthorized");
                } else {
                    failures.push(format!(
                        "{} with key {key:?}: {} not 401",
                        op.label(),
                        reply.status
                    ));
                }
            } else if reply.status != 200 {
                failures.push(format!(
                    "{} needs no key but answered {}",
                    op.label(),
                    reply.status
                ));
            }
        }
        if op.path.starts_with("/v1/admin") {
            let reply = server
                .send(&op.method, &path, Some(&team_key), body.as_ref())
                .await;
            if reply.status == 403 {
                let body = check_reply(&doc, &ops, &op.method, &op.path, &reply);
                assert_eq!(body["error"]["code"], "forbidden");
            } else {
                failures.push(format!(
                    "{} with a team key: {} not 403",
                    op.label(),
                    reply.status
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_the_documented_413() {
    let doc = document();
    let ops = operations(&doc);
    let server = Server::start().await;
    let big = serde_json::to_vec(&json!({ "name": "a".repeat(70 * 1024) })).unwrap();
    let mut checked = 0;
    for op in ops.iter().filter(|o| o.has_body()) {
        let reply = server
            .send_raw(
                &op.method,
                &fill(&op.path),
                Some(&server.admin_key),
                Some(big.clone()),
            )
            .await;
        assert_eq!(
            reply.status,
            413,
            "{}: {}",
            op.label(),
            String::from_utf8_lossy(&reply.body)
        );
        let body = check_reply(&doc, &ops, &op.method, &op.path, &reply);
        assert_eq!(body["error"]["code"], "payload_too_large");
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} operations with a body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_objects_and_errors_match_the_documented_schemas() {
    let doc = document();
    let ops = operations(&doc);
    let template_schema = component(&doc, "Template");
    let error_schema = component(&doc, "Error");
    let server = Server::start().await;
    let host = server.host.to_string();

    // Admin: the host, a team with its key, sandboxes.
    let reply = server
        .admin(
            "post",
            "/v1/admin/hosts",
            Some(&json!({ "id": host, "address": "in-process" })),
        )
        .await;
    reply.assert_status(201);
    let registered = check_reply(&doc, &ops, "post", "/v1/admin/hosts", &reply);
    assert_eq!(registered["status"], "online");
    let reply = server
        .admin(
            "patch",
            &format!("/v1/admin/hosts/{host}"),
            Some(&json!({ "status": "online", "address": "in-process" })),
        )
        .await;
    assert_eq!(reply.status, 200);
    check_reply(&doc, &ops, "patch", "/v1/admin/hosts/{host_id}", &reply);
    let reply = server.admin("get", "/v1/admin/hosts", None).await;
    assert_eq!(reply.status, 200);
    let hosts = check_reply(&doc, &ops, "get", "/v1/admin/hosts", &reply);
    assert_eq!(hosts.as_array().unwrap().len(), 1);

    let reply = server
        .admin("post", "/v1/admin/teams", Some(&json!({ "name": "acme" })))
        .await;
    assert_eq!(reply.status, 201);
    let created = check_reply(&doc, &ops, "post", "/v1/admin/teams", &reply);
    let team = created["team_id"].as_str().unwrap().to_owned();
    let key = created["api_key"].as_str().unwrap().to_owned();
    let reply = server
        .admin(
            "post",
            &format!("/v1/admin/teams/{team}/keys"),
            Some(&json!({ "name": "ci" })),
        )
        .await;
    assert_eq!(reply.status, 201);
    check_reply(&doc, &ops, "post", "/v1/admin/teams/{team_id}/keys", &reply);
    // A platform-team key without admin rights may not create templates.
    let platform = TeamId::PLATFORM.to_string();
    let reply = server
        .admin(
            "post",
            &format!("/v1/admin/teams/{platform}/keys"),
            Some(&json!({ "name": "platform-user" })),
        )
        .await;
    assert_eq!(reply.status, 201);
    let platform_key =
        check_reply(&doc, &ops, "post", "/v1/admin/teams/{team_id}/keys", &reply)["api_key"]
            .as_str()
            .unwrap()
            .to_owned();
    let reply = server
        .send(
            "post",
            "/v1/snapshots",
            Some(&platform_key),
            Some(&json!({ "sandbox_id": SandboxId::new().to_string(), "name": "x" })),
        )
        .await;
    reply.assert_status(403);
    let body = check_reply(&doc, &ops, "post", "/v1/snapshots", &reply);
    assert_eq!(body["error"]["code"], "forbidden");

    let mut sandboxes = Vec::new();
    for (owner, vcpus, memory_mb) in [
        (team.clone(), 2, 512),
        (team.clone(), 0, 0),
        (TeamId::PLATFORM.to_string(), 1, 256),
    ] {
        let id = SandboxId::new();
        server.agent.add_sandbox(id, "running", vcpus, memory_mb);
        let reply = server
            .admin(
                "post",
                "/v1/admin/sandboxes",
                Some(&json!({
                    "id": id.to_string(),
                    "team_id": owner,
                    "host_id": host,
                    "status": "paused",
                    "vcpus": vcpus,
                    "memory_mb": memory_mb,
                })),
            )
            .await;
        reply.assert_status(201);
        check_reply(&doc, &ops, "post", "/v1/admin/sandboxes", &reply);
        let path = format!("/v1/admin/sandboxes/{id}");
        let reply = server
            .admin("patch", &path, Some(&json!({ "status": "running" })))
            .await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            check_reply(
                &doc,
                &ops,
                "patch",
                "/v1/admin/sandboxes/{sandbox_id}",
                &reply
            )["status"],
            "running"
        );
        let reply = server.admin("get", &path, None).await;
        assert_eq!(reply.status, 200);
        check_reply(
            &doc,
            &ops,
            "get",
            "/v1/admin/sandboxes/{sandbox_id}",
            &reply,
        );
        sandboxes.push(id.to_string());
    }
    // A sandbox not placed on a host has no `host_id`; snapshotting it is
    // 503 `host_unavailable`.
    let unplaced = SandboxId::new().to_string();
    let reply = server
        .admin(
            "post",
            "/v1/admin/sandboxes",
            Some(&json!({ "id": unplaced, "team_id": team })),
        )
        .await;
    assert_eq!(reply.status, 201);
    let sandbox = check_reply(&doc, &ops, "post", "/v1/admin/sandboxes", &reply);
    assert!(sandbox.get("host_id").is_none(), "{sandbox}");
    assert_eq!(sandbox["status"], "running");
    let reply = server
        .send(
            "post",
            "/v1/snapshots",
            Some(&key),
            Some(&json!({ "sandbox_id": unplaced, "name": "nowhere" })),
        )
        .await;
    reply.assert_status(503);
    let body = check_reply(&doc, &ops, "post", "/v1/snapshots", &reply);
    assert_eq!(body["error"]["code"], "host_unavailable");

    // Snapshots over HTTP with the team key.
    let create = |sandbox: &str, name: &str| json!({ "sandbox_id": sandbox, "name": name });
    let reply = server
        .send(
            "post",
            "/v1/snapshots",
            Some(&key),
            Some(&create(&sandboxes[0], "first")),
        )
        .await;
    reply.assert_status(201);
    let first = check_reply(&doc, &ops, "post", "/v1/snapshots", &reply);
    assert_valid(&doc, &template_schema, &first, "created template");
    assert_eq!(first["vcpus"], 2);
    assert_eq!(first["memory_mb"], 512);
    assert_eq!(first["platform"], false);
    assert_eq!(first["type"], "snapshot");

    let reply = server
        .send(
            "post",
            "/v1/snapshots",
            Some(&key),
            Some(&create(&sandboxes[1], "second")),
        )
        .await;
    reply.assert_status(201);
    let second = check_reply(&doc, &ops, "post", "/v1/snapshots", &reply);
    assert!(
        second.get("vcpus").is_none() && second.get("memory_mb").is_none(),
        "{second}"
    );

    // A platform template, made by the admin endpoint.
    let reply = server
        .admin(
            "post",
            "/v1/admin/templates",
            Some(&json!({ "sandbox_id": sandboxes[2], "name": "golden" })),
        )
        .await;
    reply.assert_status(201);
    let golden = check_reply(&doc, &ops, "post", "/v1/admin/templates", &reply);
    assert_eq!(golden["platform"], true);

    // Reads: one template, the full list, pages with the cursor header.
    let reply = server
        .send("get", "/v1/snapshots/first", Some(&key), None)
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        check_reply(&doc, &ops, "get", "/v1/snapshots/{name}", &reply),
        first
    );
    // Restore "first" into a new sandbox, read it back, and see the
    // template's `last_used_at`; and the documented errors.
    let reply = server
        .send(
            "post",
            "/v1/sandboxes",
            Some(&key),
            Some(&json!({ "template": "first", "timeout_sec": 60 })),
        )
        .await;
    reply.assert_status(201);
    let restored = check_reply(&doc, &ops, "post", "/v1/sandboxes", &reply);
    assert_eq!(restored["status"], "running");
    assert_eq!(restored["template"], "first");
    assert_eq!(restored["host_id"], host.as_str());
    let id = restored["sandbox_id"].as_str().unwrap().to_owned();
    let reply = server
        .send("get", &format!("/v1/sandboxes/{id}"), Some(&key), None)
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        check_reply(&doc, &ops, "get", "/v1/sandboxes/{sandbox_id}", &reply),
        restored
    );
    let reply = server
        .send("get", "/v1/snapshots/first", Some(&key), None)
        .await;
    let used = check_reply(&doc, &ops, "get", "/v1/snapshots/{name}", &reply);
    assert!(used["last_used_at"].is_string(), "{used}");
    assert_eq!(used["hosts"], 1);
    for (body, status, code) in [
        (json!({ "template": "nope" }), 404, "not_found"),
        (json!({ "template": "a/b" }), 400, "invalid_request"),
        (
            json!({ "template": "first", "sandbox_id": "sb-x" }),
            400,
            "invalid_request",
        ),
        (
            json!({ "template": "first", "memory_mb": 1 }),
            400,
            "invalid_request",
        ),
        (
            json!({ "template": "first", "sandbox_id": id }),
            409,
            "already_exists",
        ),
    ] {
        let reply = server
            .send("post", "/v1/sandboxes", Some(&key), Some(&body))
            .await;
        assert_eq!(reply.status, status, "{body}");
        let error = check_reply(&doc, &ops, "post", "/v1/sandboxes", &reply);
        assert_eq!(error["error"]["code"], code, "{body}");
    }
    // Quotas: at the count limit a create is refused before any host is
    // called; the usage shows it; lifting the limit lets it through.
    let limits = format!("/v1/admin/teams/{team}/limits");
    let reply = server
        .admin("put", &limits, Some(&json!({ "max_snapshots": 2 })))
        .await;
    reply.assert_status(200);
    let usage = check_reply(
        &doc,
        &ops,
        "put",
        "/v1/admin/teams/{team_id}/limits",
        &reply,
    );
    assert_eq!(
        (usage["snapshots"].clone(), usage["max_snapshots"].clone()),
        (json!(2), json!(2))
    );
    assert_eq!(usage["max_bytes"], Value::Null);
    let calls = server
        .agent
        .calls(sandbox_snapshots::agent::AgentOp::CreateSnapshot);
    let reply = server
        .send(
            "post",
            "/v1/snapshots",
            Some(&key),
            Some(&json!({ "sandbox_id": sandboxes[0], "name": "third" })),
        )
        .await;
    reply.assert_status(403);
    let refused = check_reply(&doc, &ops, "post", "/v1/snapshots", &reply);
    assert_eq!(refused["error"]["code"], "quota_exceeded");
    assert_eq!(
        server
            .agent
            .calls(sandbox_snapshots::agent::AgentOp::CreateSnapshot),
        calls,
        "no host called"
    );
    let reply = server.send("get", "/v1/usage", Some(&key), None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(check_reply(&doc, &ops, "get", "/v1/usage", &reply), usage);
    let reply = server.admin("put", &limits, Some(&json!({}))).await;
    assert_eq!(reply.status, 200);
    let lifted = check_reply(
        &doc,
        &ops,
        "put",
        "/v1/admin/teams/{team_id}/limits",
        &reply,
    );
    assert_eq!(lifted["max_snapshots"], Value::Null);

    let (_, stranger) = server.team_key().await;
    let reply = server
        .send("get", &format!("/v1/sandboxes/{id}"), Some(&stranger), None)
        .await;
    assert_eq!(reply.status, 404, "another team's sandbox is not found");
    check_reply(&doc, &ops, "get", "/v1/sandboxes/{sandbox_id}", &reply);

    let reply = server.send("get", "/v1/snapshots", Some(&key), None).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.headers.get("x-next-cursor").is_none(),
        "an unpaginated list has no cursor"
    );
    let all = check_reply(&doc, &ops, "get", "/v1/snapshots", &reply);
    assert_eq!(all.as_array().unwrap().len(), 3, "{all}");
    let list_op = operation(&ops, "get", "/v1/snapshots");
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/snapshots?limit=2".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let reply = server.send("get", &path, Some(&key), None).await;
        assert_eq!(reply.status, 200);
        let page = check_reply(&doc, &ops, "get", "/v1/snapshots", &reply);
        seen.extend(page.as_array().unwrap().iter().cloned());
        cursor = reply
            .headers
            .get("x-next-cursor")
            .map(|v| v.to_str().unwrap().to_owned());
        if cursor.is_some() {
            assert!(
                list_op.op["responses"]["200"]["headers"]
                    .get("X-Next-Cursor")
                    .is_some(),
                "the server sends X-Next-Cursor on a list the document does not say so"
            );
        } else {
            break;
        }
    }
    assert_eq!(Value::Array(seen), all, "pages differ from the full list");
    let reply = server
        .send("get", "/v1/snapshots?type=base", Some(&key), None)
        .await;
    assert_eq!(reply.status, 200);
    check_reply(&doc, &ops, "get", "/v1/snapshots", &reply);

    // Errors of the snapshot endpoints.
    let errors: Vec<(&str, String, Option<Value>, u16, &str)> = vec![
        (
            "post",
            "/v1/snapshots".into(),
            Some(create(&sandboxes[0], "first")),
            409,
            "already_exists",
        ),
        (
            "post",
            "/v1/snapshots".into(),
            Some(create(&sandboxes[0], "golden")),
            409,
            "name_reserved",
        ),
        (
            "post",
            "/v1/snapshots".into(),
            Some(create("", "x")),
            400,
            "invalid_request",
        ),
        (
            "post",
            "/v1/snapshots".into(),
            Some(create("sb-nope", "x")),
            400,
            "invalid_request",
        ),
        (
            "post",
            "/v1/snapshots".into(),
            Some(create(&sandboxes[0], ".bad")),
            400,
            "invalid_request",
        ),
        (
            "post",
            "/v1/snapshots".into(),
            Some(create(&SandboxId::new().to_string(), "x")),
            404,
            "not_found",
        ),
        (
            "get",
            "/v1/snapshots/missing".into(),
            None,
            404,
            "not_found",
        ),
        (
            "get",
            "/v1/snapshots?type=nope".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "get",
            "/v1/snapshots?limit=0".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "get",
            "/v1/snapshots?cursor=garbage".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "delete",
            "/v1/snapshots/golden".into(),
            None,
            403,
            "forbidden",
        ),
        (
            "delete",
            "/v1/snapshots/missing".into(),
            None,
            404,
            "not_found",
        ),
        (
            "get",
            "/v1/audit-logs?limit=x".into(),
            None,
            400,
            "invalid_request",
        ),
    ];
    for (method, path, body, status, code) in errors {
        let reply = server.send(method, &path, Some(&key), body.as_ref()).await;
        assert_eq!(
            reply.status,
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let doc_path = path
            .split('?')
            .next()
            .unwrap()
            .replace("/missing", "/{name}")
            .replace("/golden", "/{name}");
        let body = check_reply(&doc, &ops, method, &doc_path, &reply);
        assert_valid(&doc, &error_schema, &body, "error body");
        assert_eq!(body["error"]["code"], code, "{method} {path}");
    }
    let reply = server
        .send_raw(
            "post",
            "/v1/snapshots",
            Some(&key),
            Some(b"not json".to_vec()),
        )
        .await;
    assert_eq!(reply.status, 400);
    let body = check_reply(&doc, &ops, "post", "/v1/snapshots", &reply);
    assert_eq!(
        body,
        json!({ "error": { "code": "invalid_request", "message": "invalid JSON body" } })
    );
    let reply = server
        .send("get", "/v1/snapshots/missing", Some(&key), None)
        .await;
    assert_eq!(
        reply.json(),
        json!({ "error": { "code": "not_found", "message": "template not found" } })
    );
    // The fallbacks carry the Error body too.
    for (method, path) in [("get", "/v1/nothing"), ("put", "/v1/snapshots")] {
        let reply = server.send(method, path, Some(&key), None).await;
        assert!(reply.is_fallback(), "{method} {path}: {}", reply.status);
        assert_valid(&doc, &error_schema, &reply.json(), "fallback body");
    }

    // Deletes: one whose host is down is queued, and shows up as pending.
    let reply = server
        .send("delete", "/v1/snapshots/first", Some(&key), None)
        .await;
    assert_eq!(reply.status, 204);
    check_reply(&doc, &ops, "delete", "/v1/snapshots/{name}", &reply);
    server.agent.set_unavailable(true);
    let reply = server
        .send("delete", "/v1/snapshots/second", Some(&key), None)
        .await;
    assert_eq!(reply.status, 204);
    // A restore whose agent cannot answer: 502, and its VM (which may have
    // started) is queued for destruction.
    let reply = server
        .send(
            "post",
            "/v1/sandboxes",
            Some(&key),
            Some(&json!({ "template": "golden" })),
        )
        .await;
    reply.assert_status(502);
    check_reply(&doc, &ops, "post", "/v1/sandboxes", &reply);
    let reply = server.admin("get", "/v1/admin/pending", None).await;
    assert_eq!(reply.status, 200);
    let pending = check_reply(&doc, &ops, "get", "/v1/admin/pending", &reply);
    assert!(
        !pending["deletions"].as_array().unwrap().is_empty(),
        "{pending}"
    );
    assert_eq!(
        pending["destroys"].as_array().unwrap().len(),
        1,
        "{pending}"
    );
    server.agent.set_unavailable(false);
    let reply = server
        .admin("delete", "/v1/admin/templates/golden", None)
        .await;
    assert_eq!(reply.status, 204);
    check_reply(&doc, &ops, "delete", "/v1/admin/templates/{name}", &reply);
    let reply = server
        .admin("delete", "/v1/admin/templates/golden", None)
        .await;
    assert_eq!(reply.status, 404);
    check_reply(&doc, &ops, "delete", "/v1/admin/templates/{name}", &reply);

    // The audit log, whole and in pages.
    let reply = server.send("get", "/v1/audit-logs", Some(&key), None).await;
    assert_eq!(reply.status, 200);
    assert!(reply.headers.get("x-next-cursor").is_none());
    let entries = check_reply(&doc, &ops, "get", "/v1/audit-logs", &reply);
    assert!(entries.as_array().unwrap().len() >= 4, "{entries}");
    let reply = server
        .send(
            "get",
            "/v1/audit-logs?limit=1&resource_type=template&action=snapshot.create",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.headers.get("x-next-cursor").is_some(),
        "two creates, a page of one"
    );
    let page = check_reply(&doc, &ops, "get", "/v1/audit-logs", &reply);
    assert_eq!(page[0]["action"], "snapshot.create");

    let reply = server.send("get", "/healthz", None, None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        check_reply(&doc, &ops, "get", "/healthz", &reply),
        json!({ "status": "ok" })
    );
}

/// Open operations are listed with their ids and resolved by an operator
/// as documented (and audited in the team's log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_operations_are_listed_and_resolved_as_documented() {
    let doc = document();
    let ops = operations(&doc);
    let server = Server::start().await;
    let (_, key, sb) = server.team_with_sandbox(1, 64).await;
    // The agent writes the files and fails, and then cannot say what
    // became of the sandbox: the operation stays open.
    server.agent.inject_times(
        sandbox_snapshots::agent::AgentOp::CreateSnapshot,
        sandbox_snapshots::agent::Fault::FailAfter(sandbox_snapshots::AgentError::rejected(
            sandbox_snapshots::AgentCode::Internal,
            "x",
        )),
        1,
    );
    server.agent.inject(
        sandbox_snapshots::agent::AgentOp::ListSandboxes,
        sandbox_snapshots::agent::Fault::Fail(sandbox_snapshots::AgentError::unavailable("down")),
    );
    let reply = server
        .send(
            "post",
            "/v1/snapshots",
            Some(&key),
            Some(&json!({ "sandbox_id": sb.to_string(), "name": "stuck" })),
        )
        .await;
    assert_eq!(reply.status, 502);

    let reply = server.admin("get", "/v1/admin/operations", None).await;
    assert_eq!(reply.status, 200);
    let listed = check_reply(&doc, &ops, "get", "/v1/admin/operations", &reply);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["phase"], "resolving");
    let id = listed[0]["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/admin/operations/{id}/resolve");
    let documented = "/v1/admin/operations/{operation_id}/resolve";

    for bad in [json!({}), json!({ "sandbox_status": "snapshotting" })] {
        let reply = server.admin("post", &path, Some(&bad)).await;
        assert_eq!(reply.status, 400, "{bad}");
        check_reply(&doc, &ops, "post", documented, &reply);
    }
    let reply = server
        .send(
            "post",
            &path,
            Some(&key),
            Some(&json!({ "sandbox_status": "paused" })),
        )
        .await;
    assert_eq!(reply.status, 403, "a team key may not resolve");
    let reply = server
        .admin("post", &path, Some(&json!({ "sandbox_status": "paused" })))
        .await;
    reply.assert_status(200);
    let resolved = check_reply(&doc, &ops, "post", documented, &reply);
    assert_eq!(resolved["id"], id.as_str());
    assert_eq!(resolved["sandbox_id"], sb.to_string());
    assert_eq!(resolved["sandbox_status"], "paused");
    let reply = server
        .admin("post", &path, Some(&json!({ "sandbox_status": "paused" })))
        .await;
    assert_eq!(reply.status, 404, "resolved once");
    check_reply(&doc, &ops, "post", documented, &reply);

    let reply = server.admin("get", "/v1/admin/operations", None).await;
    assert_eq!(
        check_reply(&doc, &ops, "get", "/v1/admin/operations", &reply),
        json!([])
    );
    let reply = server
        .admin("get", &format!("/v1/admin/sandboxes/{sb}"), None)
        .await;
    assert_eq!(reply.json()["status"], "paused");
    let reply = server
        .send(
            "get",
            "/v1/audit-logs?action=operation.resolve",
            Some(&key),
            None,
        )
        .await;
    let entries = check_reply(&doc, &ops, "get", "/v1/audit-logs", &reply);
    assert_eq!(entries.as_array().unwrap().len(), 1, "{entries}");
    assert_eq!(entries[0]["metadata"]["reason"], "operator");
    assert_eq!(entries[0]["status"], "success");
    assert_eq!(entries[0]["scope"], "team");
    // The snapshot that failed is in the log as the reference reads it.
    let reply = server
        .send(
            "get",
            "/v1/audit-logs?action=snapshot.create",
            Some(&key),
            None,
        )
        .await;
    let created = check_reply(&doc, &ops, "get", "/v1/audit-logs", &reply);
    assert_eq!(created[0]["status"], "error", "{created}");
    assert_eq!(created[0]["outcome"], "failure", "{created}");
    assert_eq!(entries[0]["metadata"]["operation_id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asynchronous_and_idempotent_answers_match_the_documented_schemas() {
    let doc = document();
    let ops = operations(&doc);
    let server = Server::start().await;
    let (_, key, sandbox) = server.team_with_sandbox(2, 512).await;
    let post =
        |path: &'static str, headers: &'static [(&'static str, &'static str)], body: Value| {
            let (server, key) = (&server, key.clone());
            async move {
                server
                    .send_with("post", path, &key, headers, Some(&body))
                    .await
            }
        };
    let get = |path: String| {
        let (server, key) = (&server, key.clone());
        async move { server.send_with("get", &path, &key, &[], None).await }
    };
    let steps = [
        (
            "/v1/snapshots",
            json!({ "sandbox_id": sandbox.to_string(), "name": "a" }),
            false,
        ),
        ("/v1/sandboxes", json!({ "template": "a" }), false),
        (
            "/v1/snapshots",
            json!({ "sandbox_id": sandbox.to_string(), "name": "b" }),
            true,
        ),
    ];
    let mut states = Vec::new();
    for (path, body, failing) in steps {
        if failing {
            server.agent.inject(
                sandbox_snapshots::agent::AgentOp::CreateSnapshot,
                sandbox_snapshots::agent::Fault::Fail(sandbox_snapshots::AgentError::rejected(
                    sandbox_snapshots::AgentCode::Internal,
                    "boom",
                )),
            );
        }
        let reply = post(path, &[PREFER_ASYNC], body).await;
        reply.assert_status(202);
        let accepted = check_reply(&doc, &ops, "post", path, &reply);
        let id = accepted["operation_id"].as_str().unwrap().to_owned();
        let reply = loop {
            let reply = get(format!("/v1/operations/{id}")).await;
            if reply.status != 200 || reply.json()["state"] != "running" {
                break reply;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        let op = check_reply(&doc, &ops, "get", "/v1/operations/{operation_id}", &reply);
        states.push(op["state"].as_str().unwrap().to_owned());
    }
    assert_eq!(states, ["succeeded", "succeeded", "failed"]);
    let reply = get("/v1/operations/op-0000000000000000000000001".into()).await;
    assert_eq!(reply.status, 404);
    check_reply(&doc, &ops, "get", "/v1/operations/{operation_id}", &reply);

    // 400 and 422 of the key.
    let reply = post(
        "/v1/snapshots",
        &[("Idempotency-Key", "")],
        json!({ "sandbox_id": sandbox.to_string(), "name": "c" }),
    )
    .await;
    assert_eq!(reply.status, 400);
    check_reply(&doc, &ops, "post", "/v1/snapshots", &reply);
    server.agent.clear_faults();
    for (name, status) in [("c", 201), ("d", 422)] {
        let reply = post(
            "/v1/snapshots",
            &[("Idempotency-Key", "k")],
            json!({ "sandbox_id": sandbox.to_string(), "name": name }),
        )
        .await;
        assert_eq!(reply.status, status);
        check_reply(&doc, &ops, "post", "/v1/snapshots", &reply);
    }
}

/// Retention over HTTP (SPEC §8): `PUT /v1/admin/teams/{team_id}/retention`
/// answers the policy (200), refuses bad values (400) and team keys (403);
/// `ttl_seconds` on a create is validated and shows as `expires_at`, as is
/// the team's default TTL; every body matches the document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_is_set_and_shown_as_documented() {
    let doc = document();
    let ops = operations(&doc);
    let server = Server::start().await;
    let (team, key, sb) = server.team_with_sandbox(1, 64).await;
    let create = |name: &str, extra: Value| {
        let mut body = json!({ "sandbox_id": sb.to_string(), "name": name });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let path = "/v1/admin/teams/{team_id}/retention";
    let retention = format!("/v1/admin/teams/{team}/retention");
    // A create that must succeed: its documented 201 body.
    let created = |name: &'static str, extra: Value| {
        let (server, doc, ops, key, body) = (&server, &doc, &ops, &key, create(name, extra));
        async move {
            let reply = server
                .send("post", "/v1/snapshots", Some(key), Some(&body))
                .await;
            reply.assert_status(201);
            check_reply(doc, ops, "post", "/v1/snapshots", &reply)
        }
    };

    // ttl_seconds: out of range or not an integer → 400, nothing created.
    let calls = server
        .agent
        .calls(sandbox_snapshots::agent::AgentOp::CreateSnapshot);
    for bad in [
        json!(0),
        json!(-5),
        json!(1.5),
        json!("60"),
        json!(315_360_001u64),
    ] {
        let reply = server
            .send(
                "post",
                "/v1/snapshots",
                Some(&key),
                Some(&create("bad-ttl", json!({ "ttl_seconds": bad }))),
            )
            .await;
        assert_eq!(reply.status, 400, "ttl_seconds {bad}");
        let error = check_reply(&doc, &ops, "post", "/v1/snapshots", &reply);
        assert_eq!(error["error"]["code"], "invalid_request", "{bad}");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("ttl_seconds"),
            "{error}"
        );
    }
    assert_eq!(
        server
            .agent
            .calls(sandbox_snapshots::agent::AgentOp::CreateSnapshot),
        calls,
        "no host called for a bad ttl_seconds"
    );

    // Without a TTL and without a policy: no expires_at.
    let forever = created("forever", json!({})).await;
    assert!(forever.get("expires_at").is_none(), "{forever}");

    // An explicit TTL: expires_at about an hour ahead.
    let hour = created("hour", json!({ "ttl_seconds": 3600 })).await;
    assert_expires_in(&hour, 3600);
    let reply = server
        .send("get", "/v1/snapshots/hour", Some(&key), None)
        .await;
    let got = check_reply(&doc, &ops, "get", "/v1/snapshots/{name}", &reply);
    assert_eq!(got["expires_at"], hour["expires_at"]);

    // The policy: 200 with what was stored; absent fields are off.
    let reply = server
        .admin(
            "put",
            &retention,
            Some(
                &json!({ "default_ttl_seconds": 7200, "keep_last_per_sandbox": 50,
                          "delete_unused_after": null }),
            ),
        )
        .await;
    reply.assert_status(200);
    let policy = check_reply(&doc, &ops, "put", path, &reply);
    assert_eq!(
        policy,
        json!({ "default_ttl_seconds": 7200, "delete_unused_after": null,
                "keep_last_per_sandbox": 50 })
    );
    // The default TTL applies to a create without one ...
    let default = created("default", json!({})).await;
    assert_expires_in(&default, 7200);
    // ... and a create's own TTL overrides it.
    let own = created("own", json!({ "ttl_seconds": 60 })).await;
    assert_expires_in(&own, 60);

    // Bad values → 400, and the stored policy is unchanged.
    for bad in [
        json!({ "default_ttl_seconds": 0 }),
        json!({ "default_ttl_seconds": "1h" }),
        json!({ "delete_unused_after": -1 }),
        json!({ "delete_unused_after": 315_360_001u64 }),
        json!({ "keep_last_per_sandbox": 0 }),
        json!({ "keep_last_per_sandbox": 2.5 }),
        json!({ "keep_last_per_sandbox": 4_294_967_296u64 }),
    ] {
        let reply = server.admin("put", &retention, Some(&bad)).await;
        assert_eq!(reply.status, 400, "{bad}");
        let error = check_reply(&doc, &ops, "put", path, &reply);
        assert_eq!(error["error"]["code"], "invalid_request", "{bad}");
        let field = bad.as_object().unwrap().keys().next().unwrap().clone();
        assert!(
            error["error"]["message"].as_str().unwrap().contains(&field),
            "{error}"
        );
    }
    let reply = server
        .admin("put", "/v1/admin/teams/team-x/retention", Some(&json!({})))
        .await;
    assert_eq!(reply.status, 400);
    check_reply(&doc, &ops, "put", path, &reply);
    // A team key may not set a policy, not even its own team's.
    let reply = server
        .send(
            "put",
            &retention,
            Some(&key),
            Some(&json!({ "default_ttl_seconds": 1 })),
        )
        .await;
    assert_eq!(reply.status, 403);
    let error = check_reply(&doc, &ops, "put", path, &reply);
    assert_eq!(error["error"]["code"], "forbidden");
    // The refused requests changed nothing: the default TTL still holds.
    let still = created("still-default", json!({})).await;
    assert_expires_in(&still, 7200);
    // An empty body turns it off.
    let reply = server.admin("put", &retention, Some(&json!({}))).await;
    assert_eq!(reply.status, 200);
    let off = check_reply(&doc, &ops, "put", path, &reply);
    assert_eq!(
        off,
        json!({ "default_ttl_seconds": null, "delete_unused_after": null,
                "keep_last_per_sandbox": null })
    );
}

/// `template["expires_at"]` is `secs` from about now (RFC 3339 with second
/// precision: a few seconds of slack either way).
fn assert_expires_in(template: &Value, secs: i64) {
    let at = |delta_ms: i64| {
        sandbox_snapshots::Timestamp::from_unix_millis(
            sandbox_snapshots::Timestamp::now().unix_millis() + secs * 1000 + delta_ms,
        )
        .to_rfc3339()
    };
    let expires = template["expires_at"].as_str().unwrap_or_default();
    // Same format throughout: the text order is the time order.
    assert!(
        at(-10_000).as_str() <= expires && expires <= at(1_000).as_str(),
        "expires_at {expires:?} is not {secs} s from now: {template}"
    );
}
