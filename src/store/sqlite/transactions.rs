//! [`Store`] over SQLite: each method is one job on the writer thread (a
//! write, group-committed) or one read on the pool, running the statements
//! of `sql.rs`. One process uses a file at a time (the lock), so instance
//! leases and adoption are trivial here: whatever is open belongs to us.

use async_trait::async_trait;

use super::{SqliteStore, sql};
use crate::agent::HostInfo;
use crate::audit::AuditEntry;
use crate::error::Result;
use crate::ids::{ApiKeyId, HostId, InstanceId, OperationId, SandboxId, TeamId, TemplateId};
use crate::model::{
    Actor, Host, HostStatus, RetentionPolicy, Sandbox, SandboxStatus, TeamLimits, Template,
    TemplateType, Timestamp, Usage,
};
use crate::names::TemplateName;
use crate::store::{
    Backlog, CreateInput, CreateOp, DELETIONS_PER_HOST, Deletion, DeletionResult, Destroy, Failure,
    Finish, HostChange, InHand, KeyRecord, ListPosition, OpenOperation, PendingDeletion,
    PendingDestroy, Phase, ResolveReason, RestoreCandidate, RestoreEnd, RestoreInput, RestoreOp,
    SandboxOutcome, Store,
};

#[async_trait]
impl Store for SqliteStore {
    async fn register_instance(
        &self,
        _me: InstanceId,
        _lease: Timestamp,
        _now: Timestamp,
    ) -> Result<()> {
        // The file lock proves no other manager runs: nothing an earlier
        // process claimed is in flight any more.
        self.write(sql::void_leases).await
    }

    async fn heartbeat(&self, _me: InstanceId, _lease_until: Timestamp) -> Result<()> {
        Ok(())
    }

    async fn adopt_operations(&self, _me: InstanceId, _now: Timestamp) -> Result<u64> {
        Ok(0)
    }

    async fn close(&self, _me: InstanceId) -> Result<()> {
        // Leave the file whole on its own, whatever name opens it next.
        Ok(self.checkpoint().await?)
    }

    async fn upsert_host(
        &self,
        id: HostId,
        address: String,
        status: HostStatus,
        now: Timestamp,
    ) -> Result<(Host, bool)> {
        self.write(move |c| sql::upsert_host(c, id, &address, status, now))
            .await
    }

    async fn update_host(&self, id: HostId, change: HostChange, now: Timestamp) -> Result<bool> {
        self.write(move |c| sql::update_host(c, id, &change, now))
            .await
    }

    async fn get_host(&self, id: HostId) -> Result<Option<Host>> {
        self.read(move |c| sql::get_host(c, id)).await
    }

    async fn list_hosts(&self) -> Result<Vec<Host>> {
        self.read(sql::list_hosts).await
    }

    async fn upsert_sandbox(&self, sandbox: Sandbox, now: Timestamp) -> Result<()> {
        self.write(move |c| sql::upsert_sandbox(c, &sandbox, now))
            .await
    }

    async fn get_sandbox(&self, id: SandboxId) -> Result<Option<Sandbox>> {
        self.read(move |c| sql::get_sandbox(c, id)).await
    }

    async fn set_sandbox_status(
        &self,
        id: SandboxId,
        expected: Option<SandboxStatus>,
        status: SandboxStatus,
        now: Timestamp,
    ) -> Result<Sandbox> {
        self.write(move |c| sql::set_sandbox_status(c, id, expected, status, now))
            .await
    }

    async fn remove_sandbox(&self, id: SandboxId) -> Result<()> {
        self.write(move |c| sql::remove_sandbox(c, id)).await
    }

    async fn insert_ready_template(
        &self,
        template: Template,
        hosts: Vec<HostId>,
        now: Timestamp,
    ) -> Result<()> {
        self.write(move |c| sql::insert_ready_template(c, &template, &hosts, now))
            .await
    }

    async fn find_visible(&self, team: TeamId, name: TemplateName) -> Result<Option<Template>> {
        self.read(move |c| sql::find_visible(c, team, &name)).await
    }

    async fn list_visible(
        &self,
        team: TeamId,
        kind: Option<TemplateType>,
        after: Option<ListPosition>,
        limit: Option<u32>,
    ) -> Result<Vec<Template>> {
        self.read(move |c| sql::list_visible(c, team, kind, after, limit))
            .await
    }

    async fn placements_of(&self, template: TemplateId) -> Result<Vec<(HostId, String)>> {
        self.read(move |c| sql::placements_of(c, template)).await
    }

    async fn get_ready_template(&self, id: TemplateId) -> Result<Option<Template>> {
        self.read(move |c| sql::get_ready_template(c, id)).await
    }

    async fn begin_create(
        &self,
        input: CreateInput,
        now: Timestamp,
    ) -> Result<(CreateOp, Sandbox)> {
        self.write(move |c| sql::begin_create(c, &input, now)).await
    }

