//! Fuzzes name, key, snapshot-request and enum parsing: arbitrary bytes as
//! text, checked against the name rule `^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandbox_snapshots::agent::SnapshotKey;
use sandbox_snapshots::{
    ErrorCode, HostStatus, NewSnapshot, SandboxId, SandboxStatus, TemplateId, TemplateName,
    TemplateState, TemplateType,
};

/// The name rule, written out by hand.
fn matches_name_rule(input: &str) -> bool {
    let mut chars = input.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    first.is_ascii_alphanumeric()
        && input.chars().count() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn check_new_snapshot(sandbox_id: &str, name: &str) {
    match NewSnapshot::parse(sandbox_id, name) {
        Ok(snapshot) => {
            assert_eq!(SandboxId::parse(sandbox_id), Ok(snapshot.sandbox_id()));
            if name.is_empty() {
                assert!(snapshot.name().as_str().starts_with("template-"));
            } else {
                assert_eq!(snapshot.name().as_str(), name);
            }
        }
        Err(err) => {
            assert_eq!(err.code(), ErrorCode::InvalidRequest, "{err}");
            assert_eq!(err.http_status(), 400);
            assert!(SandboxId::parse(sandbox_id).is_err() || !matches_name_rule(name));
        }
    }
}

macro_rules! check_enum {
    ($text:expr, $($ty:ident),+) => {$(
        match $text.parse::<$ty>() {
            Ok(value) => assert_eq!(value.as_str(), $text),
            Err(err) => {
                assert!($ty::ALL.iter().all(|v| v.as_str() != $text));
                assert_eq!(err.code(), ErrorCode::InvalidRequest);
                assert_eq!(err.http_status(), 400);
            }
        }
    )+};
}

fn run(text: &str) {
    let matches = matches_name_rule(text);
    match TemplateName::parse(text) {
        Ok(name) => {
            assert!(matches, "accepted a name outside the rule");
            assert_eq!(name.as_str(), text);
            assert_eq!(name.to_string(), text);
        }
        Err(err) => {
            assert!(!matches, "refused a name inside the rule: {err}");
        }
    }
    match SnapshotKey::parse(text) {
        Ok(key) => {
            assert!(matches, "accepted a key outside the rule");
            assert_eq!(key.as_str(), text);
            assert_eq!(key.template_id(), TemplateId::parse(text).ok());
        }
        Err(_) => assert!(!matches, "refused a key inside the rule"),
    }

    check_enum!(text, TemplateType, SandboxStatus, HostStatus, TemplateState);

    // The text as the sandbox id, as the name, and split at the first
    // newline into both.
    check_new_snapshot(text, "");
    check_new_snapshot(text, text);
    check_new_snapshot("sb-0000000000000000000000001", text);
    if let Some((sandbox_id, name)) = text.split_once('\n') {
        check_new_snapshot(sandbox_id, name);
    }
}

fuzz_target!(|data: &[u8]| {
    match std::str::from_utf8(data) {
        Ok(text) => run(text),
        Err(_) => run(&String::from_utf8_lossy(data)),
    }
});
