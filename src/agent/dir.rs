//! The reference host agent: sandboxes and snapshots as directories under
//! one root, for single-node self-hosters.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, DirBuilder, File, FileTimes, Metadata, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use rustix::io::Errno;

use super::{
    AgentCode, AgentError, CreateSandboxRequest, CreateSandboxResponse, CreateSnapshotRequest,
    CreateSnapshotResponse, DeleteSnapshotRequest, DestroySandboxRequest, Hold, HostAgent,
    HostInfo, SandboxInfo, SandboxList, SnapshotInfo, SnapshotKey,
};
use crate::ids::SandboxId;
use crate::time::Timestamp;

const SANDBOXES_DIR: &str = "sandboxes";
const SNAPSHOTS_DIR: &str = "snapshots";
const IMAGES_DIR: &str = "images";
/// Prefix of a snapshot being written.
const TMP_PREFIX: &str = ".tmp-";
/// Prefix of a snapshot being deleted.
const TRASH_PREFIX: &str = ".trash-";
const RUNNING: &str = "running";
const PAUSED: &str = "paused";
/// Granularity of hole detection in the zero-detecting copy.
const HOLE_BLOCK: usize = 4096;
/// Buffer of the copies that read and write (at most this much of a file
/// is ever in memory).
const COPY_BUFFER: usize = 1 << 20;
/// Most bytes one `copy_file_range` call is asked to copy, so one call of a
/// huge extent stays interruptible and its progress visible.
const CHUNK: u64 = 64 << 20;

/// The reference host agent: a sandbox is a directory, a snapshot is a copy
/// of it. Cheap to clone; clones share their state.
///
/// # Contract
/// On-disk layout under the root given to [`DirHostAgent::open`]:
///
/// ```text
/// <root>/sandboxes/<sandbox_id>/      a sandbox's state (`sb-…`), written by whatever runs it
/// <root>/sandboxes/.tmp-<id>-<r>/     a sandbox being restored
/// <root>/snapshots/<key>/             a complete snapshot: a copy of a sandbox directory
/// <images>/<name>/                    a base template (default images root: <root>/images)
/// <root>/snapshots/.tmp-<key>-<r>/    a snapshot being written
/// <root>/snapshots/.trash-<key>-<r>/  a snapshot being deleted
/// ```
///
/// - `create_snapshot` copies `sandboxes/<sandbox_id>/` into a `.tmp-`
///   directory, fsyncs every file and directory, then renames it to
///   `snapshots/<key>/` and fsyncs `snapshots/`. Each regular file is a
///   copy-on-write reflink (`FICLONE`) where the filesystem supports it
///   (constant time in the file's size); otherwise only its data extents
///   are copied (`SEEK_DATA`/`SEEK_HOLE`, each extent with
///   `copy_file_range` in chunks of at most 64 MiB, or a 1 MiB-buffered
///   read/write where that call is unsupported), so holes are never read
///   and stay holes, and the length is kept (a trailing hole too). Only on
///   a filesystem without `SEEK_DATA` is every byte read, its zero blocks
///   written back as holes. No copy holds more than 1 MiB of a file in
///   memory, whatever its size. `snapshots/<key>` is therefore complete or absent, also
///   after a crash. A failed copy removes its `.tmp-` directory. The answer's
///   `size_bytes` is the space allocated on disk (`st_blocks × 512` summed
///   over regular files), not the apparent size.
/// - What a snapshot holds: regular files (contents, permission bits without
///   setuid/setgid/sticky, modification time); directories (permission bits,
///   plus owner `rwx` so the agent can always delete them); symlinks,
///   recreated with the same target and never followed. Sockets, FIFOs and
///   device nodes are skipped: they hold no state a restore could use (a
///   VMM's API socket, for one). Hard links become independent files.
/// - `delete_snapshot` renames `snapshots/<key>` to a `.trash-` name,
///   fsyncs `snapshots/` (so the key stays gone after a crash), then
///   removes it without following symlinks, so a crash never leaves a
///   partial snapshot under its key.
/// - A key is being written from the moment its `create_snapshot` passes
///   its first checks until its copy is under the key and synced. A delete
///   of such a key answers `FailedPrecondition` (retry later), never
///   `NotFound`: the copy is about to appear under the key, and a caller
///   told NotFound would count the key deleted and leak it (SPEC §4a
///   "Half-written keys"). The check and the rename that deletes are one
///   step for creates of this agent, so a create cannot appear between
///   them. A delete also removes the `.tmp-<key>-…` leftovers no create of
///   this agent is writing (those of an agent that crashed), then answers
///   as for a missing key.
/// - `create_sandbox` copies `snapshots/<key>/` (or, for a name that is not
///   a snapshot here, the base template `<images>/<name>/`) the same way
///   into `sandboxes/.tmp-<id>-…` (every file and directory fsynced), then
///   renames it to `sandboxes/<id>/`, fsyncs `sandboxes/` and reports it
///   `running`. NotFound: neither exists; AlreadyExists: the
///   sandbox exists or is being restored. While a restore copies a
///   snapshot, a delete of that key answers FailedPrecondition.
/// - `destroy_sandbox` removes `sandboxes/<id>/` (moved aside first) and
///   forgets its status; NotFound when there is none.
/// - `host_info` reports the VMM, its version and snapshot format from the
///   agent's configuration ([`DirHostAgent::with_vmm`]), and the machine's
///   architecture, kernel release (`/proc/sys/kernel/osrelease`) and CPU
///   (`/proc/cpuinfo`); every `create_snapshot` answer carries it too.
/// - `list_sandboxes` reports every directory under `sandboxes/` named by a
///   sandbox id; `list_snapshots` every directory under `snapshots/` named by
///   a valid [`SnapshotKey`], with its allocated size and its directory's
///   modification time. Anything else is ignored.
/// - Nothing outside the root is read or written because of a request: every
///   path is a single checked component under `sandboxes/` or `snapshots/`
///   (anything else answers `InvalidArgument`), symlinks are never followed,
///   and a sandbox entry that is itself a symlink is not a sandbox. The
///   sandbox directory must not change during the copy (its VM is paused);
///   a regular file replaced mid-copy is detected and fails the call.
/// - There is no VM: sandbox statuses live in memory. A sandbox directory
///   without a recorded status is `running`; `create_snapshot` refuses a
///   sandbox that is neither `running` nor `paused` (`FailedPrecondition`)
///   and leaves it `paused`; [`DirHostAgent::set_sandbox_status`] changes it.
/// - One agent per root: [`DirHostAgent::open`] removes `.tmp-` and
///   `.trash-` leftovers, which would destroy another live agent's work. A
///   second `create_snapshot` of a key while the first is still copying
///   answers `AlreadyExists`.
/// - All filesystem work runs on tokio's blocking pool. A call whose future
///   is dropped still runs to its end, cleaning up after itself on failure.
#[derive(Clone)]
pub struct DirHostAgent {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    sandboxes: PathBuf,
    snapshots: PathBuf,
    statuses: Mutex<HashMap<SandboxId, String>>,
    /// Keys whose `create_snapshot` is copying right now. `delete_snapshot`
    /// holds it while it checks the key and moves its files aside.
    creating: Mutex<HashSet<SnapshotKey>>,
    /// Testing aid: where creates wait before moving their copy into place.
    pause_before_rename: Mutex<Option<Hold>>,
    /// Snapshot keys restores are copying from, with how many. Locked
    /// after `creating` (never the other way round).
    reading: Mutex<HashMap<SnapshotKey, usize>>,
    /// Sandboxes being restored right now.
    starting: Mutex<HashSet<SandboxId>>,
    /// Where base templates are.
    images: Mutex<PathBuf>,
    /// What this host produces and can restore.
    host_info: Mutex<HostInfo>,
}

