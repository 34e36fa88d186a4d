//! The reference host agent (`DirHostAgent`) through the public API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};

use sandbox_snapshots::agent::{
    CreateSandboxRequest, CreateSnapshotRequest, DeleteSnapshotRequest, DestroySandboxRequest,
    Hold, SandboxList, SnapshotKey,
};
use sandbox_snapshots::{AgentCode, DirHostAgent, HostAgent, SandboxId, Timestamp};
use tempfile::TempDir;

fn key(s: &str) -> SnapshotKey {
    SnapshotKey::parse(s).unwrap()
}

fn sandbox_dir(root: &Path, id: SandboxId) -> PathBuf {
    let dir = root.join("sandboxes").join(id.to_string());
    fs::create_dir_all(&dir).unwrap();
    dir
}

async fn create(
    agent: &DirHostAgent,
    id: SandboxId,
    k: &str,
) -> Result<u64, sandbox_snapshots::AgentError> {
    agent
        .create_snapshot(CreateSnapshotRequest::new(id, key(k)))
        .await
        .map(|r| {
            assert_eq!(r.key, k);
            r.size_bytes
        })
}

async fn delete(agent: &DirHostAgent, k: &str) -> Result<(), sandbox_snapshots::AgentError> {
    agent
        .delete_snapshot(DeleteSnapshotRequest::new(key(k)))
        .await
}

/// Every entry under `dir`, relative, with what it is: file contents,
/// `dir`, or `-> target` for a symlink. Never follows symlinks.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(base).unwrap().display().to_string();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap();
                out.insert(rel, format!("-> {}", target.display()));
            } else if meta.is_dir() {
                out.insert(rel, "dir".to_owned());
                walk(base, &path, out);
            } else {
                let bytes = fs::read(&path).unwrap();
                out.insert(rel, format!("{} bytes, {:x?}", bytes.len(), digest(&bytes)));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A cheap content fingerprint (FNV-1a), enough to tell contents apart.
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// (allocated, apparent) bytes of the regular files under `dir`.
fn sizes(dir: &Path) -> (u64, u64) {
    let mut allocated = 0;
    let mut apparent = 0;
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            let (a, b) = sizes(&path);
            allocated += a;
            apparent += b;
        } else if meta.is_file() {
            allocated += meta.blocks() * 512;
            apparent += meta.len();
        }
    }
    (allocated, apparent)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn status_of(list: &SandboxList, id: SandboxId) -> Option<&str> {
    list.sandboxes
        .iter()
        .find(|s| s.sandbox_id == id.to_string())
        .map(|s| s.status.as_str())
}

#[tokio::test]
async fn create_copies_the_tree_under_the_final_name_and_reports_allocated_bytes() {
    let root = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let id = SandboxId::new();
    let src = sandbox_dir(root.path(), id);
    fs::write(src.join("vmstate"), b"cpu registers").unwrap();
    fs::create_dir_all(src.join("disks/extra")).unwrap();
    fs::write(src.join("disks/rootfs.img"), vec![7u8; 100_000]).unwrap();
    fs::write(src.join("disks/extra/notes"), b"nested").unwrap();
    fs::create_dir(src.join("empty")).unwrap();
    // Sparse: 16 MiB apparent, one 4 KiB block of data in the middle.
    let mut memory = fs::File::create(src.join("memory")).unwrap();
    memory.set_len(16 << 20).unwrap();
    memory.seek(SeekFrom::Start(8 << 20)).unwrap();
    memory.write_all(&[0xab; 4096]).unwrap();
    drop(memory);

    let size = create(&agent, id, "tpl-one").await.unwrap();

    let snap = root.path().join("snapshots/tpl-one");
    let copied = tree(&snap);
    assert_eq!(copied, tree(&src));
    assert_eq!(copied.len(), 7, "{copied:?}");
    assert_eq!(entries(&root.path().join("snapshots")), ["tpl-one"]);
    let (allocated, apparent) = sizes(&snap);
    assert_eq!(size, allocated);
    assert!(
        size < apparent,
        "allocated {size} should be below apparent {apparent}"
    );
    assert!(size > 100_000, "{size}");
}

