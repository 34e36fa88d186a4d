//! Bad input (issue 4): id, name, key and enum parsing never panic on
//! arbitrary strings, and accept exactly what SPEC §2 and §3 allow.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::{Debug, Display};
use std::str::FromStr;

use proptest::prelude::*;
use sandbox_snapshots::agent::SnapshotKey;
use sandbox_snapshots::ids::ID_DIGITS;
use sandbox_snapshots::names::MAX_NAME_LEN;
use sandbox_snapshots::*;
use uuid::Uuid;

/// The text of `u128::MAX`: with a fixed width and the alphabet in ASCII
/// order, a 25-digit tail is in range exactly when it sorts at or below this.
const MAX_DIGITS: &str = "f5lxx1zz5pnorynqglhzmsp33";

/// Every prefix, plus near misses, so each parser also sees the others' ids.
const PREFIXES: &[&str] = &[
    "sb-", "host-", "team-", "tpl-", "key-", "log-", "", "SB-", "sb", "sb_", "tpl-sb-", " sb-",
    "Tpl-", "hostsb-",
];

/// Enum spellings and near misses.
const ENUM_LIKE: &[&str] = &[
    "base", "snapshot", "Base", "running", "paused ", "online", "ready", "deleting", "", "\0",
];

/// The operations the tests need from every id type.
trait Id: Copy + Eq + Debug + Display + FromStr<Err = IdError> {
    const PREFIX: &'static str;
    fn parse(input: &str) -> Result<Self, IdError>;
    fn from_uuid(uuid: Uuid) -> Self;
    fn as_uuid(&self) -> Uuid;
}

macro_rules! impl_id {
    ($($ty:ident),+) => {$(
        impl Id for $ty {
            const PREFIX: &'static str = $ty::PREFIX;
            fn parse(input: &str) -> Result<Self, IdError> {
                $ty::parse(input)
            }
            fn from_uuid(uuid: Uuid) -> Self {
                $ty::from_uuid(uuid)
            }
            fn as_uuid(&self) -> Uuid {
                $ty::as_uuid(self)
            }
        }
    )+};
}

impl_id!(SandboxId, HostId, TeamId, TemplateId, ApiKeyId, AuditLogId);

/// Calls `$check::<T>($arg)` for every id type.
macro_rules! for_every_id {
    ($check:ident($($arg:expr),*)) => {{
        $check::<SandboxId>($($arg),*)?;
        $check::<HostId>($($arg),*)?;
        $check::<TeamId>($($arg),*)?;
        $check::<TemplateId>($($arg),*)?;
        $check::<ApiKeyId>($($arg),*)?;
        $check::<AuditLogId>($($arg),*)?;
    }};
}

/// What SPEC §2 says `parse` returns, computed without the library's code:
/// the value comes from `u128::from_str_radix` once the tail is known to be
/// 25 lowercase base-36 digits.
/// Positions count characters, not bytes.
fn expected_id(input: &str, prefix: &'static str) -> Result<u128, IdError> {
    let Some(tail) = input.strip_prefix(prefix) else {
        return Err(IdError::WrongPrefix { expected: prefix });
    };
    let chars = tail.chars().count();
    if chars != ID_DIGITS {
        return Err(IdError::WrongLength { found: chars });
    }
    if let Some(position) = tail
        .chars()
        .position(|c| !(c.is_ascii_digit() || c.is_ascii_lowercase()))
    {
        return Err(IdError::InvalidChar { position });
    }
    match u128::from_str_radix(tail, 36) {
        Ok(value) => {
            assert!(tail <= MAX_DIGITS, "oracle disagrees with itself on {tail}");
            Ok(value)
        }
        Err(_) => {
            assert!(tail > MAX_DIGITS, "oracle disagrees with itself on {tail}");
            Err(IdError::Overflow)
        }
    }
}

/// Parsing `input` as `T` agrees with [`expected_id`], an accepted id
/// formats back to exactly `input`, and errors display without panicking.
fn check_id_parse<T: Id>(input: &str) -> Result<(), TestCaseError> {
    let parsed = T::parse(input);
    prop_assert_eq!(&input.parse::<T>(), &parsed, "FromStr and parse differ");
    match &parsed {
        Ok(id) => {
            prop_assert_eq!(id.to_string(), input, "one spelling per value");
            prop_assert_eq!(format!("{id:?}"), input);
        }
        Err(err) => {
            prop_assert!(!err.to_string().is_empty());
        }
    }
    match expected_id(input, T::PREFIX) {
        Ok(value) => prop_assert_eq!(parsed, Ok(T::from_uuid(Uuid::from_u128(value)))),
        Err(err) => prop_assert_eq!(parsed, Err(err)),
    }
    Ok(())
}