    async fn finish_create(
        &self,
        op: CreateOp,
        size_bytes: u64,
        compat: Option<HostInfo>,
        lease_until: Timestamp,
        now: Timestamp,
    ) -> Result<Finish> {
        self.write(move |c| {
            sql::finish_create(c, &op, size_bytes, compat.as_ref(), lease_until, now)
        })
        .await
    }

    async fn fail_create(
        &self,
        op: CreateOp,
        outcome: SandboxOutcome,
        failure: Failure,
        first_attempt: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<bool> {
        self.write(move |c| sql::fail_create(c, &op, outcome, &failure, first_attempt, now))
            .await
    }

    async fn resolve_operation(
        &self,
        op: CreateOp,
        status: SandboxStatus,
        now: Timestamp,
    ) -> Result<bool> {
        self.write(move |c| sql::resolve_operation(c, &op, status, now))
            .await
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
        self.write(move |c| {
            sql::resolve_open_operation(c, id, status, &actor, reason, first_attempt, now)
        })
        .await
    }

    async fn postpone_operation(
        &self,
        template: TemplateId,
        error: String,
        next_attempt: Timestamp,
        now: Timestamp,
    ) -> Result<()> {
        self.write(move |c| sql::postpone_operation(c, template, &error, next_attempt, now))
            .await
    }

    async fn open_operations(
        &self,
        _me: InstanceId,
        phase: Phase,
        due_before: Option<Timestamp>,
    ) -> Result<Vec<CreateOp>> {
        self.read(move |c| sql::open_operations(c, phase.as_str(), due_before))
            .await
    }

    async fn list_open_operations(&self) -> Result<Vec<OpenOperation>> {
        self.read(sql::list_open_operations).await
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
        self.write(move |c| sql::begin_delete(c, &actor, team, admin, &name, lease_until, now))
            .await
    }

    async fn record_deletions(
        &self,
        answers: Vec<(Deletion, DeletionResult)>,
        now: Timestamp,
    ) -> Result<()> {
        if answers.is_empty() {
            return Ok(());
        }
        // A confirmed deletion need not wait for fsync: if a power cut
        // loses this commit, the placement is still `deleting` with a
        // lease that the next process voids; the deletion is retried,
        // the host answers NotFound (the files are gone), which counts
        // as confirmed, and this record is written again. Losing it
        // only repeats a harmless delete. (Its audit entry was written
        // by `begin_delete`, at full durability.) A failure schedules a
        // retry and counts an attempt: one makes the whole record wait
        // for the configured durability, like every other record.
        let relaxed = answers
            .iter()
            .all(|(_, result)| matches!(result, DeletionResult::Confirmed));
        let job = move |c: &rusqlite::Connection| {
            for (deletion, result) in &answers {
                match result {
                    DeletionResult::Confirmed => sql::deletion_confirmed(c, deletion)?,
                    DeletionResult::Failed { error, retry_at } => {
                        sql::deletion_failed(c, deletion, error, *retry_at, now)?;
                    }
                }
            }
            Ok(())
        };
        if relaxed {
            self.write_relaxed(job).await
        } else {
            self.write(job).await
        }
    }

    async fn claim_due_deletions(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
        skip_hosts: Vec<HostId>,
    ) -> Result<Vec<Deletion>> {
        // A claim only leases rows: a lease lost to a power cut is one the
        // next process voids at open anyway, so it need not wait for fsync.
        self.write_relaxed(move |c| {
            sql::claim_due_deletions(c, now, lease_until, limit, &skip_hosts, None)
        })
        .await
    }

    async fn claim_host_deletions(
        &self,
        host: HostId,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> Result<Vec<Deletion>> {
        let limit = limit.min(DELETIONS_PER_HOST);
        // Relaxed, as the claim above.
        self.write_relaxed(move |c| {
            sql::claim_due_deletions(c, now, lease_until, limit, &[], Some(host))
        })
        .await
    }

    async fn pending_deletions(&self) -> Result<Vec<PendingDeletion>> {
        self.read(sql::pending_deletions).await
    }

    async fn key_is_owned(&self, template: TemplateId) -> Result<bool> {
        self.read(move |c| sql::key_is_owned(c, template)).await
    }

    async fn queue_orphan(
        &self,
        template: TemplateId,
        host: HostId,
        size_bytes: u64,
        now: Timestamp,
    ) -> Result<bool> {
        self.write(move |c| sql::queue_orphan(c, template, host, size_bytes, now))
            .await
    }

    async fn restore_candidates(&self, template: TemplateId) -> Result<Vec<RestoreCandidate>> {
        self.read(move |c| sql::restore_candidates(c, template))
            .await
    }

    async fn set_host_info(
        &self,
        host: HostId,
        info: Option<HostInfo>,
        now: Timestamp,
    ) -> Result<()> {
        self.write(move |c| sql::set_host_info(c, host, info.as_ref(), now))
            .await
    }

    async fn begin_restore(&self, input: RestoreInput, now: Timestamp) -> Result<Sandbox> {
        self.write(move |c| sql::begin_restore(c, &input, now))
            .await
    }

    async fn end_restore(
        &self,
        op: RestoreOp,
        end: RestoreEnd,
        now: Timestamp,
    ) -> Result<Option<Sandbox>> {
        self.write(move |c| sql::end_restore(c, &op, &end, now))
            .await
    }

    async fn requeue_destroy(
        &self,
        op: RestoreOp,
        from: Timestamp,
        now: Timestamp,
    ) -> Result<bool> {
        self.write(move |c| sql::requeue_destroy(c, &op, from, now))
            .await
    }

    async fn postpone_restore(
        &self,
        id: OperationId,
        error: String,
        next_attempt: Timestamp,
        now: Timestamp,
    ) -> Result<()> {
        self.write(move |c| sql::postpone_restore(c, id, &error, next_attempt, now))
            .await
    }

    async fn open_restores(
        &self,
        _me: InstanceId,
        due_before: Option<Timestamp>,
    ) -> Result<Vec<RestoreOp>> {
        self.read(move |c| sql::open_restores(c, due_before)).await
    }

    async fn claim_due_destroys(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
        skip_hosts: Vec<HostId>,
    ) -> Result<Vec<Destroy>> {
        self.write(move |c| sql::claim_due_destroys(c, now, lease_until, limit, &skip_hosts))
            .await
    }

    async fn record_destroy(
        &self,
        destroy: Destroy,
        result: DeletionResult,
        now: Timestamp,
    ) -> Result<()> {
        self.write(move |c| sql::record_destroy(c, &destroy, &result, now))
            .await
    }

    async fn pending_destroys(&self) -> Result<Vec<PendingDestroy>> {
        self.read(sql::pending_destroys).await
    }

    async fn set_team_limits(
        &self,
        team: TeamId,
        limits: TeamLimits,
        now: Timestamp,
    ) -> Result<()> {
        self.write(move |c| sql::set_team_limits(c, team, &limits, now))
            .await
    }

    async fn team_usage(&self, team: TeamId) -> Result<Usage> {
        self.read(move |c| sql::team_usage(c, team)).await
    }

    async fn find_request(
        &self,
        team: TeamId,
        key: crate::operation::IdempotencyKey,
        now: Timestamp,
    ) -> Result<Option<crate::operation::StoredRequest>> {
        self.read(move |c| sql::find_request(c, team, key.as_str(), now))
            .await
    }

    async fn get_request(
        &self,
        team: TeamId,
        id: OperationId,
        now: Timestamp,
    ) -> Result<Option<crate::operation::StoredRequest>> {
        self.read(move |c| sql::get_request(c, team, id, now)).await
    }

    async fn purge_requests(&self, now: Timestamp, limit: u32) -> Result<u64> {
        self.write(move |c| sql::purge_requests(c, now, limit))
            .await
    }

    async fn set_team_retention(
        &self,
        team: TeamId,
        policy: RetentionPolicy,
        now: Timestamp,
    ) -> Result<()> {
        self.write(move |c| sql::set_team_retention(c, team, &policy, now))
            .await
    }

    async fn team_retention(&self, team: TeamId) -> Result<RetentionPolicy> {
        self.read(move |c| sql::team_retention(c, team)).await
    }

    async fn sweep_retention(&self, now: Timestamp, limit: u32) -> Result<u32> {
        self.write(move |c| sql::sweep_retention(c, now, limit))
            .await
    }

    async fn next_due(&self, _me: InstanceId, in_hand: InHand) -> Result<Option<Timestamp>> {
        self.read(move |c| sql::next_due(c, &in_hand)).await
    }

    async fn backlogs(&self) -> Result<(Backlog, Backlog)> {
        self.read(sql::backlogs).await
    }

    async fn list_audit(
        &self,
        team: TeamId,
        before: Option<i64>,
        resource_type: Option<String>,
        action: Option<String>,
        limit: Option<u32>,
    ) -> Result<Vec<(i64, AuditEntry)>> {
        self.read(move |c| {
            sql::list_audit(
                c,
                team,
                before,
                resource_type.as_deref(),
                action.as_deref(),
                limit,
            )
        })
        .await
    }

    async fn create_team(&self, id: TeamId, name: String, now: Timestamp) -> Result<()> {
        self.write(move |c| sql::create_team(c, id, &name, now))
            .await
    }

    async fn create_key(&self, key: KeyRecord, now: Timestamp) -> Result<()> {
        self.write(move |c| sql::create_key(c, &key, now)).await
    }

    async fn revoke_key(&self, id: ApiKeyId, now: Timestamp) -> Result<bool> {
        self.write(move |c| sql::revoke_key(c, id, now)).await
    }

    async fn find_key(&self, id: ApiKeyId) -> Result<Option<KeyRecord>> {
        self.read(move |c| sql::find_key(c, id)).await
    }
}