#[tokio::test]
async fn create_refuses_unknown_sandboxes_taken_keys_and_stopped_sandboxes() {
    let root = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let id = SandboxId::new();
    fs::write(sandbox_dir(root.path(), id).join("f"), b"x").unwrap();

    let unknown = create(&agent, SandboxId::new(), "tpl-a").await.unwrap_err();
    assert_eq!(unknown.code(), Some(AgentCode::NotFound));

    create(&agent, id, "tpl-a").await.unwrap();
    let taken = create(&agent, id, "tpl-a").await.unwrap_err();
    assert_eq!(taken.code(), Some(AgentCode::AlreadyExists));

    let stopped = SandboxId::new();
    fs::write(sandbox_dir(root.path(), stopped).join("f"), b"y").unwrap();
    agent.set_sandbox_status(stopped, "stopped");
    let err = create(&agent, stopped, "tpl-b").await.unwrap_err();
    assert_eq!(err.code(), Some(AgentCode::FailedPrecondition));

    // Refusals write nothing, not even a temporary directory.
    assert_eq!(entries(&root.path().join("snapshots")), ["tpl-a"]);
    let list = agent.list_sandboxes().await.unwrap();
    assert_eq!(status_of(&list, stopped), Some("stopped"));
}

#[tokio::test]
async fn concurrent_creates_of_one_key_store_it_once() {
    let root = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let id = SandboxId::new();
    fs::write(sandbox_dir(root.path(), id).join("f"), vec![1u8; 1 << 20]).unwrap();

    let (a, b) = tokio::join!(create(&agent, id, "tpl-x"), create(&agent, id, "tpl-x"));
    let codes = [
        a.err().and_then(|e| e.code()),
        b.err().and_then(|e| e.code()),
    ];
    assert!(codes.contains(&None), "{codes:?}");
    assert!(codes.contains(&Some(AgentCode::AlreadyExists)), "{codes:?}");
    assert_eq!(entries(&root.path().join("snapshots")), ["tpl-x"]);
}

#[tokio::test]
async fn create_leaves_the_sandbox_paused() {
    let root = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let snapshotted = SandboxId::new();
    let other = SandboxId::new();
    sandbox_dir(root.path(), snapshotted);
    sandbox_dir(root.path(), other);

    let before = agent.list_sandboxes().await.unwrap();
    assert_eq!(status_of(&before, snapshotted), Some("running"));

    create(&agent, snapshotted, "tpl-p").await.unwrap();
    let after = agent.list_sandboxes().await.unwrap();
    assert_eq!(status_of(&after, snapshotted), Some("paused"));
    assert_eq!(status_of(&after, other), Some("running"));

    // A paused sandbox can be snapshotted again.
    create(&agent, snapshotted, "tpl-q").await.unwrap();
}

#[tokio::test]
async fn delete_removes_the_snapshot_and_then_answers_not_found() {
    let root = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let id = SandboxId::new();
    let src = sandbox_dir(root.path(), id);
    fs::create_dir(src.join("sub")).unwrap();
    fs::write(src.join("sub/f"), b"data").unwrap();
    create(&agent, id, "tpl-d").await.unwrap();
    create(&agent, id, "tpl-keep").await.unwrap();

    delete(&agent, "tpl-d").await.unwrap();

    assert_eq!(entries(&root.path().join("snapshots")), ["tpl-keep"]);
    let again = delete(&agent, "tpl-d").await.unwrap_err();
    assert_eq!(again.code(), Some(AgentCode::NotFound));
    let never = delete(&agent, "tpl-never").await.unwrap_err();
    assert_eq!(never.code(), Some(AgentCode::NotFound));
    // The sandbox itself is untouched.
    assert_eq!(fs::read(src.join("sub/f")).unwrap(), b"data");
}