/// `value` formats as the prefix and 25 digits of `[0-9a-z]`, in the same
/// order as the numbers, and parses back to the same id.
fn check_id_format<T: Id>(value: u128, other: u128) -> Result<(), TestCaseError> {
    let id = T::from_uuid(Uuid::from_u128(value));
    let text = id.to_string();
    let digits = text.strip_prefix(T::PREFIX);
    prop_assert!(digits.is_some(), "{text} lacks prefix {}", T::PREFIX);
    let digits = digits.unwrap();
    prop_assert_eq!(digits.len(), ID_DIGITS, "{}", text);
    prop_assert!(
        digits
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()),
        "{text} has a character outside [0-9a-z]"
    );
    prop_assert_eq!(u128::from_str_radix(digits, 36), Ok(value));
    prop_assert_eq!(T::parse(&text), Ok(id));
    prop_assert_eq!(T::parse(&text).unwrap().as_uuid().as_u128(), value);
    prop_assert_eq!(format!("{id:?}"), text.clone());

    // Fixed width: text order is numeric order.
    let other_text = T::from_uuid(Uuid::from_u128(other)).to_string();
    prop_assert_eq!(text.cmp(&other_text), value.cmp(&other));

    // The uppercase spelling of the same value is refused.
    let upper = format!("{}{}", T::PREFIX, digits.to_ascii_uppercase());
    if upper != text {
        let position = digits.bytes().position(|b| b.is_ascii_lowercase()).unwrap();
        prop_assert_eq!(T::parse(&upper), Err(IdError::InvalidChar { position }));
    }
    Ok(())
}