impl fmt::Debug for DirHostAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirHostAgent")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

impl DirHostAgent {
    /// Opens the agent over `root`: creates `root/sandboxes` and
    /// `root/snapshots` if missing and removes the `.tmp-*` and `.trash-*`
    /// leftovers of interrupted creates and deletes under `snapshots/`.
    ///
    /// # Errors
    /// The [`io::Error`] of a directory that cannot be created or read, or of
    /// a leftover that cannot be removed; its message names the path.
    pub async fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        let sandboxes = root.join(SANDBOXES_DIR);
        let snapshots = root.join(SNAPSHOTS_DIR);
        {
            let sandboxes = sandboxes.clone();
            let snapshots = snapshots.clone();
            tokio::task::spawn_blocking(move || prepare(&sandboxes, &snapshots))
                .await
                .map_err(|e| io::Error::other(format!("host agent open task failed: {e}")))??;
        }
        let host_info = tokio::task::spawn_blocking(|| {
            machine_info(HostInfo::new(
                "dir",
                env!("CARGO_PKG_VERSION"),
                "dir-1",
                std::env::consts::ARCH,
            ))
        })
        .await
        .map_err(|e| io::Error::other(format!("host agent open task failed: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                images: Mutex::new(root.join(IMAGES_DIR)),
                root,
                sandboxes,
                snapshots,
                statuses: Mutex::new(HashMap::new()),
                creating: Mutex::new(HashSet::new()),
                pause_before_rename: Mutex::new(None),
                reading: Mutex::new(HashMap::new()),
                starting: Mutex::new(HashSet::new()),
                host_info: Mutex::new(host_info),
            }),
        })
    }

    /// Names the VMM this host runs, its version and the snapshot format it
    /// writes (reported by `host_info`; the defaults describe this agent
    /// itself: `dir`, the crate's version, `dir-1`). Clones share it.
    pub fn with_vmm(
        self,
        vmm: impl Into<String>,
        vmm_version: impl Into<String>,
        snapshot_format: impl Into<String>,
    ) -> Self {
        {
            let mut info = lock(&self.inner.host_info);
            info.vmm = vmm.into();
            info.vmm_version = vmm_version.into();
            info.snapshot_format = snapshot_format.into();
        }
        self
    }

    /// Takes base templates from `images` (default `<root>/images`).
    pub fn with_images(self, images: impl Into<PathBuf>) -> Self {
        *lock(&self.inner.images) = images.into();
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Sets the status `list_sandboxes` reports for a sandbox (`running`,
    /// `paused`, `stopped`, …). Only `running` and `paused` sandboxes can be
    /// snapshotted. The status is kept in memory, also for a sandbox whose
    /// directory does not exist (yet).
    pub fn set_sandbox_status(&self, id: SandboxId, status: impl Into<String>) {
        lock(&self.inner.statuses).insert(id, status.into());
    }

    /// Testing aid for deterministic interleavings: while set, every
    /// `create_snapshot` and `create_sandbox` of this agent (and its
    /// clones) waits at `hold` once its copy is complete, just before
    /// moving it into place; the key is being written (or the snapshot
    /// read) meanwhile. `None` removes the gate. A real host has no use for
    /// this.
    pub fn pause_before_rename(&self, hold: Option<Hold>) {
        *lock(&self.inner.pause_before_rename) = hold;
    }
}

#[async_trait]
impl HostAgent for DirHostAgent {
    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, AgentError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.create_snapshot(req.sandbox_id, &req.key)).await
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<(), AgentError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.delete_snapshot(&req.key)).await
    }

    async fn list_sandboxes(&self) -> Result<SandboxList, AgentError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.list_sandboxes()).await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.list_snapshots()).await
    }

    async fn create_sandbox(
        &self,
        req: CreateSandboxRequest,
    ) -> Result<CreateSandboxResponse, AgentError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.create_sandbox(req.sandbox_id, &req.template)).await
    }

    async fn destroy_sandbox(&self, req: DestroySandboxRequest) -> Result<(), AgentError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.destroy_sandbox(req.sandbox_id)).await
    }

    async fn host_info(&self) -> Result<HostInfo, AgentError> {
        Ok(lock(&self.inner.host_info).clone())
    }
}

