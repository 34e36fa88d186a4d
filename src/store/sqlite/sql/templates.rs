//! Templates and their names: what a team sees, name checks, placements
//! of ready templates.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(super) const TEMPLATE_COLS: &str =
    "id, team_id, name, type, vcpus, memory_mb, size_bytes, created_at, source_sandbox_id,
     state, (SELECT count(*) FROM placements p
             WHERE p.template_id = templates.id AND p.state = 'present'),
     compat, last_used_at, expires_at";

/// A `HostInfo` from its stored JSON; anything unreadable is unknown.
pub(super) fn host_info_col(
    row: &Row<'_>,
    idx: usize,
) -> rusqlite::Result<Option<crate::agent::HostInfo>> {
    Ok(row
        .get::<_, Option<String>>(idx)?
        .and_then(|json| serde_json::from_str(&json).ok()))
}

/// A `HostInfo` as stored: JSON, or NULL when unknown.
pub(super) fn host_info_json(info: Option<&crate::agent::HostInfo>) -> Option<String> {
    info.filter(|i| !i.is_unknown())
        .and_then(|i| serde_json::to_string(i).ok())
}

pub(super) fn template_row(row: &Row<'_>) -> rusqlite::Result<Template> {
    Ok(Template {
        id: row.get(0)?,
        team: row.get(1)?,
        name: TemplateName::from_trusted(row.get(2)?),
        template_type: row.get(3)?,
        vcpus: u32_col(row, 4)?,
        memory_mb: u32_col(row, 5)?,
        size_bytes: u64_col(row, 6)?,
        created_at: Timestamp::from_unix_millis(row.get(7)?),
        source_sandbox: row.get(8)?,
        state: row.get(9)?,
        hosts: u32_col(row, 10)?,
        compat: host_info_col(row, 11)?,
        last_used_at: row
            .get::<_, Option<i64>>(12)?
            .map(Timestamp::from_unix_millis),
        expires_at: row
            .get::<_, Option<i64>>(13)?
            .map(Timestamp::from_unix_millis),
    })
}

/// The template `team` sees under `name`: its own, else a platform one.
pub(crate) fn find_visible(
    conn: &Connection,
    team: TeamId,
    name: &TemplateName,
) -> Result<Option<Template>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {TEMPLATE_COLS} FROM templates
             WHERE team_id IN (?1, ?2) AND name = ?3 AND state = 'ready' AND replaces IS NULL
             ORDER BY team_id = ?2 LIMIT 1"
        ))
        .and_then(|mut s| {
            s.query_row(params![team, TeamId::PLATFORM, name.as_str()], template_row)
                .optional()
        })?)
}

/// The caller's templates plus platform templates, newest first, after
/// `after`, at most `limit` (all when `None`).
pub(crate) fn list_visible(
    conn: &Connection,
    team: TeamId,
    kind: Option<TemplateType>,
    after: Option<ListPosition>,
    limit: Option<u32>,
) -> Result<Vec<Template>> {
    // Each side reads at most `limit` rows in index order and the outer
    // query merges the two; `team_id IN (..)` would sort every visible row.
    let side = |team_param: &str| {
        format!(
            "SELECT {TEMPLATE_COLS} FROM templates INDEXED BY templates_visible
             WHERE team_id = {team_param} AND state = 'ready'{kind}{after}
             ORDER BY created_at DESC, id DESC LIMIT ?6",
            kind = if kind.is_some() { " AND type = ?3" } else { "" },
            after = if after.is_some() {
                " AND (created_at, id) < (?4, ?5)"
            } else {
                ""
            },
        )
    };
    let sql = if team.is_platform() {
        side("?1")
    } else {
        format!(
            "SELECT * FROM ({}) UNION ALL SELECT * FROM ({})
             ORDER BY created_at DESC, id DESC LIMIT ?6",
            side("?1"),
            side("?2")
        )
    };
    let (after_ms, after_id) = match after {
        Some(p) => (Some(p.created_at), Some(p.id)),
        None => (None, None),
    };
    let limit = limit.map_or(-1, i64::from);
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt
        .query_map(
            params![team, TeamId::PLATFORM, kind, after_ms, after_id, limit],
            template_row,
        )
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}

/// A template's placements and their states.
pub(crate) fn placements_of(
    conn: &Connection,
    template: TemplateId,
) -> Result<Vec<(HostId, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT host_id, state FROM placements WHERE template_id = ?1 ORDER BY host_id",
    )?;
    let rows = stmt
        .query_map([template], |r| Ok((r.get(0)?, r.get(1)?)))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}