#[tokio::test]
async fn lists_report_what_is_there_and_skip_junk() {
    let root = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let a = SandboxId::new();
    let b = SandboxId::new();
    fs::write(sandbox_dir(root.path(), a).join("f"), vec![3u8; 50_000]).unwrap();
    sandbox_dir(root.path(), b);
    create(&agent, a, "tpl-1").await.unwrap();
    create(&agent, b, "tpl-2").await.unwrap();

    let sandboxes = root.path().join("sandboxes");
    fs::create_dir(sandboxes.join("not-an-id")).unwrap();
    fs::write(sandboxes.join(SandboxId::new().to_string()), b"a file").unwrap();
    symlink(
        sandboxes.join(a.to_string()),
        sandboxes.join(SandboxId::new().to_string()),
    )
    .unwrap();
    let snapshots = root.path().join("snapshots");
    fs::create_dir(snapshots.join(".tmp-x")).unwrap();
    fs::create_dir(snapshots.join(".trash-y")).unwrap();
    fs::create_dir(snapshots.join("bad name")).unwrap();
    fs::write(snapshots.join("stray"), b"a file").unwrap();
    symlink(snapshots.join("tpl-1"), snapshots.join("tpl-link")).unwrap();

    let list = agent.list_sandboxes().await.unwrap();
    let mut ids: Vec<(String, String)> = list
        .sandboxes
        .iter()
        .map(|s| (s.sandbox_id.clone(), s.status.clone()))
        .collect();
    ids.sort();
    let mut expected = vec![
        (a.to_string(), "paused".to_owned()),
        (b.to_string(), "paused".to_owned()),
    ];
    expected.sort();
    assert_eq!(ids, expected);

    let snaps = agent.list_snapshots().await.unwrap();
    let keys: Vec<&str> = snaps.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["tpl-1", "tpl-2"]);
    let now = Timestamp::now().unix_millis();
    for snap in &snaps {
        let (allocated, _) = sizes(&snapshots.join(&snap.key));
        assert_eq!(snap.size_bytes, allocated, "{}", snap.key);
        let created = snap.created_at.expect("a directory has an mtime");
        assert!((now - created.unix_millis()).abs() < 60_000, "{created}");
    }
    assert!(snaps[0].size_bytes >= 50_000, "{:?}", snaps[0]);
}

#[tokio::test]
async fn open_creates_the_layout_and_removes_leftovers() {
    let root = TempDir::new().unwrap();
    let base = root.path().join("agent");
    let snapshots = base.join("snapshots");
    fs::create_dir_all(snapshots.join(".tmp-tpl-a-123/deep/er")).unwrap();
    fs::write(snapshots.join(".tmp-tpl-a-123/deep/er/f"), b"half").unwrap();
    fs::create_dir_all(snapshots.join(".trash-tpl-b-456/d")).unwrap();
    fs::write(snapshots.join(".trash-tpl-b-456/d/f"), b"old").unwrap();
    fs::write(snapshots.join(".tmp-file"), b"x").unwrap();
    fs::create_dir_all(snapshots.join("tpl-kept")).unwrap();
    fs::write(snapshots.join("tpl-kept/f"), b"kept").unwrap();

    let agent = DirHostAgent::open(&base).await.unwrap();

    assert_eq!(agent.root(), base);
    assert!(base.join("sandboxes").is_dir());
    assert_eq!(entries(&snapshots), ["tpl-kept"]);
    assert_eq!(fs::read(snapshots.join("tpl-kept/f")).unwrap(), b"kept");
    // A fresh root gets both directories too.
    let fresh = root.path().join("fresh");
    DirHostAgent::open(&fresh).await.unwrap();
    assert_eq!(entries(&fresh), ["sandboxes", "snapshots"]);
}

#[tokio::test]
async fn a_failed_copy_leaves_nothing_behind() {
    let root = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let id = SandboxId::new();
    let src = sandbox_dir(root.path(), id);
    fs::write(src.join("shallow"), b"copied before the failure").unwrap();
    // A path that fits under sandboxes/<id>/ but not under the longer
    // snapshots/.tmp-<key>-<random>/ (PATH_MAX is 4096 on Linux): the copy
    // fails part-way, even for root.
    let mut deep = src.clone();
    while deep.as_os_str().len() < 4000 {
        deep.push("d".repeat(200));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("f"), b"deep").unwrap();
    let long_key = format!("tpl-{}", "k".repeat(60));

    let err = create(&agent, id, &long_key).await.unwrap_err();

    assert_eq!(err.code(), Some(AgentCode::Internal), "{err}");
    let message = err.to_string();
    assert!(message.contains(&long_key), "{message}");
    assert!(
        !message.contains(&root.path().display().to_string()),
        "{message}"
    );
    assert!(entries(&root.path().join("snapshots")).is_empty());
    assert!(agent.list_snapshots().await.unwrap().is_empty());
}

