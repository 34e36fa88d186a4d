//! Domain records: hosts, sandboxes, templates, callers.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;
use crate::ids::{ApiKeyId, HostId, SandboxId, TeamId, TemplateId};
use crate::names::TemplateName;
pub use crate::time::Timestamp;

macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The lowercase text form.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(Error::invalid_request(format!(
                        concat!("invalid ", $what, " {:?}: expected one of {}"),
                        s,
                        [$($text),+].join(", ")
                    ))),
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// Lifecycle of a sandbox as the control plane sees it.
    SandboxStatus, "sandbox status" {
        /// Accepted, not yet placed.
        Pending = "pending",
        /// Booting on its host.
        Starting = "starting",
        /// Running.
        Running = "running",
        /// Paused (the state a snapshot leaves it in).
        Paused = "paused",
        /// A snapshot operation owns the sandbox.
        Snapshotting = "snapshotting",
        /// Stopped.
        Stopped = "stopped",
        /// Its host no longer reports it.
        Missing = "missing",
        /// Failed.
        Error = "error",
    }
);

string_enum!(
    /// Health of a host as the embedding application reports it.
    HostStatus, "host status" {
        /// Registered, not yet seen alive.
        Pending = "pending",
        /// Serving.
        Online = "online",
        /// Missed heartbeats.
        Unreachable = "unreachable",
        /// Serving existing sandboxes, taking no new ones.
        Draining = "draining",
        /// Out of service.
        Offline = "offline",
    }
);

string_enum!(
    /// Kind of template. The `type` filter of a list accepts these values.
    TemplateType, "type filter" {
        /// A base image provided by the platform or a team.
        Base = "base",
        /// A snapshot of a sandbox.
        Snapshot = "snapshot",
    }
);

string_enum!(
    /// Lifecycle of a template row (SPEC §4a).
    TemplateState, "template state" {
        /// The host agent is writing its files; invisible.
        Creating = "creating",
        /// Visible and usable.
        Ready = "ready",
        /// Deleted; files are being removed from hosts; invisible.
        Deleting = "deleting",
    }
);

impl HostStatus {
    /// Whether new snapshots may be taken on a host in this status.
    pub fn accepts_snapshots(self) -> bool {
        matches!(self, HostStatus::Online | HostStatus::Draining)
    }
}

/// A registered host.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Host {
    /// Its id.
    pub id: HostId,
    /// Where its agent listens (`host:port`, a URL, or an in-process name);
    /// empty when not known yet.
    pub address: String,
    /// Its status.
    pub status: HostStatus,
    /// When it last reported in.
    pub last_heartbeat: Option<Timestamp>,
}

/// A registered sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Sandbox {
    /// Its id.
    pub id: SandboxId,
    /// The team that owns it.
    pub team: TeamId,
    /// The host it runs on, if placed.
    pub host: Option<HostId>,
    /// Its status.
    pub status: SandboxStatus,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// The template it was restored from, by name (restored sandboxes).
    pub template: Option<TemplateName>,
    /// The template it was restored from, by id (restored sandboxes).
    pub template_id: Option<TemplateId>,
    /// When it was registered.
    pub created_at: Timestamp,
}

impl Sandbox {
    /// A sandbox record for [`crate::Registry::register_sandbox`].
    pub fn new(
        id: SandboxId,
        team: TeamId,
        host: Option<HostId>,
        status: SandboxStatus,
        vcpus: u32,
        memory_mb: u32,
    ) -> Self {
        Self {
            id,
            team,
            host,
            status,
            vcpus,
            memory_mb,
            template: None,
            template_id: None,
            created_at: Timestamp::now(),
        }
    }
}

/// A template (a snapshot is a template of type [`TemplateType::Snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Template {
    /// Its id; also the key of its files on hosts.
    pub id: TemplateId,
    /// The owning team ([`TeamId::PLATFORM`] for platform templates).
    pub team: TeamId,
    /// Its name, unique within the team.
    pub name: TemplateName,
    /// Base or snapshot.
    pub template_type: TemplateType,
    /// Virtual CPUs (0 when unknown).
    pub vcpus: u32,
    /// Memory in MiB (0 when unknown).
    pub memory_mb: u32,
    /// Bytes allocated on disk by its files.
    pub size_bytes: u64,
    /// When it became visible.
    pub created_at: Timestamp,
    /// The sandbox it was taken from (snapshots only).
    pub source_sandbox: Option<SandboxId>,
    /// Its lifecycle state; templates shown by get and list are `ready`.
    pub state: TemplateState,
    /// How many hosts hold its files (`present` placements).
    pub hosts: u32,
    /// What produced it (snapshots: the host's VMM, snapshot format, CPU),
    /// `None` when unknown; restores check it against each host's.
    pub compat: Option<crate::agent::HostInfo>,
    /// When a sandbox was last restored from it.
    pub last_used_at: Option<Timestamp>,
    /// When retention deletes it (SPEC §8): its create's TTL (or its
    /// team's default TTL), counted from when the create began. `None`:
    /// never. Platform templates are never deleted by retention, whatever
    /// this says.
    pub expires_at: Option<Timestamp>,
}