impl Inner {
    fn create_snapshot(
        &self,
        sandbox_id: SandboxId,
        key: &SnapshotKey,
    ) -> Result<CreateSnapshotResponse, AgentError> {
        let sandbox = sandbox_id.to_string();
        let source = child_path(&self.sandboxes, &sandbox)?;
        let target = child_path(&self.snapshots, key.as_str())?;
        let temp = child_path(
            &self.snapshots,
            &format!("{TMP_PREFIX}{key}-{}", random_suffix()),
        )?;

        match fs::symlink_metadata(&source) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(AgentError::rejected(
                    AgentCode::FailedPrecondition,
                    format!("sandbox {sandbox} is not a directory"),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(AgentError::rejected(
                    AgentCode::NotFound,
                    format!("sandbox {sandbox} not found"),
                ));
            }
            Err(e) => return Err(io_error(format!("sandbox {sandbox}: cannot read it"), &e)),
        }

        let _reservation = Reservation::take(&self.creating, key)?;
        {
            let mut statuses = lock(&self.statuses);
            let status = statuses.get(&sandbox_id).map_or(RUNNING, String::as_str);
            if status != RUNNING && status != PAUSED {
                return Err(AgentError::rejected(
                    AgentCode::FailedPrecondition,
                    format!("sandbox {sandbox} is {status}"),
                ));
            }
            match fs::symlink_metadata(&target) {
                Ok(_) => {
                    return Err(AgentError::rejected(
                        AgentCode::AlreadyExists,
                        format!("snapshot {key} already exists"),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(format!("snapshot {key}: cannot check it"), &e)),
            }
            // The VM is paused before its state is copied, and stays paused.
            statuses.insert(sandbox_id, PAUSED.to_owned());
        }

        let written = copy_tree(&source, &temp)
            .map_err(|e| e.into_agent_error(&format!("snapshot {key}: copying sandbox {sandbox}")))
            .and_then(|()| {
                allocated_size(&temp)
                    .map_err(|e| e.into_agent_error(&format!("snapshot {key}: measuring its size")))
            })
            .and_then(|size| {
                let gate = lock(&self.pause_before_rename).clone();
                if let Some(hold) = gate {
                    hold.pass_blocking();
                }
                fs::rename(&temp, &target)
                    .map(|()| size)
                    .map_err(|e| io_error(format!("snapshot {key}: moving it into place"), &e))
            });
        let size_bytes = match written {
            Ok(size) => size,
            Err(err) => {
                discard(&temp);
                return Err(err);
            }
        };
        // The files are durable; this makes the new name durable too. On
        // failure the complete snapshot stays under its key for the caller
        // to delete, as the contract allows.
        sync_dir(&self.snapshots).map_err(|e| {
            io_error(
                format!("snapshot {key}: syncing the snapshots directory"),
                &e,
            )
        })?;
        Ok(CreateSnapshotResponse::new(key.as_str(), size_bytes)
            .with_compat(Some(lock(&self.host_info).clone())))
    }

    fn create_sandbox(
        &self,
        sandbox_id: SandboxId,
        template: &SnapshotKey,
    ) -> Result<CreateSandboxResponse, AgentError> {
        let sandbox = sandbox_id.to_string();
        let target = child_path(&self.sandboxes, &sandbox)?;
        let temp = child_path(
            &self.sandboxes,
            &format!("{TMP_PREFIX}{sandbox}-{}", random_suffix()),
        )?;
        let _starting = Starting::take(&self.starting, sandbox_id)?;
        match fs::symlink_metadata(&target) {
            Ok(_) => {
                return Err(AgentError::rejected(
                    AgentCode::AlreadyExists,
                    format!("sandbox {sandbox} exists"),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(format!("sandbox {sandbox}: cannot check it"), &e)),
        }
        // A snapshot of this host, held against deletion while it is read;
        // else a base template.
        let snapshot = child_path(&self.snapshots, template.as_str())?;
        let reader = Reader::take(self, template, &snapshot)?;
        let source = match &reader {
            Some(_) => snapshot,
            None => {
                let images = lock(&self.images).clone();
                let image = child_path(&images, template.as_str())?;
                match fs::symlink_metadata(&image) {
                    Ok(meta) if meta.is_dir() => image,
                    Ok(_) | Err(_) => {
                        return Err(AgentError::rejected(
                            AgentCode::NotFound,
                            format!("template {template} is not on this host"),
                        ));
                    }
                }
            }
        };
        let written = copy_tree(&source, &temp)
            .map_err(|e| e.into_agent_error(&format!("sandbox {sandbox}: copying {template}")))
            .and_then(|()| {
                let gate = lock(&self.pause_before_rename).clone();
                if let Some(hold) = gate {
                    hold.pass_blocking();
                }
                fs::rename(&temp, &target)
                    .map_err(|e| io_error(format!("sandbox {sandbox}: moving it into place"), &e))
            });
        drop(reader);
        if let Err(err) = written {
            discard(&temp);
            return Err(err);
        }
        sync_dir(&self.sandboxes).map_err(|e| {
            io_error(
                format!("sandbox {sandbox}: syncing the sandboxes directory"),
                &e,
            )
        })?;
        lock(&self.statuses).insert(sandbox_id, RUNNING.to_owned());
        Ok(CreateSandboxResponse::new(sandbox, RUNNING))
    }

    fn destroy_sandbox(&self, sandbox_id: SandboxId) -> Result<(), AgentError> {
        let sandbox = sandbox_id.to_string();
        let target = child_path(&self.sandboxes, &sandbox)?;
        let trash = child_path(
            &self.sandboxes,
            &format!("{TRASH_PREFIX}{sandbox}-{}", random_suffix()),
        )?;
        if lock(&self.starting).contains(&sandbox_id) {
            return Err(AgentError::rejected(
                AgentCode::FailedPrecondition,
                format!("sandbox {sandbox} is being restored; retry later"),
            ));
        }
        match fs::symlink_metadata(&target) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) | Err(_) => {
                return Err(AgentError::rejected(
                    AgentCode::NotFound,
                    format!("sandbox {sandbox} not found"),
                ));
            }
        }
        fs::rename(&target, &trash)
            .map_err(|e| io_error(format!("sandbox {sandbox}: moving it aside"), &e))?;
        lock(&self.statuses).remove(&sandbox_id);
        sync_dir(&self.sandboxes).map_err(|e| {
            io_error(
                format!("sandbox {sandbox}: syncing the sandboxes directory"),
                &e,
            )
        })?;
        remove_entry(&trash).map_err(|e| io_error(format!("sandbox {sandbox}: removing it"), &e))
    }

    fn delete_snapshot(&self, key: &SnapshotKey) -> Result<(), AgentError> {
        let target = child_path(&self.snapshots, key.as_str())?;
        let trash = child_path(
            &self.snapshots,
            &format!("{TRASH_PREFIX}{key}-{}", random_suffix()),
        )?;
        // Checked and moved aside under one lock: a create of this key
        // either registered before (and this delete is refused) or
        // registers after the files are gone.
        let (leftovers, moved) = {
            let creating = lock(&self.creating);
            if creating.contains(key) {
                return Err(AgentError::rejected(
                    AgentCode::FailedPrecondition,
                    format!("snapshot {key} is still being written; retry later"),
                ));
            }
            if lock(&self.reading).contains_key(key) {
                return Err(AgentError::rejected(
                    AgentCode::FailedPrecondition,
                    format!("snapshot {key} is being restored from; retry later"),
                ));
            }
            let leftovers = self.move_aside_leftovers(key)?;
            (leftovers, fs::rename(&target, &trash))
        };
        for leftover in leftovers {
            discard(&leftover);
        }
        match moved {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(AgentError::rejected(
                    AgentCode::NotFound,
                    format!("snapshot {key} not found"),
                ));
            }
            Err(e) => return Err(io_error(format!("snapshot {key}: moving it aside"), &e)),
        }
        sync_dir(&self.snapshots).map_err(|e| {
            io_error(
                format!("snapshot {key}: syncing the snapshots directory"),
                &e,
            )
        })?;
        // The key is gone; a failure here leaves only a `.trash-` directory,
        // which the next `open` removes.
        remove_entry(&trash)
            .map_err(|e| io_error(format!("snapshot {key}: removing its files"), &e))
    }

    /// Renames the `.tmp-` directories of `key` to `.trash-` names and
    /// returns those. Called with `creating` held and `key` not in it, so
    /// no create of this agent is writing them: they are what a crashed
    /// agent left.
    fn move_aside_leftovers(&self, key: &SnapshotKey) -> Result<Vec<PathBuf>, AgentError> {
        let context = || format!("snapshot {key}: looking for leftovers");
        let entries = fs::read_dir(&self.snapshots).map_err(|e| io_error(context(), &e))?;
        let mut moved = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error(context(), &e))?;
            let name = entry.file_name();
            let Some(suffix) = name
                .to_str()
                .and_then(|n| n.strip_prefix(TMP_PREFIX))
                .and_then(|rest| rest.strip_prefix(key.as_str()))
                .and_then(|rest| rest.strip_prefix('-'))
            else {
                continue;
            };
            // `.tmp-<key>-<suffix>` with a suffix without '-': keys may
            // contain '-', so `.tmp-a-b-<r>` belongs to key `a-b`, not `a`.
            if suffix.is_empty() || suffix.contains('-') {
                continue;
            }
            let trash = child_path(
                &self.snapshots,
                &format!("{TRASH_PREFIX}{key}-{}", random_suffix()),
            )?;
            match fs::rename(entry.path(), &trash) {
                Ok(()) => {
                    tracing::info!(
                        path = %entry.path().display(),
                        "removing the leftover of an interrupted create"
                    );
                    moved.push(trash);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(io_error(
                        format!("snapshot {key}: moving a leftover aside"),
                        &e,
                    ));
                }
            }
        }
        Ok(moved)
    }

    fn list_sandboxes(&self) -> Result<SandboxList, AgentError> {
        let entries =
            fs::read_dir(&self.sandboxes).map_err(|e| io_error("listing sandboxes".into(), &e))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error("listing sandboxes".into(), &e))?;
            let Some(id) = entry.file_name().to_str().and_then(canonical_sandbox_id) else {
                continue;
            };
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => ids.push(id),
                Ok(_) => {}
                // Removed while we were listing.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(format!("sandbox {id}: cannot read it"), &e)),
            }
        }
        let statuses = lock(&self.statuses);
        let mut sandboxes: Vec<SandboxInfo> = ids
            .into_iter()
            .map(|id| {
                let status = statuses.get(&id).map_or(RUNNING, String::as_str);
                SandboxInfo::new(id.to_string(), status)
            })
            .collect();
        drop(statuses);
        sandboxes.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        Ok(SandboxList {
            sandboxes,
            auto_paused_sandbox_ids: Vec::new(),
        })
    }

    fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentError> {
        let entries =
            fs::read_dir(&self.snapshots).map_err(|e| io_error("listing snapshots".into(), &e))?;
        let mut snapshots = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error("listing snapshots".into(), &e))?;
            // Keys never start with '.', so `.tmp-` and `.trash-` are skipped here.
            let Some(key) = entry
                .file_name()
                .to_str()
                .and_then(|name| SnapshotKey::parse(name).ok())
            else {
                continue;
            };
            let meta = match entry.metadata() {
                Ok(meta) if meta.is_dir() => meta,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(format!("snapshot {key}: cannot read it"), &e)),
            };
            let size = match allocated_size(&entry.path()) {
                Ok(size) => size,
                // Deleted while we were measuring it.
                Err(e) if e.source.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into_agent_error(&format!("snapshot {key}: measuring it"))),
            };
            let created_at = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .and_then(|d| i64::try_from(d.as_millis()).ok())
                .map(Timestamp::from_unix_millis);
            snapshots.push(SnapshotInfo::new(key.as_str(), size, created_at));
        }
        snapshots.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(snapshots)
    }
}