#[tokio::test]
async fn symlinks_are_copied_as_links_and_never_followed() {
    let root = TempDir::new().unwrap();
    let outside = TempDir::new().unwrap();
    let secret = outside.path().join("secret");
    fs::write(&secret, b"SECRET-CONTENT").unwrap();
    let outside_dir = outside.path().join("dir");
    fs::create_dir(&outside_dir).unwrap();
    fs::write(outside_dir.join("inner"), vec![9u8; 200_000]).unwrap();

    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let id = SandboxId::new();
    let src = sandbox_dir(root.path(), id);
    fs::write(src.join("real"), b"real").unwrap();
    symlink(&secret, src.join("to-file")).unwrap();
    symlink(&outside_dir, src.join("to-dir")).unwrap();
    symlink("../../../../etc/passwd", src.join("relative")).unwrap();

    let size = create(&agent, id, "tpl-links").await.unwrap();

    let snap = root.path().join("snapshots/tpl-links");
    for (name, target) in [
        ("to-file", secret.clone()),
        ("to-dir", outside_dir.clone()),
        ("relative", PathBuf::from("../../../../etc/passwd")),
    ] {
        let meta = fs::symlink_metadata(snap.join(name)).unwrap();
        assert!(meta.file_type().is_symlink(), "{name}");
        assert_eq!(fs::read_link(snap.join(name)).unwrap(), target);
    }
    // Only `real` was read: the linked file and directory were not copied.
    let (allocated, apparent) = sizes(&snap);
    assert_eq!(apparent, 4);
    assert_eq!(size, allocated);
    assert!(size < 200_000, "{size}");

    delete(&agent, "tpl-links").await.unwrap();

    assert!(!snap.exists());
    assert_eq!(fs::read(&secret).unwrap(), b"SECRET-CONTENT");
    assert_eq!(fs::read(outside_dir.join("inner")).unwrap().len(), 200_000);
}

#[tokio::test]
async fn a_sandbox_directory_that_is_a_symlink_is_not_followed() {
    let root = TempDir::new().unwrap();
    let outside = TempDir::new().unwrap();
    fs::write(outside.path().join("secret"), b"SECRET").unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let id = SandboxId::new();
    fs::create_dir_all(root.path().join("sandboxes")).unwrap();
    symlink(
        outside.path(),
        root.path().join("sandboxes").join(id.to_string()),
    )
    .unwrap();

    let err = create(&agent, id, "tpl-s").await.unwrap_err();

    assert_eq!(err.code(), Some(AgentCode::FailedPrecondition));
    assert!(entries(&root.path().join("snapshots")).is_empty());
    assert!(agent.list_sandboxes().await.unwrap().sandboxes.is_empty());
}

#[test]
fn path_escapes_cannot_be_expressed() {
    for bad in ["../x", "a/b", "..", ".x", ".", "", "/etc", ".tmp-x"] {
        assert!(SnapshotKey::parse(bad).is_err(), "{bad:?}");
        assert!(SandboxId::parse(bad).is_err(), "{bad:?}");
    }
    assert!(SnapshotKey::parse("tpl-ok.v2_x").is_ok());
}

struct ReleaseOnDrop(Hold);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

#[tokio::test]
async fn a_key_being_written_is_never_reported_deleted() {
    let root = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let id = SandboxId::new();
    fs::write(sandbox_dir(root.path(), id).join("memory.bin"), b"state").unwrap();
    let hold = Hold::new();
    agent.pause_before_rename(Some(hold.clone()));
    // Released even when an assertion fails, or the paused copy would keep
    // the runtime (and the test) from ever finishing.
    let _release = ReleaseOnDrop(hold.clone());
    let creating = {
        let agent = agent.clone();
        tokio::spawn(async move { create(&agent, id, "tpl-w").await })
    };
    hold.arrived(1).await;

    // The copy is complete but not under its key yet. Were the delete told
    // NotFound, the control plane would count the key deleted, and the
    // files would appear under it a moment later and never go.
    for attempt in 0..3 {
        let err = delete(&agent, "tpl-w").await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(AgentCode::FailedPrecondition),
            "attempt {attempt}: {err}"
        );
    }
    // Clones share what is being written.
    let err = delete(&agent.clone(), "tpl-w").await.unwrap_err();
    assert_eq!(err.code(), Some(AgentCode::FailedPrecondition), "{err}");
    assert!(agent.list_snapshots().await.unwrap().is_empty());
    // The refused deletes did not touch the copy in progress.
    hold.release();
    creating.await.unwrap().unwrap();
    let snapshots = root.path().join("snapshots");
    assert_eq!(entries(&snapshots), ["tpl-w"]);
    assert_eq!(
        fs::read(snapshots.join("tpl-w/memory.bin")).unwrap(),
        b"state"
    );

    // Once in place, a delete removes it, and then it is not found.
    delete(&agent, "tpl-w").await.unwrap();
    assert!(entries(&snapshots).is_empty());
    let again = delete(&agent, "tpl-w").await.unwrap_err();
    assert_eq!(again.code(), Some(AgentCode::NotFound), "{again}");
}

