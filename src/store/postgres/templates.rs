//! What a team sees, and the name checks every write that takes a name
//! runs (as `sqlite/sql.rs`'s `check_name_free`).
//!
//! A team's names are unique by the index `templates_name_per_team`; a
//! platform template's name is reserved for every team, which no index can
//! say. So every name check first takes an advisory lock on the name:
//! shared for a team (teams never wait on each other), exclusive for the
//! platform team. A platform template and a team template of one name can
//! then not be created at once: the later one waits, and its check sees
//! the earlier one.

use deadpool_postgres::GenericClient;

use super::TxResult;
use super::rows::{
    BlobId, TEMPLATE_COLS, all, get, get_enum, get_id, prepare_all, query, query_one, query_opt,
    template_row,
};
use crate::error::{Error, ErrorCode};
use crate::ids::{HostId, TeamId, TemplateId};
use crate::model::{Template, TemplateState, TemplateType};
use crate::names::TemplateName;
use crate::store::ListPosition;

/// The first key of the advisory locks on names (the second is the
/// name's hash); distinct from the migrator's one-key lock space.
const NAME_LOCK: i32 = 0x534e_4150; // "SNAP"

/// Whether the template `team` sees under `name` is locked for update
/// (a delete), or only read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lock {
    None,
    ForUpdate,
}

/// The template `team` sees under `name`: its own, else a platform one.
pub(super) async fn find_visible(
    db: &impl GenericClient,
    team: TeamId,
    name: &TemplateName,
    lock: Lock,
) -> TxResult<Option<Template>> {
    static READ: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT {TEMPLATE_COLS} FROM templates
             WHERE team_id IN ($1, $2) AND name = $3 AND state = 'ready' AND replaces IS NULL
             ORDER BY team_id = $2 LIMIT 1"
        )
    });
    // A concurrent delete of the same template waits here, and then finds
    // it no longer ready (the row is read again once the lock is had).
    static LOCKED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT {TEMPLATE_COLS} FROM templates
             WHERE team_id IN ($1, $2) AND name = $3 AND state = 'ready' AND replaces IS NULL
             ORDER BY team_id = $2 LIMIT 1 FOR UPDATE OF templates"
        )
    });
    let sql: &str = match lock {
        Lock::None => &READ,
        Lock::ForUpdate => &LOCKED,
    };
    let row = query_opt(
        db,
        sql,
        &[&team.bytes(), &TeamId::PLATFORM.bytes(), &name.as_str()],
    )
    .await?;
    Ok(row.as_ref().map(template_row).transpose()?)
}

/// The caller's templates plus platform templates, newest first, after
/// `after`, at most `limit` (all when `None`).
pub(super) async fn list_visible(
    db: &impl GenericClient,
    team: TeamId,
    kind: Option<TemplateType>,
    after: Option<ListPosition>,
    limit: Option<u32>,
) -> TxResult<Vec<Template>> {
    // Each side reads at most `limit` rows in index order and the outer
    // query merges the two. Parameters: the team(s), then `kind` ($k),
    // the position after which to list ($k+1, $k+2) and `limit` ($k+3).
    let side = |team_param: &str, k: usize| {
        format!(
            "(SELECT {TEMPLATE_COLS} FROM templates
              WHERE team_id = {team_param} AND state = 'ready'
                AND (${k}::text IS NULL OR type = ${k})
                AND (${a}::bigint IS NULL OR (created_at, id) < (${a}, ${b}::bytea))
              ORDER BY created_at DESC, id DESC LIMIT ${l}::bigint)",
            a = k + 1,
            b = k + 2,
            l = k + 3,
        )
    };
    let (after_ms, after_id) = match after {
        Some(p) => (Some(p.created_at), Some(p.id)),
        None => (None, None),
    };
    let kind = kind.map(TemplateType::as_str);
    let after_id = after_id.as_ref().map(BlobId::bytes);
    let limit = limit.map(i64::from);
    let rows = if team.is_platform() {
        query(
            db,
            &side("$1", 2),
            &[&team.bytes(), &kind, &after_ms, &after_id, &limit],
        )
        .await?
    } else {
        let sql = format!(
            "SELECT * FROM ({} UNION ALL {}) visible
             ORDER BY created_at DESC, id DESC LIMIT $6::bigint",
            side("$1", 3),
            side("$2", 3)
        );
        query(
            db,
            &sql,
            &[
                &team.bytes(),
                &TeamId::PLATFORM.bytes(),
                &kind,
                &after_ms,
                &after_id,
                &limit,
            ],
        )
        .await?
    };
    Ok(all(&rows, template_row)?)
}

/// A template's placements and their states.
pub(super) async fn placements_of(
    db: &impl GenericClient,
    template: TemplateId,
) -> TxResult<Vec<(HostId, String)>> {
    let rows = query(
        db,
        "SELECT host_id, state FROM placements WHERE template_id = $1 ORDER BY host_id",
        &[&template.bytes()],
    )
    .await?;
    Ok(all(&rows, |r| Ok((get_id(r, 0)?, get(r, 1)?)))?)
}