/// Marks a sandbox as being restored until dropped.
struct Starting<'a> {
    set: &'a Mutex<HashSet<SandboxId>>,
    id: SandboxId,
}

impl<'a> Starting<'a> {
    fn take(set: &'a Mutex<HashSet<SandboxId>>, id: SandboxId) -> Result<Self, AgentError> {
        if !lock(set).insert(id) {
            return Err(AgentError::rejected(
                AgentCode::AlreadyExists,
                format!("sandbox {id} is being restored"),
            ));
        }
        Ok(Self { set, id })
    }
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.id);
    }
}

/// A restore reading a snapshot: its key cannot be deleted until dropped.
struct Reader<'a> {
    inner: &'a Inner,
    key: SnapshotKey,
}

impl<'a> Reader<'a> {
    /// Registers a reader of `key` if the snapshot exists (complete), under
    /// the same lock as deletes check readers; `None` when it does not.
    fn take(inner: &'a Inner, key: &SnapshotKey, path: &Path) -> Result<Option<Self>, AgentError> {
        let _creating = lock(&inner.creating);
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(format!("snapshot {key}: cannot read it"), &e)),
        }
        *lock(&inner.reading).entry(key.clone()).or_default() += 1;
        Ok(Some(Self {
            inner,
            key: key.clone(),
        }))
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        let mut reading = lock(&self.inner.reading);
        if let Some(count) = reading.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                reading.remove(&self.key);
            }
        }
    }
}