#[tokio::test]
async fn a_delete_removes_what_a_crashed_copy_left_and_answers_not_found() {
    let root = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    // Written after `open` (which would have removed it) by an agent
    // process that then died: no create of this agent owns it.
    let snapshots = root.path().join("snapshots");
    fs::create_dir_all(snapshots.join(".tmp-tpl-c-0123456789abcdef/disk")).unwrap();
    fs::write(
        snapshots.join(".tmp-tpl-c-0123456789abcdef/disk/f"),
        b"half",
    )
    .unwrap();
    // Keys may contain '-': these belong to `tpl-c-2`, or are no temp dir.
    fs::create_dir_all(snapshots.join(".tmp-tpl-c-2-0123456789abcdef")).unwrap();
    fs::create_dir_all(snapshots.join(".tmp-tpl-c")).unwrap();

    let err = delete(&agent, "tpl-c").await.unwrap_err();

    assert_eq!(err.code(), Some(AgentCode::NotFound), "{err}");
    assert_eq!(
        entries(&snapshots),
        [".tmp-tpl-c", ".tmp-tpl-c-2-0123456789abcdef"]
    );
    let err = delete(&agent, "tpl-c-2").await.unwrap_err();
    assert_eq!(err.code(), Some(AgentCode::NotFound), "{err}");
    assert_eq!(entries(&snapshots), [".tmp-tpl-c"]);
}

/// A sandbox directory with a sparse memory file, a disk image, nested
/// directories, a symlink and odd permissions.
fn populate(src: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(src.join("vmstate"), b"cpu registers").unwrap();
    fs::create_dir_all(src.join("disks/extra")).unwrap();
    fs::write(src.join("disks/rootfs.img"), vec![7u8; 100_000]).unwrap();
    fs::write(src.join("disks/extra/notes"), b"nested").unwrap();
    fs::set_permissions(
        src.join("disks/extra/notes"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    symlink("disks/rootfs.img", src.join("rootfs")).unwrap();
    let mut memory = fs::File::create(src.join("memory")).unwrap();
    memory.set_len(64 << 20).unwrap();
    for offset in [0u64, 20 << 20, 63 << 20] {
        memory.seek(SeekFrom::Start(offset)).unwrap();
        memory.write_all(&[0xcd; 8192]).unwrap();
    }
}

fn restore_request(id: SandboxId, template: &str) -> CreateSandboxRequest {
    CreateSandboxRequest::new(id, key(template))
}

/// A snapshot restored into a new sandbox is the snapshot, byte for byte,
/// holes kept; the new sandbox is listed running; destroying it removes
/// it.
#[tokio::test]
async fn create_sandbox_restores_a_snapshot_byte_for_byte_and_destroy_removes_it() {
    let root = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let source = SandboxId::new();
    let src = sandbox_dir(root.path(), source);
    populate(&src);
    create(&agent, source, "tpl-snap").await.unwrap();

    let restored = SandboxId::new();
    let answer = agent
        .create_sandbox(restore_request(restored, "tpl-snap"))
        .await
        .unwrap();
    assert_eq!(answer.sandbox_id, restored.to_string());
    assert_eq!(answer.status, "running");
    let dst = root.path().join("sandboxes").join(restored.to_string());
    assert_eq!(tree(&dst), tree(&src));
    let ((a_src, len_src), (a_dst, len_dst)) = (sizes(&src), sizes(&dst));
    assert_eq!(len_dst, len_src);
    assert!(
        a_dst <= a_src + 4096 * 4 && a_dst < len_dst / 4,
        "holes kept: {a_dst} allocated of {len_dst} (source {a_src})"
    );
    let mode = fs::metadata(dst.join("disks/extra/notes")).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o640);
    let list = agent.list_sandboxes().await.unwrap();
    assert_eq!(status_of(&list, restored), Some("running"));
    // No leftovers of the copy.
    assert!(
        entries(&root.path().join("sandboxes"))
            .iter()
            .all(|n| !n.starts_with('.'))
    );

    // The same id again: refused, nothing changed.
    let again = agent
        .create_sandbox(restore_request(restored, "tpl-snap"))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Some(AgentCode::AlreadyExists));

    agent
        .destroy_sandbox(DestroySandboxRequest::new(restored))
        .await
        .unwrap();
    assert!(!dst.exists());
    let list = agent.list_sandboxes().await.unwrap();
    assert_eq!(status_of(&list, restored), None);
    let gone = agent
        .destroy_sandbox(DestroySandboxRequest::new(restored))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Some(AgentCode::NotFound));
}

