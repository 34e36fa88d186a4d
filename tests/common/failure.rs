//! The ways a host-agent call can fail, for the fault matrices
//! (`tests/faults.rs` for creates and deletes, `tests/restore.rs` for
//! restores): each agent error code, unavailable (possibly delivered, or
//! provably not sent), a timeout (reported, or a call that really outlasts
//! the manager's timeout) and an undecodable answer, each answered before
//! doing anything or after doing the work.

use std::time::Duration;

use sandbox_snapshots::agent::Fault;
use sandbox_snapshots::*;

use super::CODES;

/// Put into every injected error message: it must never reach the caller.
pub const AGENT_TEXT: &str = "injected: /var/lib/agent/secret";

/// A call that outlasts every timeout of the fault tests (it is cancelled
/// at the timeout, so its length costs nothing).
pub const SLOW: Duration = Duration::from_secs(60);

/// One way an agent call can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The agent answers with this code.
    Code(AgentCode),
    /// The agent cannot be reached, or the connection failed mid-call.
    Unavailable,
    /// The request provably never reached the agent (refused, DNS, TLS).
    NotSent,
    /// The transport reports a timeout.
    Timeout,
    /// The call really outlasts the manager's timeout.
    Slow,
    /// The answer does not decode.
    Protocol,
}

/// Whether the agent fails before or after doing the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Before,
    After,
}

impl Failure {
    pub fn all() -> Vec<Failure> {
        let mut all: Vec<Failure> = CODES.iter().copied().map(Failure::Code).collect();
        all.extend([
            Failure::Unavailable,
            Failure::NotSent,
            Failure::Timeout,
            Failure::Slow,
            Failure::Protocol,
        ]);
        all
    }

    /// Every failure with every timing that exists (a real timeout has no
    /// "after", and a request that was never sent did no work), against
    /// each kind of agent.
    pub fn matrix() -> Vec<(super::Mode, Failure, When)> {
        let mut cases = Vec::new();
        for mode in super::Mode::ALL {
            for f in Self::all() {
                cases.push((mode, f, When::Before));
                if f != Failure::Slow && f != Failure::NotSent {
                    cases.push((mode, f, When::After));
                }
            }
        }
        cases
    }

    pub fn fault(self, when: When) -> Fault {
        let err = match self {
            Failure::Code(code) => AgentError::rejected(code, AGENT_TEXT),
            Failure::Unavailable => AgentError::unavailable(AGENT_TEXT),
            Failure::NotSent => AgentError::not_sent(AGENT_TEXT),
            Failure::Timeout => AgentError::Timeout,
            Failure::Protocol => AgentError::Protocol {
                message: AGENT_TEXT.into(),
            },
            Failure::Slow => {
                assert_eq!(when, When::Before, "a slow call has no 'after'");
                return Fault::Delay(SLOW);
            }
        };
        match when {
            When::Before => Fault::Fail(err),
            When::After => Fault::FailAfter(err),
        }
    }

    /// Whether the answer says the agent did nothing (the documented list
    /// of `AgentError::is_definite_rejection`).
    pub fn definite(self) -> bool {
        matches!(
            self,
            Failure::Code(
                AgentCode::InvalidArgument
                    | AgentCode::NotFound
                    | AgentCode::AlreadyExists
                    | AgentCode::PermissionDenied
                    | AgentCode::FailedPrecondition
                    | AgentCode::OutOfRange
                    | AgentCode::Unimplemented
                    | AgentCode::Unauthenticated
            )
        )
    }
}