/// The name rule `^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$`, written out by hand.
fn matches_name_rule(input: &str) -> bool {
    let mut chars = input.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    first.is_ascii_alphanumeric()
        && input.chars().count() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `TemplateName::parse` and `SnapshotKey::parse` accept exactly the
/// strings the rule accepts, keep them as given, and refuse the rest with a
/// sensible reason.
fn check_name(input: &str) -> Result<(), TestCaseError> {
    let matches = matches_name_rule(input);
    let name = TemplateName::parse(input);
    prop_assert_eq!(&input.parse::<TemplateName>(), &name);
    match &name {
        Ok(name) => {
            prop_assert!(matches, "accepted a name outside the rule: {input:?}");
            prop_assert_eq!(name.as_str(), input);
            prop_assert_eq!(name.to_string(), input);
            prop_assert_eq!(name.as_ref() as &str, input);
        }
        Err(err) => {
            prop_assert!(!matches, "refused a name inside the rule: {input:?}: {err}");
            let empty = input.is_empty();
            prop_assert_eq!(*err == NameError::Empty, empty, "{:?} for {:?}", err, input);
            if *err == NameError::TooLong {
                prop_assert!(input.chars().count() > MAX_NAME_LEN);
            }
            if input.chars().count() > MAX_NAME_LEN {
                prop_assert_eq!(err, &NameError::TooLong, "{:?}", input);
            }
            prop_assert!(!err.to_string().is_empty());
        }
    }

    let key = SnapshotKey::parse(input);
    prop_assert_eq!(
        key.is_ok(),
        matches,
        "key and name rules differ on {:?}",
        input
    );
    if let Ok(key) = key {
        prop_assert_eq!(key.as_str(), input);
        prop_assert_eq!(key.to_string(), input);
        prop_assert_eq!(key.template_id(), TemplateId::parse(input).ok());
    } else {
        prop_assert_eq!(key.err(), name.err());
    }
    Ok(())
}

/// `NewSnapshot::parse` accepts exactly a valid sandbox id with an empty or
/// valid name, and every refusal is a 400 `invalid_request` with the SPEC §3
/// message.
fn check_new_snapshot(sandbox_id: &str, name: &str) -> Result<(), TestCaseError> {
    let result = NewSnapshot::parse(sandbox_id, name);
    let id = SandboxId::parse(sandbox_id);
    let parsed_name = TemplateName::parse(name);
    match result {
        Ok(snapshot) => {
            prop_assert_eq!(Ok(snapshot.sandbox_id()), id);
            if name.is_empty() {
                let generated = snapshot.name().as_str();
                let suffix = generated.strip_prefix("template-");
                prop_assert!(suffix.is_some(), "generated name {generated:?}");
                let suffix = suffix.unwrap();
                prop_assert!(
                    suffix.len() == 8
                        && suffix
                            .bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                    "generated name {generated:?}"
                );
                prop_assert!(matches_name_rule(generated));
            } else {
                prop_assert_eq!(snapshot.name().as_str(), name);
            }
        }
        Err(err) => {
            prop_assert_eq!(err.code(), ErrorCode::InvalidRequest, "{}", err);
            prop_assert_eq!(err.code().as_str(), "invalid_request");
            prop_assert_eq!(err.http_status(), 400);
            prop_assert_eq!(err.code().http_status(), 400);
            if sandbox_id.is_empty() {
                prop_assert_eq!(err.message(), "sandbox_id is required");
            } else if id.is_err() {
                prop_assert_eq!(err.message(), "invalid sandbox_id");
            } else {
                prop_assert!(!name.is_empty(), "refused with an empty name: {err}");
                let reason = parsed_name.err();
                prop_assert!(reason.is_some(), "refused a valid name {name:?}: {err}");
                prop_assert_eq!(
                    err.message(),
                    format!("invalid snapshot name: {}", reason.unwrap())
                );
            }
        }
    }
    Ok(())
}

/// A `FromStr` enum accepts exactly its `as_str` spellings; refusals are
/// 400 `invalid_request`.
fn check_enum<T>(input: &str, all: &[T], as_str: fn(T) -> &'static str) -> Result<(), TestCaseError>
where
    T: Copy + PartialEq + Debug + Display + FromStr<Err = Error>,
{
    let expected = all.iter().copied().find(|v| as_str(*v) == input);
    match input.parse::<T>() {
        Ok(value) => {
            prop_assert_eq!(Some(value), expected);
            prop_assert_eq!(value.to_string(), input);
        }
        Err(err) => {
            prop_assert_eq!(expected, None, "refused {:?}", input);
            prop_assert_eq!(err.code(), ErrorCode::InvalidRequest);
            prop_assert_eq!(err.http_status(), 400);
            prop_assert!(!err.message().is_empty());
        }
    }
    Ok(())
}

fn check_enums(input: &str) -> Result<(), TestCaseError> {
    check_enum(input, TemplateType::ALL, TemplateType::as_str)?;
    check_enum(input, SandboxStatus::ALL, SandboxStatus::as_str)?;
    check_enum(input, HostStatus::ALL, HostStatus::as_str)?;
    check_enum(input, TemplateState::ALL, TemplateState::as_str)?;
    Ok(())
}

/// Runs every parser on `input` (ids, names, keys, enums, and `input` as
/// both the sandbox id and the name of a snapshot request).
fn check_everything(input: &str) -> Result<(), TestCaseError> {
    for_every_id!(check_id_parse(input));
    check_name(input)?;
    check_enums(input)?;
    check_new_snapshot(input, "")?;
    check_new_snapshot(input, input)?;
    check_new_snapshot("sb-0000000000000000000000001", input)?;
    Ok(())
}

fn prefix() -> impl Strategy<Value = &'static str> {
    prop::sample::select(PREFIXES)
}

/// `n` arbitrary unicode scalar values.
fn any_chars(n: impl Into<prop::collection::SizeRange>) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), n).prop_map(String::from_iter)
}

/// A prefix followed by 24 to 26 characters: arbitrary unicode, digits and
/// letters of both cases (overflow, uppercase, wrong length), or lowercase
/// base-36 digits around the top of the range.
fn id_like() -> impl Strategy<Value = String> {
    let tail = prop_oneof![
        any_chars(24..=26),
        "[0-9a-zA-Z]{24,26}",
        "[0-9a-z]{25}",
        "[0-9a-f][0-9a-z]{24}",
        "f5lxx1zz5pnorynqglhzmsp[0-9a-z]{2}",
        "[0-9a-z]{0,25}[^0-9a-z][0-9a-z]{0,25}",
    ];
    (prefix(), tail).prop_map(|(p, t)| format!("{p}{t}"))
}

/// Strings near the name rule's edges: its alphabet with some unicode
/// mixed in, lengths around 64.
fn name_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}",
        "[a-zA-Z0-9._-]{0,70}",
        "[a-zA-Z0-9][a-zA-Z0-9._-]{62,65}",
        "[a-zA-Z0-9._ /\\n-]{0,8}",
        "[a-zA-Z0-9._-]{0,10}\\PC[a-zA-Z0-9._-]{0,10}",
        "[a-zA-Z0-9é_.-]{60,66}",
        any_chars(0..=70),
    ]
}