/// A base template is a directory under the images root; an unknown
/// template is NotFound and leaves nothing behind.
#[tokio::test]
async fn create_sandbox_from_a_base_template_and_unknown_templates() {
    let root = TempDir::new().unwrap();
    let images = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path())
        .await
        .unwrap()
        .with_images(images.path());
    let base = images.path().join("ubuntu-24.04");
    fs::create_dir_all(&base).unwrap();
    fs::write(base.join("rootfs.img"), b"base image").unwrap();

    let id = SandboxId::new();
    agent
        .create_sandbox(restore_request(id, "ubuntu-24.04"))
        .await
        .unwrap();
    let dst = root.path().join("sandboxes").join(id.to_string());
    assert_eq!(fs::read(dst.join("rootfs.img")).unwrap(), b"base image");

    let missing = SandboxId::new();
    let err = agent
        .create_sandbox(restore_request(missing, "tpl-nowhere"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(AgentCode::NotFound));
    assert_eq!(entries(&root.path().join("sandboxes")), [id.to_string()]);
}

/// Requests whose template or sandbox would name a path outside the root
/// are refused on the wire (InvalidArgument) before they reach the agent:
/// the domain types cannot even express them.
#[tokio::test]
async fn create_sandbox_requests_that_would_leave_the_root_are_refused() {
    use sandbox_snapshots::HostAgentServer;
    let root = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let (addr, _server) = HostAgentServer::new(std::sync::Arc::new(agent))
        .spawn("127.0.0.1:0".parse().unwrap(), std::future::pending())
        .await
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    for (template, sandbox) in [
        ("../../etc", SandboxId::new().to_string()),
        ("tpl-ok", "../../etc".to_owned()),
        ("a/b", SandboxId::new().to_string()),
        (".tmp-x", SandboxId::new().to_string()),
        ("tpl-ok", ".".to_owned()),
    ] {
        let status = raw_create_sandbox(channel.clone(), template, &sandbox).await;
        assert_eq!(status, tonic::Code::InvalidArgument, "{template} {sandbox}");
    }
    assert!(entries(&root.path().join("sandboxes")).is_empty());
}

/// Calls `CreateSandbox` with raw strings, as a hostile client could.
async fn raw_create_sandbox(
    channel: tonic::transport::Channel,
    template: &str,
    sandbox: &str,
) -> tonic::Code {
    use prost::Message;
    #[derive(Clone, PartialEq, Message)]
    struct RawRequest {
        #[prost(string, tag = "1")]
        template: String,
        #[prost(string, tag = "5")]
        sandbox_id: String,
    }
    #[derive(Clone, PartialEq, Message)]
    struct RawResponse {}
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/hostagent.v1.HostAgentService/CreateSandbox");
    let request = tonic::Request::new(RawRequest {
        template: template.to_owned(),
        sandbox_id: sandbox.to_owned(),
    });
    let codec = tonic_prost::ProstCodec::<RawRequest, RawResponse>::default();
    match client.unary(request, path, codec).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

/// While a restore copies a snapshot, a delete of that key is refused
/// (retry later) rather than pulling the files from under it; once the
/// restore is done it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_being_restored_from_is_not_deleted() {
    let root = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let source = SandboxId::new();
    fs::write(
        sandbox_dir(root.path(), source).join("memory.bin"),
        b"state",
    )
    .unwrap();
    create(&agent, source, "tpl-busy").await.unwrap();
    let hold = Hold::new();
    let _release = ReleaseOnDrop(hold.clone());
    agent.pause_before_rename(Some(hold.clone()));
    let restored = SandboxId::new();
    let restore = {
        let agent = agent.clone();
        tokio::spawn(async move {
            agent
                .create_sandbox(restore_request(restored, "tpl-busy"))
                .await
        })
    };
    hold.arrived(1).await;
    let refused = delete(&agent, "tpl-busy").await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(AgentCode::FailedPrecondition),
        "{refused:?}"
    );
    hold.release();
    restore.await.unwrap().unwrap();
    agent.pause_before_rename(None);
    delete(&agent, "tpl-busy").await.unwrap();
    let dst = root.path().join("sandboxes").join(restored.to_string());
    assert_eq!(fs::read(dst.join("memory.bin")).unwrap(), b"state");
}