/// Registers a ready template whose files already exist on `hosts` (base
/// images, or templates copied by other means).
pub(crate) fn insert_ready_template(
    conn: &Connection,
    template: &Template,
    hosts: &[HostId],
    now: Timestamp,
) -> Result<()> {
    check_name_free(conn, template.team, &template.name, false)?;
    conn.prepare_cached(
        "INSERT INTO templates (id, team_id, name, type, state, vcpus, memory_mb, size_bytes,
                                source_sandbox_id, created_at, updated_at, compat)
         VALUES (?1, ?2, ?3, ?4, 'ready', ?5, ?6, ?7, ?8, ?9, ?9, ?10)",
    )
    .and_then(|mut s| {
        s.execute(params![
            template.id,
            template.team,
            template.name.as_str(),
            template.template_type,
            template.vcpus,
            template.memory_mb,
            clamp_i64(template.size_bytes),
            template.source_sandbox,
            template.created_at.unix_millis(),
            host_info_json(template.compat.as_ref()),
        ])
    })?;
    for host in hosts {
        if get_host(conn, *host)?.is_none() {
            return Err(Error::not_found(format!("host {host} not found")));
        }
        insert_placement(conn, template.id, *host, template.team, "present", now)?;
    }
    Ok(())
}

pub(super) fn insert_placement(
    conn: &Connection,
    template: TemplateId,
    host: HostId,
    team: TeamId,
    state: &str,
    now: Timestamp,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO placements (template_id, host_id, team_id, state, next_attempt, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?5)
         ON CONFLICT (template_id, host_id) DO UPDATE SET state = excluded.state,
             next_attempt = excluded.next_attempt, updated_at = excluded.updated_at",
    )
    .and_then(|mut s| s.execute(params![template, host, team, state, now.unix_millis()]))?;
    Ok(())
}

/// What holds `name` in `team` (not counting templates being deleted or
/// pending overwrites).
pub(super) fn name_holder(
    conn: &Connection,
    team: TeamId,
    name: &TemplateName,
) -> Result<Option<(TemplateId, TemplateState)>> {
    Ok(conn
        .prepare_cached(
            "SELECT id, state FROM templates
             WHERE team_id = ?1 AND name = ?2 AND state <> 'deleting' AND replaces IS NULL",
        )
        .and_then(|mut s| {
            s.query_row(params![team, name.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })?)
}

/// Checks that `team` may take `name`. Returns the ready template an
/// overwrite would replace.
pub(super) fn check_name_free(
    conn: &Connection,
    team: TeamId,
    name: &TemplateName,
    overwrite: bool,
) -> Result<Option<TemplateId>> {
    if team.is_platform() {
        let used_by_team: bool = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM templates
                                WHERE name = ?1 AND state <> 'deleting' AND team_id <> ?2)",
            )
            .and_then(|mut s| {
                s.query_row(params![name.as_str(), TeamId::PLATFORM], |r| r.get(0))
            })?;
        if used_by_team {
            return Err(Error::new(
                ErrorCode::AlreadyExists,
                format!("name {name:?} is already used by a team template"),
            ));
        }
    } else if name_holder(conn, TeamId::PLATFORM, name)?.is_some() {
        return Err(Error::new(
            ErrorCode::NameReserved,
            format!("name {name:?} is reserved by a platform template"),
        ));
    }
    match name_holder(conn, team, name)? {
        None => Ok(None),
        Some((_, TemplateState::Creating)) => Err(if overwrite {
            Error::conflict(
                "a snapshot with this name is being created; try again when it finishes",
            )
        } else {
            Error::new(
                ErrorCode::AlreadyExists,
                "a snapshot with this name is being created",
            )
        }),
        Some((_, TemplateState::Deleting)) => Ok(None),
        Some((id, TemplateState::Ready)) => {
            if !overwrite {
                return Err(Error::new(
                    ErrorCode::AlreadyExists,
                    "snapshot name already exists; use ?overwrite=true to replace",
                ));
            }
            let pending: bool = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM templates WHERE replaces = ?1)")
                .and_then(|mut s| s.query_row([id], |r| r.get(0)))?;
            if pending {
                return Err(Error::conflict(
                    "an overwrite of this snapshot is already in progress",
                ));
            }
            Ok(Some(id))
        }
    }
}