/// What the machine says of itself: kernel release and CPU, added to
/// `base` (best effort: what cannot be read stays unknown).
fn machine_info(base: HostInfo) -> HostInfo {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let (vendor, model, flags) = parse_cpuinfo(&cpuinfo);
    let info = base.kernel(kernel).cpu(vendor, model, flags);
    // Whatever the machine says must pass the checks a client applies.
    match info.validate() {
        Ok(()) => info,
        Err(err) => {
            tracing::warn!(error = %err, "ignoring the CPU description of /proc/cpuinfo");
            HostInfo {
                cpu_vendor: String::new(),
                cpu_model: String::new(),
                cpu_flags: Vec::new(),
                ..info
            }
        }
    }
}

/// Vendor, model and flags of the first processor in `/proc/cpuinfo`
/// (x86: `vendor_id`, `model name`, `flags`; arm64: `CPU implementer`,
/// `CPU part`, `Features`).
fn parse_cpuinfo(text: &str) -> (String, String, Vec<String>) {
    let (mut vendor, mut model, mut flags) = (String::new(), String::new(), Vec::new());
    let mut part = String::new();
    for line in text.lines() {
        if line.trim().is_empty() && !(vendor.is_empty() && model.is_empty()) {
            break;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "vendor_id" | "CPU implementer" if vendor.is_empty() => vendor = value.to_owned(),
            "model name" if model.is_empty() => model = value.to_owned(),
            "CPU part" if part.is_empty() => part = value.to_owned(),
            "flags" | "Features" if flags.is_empty() => {
                flags = value.split_whitespace().map(str::to_owned).collect();
            }
            _ => {}
        }
    }
    if model.is_empty() {
        model = part;
    }
    (vendor, model, flags)
}

