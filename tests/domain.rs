//! Ids, names, and opening stores: parse and format rules (SPEC §2), the
//! schema migrator — reopening a store keeps what it holds, on each store
//! (SQLite and PostgreSQL, see [`conformance!`]) — and SQLite files that
//! must be refused untouched.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Backend, Db};
use sandbox_snapshots::*;
use uuid::Uuid;

conformance!(reopening_a_store_keeps_what_it_holds);

#[test]
fn ids_round_trip_for_every_prefix() {
    for value in [
        0u128,
        1,
        35,
        36,
        u128::from(u64::MAX),
        u128::MAX / 3,
        u128::MAX,
    ] {
        let uuid = Uuid::from_u128(value);
        let sb = SandboxId::from_uuid(uuid);
        let text = sb.to_string();
        assert_eq!(text.len(), "sb-".len() + 25, "{text}");
        assert_eq!(SandboxId::parse(&text).unwrap(), sb);
        // Every other prefix round-trips the same value.
        macro_rules! round_trips {
            ($($id:ident),*) => {$(
                assert_eq!(
                    $id::parse(&$id::from_uuid(uuid).to_string())
                        .unwrap()
                        .as_uuid(),
                    uuid,
                    stringify!($id)
                );
            )*};
        }
        round_trips!(HostId, TeamId, TemplateId, ApiKeyId, AuditLogId);
    }
    assert_eq!(
        SandboxId::from_uuid(Uuid::from_u128(1)).to_string(),
        "sb-0000000000000000000000001"
    );
    assert_eq!(
        SandboxId::from_uuid(Uuid::from_u128(35)).to_string(),
        "sb-000000000000000000000000z"
    );
    assert_eq!(
        TeamId::PLATFORM.to_string(),
        "team-0000000000000000000000000"
    );
    assert!(
        TeamId::parse("team-0000000000000000000000000")
            .unwrap()
            .is_platform()
    );
    // Random ids differ and survive serde as strings.
    let (a, b) = (TemplateId::new(), TemplateId::new());
    assert_ne!(a, b);
    let json = serde_json::to_string(&a).unwrap();
    assert_eq!(json, format!("\"{a}\""));
    assert_eq!(serde_json::from_str::<TemplateId>(&json).unwrap(), a);
    assert!(serde_json::from_str::<TemplateId>("\"sb-0000000000000000000000001\"").is_err());
}

#[test]
fn ids_reject_wrong_prefix_length_case_characters_and_overflow() {
    let good = "0000000000000000000000001";
    let other_prefix = format!("host-{good}");
    let prefix = IdError::WrongPrefix { expected: "sb-" };
    let cases = [
        (other_prefix.as_str(), prefix.clone()),
        (good, prefix.clone()),
        ("", prefix.clone()),
        ("SB-0000000000000000000000001", prefix),
        ("sb-", IdError::WrongLength { found: 0 }),
        (
            "sb-000000000000000000000001",
            IdError::WrongLength { found: 24 },
        ),
        (
            "sb-00000000000000000000000001",
            IdError::WrongLength { found: 26 },
        ),
        (
            "sb-000000000000000000000000A",
            IdError::InvalidChar { position: 24 },
        ),
        (
            "sb-00000000000-0000000000000",
            IdError::InvalidChar { position: 11 },
        ),
        (
            "sb-0000000000000000000000 01",
            IdError::InvalidChar { position: 22 },
        ),
        // Above 2^128 - 1: an error, not a panic or a wrap-around.
        ("sb-zzzzzzzzzzzzzzzzzzzzzzzzz", IdError::Overflow),
        ("sb-f5lxx1zz5pnorynqglhzmsp34", IdError::Overflow),
    ];
    for (text, why) in cases {
        assert_eq!(SandboxId::parse(text), Err(why), "{text:?}");
    }
    // Multi-byte characters are counted as characters, never sliced.
    assert!(SandboxId::parse("sb-000000000000000000000000é").is_err());
    assert!(SandboxId::parse("sb-00000000000000000000000é").is_err());
    assert!(
        SandboxId::parse("sb-f5lxx1zz5pnorynqglhzmsp33").is_ok(),
        "2^128 - 1 itself is fine"
    );
}