/// Any string at all: unicode (control characters included), near-ids,
/// near-names, enum spellings.
fn any_input() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        ".*",
        id_like(),
        name_like(),
        prop::sample::select(ENUM_LIKE).prop_map(str::to_owned),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_parser_panics_on_arbitrary_unicode(input in any::<String>()) {
        check_everything(&input)?;
    }

    #[test]
    fn no_parser_panics_on_prefix_plus_25_arbitrary_chars(p in prefix(), tail in any_chars(25)) {
        check_everything(&format!("{p}{tail}"))?;
    }

    #[test]
    fn no_parser_panics_on_prefix_plus_24_to_26_alphanumerics(
        p in prefix(),
        tail in "[0-9a-zA-Z]{24,26}",
    ) {
        check_everything(&format!("{p}{tail}"))?;
    }

    #[test]
    fn ids_parse_exactly_the_spec_spelling(input in id_like()) {
        for_every_id!(check_id_parse(&input));
    }

    #[test]
    fn every_u128_formats_to_prefix_and_25_digits_and_round_trips(
        value in any::<u128>(),
        other in any::<u128>(),
    ) {
        for_every_id!(check_id_format(value, other));
    }

    #[test]
    fn small_and_large_u128_round_trip(
        value in prop_oneof![0u128..=100_000, (u128::MAX - 100_000)..=u128::MAX],
        other in any::<u128>(),
    ) {
        for_every_id!(check_id_format(value, other));
    }

    #[test]
    fn every_name_matching_the_rule_is_accepted(input in "[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}") {
        prop_assert!(matches_name_rule(&input));
        prop_assert!(TemplateName::parse(&input).is_ok(), "{:?}", input);
        check_name(&input)?;
    }

    #[test]
    fn names_are_accepted_exactly_by_the_rule(input in name_like()) {
        check_name(&input)?;
    }

    #[test]
    fn key_of_every_template_is_a_valid_key(value in any::<u128>()) {
        let id = TemplateId::from_uuid(Uuid::from_u128(value));
        let key = SnapshotKey::for_template(id);
        prop_assert_eq!(key.template_id(), Some(id));
        let parsed = SnapshotKey::parse(key.as_str());
        prop_assert!(parsed.is_ok(), "{:?}", key);
        prop_assert_eq!(parsed.unwrap().template_id(), Some(id));
    }

    #[test]
    fn new_snapshot_errors_are_invalid_request_400(
        sandbox_id in prop_oneof![
            any_input(),
            any::<u128>().prop_map(|v| SandboxId::from_uuid(Uuid::from_u128(v)).to_string()),
        ],
        name in prop_oneof![Just(String::new()), any_input()],
    ) {
        check_new_snapshot(&sandbox_id, &name)?;
    }

    #[test]
    fn enums_accept_only_their_spellings(input in any_input()) {
        check_enums(&input)?;
    }
}

#[test]
fn every_enum_value_round_trips() {
    for v in TemplateType::ALL {
        assert_eq!(v.as_str().parse::<TemplateType>().unwrap(), *v);
    }
    for v in SandboxStatus::ALL {
        assert_eq!(v.as_str().parse::<SandboxStatus>().unwrap(), *v);
    }
    for v in HostStatus::ALL {
        assert_eq!(v.as_str().parse::<HostStatus>().unwrap(), *v);
    }
    for v in TemplateState::ALL {
        assert_eq!(v.as_str().parse::<TemplateState>().unwrap(), *v);
    }
}

#[test]
fn id_boundaries() {
    let max = format!("sb-{MAX_DIGITS}");
    assert_eq!(
        SandboxId::parse(&max).unwrap().as_uuid().as_u128(),
        u128::MAX
    );
    assert_eq!(
        SandboxId::parse("sb-f5lxx1zz5pnorynqglhzmsp34"),
        Err(IdError::Overflow)
    );
    assert_eq!(
        SandboxId::parse("sb-zzzzzzzzzzzzzzzzzzzzzzzzz"),
        Err(IdError::Overflow)
    );
    assert_eq!(
        SandboxId::parse("sb-0000000000000000000000000").unwrap(),
        SandboxId::from_uuid(Uuid::nil())
    );
    // A tail whose UTF-8 is 25 bytes but fewer characters.
    assert_eq!(
        SandboxId::parse("sb-é00000000000000000000000"),
        Err(IdError::WrongLength { found: 24 })
    );
}

/// Found by `ids_parse_exactly_the_spec_spelling`: a tail of exactly 25
/// characters with a non-ASCII one was refused as `WrongLength { found: 25 }`
/// ("expected 25 … found 25"); it is an invalid character.
#[test]
fn non_ascii_tail_of_25_chars_is_an_invalid_char() {
    assert_eq!(
        SandboxId::parse("sb-é000000000000000000000000"),
        Err(IdError::InvalidChar { position: 0 })
    );
}