/// `host_info` reports the configured VMM and the machine; every snapshot
/// says what produced it.
#[tokio::test]
async fn host_info_reports_the_vmm_and_the_machine() {
    let root = TempDir::new().unwrap();
    let agent =
        DirHostAgent::open(root.path())
            .await
            .unwrap()
            .with_vmm("firecracker", "1.7.0", "4.0.0");
    let info = agent.host_info().await.unwrap();
    assert_eq!(
        (
            info.vmm.as_str(),
            info.vmm_version.as_str(),
            info.snapshot_format.as_str()
        ),
        ("firecracker", "1.7.0", "4.0.0")
    );
    assert_eq!(info.arch, std::env::consts::ARCH);
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(info.kernel_version, release.trim());
    assert!(
        !info.cpu_model.is_empty() || !info.cpu_vendor.is_empty(),
        "{info:?}"
    );
    assert!(info.validate().is_ok());
    let source = SandboxId::new();
    fs::write(sandbox_dir(root.path(), source).join("m"), b"x").unwrap();
    let answer = agent
        .create_snapshot(CreateSnapshotRequest::new(source, key("tpl-c")))
        .await
        .unwrap();
    assert_eq!(answer.compat, Some(info));
}

/// The data ranges of the file at `path` (`SEEK_DATA`/`SEEK_HOLE`).
fn data_ranges(path: &Path) -> Vec<(u64, u64)> {
    use rustix::fs::{SeekFrom as Whence, seek};
    let file = fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < len {
        let start = match seek(&file, Whence::Data(pos)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => panic!("SEEK_DATA: {e}"),
        };
        let end = seek(&file, Whence::Hole(start)).unwrap().min(len);
        ranges.push((start, end));
        pos = end;
    }
    ranges
}

/// Asserts the two files are byte-identical without reading their holes:
/// same length, and the same bytes over the union of both files' data
/// ranges (outside it, both read as zeros). Reads 1 MiB at a time.
fn assert_same_sparse_file(a: &Path, b: &Path) {
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (fs::File::open(a).unwrap(), fs::File::open(b).unwrap());
    let len = fa.metadata().unwrap().len();
    assert_eq!(fb.metadata().unwrap().len(), len, "{}", b.display());
    let mut ranges = data_ranges(a);
    ranges.extend(data_ranges(b));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for (start, end) in ranges {
        let mut at = start;
        while at < end {
            let n = usize::try_from((end - at).min(1 << 20)).unwrap();
            fa.read_exact_at(&mut ba[..n], at).unwrap();
            fb.read_exact_at(&mut bb[..n], at).unwrap();
            assert!(ba[..n] == bb[..n], "{} differs at {at}", b.display());
            at += n as u64;
        }
    }
}

/// Allocated bytes of one file.
fn allocated(path: &Path) -> u64 {
    fs::symlink_metadata(path).unwrap().blocks() * 512
}

/// Writes `len` bytes of a recognisable pattern at each offset of a file
/// of `apparent` bytes, the rest holes.
fn sparse_file(path: &Path, apparent: u64, extents: &[(u64, usize)]) {
    let mut file = fs::File::create(path).unwrap();
    file.set_len(apparent).unwrap();
    for (i, &(offset, len)) in extents.iter().enumerate() {
        file.seek(SeekFrom::Start(offset)).unwrap();
        let pattern: Vec<u8> = (0..len).map(|b| (b % 251) as u8 ^ (i as u8 + 1)).collect();
        file.write_all(&pattern).unwrap();
    }
    file.sync_all().unwrap();
}

