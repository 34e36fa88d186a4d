//! Template names: `^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$`, case-sensitive.

use std::fmt;
use std::str::FromStr;

/// Longest accepted name, in characters (all accepted characters are ASCII).
pub const MAX_NAME_LEN: usize = 64;

/// Why a template name was refused. The `Display` text is what follows
/// `invalid snapshot name: ` in an error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("name must not be empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("name must be at most {MAX_NAME_LEN} characters")]
    TooLong,
    /// The first character is not a letter or a digit.
    #[error("name must start with a letter or a digit")]
    BadStart,
    /// A character outside `a-z A-Z 0-9 . _ -`.
    #[error("name may only contain letters, digits, '.', '_' and '-'")]
    BadChar,
}

/// A validated template name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TemplateName(String);

impl TemplateName {
    /// Validates `input` against the name rule.
    pub fn parse(input: &str) -> Result<Self, NameError> {
        let bytes = input.as_bytes();
        let first = *bytes.first().ok_or(NameError::Empty)?;
        if input.chars().count() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if !first.is_ascii_alphanumeric() {
            return Err(NameError::BadStart);
        }
        let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
        if !bytes.iter().all(allowed) {
            return Err(NameError::BadChar);
        }
        Ok(Self(input.to_owned()))
    }

    /// A fresh name for a snapshot created without one: `template-` and
    /// eight random lowercase hex characters.
    pub fn generate() -> Self {
        let random = uuid::Uuid::new_v4().simple().to_string();
        Self(format!("template-{}", &random[..8]))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Used for names read back from our own store, which were validated
    /// on the way in.
    pub(crate) fn from_trusted(name: String) -> Self {
        Self(name)
    }
}

impl fmt::Display for TemplateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for TemplateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl FromStr for TemplateName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::parse(s)
    }
}

impl AsRef<str> for TemplateName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for TemplateName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}
