//! Fuzzes id parsing: arbitrary bytes as text for every id type, and the
//! first 16 bytes as a value for format → parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandbox_snapshots::ids::ID_DIGITS;
use sandbox_snapshots::{ApiKeyId, AuditLogId, HostId, IdError, SandboxId, TeamId, TemplateId};
use uuid::Uuid;

macro_rules! check_ids {
    ($text:expr, $value:expr, $($ty:ident),+) => {$(
        check_text::<$ty>($text, $ty::PREFIX, $ty::parse, |id| id.to_string());
        assert_eq!($text.parse::<$ty>(), $ty::parse($text));
        if let Some(value) = $value {
            let id = $ty::from_uuid(Uuid::from_u128(value));
            check_value(value, id, $ty::PREFIX, $ty::parse, |id| id.to_string(), |id| id.as_uuid());
        }
    )+};
}

/// An accepted id formats back to exactly its input (one spelling per
/// value); every error displays.
fn check_text<T: PartialEq + std::fmt::Debug>(
    text: &str,
    prefix: &str,
    parse: fn(&str) -> Result<T, IdError>,
    format: fn(&T) -> String,
) {
    match parse(text) {
        Ok(id) => {
            assert_eq!(format(&id), text, "accepted a second spelling");
            assert!(text.starts_with(prefix));
            assert_eq!(parse(&format(&id)).as_ref(), Ok(&id));
        }
        Err(err) => {
            let _ = err.to_string();
        }
    }
}

/// Every value formats as the prefix and 25 digits of `[0-9a-z]` and parses
/// back to itself.
fn check_value<T: PartialEq + std::fmt::Debug>(
    value: u128,
    id: T,
    prefix: &str,
    parse: fn(&str) -> Result<T, IdError>,
    format: fn(&T) -> String,
    as_uuid: fn(&T) -> Uuid,
) {
    let text = format(&id);
    let digits = text
        .strip_prefix(prefix)
        .expect("formatted id lacks its prefix");
    assert_eq!(digits.len(), ID_DIGITS);
    assert!(
        digits
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    );
    assert_eq!(u128::from_str_radix(digits, 36), Ok(value));
    let parsed = parse(&text).expect("formatted id does not parse");
    assert_eq!(as_uuid(&parsed).as_u128(), value);
    assert_eq!(parsed, id);
}

fn run(text: &str, value: Option<u128>) {
    check_ids!(
        text, value, SandboxId, HostId, TeamId, TemplateId, ApiKeyId, AuditLogId
    );
}

fuzz_target!(|data: &[u8]| {
    let value = data
        .get(..16)
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .map(u128::from_le_bytes);
    match std::str::from_utf8(data) {
        Ok(text) => run(text, value),
        Err(_) => run(&String::from_utf8_lossy(data), value),
    }
});