/// Marks a key as being created until dropped.
struct Reservation<'a> {
    set: &'a Mutex<HashSet<SnapshotKey>>,
    key: SnapshotKey,
}

impl<'a> Reservation<'a> {
    fn take(set: &'a Mutex<HashSet<SnapshotKey>>, key: &SnapshotKey) -> Result<Self, AgentError> {
        if !lock(set).insert(key.clone()) {
            return Err(AgentError::rejected(
                AgentCode::AlreadyExists,
                format!("snapshot {key} is being created"),
            ));
        }
        Ok(Self {
            set,
            key: key.clone(),
        })
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.key);
    }
}

/// An I/O failure on a path, which goes to the host's log only: answers
/// name keys and sandboxes, never host paths.
#[derive(Debug)]
struct FsError {
    path: PathBuf,
    source: io::Error,
}

impl FsError {
    fn at(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self {
            path: path.to_path_buf(),
            source,
        }
    }

    fn into_agent_error(self, context: &str) -> AgentError {
        tracing::warn!(path = %self.path.display(), error = %self.source, "{context} failed");
        io_error(context.to_owned(), &self.source)
    }
}

/// Runs filesystem work on the blocking pool.
async fn blocking<T, F>(work: F) -> Result<T, AgentError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, AgentError> + Send + 'static,
{
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(AgentError::rejected(
            AgentCode::Internal,
            format!("host agent task failed: {e}"),
        ))
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn io_error(context: String, err: &io::Error) -> AgentError {
    let code = match err.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => AgentCode::ResourceExhausted,
        _ => AgentCode::Internal,
    };
    AgentError::rejected(code, format!("{context}: {err}"))
}

/// `dir/name`, where `name` must be exactly one ordinary path component, so
/// the result is a direct child of `dir`. Keys and ids are validated types
/// already; this is the second line of defence.
fn child_path(dir: &Path, name: &str) -> Result<PathBuf, AgentError> {
    let mut components = Path::new(name).components();
    let single = matches!(
        (components.next(), components.next()),
        (Some(Component::Normal(part)), None) if part == OsStr::new(name)
    );
    let path = dir.join(name);
    if !single || name.contains('\0') || path.parent() != Some(dir) {
        return Err(AgentError::rejected(
            AgentCode::InvalidArgument,
            format!("{name:?} is not a plain file name"),
        ));
    }
    Ok(path)
}

/// The sandbox id `name` spells, if it is one in its canonical text form
/// (the only form `create_snapshot` looks for).
fn canonical_sandbox_id(name: &str) -> Option<SandboxId> {
    SandboxId::parse(name)
        .ok()
        .filter(|id| id.to_string() == name)
}

fn random_suffix() -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    random[..16].to_owned()
}