#[test]
fn template_name_rule_accept_and_reject_table() {
    let max = "a".repeat(64);
    for ok in [
        "a",
        "A",
        "0",
        "a..b",
        "my-snap_1.2",
        "Z.-_",
        max.as_str(),
        "template-0a1b2c3d",
    ] {
        assert_eq!(
            TemplateName::parse(ok).unwrap().as_str(),
            ok,
            "{ok:?} should be accepted"
        );
    }
    let too_long = "a".repeat(65);
    let cases: &[(&str, NameError)] = &[
        ("", NameError::Empty),
        (".", NameError::BadStart),
        ("..", NameError::BadStart),
        (".x", NameError::BadStart),
        ("-x", NameError::BadStart),
        ("_x", NameError::BadStart),
        ("~x", NameError::BadStart),
        ("a/b", NameError::BadChar),
        ("a b", NameError::BadChar),
        ("a\0b", NameError::BadChar),
        ("naïve", NameError::BadChar),
        (too_long.as_str(), NameError::TooLong),
    ];
    for (bad, why) in cases {
        assert_eq!(TemplateName::parse(bad), Err(why.clone()), "{bad:?}");
    }
    // Case-sensitive: two distinct names.
    assert_ne!(
        TemplateName::parse("Snap").unwrap(),
        TemplateName::parse("snap").unwrap()
    );
    // Generated names follow the rule and the template-xxxxxxxx shape.
    for _ in 0..100 {
        let g = TemplateName::generate();
        let text = g.as_str();
        assert_eq!(text.len(), 17);
        assert!(text.starts_with("template-"));
        assert!(
            text[9..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(TemplateName::parse(text).unwrap(), g);
    }
}

#[test]
fn error_codes_and_statuses_are_stable() {
    let table = [
        (ErrorCode::InvalidRequest, "invalid_request", 400),
        (ErrorCode::Unauthorized, "unauthorized", 401),
        (ErrorCode::Forbidden, "forbidden", 403),
        (ErrorCode::NotFound, "not_found", 404),
        (ErrorCode::MethodNotAllowed, "method_not_allowed", 405),
        (ErrorCode::PayloadTooLarge, "payload_too_large", 413),
        (ErrorCode::AlreadyExists, "already_exists", 409),
        (ErrorCode::NameReserved, "name_reserved", 409),
        (ErrorCode::InvalidState, "invalid_state", 409),
        (ErrorCode::Conflict, "conflict", 409),
        (ErrorCode::DbError, "db_error", 500),
        (ErrorCode::AgentError, "agent_error", 502),
        (ErrorCode::HostUnavailable, "host_unavailable", 503),
    ];
    for (code, text, status) in table {
        assert_eq!(code.as_str(), text);
        assert_eq!(code.http_status(), status);
        let err = Error::new(code, "m");
        assert_eq!(
            (err.code(), err.http_status(), err.message()),
            (code, status, "m")
        );
    }
}

#[test]
fn timestamps_format_as_rfc3339_seconds() {
    assert_eq!(
        Timestamp::from_unix_millis(0).to_rfc3339(),
        "1970-01-01T00:00:00Z"
    );
    assert_eq!(
        Timestamp::from_unix_millis(1_795_874_272_999).to_rfc3339(),
        "2026-11-28T13:57:52Z"
    );
}

fn schema_of(db: &std::path::Path) -> (i64, Vec<String>) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let version = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    let mut stmt = conn
        .prepare("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name")
        .unwrap();
    let sql = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<Vec<String>, _>>()
        .unwrap();
    (version, sql)
}

async fn open_and_close(db: &std::path::Path) {
    let transport = std::sync::Arc::new(InProcessTransport::new());
    let mut options = ManagerOptions::default();
    options.run_janitor = false;
    let manager = Manager::open(db, transport, options).await.unwrap();
    manager.shutdown().await;
}

/// Opening `db` fails with `db_error`; its cause is the store's error.
async fn open_error(db: &std::path::Path) -> StoreError {
    let transport = std::sync::Arc::new(InProcessTransport::new());
    let err = Manager::open(db, transport, ManagerOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::DbError);
    std::error::Error::source(&err)
        .and_then(|s| s.downcast_ref::<StoreError>())
        .cloned()
        .unwrap_or_else(|| panic!("no store error under {err:?}"))
}

/// The migrations run once: a reopened store (twice) still holds what was
/// written through the first manager.
async fn reopening_a_store_keeps_what_it_holds(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::fresh(&backend, dir.path()).await;
    let transport = std::sync::Arc::new(InProcessTransport::new());
    let mut options = ManagerOptions::default();
    options.run_janitor = false;
    let host = HostId::new();
    for round in 0..3 {
        let manager = db.open(transport.clone(), options.clone()).await.unwrap();
        let registry = manager.registry();
        if round == 0 {
            registry
                .register_host(host, "a", HostStatus::Online)
                .await
                .unwrap();
        }
        let found = registry.host(host).await.unwrap();
        assert_eq!(
            found.map(|h| (h.address, h.status)),
            Some(("a".to_owned(), HostStatus::Online)),
            "open {round}"
        );
        assert_eq!(
            db.count("SELECT count(*) FROM hosts").await,
            1,
            "open {round}"
        );
        manager.shutdown().await;
    }
}

// SQLite-only: the store file itself (its schema and PRAGMAs, a newer
// user_version, a file that is not a database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_applies_the_schema_once_and_reopening_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nested/dir/s.db");
    open_and_close(&db).await;
    let first = schema_of(&db);
    assert_eq!(first.0, SCHEMA_VERSION);
    assert!(first.1.iter().any(|s| s.contains("CREATE TABLE templates")));
    assert!(
        first
            .1
            .iter()
            .any(|s| s.contains("templates_name_per_team"))
    );

    // Write a row, reopen, and find the same schema and the row.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "INSERT INTO hosts (id, address, status, created_at, updated_at)
         VALUES (randomblob(16), 'a', 'online', 0, 0)",
        [],
    )
    .unwrap();
    drop(conn);
    open_and_close(&db).await;
    assert_eq!(schema_of(&db), first);
    assert_eq!(common::count(&db, "SELECT count(*) FROM hosts"), 1);
    let mode: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused_and_the_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("future.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE t (x); PRAGMA user_version = 999;")
            .unwrap();
    }
    let before = std::fs::read(&db).unwrap();
    // A db_error whose cause is the store's explanation.
    let err = open_error(&db).await;
    assert_eq!(err.kind(), StoreErrorKind::NewerSchema);
    assert!(err.to_string().contains("999"), "{err}");
    assert_eq!(std::fs::read(&db).unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_database_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("notes.txt");
    let content = b"these are my notes, not a database\n".repeat(200);
    std::fs::write(&db, &content).unwrap();
    let err = open_error(&db).await;
    assert_eq!(err.kind(), StoreErrorKind::NotADatabase, "{err}");
    assert!(err.to_string().contains("not an SQLite database"));
    assert_eq!(std::fs::read(&db).unwrap(), content);
}

