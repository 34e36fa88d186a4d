//! [`Store`] over PostgreSQL: each method is one transaction on a pooled
//! connection (reads: one statement or a few on one connection), running
//! the statements of the sibling modules.
//!
//! A write runs on a task of its own, so that it runs to the end even if
//! the caller's future is dropped (as SQLite's writer thread does): its
//! outcome is decided by the database, never by who still listens. A
//! transaction that lost a race ([`TxError::Retry`]: a serialization
//! failure, a deadlock, a name a concurrent transaction took first) is run
//! again from the start after a short backoff, at most `RETRIES` times.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;

use super::{PostgresStore, TxError, TxResult};
use super::{
    audit, keys, operations, placements, policies, registry, requests, restores, retention,
    templates,
};
use crate::agent::HostInfo;
use crate::audit::AuditEntry;
use crate::error::{Error, Result};
use crate::ids::{ApiKeyId, HostId, InstanceId, OperationId, SandboxId, TeamId, TemplateId};
use crate::model::{
    Actor, Host, HostStatus, RetentionPolicy, Sandbox, SandboxStatus, TeamLimits, Template,
    TemplateType, Timestamp, Usage,
};
use crate::names::TemplateName;
use crate::store::{
    Backlog, CreateInput, CreateOp, Deletion, DeletionResult, Destroy, Failure, Finish, HostChange,
    InHand, KeyRecord, ListPosition, OpenOperation, PendingDeletion, PendingDestroy, Phase,
    ResolveReason, RestoreCandidate, RestoreEnd, RestoreInput, RestoreOp, SandboxOutcome, Store,
    StoreError,
};

/// Runs of a transaction after the first one, when it keeps losing races.
const RETRIES: u32 = 5;

/// The wait before run `attempt` (1-based) of a transaction: 2, 4, 8, …
/// ms, plus up to as much again at random so that the racers part.
fn backoff(attempt: u32) -> Duration {
    let base = 1u64 << attempt.min(8);
    let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0]) % base;
    Duration::from_millis(base + jitter)
}

/// Runs `fut` on a task of its own: it runs to the end even if the
/// caller stops waiting.
async fn detached<T: Send + 'static>(
    fut: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(fut).await.unwrap_or_else(|e| {
        Err(StoreError::internal(format!("postgres: a store task failed: {e}")).into())
    })
}

/// How one run of a transaction ended.
fn settle<T>(result: TxResult<T>, attempt: u32) -> std::ops::ControlFlow<Result<T>> {
    use std::ops::ControlFlow::{Break, Continue};
    match result {
        Ok(value) => Break(Ok(value)),
        Err(TxError::Retry(err)) if attempt < RETRIES => {
            tracing::debug!(error = ?err, attempt, "postgres transaction lost a race; retrying");
            Continue(())
        }
        Err(err) => Break(Err(Error::from(err))),
    }
}

/// `transaction!(self, |tx| body)`: runs `body` (a future using `tx`, a
/// `&deadpool_postgres::Transaction`) in a transaction that commits when
/// it returns `Ok`, detached from the caller, retried on a lost race.
/// Everything `body` names is moved into the task, so it borrows what it
/// needs again on each run.
macro_rules! transaction {
    ($store:expr, |$tx:ident| $body:expr) => {{
        let store: PostgresStore = $store.clone();
        detached(async move {
            let mut attempt = 0u32;
            loop {
                let run: TxResult<_> = async {
                    let mut client = store.client().await?;
                    let transaction = client.transaction().await?;
                    let value = {
                        let $tx = &transaction;
                        $body.await?
                    };
                    transaction.commit().await?;
                    Ok(value)
                }
                .await;
                match settle(run, attempt) {
                    std::ops::ControlFlow::Break(result) => break result,
                    std::ops::ControlFlow::Continue(()) => {
                        attempt += 1;
                        tokio::time::sleep(backoff(attempt)).await;
                    }
                }
            }
        })
        .await
    }};
}

/// `read!(self, |db| body)`: runs `body` on a pooled connection, outside
/// any explicit transaction (each statement sees what was committed when
/// it began, as SQLite's read pool does).
macro_rules! read {
    ($store:expr, |$db:ident| $body:expr) => {{
        let client = $store.client().await?;
        let $db = &client;
        Ok($body.await?)
    }};
}

#[async_trait]
impl Store for PostgresStore {
    fn shared(&self) -> bool {
        true
    }

    async fn register_instance(
        &self,
        me: InstanceId,
        lease_until: Timestamp,
        now: Timestamp,
    ) -> Result<()> {
        transaction!(self, |tx| operations::register_instance(
            tx,
            me,
            lease_until,
            now
        ))
    }