/// Creates the two directories and removes leftovers of interrupted work.
fn prepare(sandboxes: &Path, snapshots: &Path) -> io::Result<()> {
    let with_path = |path: &Path| {
        let path = path.display().to_string();
        move |e: io::Error| io::Error::new(e.kind(), format!("{path}: {e}"))
    };
    fs::create_dir_all(sandboxes).map_err(with_path(sandboxes))?;
    fs::create_dir_all(snapshots).map_err(with_path(snapshots))?;
    for dir in [snapshots, sandboxes] {
        for entry in fs::read_dir(dir).map_err(with_path(dir))? {
            let entry = entry.map_err(with_path(dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TMP_PREFIX) || name.starts_with(TRASH_PREFIX) {
                let path = entry.path();
                tracing::info!(path = %path.display(), "removing the leftover of interrupted work");
                remove_entry(&path).map_err(with_path(&path))?;
            }
        }
    }
    Ok(())
}

/// Removes a file, symlink or directory tree without following symlinks
/// (`remove_dir_all` unlinks symlinks, it does not descend into them).
fn remove_entry(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// Best-effort removal of a failed create's temporary directory.
fn discard(temp: &Path) {
    match remove_entry(temp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(
            path = %temp.display(),
            error = %e,
            "cannot remove a failed snapshot; the next open removes it"
        ),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Permission bits of a copied directory: the source's, plus owner `rwx`.
fn dir_mode(meta: &Metadata) -> u32 {
    (meta.mode() & 0o777) | 0o700
}

/// Copies the tree at `src_root` (a directory) to a new directory `dst_root`
/// as described on [`DirHostAgent`], fsyncing everything it writes.
fn copy_tree(src_root: &Path, dst_root: &Path) -> Result<(), FsError> {
    let root_meta = fs::symlink_metadata(src_root).map_err(FsError::at(src_root))?;
    let mut builder = DirBuilder::new();
    // Owner-only while being written; final bits are set once it is full.
    builder.mode(0o700);
    builder.create(dst_root).map_err(FsError::at(dst_root))?;
    // Directories in creation order; fixed up children first (reversed).
    let mut dirs = vec![(dst_root.to_path_buf(), dir_mode(&root_meta))];
    // An explicit stack, so deep trees cannot overflow the thread's stack.
    let mut pending = vec![(src_root.to_path_buf(), dst_root.to_path_buf())];
    while let Some((src_dir, dst_dir)) = pending.pop() {
        for entry in fs::read_dir(&src_dir).map_err(FsError::at(&src_dir))? {
            let entry = entry.map_err(FsError::at(&src_dir))?;
            let src = entry.path();
            let dst = dst_dir.join(entry.file_name());
            // Does not follow symlinks.
            let meta = entry.metadata().map_err(FsError::at(&src))?;
            let kind = meta.file_type();
            if kind.is_symlink() {
                let target = fs::read_link(&src).map_err(FsError::at(&src))?;
                std::os::unix::fs::symlink(&target, &dst).map_err(FsError::at(&dst))?;
            } else if kind.is_dir() {
                builder.create(&dst).map_err(FsError::at(&dst))?;
                dirs.push((dst.clone(), dir_mode(&meta)));
                pending.push((src, dst));
            } else if kind.is_file() {
                copy_file(&src, &meta, &dst)?;
            } else {
                tracing::debug!(path = %src.display(), "skipping a special file");
            }
        }
    }
    for (dir, mode) in dirs.iter().rev() {
        fs::set_permissions(dir, Permissions::from_mode(*mode)).map_err(FsError::at(dir))?;
        sync_dir(dir).map_err(FsError::at(dir))?;
    }
    Ok(())
}

/// Copies one regular file (`meta` is its `lstat`) to the new file `dst`.
fn copy_file(src: &Path, meta: &Metadata, dst: &Path) -> Result<(), FsError> {
    let from = File::open(src).map_err(FsError::at(src))?;
    let opened = from.metadata().map_err(FsError::at(src))?;
    // `open` follows symlinks: make sure we opened the file we inspected,
    // not something swapped in since.
    if !opened.is_file() || opened.dev() != meta.dev() || opened.ino() != meta.ino() {
        return Err(FsError::at(src)(io::Error::other(
            "a file changed while the sandbox was being copied",
        )));
    }
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(FsError::at(dst))?;
    if let Err(e) = reflink_copy::reflink_file(&from, &to) {
        tracing::trace!(error = %e, "no reflink, copying");
        extent_copy(&from, &to, &opened).map_err(FsError::at(dst))?;
    }
    // No setuid/setgid/sticky: the copy is owned by the agent's user.
    to.set_permissions(Permissions::from_mode(meta.mode() & 0o777))
        .map_err(FsError::at(dst))?;
    let modified = opened.modified().map_err(FsError::at(src))?;
    to.set_times(FileTimes::new().set_modified(modified))
        .map_err(FsError::at(dst))?;
    to.sync_all().map_err(FsError::at(dst))
}

/// Copies `from` into the empty file `to` without reading its holes: asks
/// the filesystem for the data extents (`SEEK_DATA`/`SEEK_HOLE`) and copies
/// only those, each with `copy_file_range` in bounded chunks (a bounded
/// read/write where the kernel or filesystem cannot), then sets the length
/// so a trailing hole stays a hole. A filesystem without `SEEK_DATA` gets
/// [`zero_detecting_copy`]. Never holds more than [`COPY_BUFFER`] bytes.
fn extent_copy(from: &File, to: &File, meta: &Metadata) -> io::Result<()> {
    copy_extents(from, to, meta, true)
}

/// [`extent_copy`]; `kernel_copy` false starts with the read/write
/// fallback (what an unsupported `copy_file_range` leads to).
fn copy_extents(from: &File, to: &File, meta: &Metadata, mut kernel_copy: bool) -> io::Result<()> {
    let len = meta.len();
    to.set_len(0)?;
    let mut pos: u64 = 0;
    let mut buf: Vec<u8> = Vec::new();
    'extents: while pos < len {
        let start = match rustix::fs::seek(from, rustix::fs::SeekFrom::Data(pos)) {
            Ok(start) => start,
            // No data at or after `pos`: the rest is a hole.
            Err(Errno::NXIO) => break,
            Err(e) if pos == 0 && (e == Errno::INVAL || e == Errno::OPNOTSUPP) => {
                tracing::trace!(error = %e, "no SEEK_DATA, copying every byte");
                return zero_detecting_copy(from, to, meta);
            }
            Err(e) => return Err(e.into()),
        };
        if start >= len {
            break;
        }
        let end = match rustix::fs::seek(from, rustix::fs::SeekFrom::Hole(start)) {
            Ok(end) => end.min(len),
            // The file shrank under us; what is left is copied as data.
            Err(Errno::NXIO) => len,
            Err(e) => return Err(e.into()),
        };
        let mut at = start;
        while at < end {
            let want = usize::try_from((end - at).min(CHUNK)).map_err(io::Error::other)?;
            let copied = if kernel_copy {
                let (mut off_in, mut off_out) = (at, at);
                match rustix::fs::copy_file_range(
                    from,
                    Some(&mut off_in),
                    to,
                    Some(&mut off_out),
                    want,
                ) {
                    Ok(n) => n,
                    Err(Errno::INTR) => continue,
                    Err(e @ (Errno::XDEV | Errno::NOSYS | Errno::OPNOTSUPP | Errno::INVAL)) => {
                        tracing::trace!(error = %e, "no copy_file_range, reading and writing");
                        kernel_copy = false;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                if buf.is_empty() {
                    buf = vec![0u8; COPY_BUFFER];
                }
                let take = want.min(buf.len());
                let n = read_full_at(from, &mut buf[..take], at)?;
                to.write_all_at(&buf[..n], at)?;
                n
            };
            if copied == 0 {
                // The file ended early (it shrank while being copied).
                break 'extents;
            }
            at = at.saturating_add(copied as u64);
        }
        pos = end;
    }
    // Covers a trailing hole, which no write extended the file over.
    to.set_len(len)
}

/// The copy for filesystems without `SEEK_DATA`: reads every byte. A file
/// with fewer allocated blocks than its length is sparse: its zero blocks
/// become holes again instead of allocated zeros.
fn zero_detecting_copy(mut from: &File, mut to: &File, meta: &Metadata) -> io::Result<()> {
    from.seek(SeekFrom::Start(0))?;
    to.set_len(0)?;
    to.seek(SeekFrom::Start(0))?;
    if meta.blocks().saturating_mul(512) >= meta.len() {
        io::copy(&mut from, &mut to)?;
        return Ok(());
    }
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut length: u64 = 0;
    loop {
        let filled = read_full(from, &mut buf)?;
        if filled == 0 {
            break;
        }
        let chunk = &buf[..filled];
        let mut start = 0;
        while start < filled {
            let zero = is_zero_block(chunk, start);
            let mut end = (start + HOLE_BLOCK).min(filled);
            while end < filled && is_zero_block(chunk, end) == zero {
                end = (end + HOLE_BLOCK).min(filled);
            }
            if zero {
                let skip = i64::try_from(end - start).map_err(io::Error::other)?;
                to.seek(SeekFrom::Current(skip))?;
            } else {
                to.write_all(&chunk[start..end])?;
            }
            start = end;
        }
        length = length.saturating_add(filled as u64);
    }
    // Covers a trailing hole, which no write extended the file over.
    to.set_len(length)
}

/// Reads at `offset` until `buf` is full or the file ends; returns the
/// bytes read.
fn read_full_at(from: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match from.read_at(&mut buf[filled..], offset.saturating_add(filled as u64)) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn is_zero_block(chunk: &[u8], start: usize) -> bool {
    let end = (start + HOLE_BLOCK).min(chunk.len());
    chunk[start..end].iter().all(|&b| b == 0)
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(mut from: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match from.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Bytes allocated to the regular files under `dir` (`st_blocks × 512`),
/// without following symlinks.
fn allocated_size(dir: &Path) -> Result<u64, FsError> {
    let mut total: u64 = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).map_err(FsError::at(&dir))? {
            let entry = entry.map_err(FsError::at(&dir))?;
            let meta = entry.metadata().map_err(FsError::at(&entry.path()))?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                total = total.saturating_add(meta.blocks().saturating_mul(512));
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallbacks `extent_copy` takes where the kernel or filesystem
    /// lacks `copy_file_range` or `SEEK_DATA`: same bytes, holes kept.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn the_fallback_copies_keep_bytes_and_holes() {
        let dir = tempfile::TempDir::new().unwrap();
        let src = dir.path().join("src");
        let mut file = File::create(&src).unwrap();
        file.set_len(40 << 20).unwrap();
        for offset in [0u64, 5 << 20, (40 << 20) - 3000] {
            file.seek(SeekFrom::Start(offset)).unwrap();
            file.write_all(&[0x3c; 3000]).unwrap();
        }
        file.sync_all().unwrap();
        let meta = file.metadata().unwrap();
        let want = fs::read(&src).unwrap();
        type Copy = fn(&File, &File, &Metadata) -> io::Result<()>;
        let read_write: Copy = |from, to, meta| copy_extents(from, to, meta, false);
        let copies: [(&str, Copy); 3] = [
            ("kernel", extent_copy),
            ("read-write", read_write),
            ("zero-detecting", zero_detecting_copy),
        ];
        for (name, copy) in copies {
            let dst = dir.path().join(name);
            let to = File::create_new(&dst).unwrap();
            copy(&File::open(&src).unwrap(), &to, &meta).unwrap();
            to.sync_all().unwrap();
            assert!(fs::read(&dst).unwrap() == want, "{name}: same bytes");
            let blocks = to.metadata().unwrap().blocks() * 512;
            assert!(blocks < 1 << 20, "{name}: holes kept, {blocks} allocated");
        }
    }

    #[test]
    fn child_path_accepts_only_one_plain_component() {
        let dir = Path::new("/srv/agent/snapshots");
        assert_eq!(
            child_path(dir, "tpl-1").ok(),
            Some(PathBuf::from("/srv/agent/snapshots/tpl-1"))
        );
        for bad in ["", ".", "..", "../x", "a/b", "a/", "/etc", "a\0b", "./a"] {
            let err = child_path(dir, bad).err();
            assert_eq!(
                err.and_then(|e| e.code()),
                Some(AgentCode::InvalidArgument),
                "{bad:?}"
            );
        }
    }
}