/// Snapshot and restore of sparse files (holes in the middle, at the
/// start and at the end, a file all hole, an unaligned tail), symlinks and
/// odd permissions: byte-identical, holes kept file by file, the answer's
/// size the allocated bytes, setuid dropped as documented.
#[tokio::test]
async fn sparse_files_symlinks_and_odd_modes_survive_a_snapshot_and_a_restore() {
    use std::os::unix::fs::PermissionsExt;
    let root = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let id = SandboxId::new();
    let src = sandbox_dir(root.path(), id);
    let mib = 1u64 << 20;
    // Holes between, before and after scattered 2 MiB extents.
    sparse_file(
        &src.join("memory"),
        64 * mib,
        &[
            (3 * mib, 2 << 20),
            (20 * mib, 2 << 20),
            (50 * mib + 4096, 2 << 20),
        ],
    );
    // Data at the very start and the very end, odd length.
    sparse_file(
        &src.join("disk.img"),
        32 * mib + 123,
        &[(0, 8192), (32 * mib, 123)],
    );
    sparse_file(&src.join("all-hole"), 8 * mib, &[]);
    fs::write(src.join("empty"), b"").unwrap();
    fs::create_dir(src.join("bin")).unwrap();
    fs::write(src.join("bin/tool"), b"#!/bin/sh\n").unwrap();
    fs::write(src.join("bin/suid"), b"#!/bin/sh\nid\n").unwrap();
    fs::write(src.join("secret"), b"key").unwrap();
    for (path, mode) in [("bin/tool", 0o755), ("bin/suid", 0o4755), ("secret", 0o600)] {
        fs::set_permissions(src.join(path), fs::Permissions::from_mode(mode)).unwrap();
    }
    symlink("memory", src.join("memory-link")).unwrap();
    symlink("/nonexistent/outside", src.join("dangling")).unwrap();
    let files = ["memory", "disk.img", "all-hole", "empty", "bin/tool"];

    let size = create(&agent, id, "tpl-sparse").await.unwrap();
    let snap = root.path().join("snapshots/tpl-sparse");
    assert_eq!(size, sizes(&snap).0, "reported size is the allocated bytes");

    let restored = SandboxId::new();
    agent
        .create_sandbox(restore_request(restored, "tpl-sparse"))
        .await
        .unwrap();
    let dst = root.path().join("sandboxes").join(restored.to_string());

    for copy in [&snap, &dst] {
        assert_eq!(tree(copy), tree(&src), "{}", copy.display());
        for file in files {
            let (from, to) = (src.join(file), copy.join(file));
            assert_same_sparse_file(&from, &to);
            let (a, b) = (allocated(&from), allocated(&to));
            assert!(
                b <= a + 4 * 4096 && a <= b + 4 * 4096,
                "{}: holes kept: {b} allocated, source {a}",
                to.display()
            );
        }
        assert!(allocated(&copy.join("memory")) < 16 * mib);
        assert_eq!(allocated(&copy.join("all-hole")), 0);
        let mode = |p: &str| fs::metadata(copy.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("bin/tool"), 0o755);
        assert_eq!(mode("bin/suid"), 0o755, "setuid is dropped");
        assert_eq!(mode("secret"), 0o600);
        assert_eq!(
            fs::read_link(copy.join("dangling")).unwrap(),
            Path::new("/nonexistent/outside")
        );
        assert!(
            fs::symlink_metadata(copy.join("memory-link"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
}

/// A file far larger than memory could buffer (64 GiB apparent, a few MiB
/// of data scattered over it, the last byte included) snapshots and
/// restores exactly, without its holes being read: a copy that read every
/// byte would take minutes here.
#[tokio::test]
async fn a_file_larger_than_memory_copies_by_its_extents() {
    let root = TempDir::new().unwrap();
    let agent = DirHostAgent::open(root.path()).await.unwrap();
    let id = SandboxId::new();
    let src = sandbox_dir(root.path(), id);
    let gib = 1u64 << 30;
    let apparent = 64 * gib;
    let mut extents: Vec<(u64, usize)> = (0..8).map(|i| (i * 8 * gib + 12_288, 1 << 19)).collect();
    extents.push((apparent - 1, 1));
    sparse_file(&src.join("memory"), apparent, &extents);

    let size = create(&agent, id, "tpl-huge").await.unwrap();
    let snap = root.path().join("snapshots/tpl-huge");
    assert_same_sparse_file(&src.join("memory"), &snap.join("memory"));
    assert_eq!(size, allocated(&snap.join("memory")));
    assert!(size < 64 << 20, "{size} allocated");

    let restored = SandboxId::new();
    agent
        .create_sandbox(restore_request(restored, "tpl-huge"))
        .await
        .unwrap();
    let dst = root.path().join("sandboxes").join(restored.to_string());
    assert_same_sparse_file(&src.join("memory"), &dst.join("memory"));
    assert!(allocated(&dst.join("memory")) < 64 << 20);
}