    async fn heartbeat(&self, me: InstanceId, lease_until: Timestamp) -> Result<()> {
        transaction!(self, |tx| operations::heartbeat(tx, me, lease_until))
    }

    async fn adopt_operations(&self, me: InstanceId, now: Timestamp) -> Result<u64> {
        transaction!(self, |tx| operations::adopt_operations(tx, me, now))
    }

    async fn close(&self, me: InstanceId) -> Result<()> {
        transaction!(self, |tx| operations::close(tx, me))
    }

    async fn upsert_host(
        &self,
        id: HostId,
        address: String,
        status: HostStatus,
        now: Timestamp,
    ) -> Result<(Host, bool)> {
        transaction!(self, |tx| registry::upsert_host(
            tx, id, &address, status, now
        ))
    }

    async fn update_host(&self, id: HostId, change: HostChange, now: Timestamp) -> Result<bool> {
        transaction!(self, |tx| registry::update_host(tx, id, &change, now))
    }

    async fn get_host(&self, id: HostId) -> Result<Option<Host>> {
        read!(self, |db| registry::get_host(db, id))
    }

    async fn list_hosts(&self) -> Result<Vec<Host>> {
        read!(self, |db| registry::list_hosts(db))
    }

    async fn upsert_sandbox(&self, sandbox: Sandbox, now: Timestamp) -> Result<()> {
        transaction!(self, |tx| registry::upsert_sandbox(tx, &sandbox, now))
    }

    async fn get_sandbox(&self, id: SandboxId) -> Result<Option<Sandbox>> {
        read!(self, |db| registry::get_sandbox(db, id))
    }

    async fn set_sandbox_status(
        &self,
        id: SandboxId,
        expected: Option<SandboxStatus>,
        status: SandboxStatus,
        now: Timestamp,
    ) -> Result<Sandbox> {
        transaction!(self, |tx| registry::set_sandbox_status(
            tx, id, expected, status, now
        ))
    }

    async fn remove_sandbox(&self, id: SandboxId) -> Result<()> {
        transaction!(self, |tx| registry::remove_sandbox(tx, id))
    }

    async fn insert_ready_template(
        &self,
        template: Template,
        hosts: Vec<HostId>,
        now: Timestamp,
    ) -> Result<()> {
        transaction!(self, |tx| registry::insert_ready_template(
            tx, &template, &hosts, now
        ))
    }

    async fn find_visible(&self, team: TeamId, name: TemplateName) -> Result<Option<Template>> {
        read!(self, |db| templates::find_visible(
            db,
            team,
            &name,
            templates::Lock::None
        ))
    }

    async fn list_visible(
        &self,
        team: TeamId,
        kind: Option<TemplateType>,
        after: Option<ListPosition>,
        limit: Option<u32>,
    ) -> Result<Vec<Template>> {
        read!(self, |db| templates::list_visible(
            db, team, kind, after, limit
        ))
    }

    async fn placements_of(&self, template: TemplateId) -> Result<Vec<(HostId, String)>> {
        read!(self, |db| templates::placements_of(db, template))
    }

    async fn get_ready_template(&self, id: TemplateId) -> Result<Option<Template>> {
        read!(self, |db| templates::get_ready_template(db, id))
    }

    async fn begin_create(
        &self,
        input: CreateInput,
        now: Timestamp,
    ) -> Result<(CreateOp, Sandbox)> {
        transaction!(self, |tx| operations::begin_create(tx, &input, now))
    }

    async fn finish_create(
        &self,
        op: CreateOp,
        size_bytes: u64,
        compat: Option<HostInfo>,
        lease_until: Timestamp,
        now: Timestamp,
    ) -> Result<Finish> {
        transaction!(self, |tx| operations::finish_create(
            tx,
            &op,
            size_bytes,
            compat.as_ref(),
            lease_until,
            now
        ))
    }

