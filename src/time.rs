//! [`Timestamp`]: the one time type, below every other layer (the agent
//! protocol, the store and the domain all use it, and it uses none of them).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// A point in time with millisecond precision (Unix epoch based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Self(millis)
    }

    /// From milliseconds since the Unix epoch.
    pub const fn from_unix_millis(millis: i64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn unix_millis(self) -> i64 {
        self.0
    }

    /// RFC 3339 with second precision in UTC, e.g. `2026-11-28T13:57:52Z`
    /// (the format of Go's `time.RFC3339` that existing clients parse).
    pub fn to_rfc3339(self) -> String {
        let seconds = self.0.div_euclid(1000);
        let format =
            time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
        time::OffsetDateTime::from_unix_timestamp(seconds)
            .ok()
            .and_then(|t| t.format(&format).ok())
            .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}