/// A template by id, if it is ready.
pub(super) async fn get_ready_template(
    db: &impl GenericClient,
    id: TemplateId,
) -> TxResult<Option<Template>> {
    let row = query_opt(
        db,
        &format!("SELECT {TEMPLATE_COLS} FROM templates WHERE id = $1 AND state = 'ready'"),
        &[&id.bytes()],
    )
    .await?;
    Ok(row.as_ref().map(template_row).transpose()?)
}

/// What holds `name` in `team` (not counting templates being deleted or
/// pending overwrites), locked against change until the transaction ends:
/// a concurrent delete of the holder waits, so that the name it frees is
/// handed to an overwrite this transaction writes (see `mark_deleting`).
pub(super) const NAME_HOLDER: &str = "SELECT id, state FROM templates
     WHERE team_id = $1 AND name = $2 AND state <> 'deleting' AND replaces IS NULL
     FOR SHARE";
const NAME_LOCK_EXCLUSIVE: &str = "SELECT pg_advisory_xact_lock($1, hashtext($2))";
const NAME_LOCK_SHARED: &str = "SELECT pg_advisory_xact_lock_shared($1, hashtext($2))";
const USED_BY_A_TEAM: &str = "SELECT EXISTS (SELECT 1 FROM templates
     WHERE name = $1 AND state <> 'deleting' AND team_id <> $2)";

/// Every statement [`check_name_free`] sends at once, to prepare first.
pub(super) const NAME_CHECKS: [&str; 4] = [
    NAME_LOCK_EXCLUSIVE,
    NAME_LOCK_SHARED,
    USED_BY_A_TEAM,
    NAME_HOLDER,
];

pub(super) async fn name_holder(
    db: &impl GenericClient,
    team: TeamId,
    name: &TemplateName,
) -> TxResult<Option<(TemplateId, TemplateState)>> {
    let row = query_opt(db, NAME_HOLDER, &[&team.bytes(), &name.as_str()]).await?;
    match row {
        None => Ok(None),
        Some(r) => Ok(Some((get_id(&r, 0)?, get_enum(&r, 1)?))),
    }
}

/// The error a lost race for `name` ends with when the retries run out:
/// what the check gives once the winner is visible (it is being created).
pub(super) fn name_race_error(overwrite: bool) -> Error {
    being_created(overwrite)
}

fn being_created(overwrite: bool) -> Error {
    if overwrite {
        Error::conflict("a snapshot with this name is being created; try again when it finishes")
    } else {
        Error::new(
            ErrorCode::AlreadyExists,
            "a snapshot with this name is being created",
        )
    }
}

/// Checks that `team` may take `name`. Returns the ready template an
/// overwrite would replace.
pub(super) async fn check_name_free(
    db: &impl GenericClient,
    team: TeamId,
    name: &TemplateName,
    overwrite: bool,
) -> TxResult<Option<TemplateId>> {
    let lock = if team.is_platform() {
        NAME_LOCK_EXCLUSIVE
    } else {
        NAME_LOCK_SHARED
    };
    prepare_all(db, &NAME_CHECKS).await?;
    // The three statements go out together (tokio-postgres pipelines
    // requests made at once on one connection; the server runs them in
    // order, so the name lock is held before either check reads).
    let other_kind = async {
        if team.is_platform() {
            let used_by_team: bool = get(
                &query_one(
                    db,
                    USED_BY_A_TEAM,
                    &[&name.as_str(), &TeamId::PLATFORM.bytes()],
                )
                .await?,
                0,
            )?;
            TxResult::Ok(used_by_team)
        } else {
            Ok(name_holder(db, TeamId::PLATFORM, name).await?.is_some())
        }
    };
    let name_text = name.as_str();
    let lock_params: [super::rows::Param<'_>; 2] = [&NAME_LOCK, &name_text];
    let (locked, other_kind, holder) = tokio::join!(
        query_one(db, lock, &lock_params),
        other_kind,
        name_holder(db, team, name)
    );
    locked?;
    if other_kind? {
        return Err(if team.is_platform() {
            Error::new(
                ErrorCode::AlreadyExists,
                format!("name {name:?} is already used by a team template"),
            )
        } else {
            Error::new(
                ErrorCode::NameReserved,
                format!("name {name:?} is reserved by a platform template"),
            )
        }
        .into());
    }
    match holder? {
        None => Ok(None),
        Some((_, TemplateState::Creating)) => Err(being_created(overwrite).into()),
        Some((_, TemplateState::Deleting)) => Ok(None),
        Some((id, TemplateState::Ready)) => {
            if !overwrite {
                return Err(Error::new(
                    ErrorCode::AlreadyExists,
                    "snapshot name already exists; use ?overwrite=true to replace",
                )
                .into());
            }
            let pending: bool = get(
                &query_one(
                    db,
                    "SELECT EXISTS (SELECT 1 FROM templates WHERE replaces = $1)",
                    &[&id.bytes()],
                )
                .await?,
                0,
            )?;
            if pending {
                return Err(overwrite_in_progress().into());
            }
            Ok(Some(id))
        }
    }
}

/// Another overwrite of the same template is pending.
pub(super) fn overwrite_in_progress() -> Error {
    Error::conflict("an overwrite of this snapshot is already in progress")
}