// SQLite-only: one manager per file is SQLite's rule (replicas share a PostgreSQL database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_manager_per_store_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let transport = std::sync::Arc::new(InProcessTransport::new());
    let first = Manager::open(&db, transport.clone(), ManagerOptions::default())
        .await
        .unwrap();
    let err = Manager::open(&db, transport.clone(), ManagerOptions::default())
        .await
        .unwrap_err();
    assert!(err.message().contains("in use"), "{err:?}");
    first.shutdown().await;
    drop(first);
    let again = Manager::open(&db, transport, ManagerOptions::default())
        .await
        .unwrap();
    // Before the directory goes with the test.
    again.shutdown().await;
}

/// `Manager::open_url` names its store by URL: `sqlite:PATH` or a plain
/// path open the same SQLite file; anything else is a clear 400, and
/// nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_url_names_its_store_or_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let transport = std::sync::Arc::new(InProcessTransport::new());
    let mut options = ManagerOptions::default();
    options.run_janitor = false;
    let path = dir.path().join("by-url.db");
    for url in [
        format!("sqlite:{}", path.display()),
        path.display().to_string(),
    ] {
        let manager = Manager::open_url(&url, transport.clone(), options.clone())
            .await
            .unwrap_or_else(|e| panic!("{url}: {e:?}"));
        manager.shutdown().await;
        drop(manager);
    }
    assert!(path.exists());
    for bad in ["", "sqlite:", "mysql://db/x", "  "] {
        let err = Manager::open_url(bad, transport.clone(), options.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest, "{bad:?}: {err:?}");
    }
    // The refused URLs created nothing: only the file (and, when its last
    // checkpoint met a reader, its WAL and shared-memory files) is there.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for n in &names {
        assert!(
            ["by-url.db", "by-url.db-wal", "by-url.db-shm"].contains(&n.as_str()),
            "{n} was created: {names:?}"
        );
    }
}