    async fn fail_create(
        &self,
        op: CreateOp,
        outcome: SandboxOutcome,
        failure: Failure,
        first_attempt: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<bool> {
        transaction!(self, |tx| operations::fail_create(
            tx,
            &op,
            outcome,
            &failure,
            first_attempt,
            now
        ))
    }

    async fn resolve_operation(
        &self,
        op: CreateOp,
        status: SandboxStatus,
        now: Timestamp,
    ) -> Result<bool> {
        transaction!(self, |tx| operations::resolve_operation(
            tx, &op, status, now
        ))
    }

    async fn resolve_open_operation(
        &self,
        id: OperationId,
        status: SandboxStatus,
        actor: Actor,
        reason: ResolveReason,
        first_attempt: Timestamp,
        now: Timestamp,
    ) -> Result<Option<CreateOp>> {
        transaction!(self, |tx| operations::resolve_open_operation(
            tx,
            id,
            status,
            &actor,
            reason,
            first_attempt,
            now
        ))
    }

    async fn postpone_operation(
        &self,
        template: TemplateId,
        error: String,
        next_attempt: Timestamp,
        now: Timestamp,
    ) -> Result<()> {
        transaction!(self, |tx| operations::postpone_operation(
            tx,
            template,
            &error,
            next_attempt,
            now
        ))
    }

    async fn open_operations(
        &self,
        me: InstanceId,
        phase: Phase,
        due_before: Option<Timestamp>,
    ) -> Result<Vec<CreateOp>> {
        read!(self, |db| operations::open_operations(
            db,
            me,
            phase.as_str(),
            due_before
        ))
    }

    async fn list_open_operations(&self) -> Result<Vec<OpenOperation>> {
        read!(self, |db| operations::list_open_operations(db))
    }

    async fn begin_delete(
        &self,
        actor: Actor,
        team: TeamId,
        admin: bool,
        name: TemplateName,
        lease_until: Timestamp,
        now: Timestamp,
    ) -> Result<(Template, Vec<Deletion>)> {
        transaction!(self, |tx| placements::begin_delete(
            tx,
            &actor,
            team,
            admin,
            &name,
            lease_until,
            now
        ))
    }

    async fn record_deletions(
        &self,
        mut answers: Vec<(Deletion, DeletionResult)>,
        now: Timestamp,
    ) -> Result<()> {
        if answers.is_empty() {
            return Ok(());
        }
        // A confirmation locks its template row: in one order, so that two
        // batches sharing templates cannot deadlock.
        answers.sort_by_key(|(d, _)| (d.template_id, d.host.id));
        transaction!(self, |tx| async {
            for (deletion, result) in &answers {
                match result {
                    DeletionResult::Confirmed => {
                        placements::deletion_confirmed(tx, deletion).await?
                    }
                    DeletionResult::Failed { error, retry_at } => {
                        placements::deletion_failed(tx, deletion, error, *retry_at, now).await?;
                    }
                }
            }
            TxResult::Ok(())
        })
    }

    async fn claim_due_deletions(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
        skip_hosts: Vec<HostId>,
    ) -> Result<Vec<Deletion>> {
        transaction!(self, |tx| placements::claim_due_deletions(
            tx,
            now,
            lease_until,
            limit,
            &skip_hosts,
            None
        ))
    }

    async fn claim_host_deletions(
        &self,
        host: HostId,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> Result<Vec<Deletion>> {
        let limit = limit.min(crate::store::DELETIONS_PER_HOST);
        transaction!(self, |tx| placements::claim_due_deletions(
            tx,
            now,
            lease_until,
            limit,
            &[],
            Some(host)
        ))
    }

    async fn pending_deletions(&self) -> Result<Vec<PendingDeletion>> {
        read!(self, |db| placements::pending_deletions(db))
    }

    async fn key_is_owned(&self, template: TemplateId) -> Result<bool> {
        read!(self, |db| placements::key_is_owned(db, template))
    }

    async fn queue_orphan(
        &self,
        template: TemplateId,
        host: HostId,
        size_bytes: u64,
        now: Timestamp,
    ) -> Result<bool> {
        transaction!(self, |tx| placements::queue_orphan(
            tx, template, host, size_bytes, now
        ))
    }

    async fn restore_candidates(&self, template: TemplateId) -> Result<Vec<RestoreCandidate>> {
        read!(self, |db| restores::restore_candidates(db, template))
    }

    async fn set_host_info(
        &self,
        host: HostId,
        info: Option<HostInfo>,
        now: Timestamp,
    ) -> Result<()> {
        transaction!(self, |tx| restores::set_host_info(
            tx,
            host,
            info.as_ref(),
            now
        ))
    }

    async fn begin_restore(&self, input: RestoreInput, now: Timestamp) -> Result<Sandbox> {
        transaction!(self, |tx| restores::begin_restore(tx, &input, now))
    }

    async fn end_restore(
        &self,
        op: RestoreOp,
        end: RestoreEnd,
        now: Timestamp,
    ) -> Result<Option<Sandbox>> {
        transaction!(self, |tx| restores::end_restore(tx, &op, &end, now))
    }

    async fn requeue_destroy(
        &self,
        op: RestoreOp,
        from: Timestamp,
        now: Timestamp,
    ) -> Result<bool> {
        transaction!(self, |tx| restores::requeue_destroy(tx, &op, from, now))
    }

    async fn postpone_restore(
        &self,
        id: OperationId,
        error: String,
        next_attempt: Timestamp,
        now: Timestamp,
    ) -> Result<()> {
        transaction!(self, |tx| restores::postpone_restore(
            tx,
            id,
            &error,
            next_attempt,
            now
        ))
    }

    async fn open_restores(
        &self,
        me: InstanceId,
        due_before: Option<Timestamp>,
    ) -> Result<Vec<RestoreOp>> {
        read!(self, |db| restores::open_restores(db, me, due_before))
    }

    async fn claim_due_destroys(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
        skip_hosts: Vec<HostId>,
    ) -> Result<Vec<Destroy>> {
        transaction!(self, |tx| restores::claim_due_destroys(
            tx,
            now,
            lease_until,
            limit,
            &skip_hosts
        ))
    }

    async fn record_destroy(
        &self,
        destroy: Destroy,
        result: DeletionResult,
        now: Timestamp,
    ) -> Result<()> {
        transaction!(self, |tx| restores::record_destroy(
            tx, &destroy, &result, now
        ))
    }

    async fn pending_destroys(&self) -> Result<Vec<PendingDestroy>> {
        read!(self, |db| restores::pending_destroys(db))
    }

    async fn set_team_limits(
        &self,
        team: TeamId,
        limits: TeamLimits,
        now: Timestamp,
    ) -> Result<()> {
        transaction!(self, |tx| policies::set_team_limits(tx, team, &limits, now))
    }

    async fn team_usage(&self, team: TeamId) -> Result<Usage> {
        read!(self, |db| policies::team_usage(db, team, false))
    }

    async fn find_request(
        &self,
        team: TeamId,
        key: crate::operation::IdempotencyKey,
        now: Timestamp,
    ) -> Result<Option<crate::operation::StoredRequest>> {
        read!(self, |db| requests::find_request(
            db,
            team,
            key.as_str(),
            now
        ))
    }

    async fn get_request(
        &self,
        team: TeamId,
        id: OperationId,
        now: Timestamp,
    ) -> Result<Option<crate::operation::StoredRequest>> {
        read!(self, |db| requests::get_request(db, team, id, now))
    }

    async fn purge_requests(&self, now: Timestamp, limit: u32) -> Result<u64> {
        transaction!(self, |tx| requests::purge_requests(tx, now, limit))
    }

    async fn set_team_retention(
        &self,
        team: TeamId,
        policy: RetentionPolicy,
        now: Timestamp,
    ) -> Result<()> {
        transaction!(self, |tx| retention::set_team_retention(
            tx, team, &policy, now
        ))
    }

    async fn team_retention(&self, team: TeamId) -> Result<RetentionPolicy> {
        read!(self, |db| retention::team_retention(db, team))
    }

    async fn sweep_retention(&self, now: Timestamp, limit: u32) -> Result<u32> {
        transaction!(self, |tx| retention::sweep_retention(tx, now, limit))
    }

    async fn next_due(&self, me: InstanceId, in_hand: InHand) -> Result<Option<Timestamp>> {
        read!(self, |db| operations::next_due(db, me, &in_hand))
    }

    async fn backlogs(&self) -> Result<(Backlog, Backlog)> {
        read!(self, |db| operations::backlogs(db))
    }

    async fn list_audit(
        &self,
        team: TeamId,
        before: Option<i64>,
        resource_type: Option<String>,
        action: Option<String>,
        limit: Option<u32>,
    ) -> Result<Vec<(i64, AuditEntry)>> {
        read!(self, |db| audit::list_audit(
            db,
            team,
            before,
            resource_type.as_deref(),
            action.as_deref(),
            limit
        ))
    }

    async fn create_team(&self, id: TeamId, name: String, now: Timestamp) -> Result<()> {
        transaction!(self, |tx| keys::create_team(tx, id, &name, now))
    }

    async fn create_key(&self, key: KeyRecord, now: Timestamp) -> Result<()> {
        transaction!(self, |tx| keys::create_key(tx, &key, now))
    }

    async fn revoke_key(&self, id: ApiKeyId, now: Timestamp) -> Result<bool> {
        transaction!(self, |tx| keys::revoke_key(tx, id, now))
    }

    async fn find_key(&self, id: ApiKeyId) -> Result<Option<KeyRecord>> {
        read!(self, |db| keys::find_key(db, id))
    }
}