impl Template {
    /// Whether it belongs to the platform team.
    pub fn is_platform(&self) -> bool {
        self.team.is_platform()
    }
}

/// Who performs an action, for scoping and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Actor {
    /// A signed-in user.
    User {
        /// The user's id in the embedding application.
        id: String,
        /// Display name.
        name: String,
    },
    /// An API key.
    ApiKey {
        /// The key's id.
        id: ApiKeyId,
        /// The key's label.
        name: String,
    },
    /// The library or the embedding application itself.
    System,
}

impl Actor {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Actor::User { .. } => "user",
            Actor::ApiKey { .. } => "api_key",
            Actor::System => "system",
        }
    }

    pub(crate) fn id_text(&self) -> Option<String> {
        match self {
            Actor::User { id, .. } => Some(id.clone()),
            Actor::ApiKey { id, .. } => Some(id.to_string()),
            Actor::System => None,
        }
    }

    pub(crate) fn name_text(&self) -> Option<&str> {
        match self {
            Actor::User { name, .. } | Actor::ApiKey { name, .. } => Some(name),
            Actor::System => None,
        }
    }
}

/// Who is asking: every operation is scoped to the caller's team.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    team: TeamId,
    actor: Actor,
    admin: bool,
}

impl Caller {
    /// A regular (non-admin) member of `team`.
    pub fn new(team: TeamId, actor: Actor) -> Self {
        Self {
            team,
            actor,
            admin: false,
        }
    }

    /// An administrator acting for `team`. Only admins may act for the
    /// platform team.
    pub fn admin(team: TeamId, actor: Actor) -> Self {
        Self {
            team,
            actor,
            admin: true,
        }
    }

    /// The library acting on its own behalf (recovery, sweeps).
    pub fn system(team: TeamId) -> Self {
        Self::admin(team, Actor::System)
    }

    /// The team the caller acts for.
    pub fn team(&self) -> TeamId {
        self.team
    }

    /// Who the caller is.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }

    /// Whether the caller is an administrator.
    pub fn is_admin(&self) -> bool {
        self.admin
    }
}

/// A team's quotas (SPEC §8); `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TeamLimits {
    /// Most templates of type snapshot that are being created or ready.
    pub max_snapshots: Option<u64>,
    /// Most bytes those may hold; a create starting at or over it is
    /// refused (the one that crosses it may overshoot: its size is known
    /// only afterwards).
    pub max_bytes: Option<u64>,
}

impl TeamLimits {
    /// Limits of at most `max_snapshots` snapshots and `max_bytes` bytes.
    pub fn new(max_snapshots: Option<u64>, max_bytes: Option<u64>) -> Self {
        Self {
            max_snapshots,
            max_bytes,
        }
    }
}

/// A team's usage against its quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Usage {
    /// Templates of type snapshot being created or ready.
    pub snapshots: u64,
    /// Bytes they hold.
    pub bytes: u64,
    /// The limits that apply.
    pub limits: TeamLimits,
}

/// A team's retention policy (SPEC §8); `None` is off. The background
/// worker deletes what it selects through the ordinary delete, audited as
/// the system. Platform templates are never selected.
///
/// ```
/// use std::time::Duration;
/// use sandbox_snapshots::RetentionPolicy;
///
/// let policy = RetentionPolicy::new()
///     .default_ttl(Duration::from_secs(7 * 24 * 3600))
///     .keep_last_per_sandbox(3);
/// assert_eq!(policy.delete_unused_after, None);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionPolicy {
    /// The TTL of a create that carries none (whole seconds).
    pub default_ttl: Option<std::time::Duration>,
    /// Snapshots not restored from for this long (counted from their
    /// creation when never restored) are deleted (whole seconds).
    pub delete_unused_after: Option<std::time::Duration>,
    /// Only the newest this many snapshots taken from one source sandbox
    /// are kept.
    pub keep_last_per_sandbox: Option<u32>,
}

impl RetentionPolicy {
    /// A policy with everything off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates without a TTL of their own get `ttl`.
    pub fn default_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.default_ttl = Some(ttl);
        self
    }

    /// Snapshots unused for `after` are deleted.
    pub fn delete_unused_after(mut self, after: std::time::Duration) -> Self {
        self.delete_unused_after = Some(after);
        self
    }

    /// Only the newest `n` snapshots of each source sandbox are kept.
    pub fn keep_last_per_sandbox(mut self, n: u32) -> Self {
        self.keep_last_per_sandbox = Some(n);
        self
    }

    /// Whether every part is off.
    pub fn is_off(&self) -> bool {
        *self == Self::default()
    }
}
