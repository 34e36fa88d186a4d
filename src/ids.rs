//! Prefixed identifiers: a UUID shown as a type prefix plus its value in
//! base 36, zero-padded to exactly [`ID_DIGITS`] characters.
//!
//! `sb-0000000000000000000000001` is the sandbox whose UUID is `…0001`.
//! Parsing accepts exactly one spelling per value: the right prefix, then 25
//! lowercase base-36 digits whose value fits in 128 bits.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// Number of base-36 digits after the prefix (36^25 > 2^128 > 36^24).
pub const ID_DIGITS: usize = 25;

const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Why an id string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The string does not start with the expected prefix.
    #[error("expected an id starting with {expected:?}")]
    WrongPrefix {
        /// The prefix this id type needs, e.g. `sb-`.
        expected: &'static str,
    },
    /// The part after the prefix is not exactly 25 characters long.
    #[error("expected {ID_DIGITS} base-36 digits after the prefix, found {found}")]
    WrongLength {
        /// Characters found after the prefix.
        found: usize,
    },
    /// A character outside `0-9a-z` (uppercase is refused too).
    #[error("invalid character at position {position}: ids use only 0-9 and a-z")]
    InvalidChar {
        /// Character offset of the bad character after the prefix.
        position: usize,
    },
    /// The value does not fit in 128 bits.
    #[error("id value is larger than 128 bits")]
    Overflow,
}

pub(crate) fn encode_base36(mut value: u128) -> [u8; ID_DIGITS] {
    let mut out = [b'0'; ID_DIGITS];
    for slot in out.iter_mut().rev() {
        // `value % 36` is below 36, so the index is in bounds.
        *slot = ALPHABET[(value % 36) as usize];
        value /= 36;
    }
    out
}

pub(crate) fn decode_id(input: &str, prefix: &'static str) -> Result<Uuid, IdError> {
    let digits = input
        .strip_prefix(prefix)
        .ok_or(IdError::WrongPrefix { expected: prefix })?;
    let len = digits.chars().count();
    if len != ID_DIGITS {
        return Err(IdError::WrongLength { found: len });
    }
    let mut value: u128 = 0;
    for (position, c) in digits.chars().enumerate() {
        let digit = match c {
            '0'..='9' => u32::from(c) - u32::from('0'),
            'a'..='z' => u32::from(c) - u32::from('a') + 10,
            _ => return Err(IdError::InvalidChar { position }),
        };
        value = value
            .checked_mul(36)
            .and_then(|v| v.checked_add(u128::from(digit)))
            .ok_or(IdError::Overflow)?;
    }
    Ok(Uuid::from_u128(value))
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// The text prefix of this id type.
            pub const PREFIX: &'static str = $prefix;

            /// A new random id.
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }

            /// Wraps an existing UUID.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The underlying UUID.
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }

            /// Parses the text form: the prefix, then exactly 25 lowercase
            /// base-36 digits whose value fits in 128 bits.
            pub fn parse(input: &str) -> Result<Self, IdError> {
                decode_id(input, $prefix).map(Self)
            }

            pub(crate) fn from_blob(bytes: &[u8]) -> Option<Self> {
                Uuid::from_slice(bytes).ok().map(Self)
            }

            pub(crate) fn as_blob(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let digits = encode_base36(self.0.as_u128());
                f.write_str($prefix)?;
                // The alphabet is ASCII, so this never fails.
                f.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

prefixed_id!(
    /// A sandbox (microVM) id, `sb-…`.
    SandboxId,
    "sb-"
);
prefixed_id!(
    /// A host id, `host-…`.
    HostId,
    "host-"
);
prefixed_id!(
    /// A team id, `team-…`. [`TeamId::PLATFORM`] owns platform templates.
    TeamId,
    "team-"
);
prefixed_id!(
    /// A template id, `tpl-…`. Also the key of the template's files on hosts.
    TemplateId,
    "tpl-"
);
prefixed_id!(
    /// An API key id, `key-…`.
    ApiKeyId,
    "key-"
);
prefixed_id!(
    /// An operation id, `op-…`: one multi-step operation in the journal
    /// (a create in flight, or one waiting to be resolved).
    OperationId,
    "op-"
);

prefixed_id!(
    /// A manager process (a control-plane replica), `inst-…`: the owner of
    /// the journal entries and claims it writes, alive while its heartbeat
    /// lease lasts.
    InstanceId,
    "inst-"
);

prefixed_id!(
    /// An audit log entry id, `log-…`.
    AuditLogId,
    "log-"
);

impl TeamId {
    /// The platform team (the all-zero UUID): owner of platform templates,
    /// which every team can see and whose names are reserved for everyone.
    pub const PLATFORM: TeamId = TeamId(Uuid::nil());

    /// Whether this is the platform team.
    pub fn is_platform(&self) -> bool {
        *self == Self::PLATFORM
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_value_encodes_to_25_digits_and_back() {
        let id = SandboxId::from_uuid(Uuid::from_u128(u128::MAX));
        let text = id.to_string();
        assert_eq!(text, "sb-f5lxx1zz5pnorynqglhzmsp33");
        assert_eq!(SandboxId::parse(&text), Ok(id));
    }

    #[test]
    fn one_past_max_overflows() {
        // u128::MAX + 1 in base 36.
        assert_eq!(
            SandboxId::parse("sb-f5lxx1zz5pnorynqglhzmsp34"),
            Err(IdError::Overflow)
        );
    }
}
