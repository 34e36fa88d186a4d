//! The data path cases (issue 14, items 3 and 4): the reference agent
//! (`DirHostAgent`, in-process through its `HostAgent` trait) snapshotting
//! and restoring a sandbox directory, against `cp -a` of the same directory
//! followed by an fsync of every file and directory it wrote (ours is
//! durable, so is the baseline), in the same run on the same filesystem.
//!
//! The fixture is generated, never committed: a sandbox directory with one
//! sparse disk image (a quarter of it written, in 2 MiB extents at
//! deterministic scattered positions, never adjacent) and a handful of small
//! files. Cold-cache runs drop the page cache (`sync; echo 3 >
//! /proc/sys/vm/drop_caches`, root only) before every timed run of either
//! side. The reflink cases run on an XFS image (`reflink=1`) mounted over a
//! loop device, when root and `mkfs.xfs` allow. Also draws
//! `target/bench/snapshot_time.svg` (and `SNAPSHOTS_BENCH_CHART`).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sandbox_snapshots::agent::{
    CreateSandboxRequest, CreateSnapshotRequest, DeleteSnapshotRequest, DestroySandboxRequest,
    SnapshotKey,
};
use sandbox_snapshots::{DirHostAgent, HostAgent, SandboxId};
use tokio::runtime::Runtime;

use super::{BenchResult, Row, quick};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Size of one written extent of the disk image.
const EXTENT: u64 = 2 * MIB;

/// What one run measures.
struct Plan {
    /// Apparent sizes with table rows (warm and cold, snapshot and restore).
    rows: Vec<u64>,
    /// Apparent sizes on the chart (warm snapshots only); a superset of
    /// `rows`.
    chart: Vec<u64>,
    /// Timed runs per side and point; the median is reported.
    runs: usize,
}

impl Plan {
    fn new() -> Self {
        if quick() {
            Self {
                rows: vec![8 * MIB, 32 * MIB],
                chart: vec![2 * MIB, 8 * MIB, 32 * MIB],
                runs: 1,
            }
        } else {
            Self {
                rows: vec![GIB, 4 * GIB],
                chart: vec![256 * MIB, GIB, 4 * GIB],
                runs: 3,
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Cache {
    Warm,
    Cold,
}

impl Cache {
    fn name(self) -> &'static str {
        match self {
            Cache::Warm => "warm",
            Cache::Cold => "cold",
        }
    }
}

/// Whether the page cache can be dropped here; the reason when not.
fn can_drop_caches() -> Result<(), String> {
    OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
        .map(drop)
        .map_err(|e| format!("cannot open /proc/sys/vm/drop_caches for writing ({e}); run as root"))
}

/// Writes back everything dirty (so no run pays for another's writeback)
/// and, for a cold run, empties the page cache.
fn settle(cache: Cache) -> BenchResult<()> {
    rustix::fs::sync();
    if cache == Cache::Cold {
        fs::write("/proc/sys/vm/drop_caches", "3")?;
    }
    Ok(())
}

/// Times `f` after [`settle`].
fn timed(cache: Cache, f: impl FnOnce() -> BenchResult<()>) -> BenchResult<Duration> {
    settle(cache)?;
    let began = Instant::now();
    f()?;
    Ok(began.elapsed())
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn size_name(bytes: u64) -> String {
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

fn secs(d: Duration) -> String {
    if d < Duration::from_millis(100) {
        format!("{:.2} ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.3} s", d.as_secs_f64())
    }
}

// ---------------------------------------------------------------- fixture

/// splitmix64: deterministic, fast, good enough to make data incompressible.
fn mix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut state = seed;
    for chunk in buf.chunks_mut(8) {
        let v = mix(&mut state).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// The number of written extents of the standard image of `apparent`
/// bytes: one in each 8 MiB, 25 %.
fn standard_extents(apparent: u64) -> u64 {
    apparent / (4 * EXTENT)
}

/// Offsets of `count` written 2 MiB extents spread over an image of
/// `apparent` bytes: one in each of `count` equal groups, at a
/// deterministic position among the group's first three extents (so no
/// two touch and merge).
fn extents(apparent: u64, count: u64) -> Vec<u64> {
    let mut state = apparent;
    let group = (apparent / count.max(1)) / EXTENT * EXTENT;
    (0..count)
        .map(|g| g * group + (mix(&mut state) % 3.min(group / EXTENT).max(1)) * EXTENT)
        .collect()
}

/// Writes a sandbox's state directory at `dir`: `disk.img` of `apparent`
/// bytes with `count` written extents (see [`extents`]) and a few small
/// files, all fsynced.
fn sandbox_fixture(dir: &Path, apparent: u64, count: u64) -> BenchResult<()> {
    fs::create_dir_all(dir.join("logs"))?;
    let disk = File::create_new(dir.join("disk.img"))?;
    disk.set_len(apparent)?;
    let mut buf = vec![0u8; EXTENT as usize];
    for offset in extents(apparent, count) {
        fill(&mut buf, offset ^ apparent);
        disk.write_all_at(&buf, offset)?;
    }
    disk.sync_all()?;
    let small: [(&str, usize); 5] = [
        ("config.json", 1_500),
        ("vmstate.bin", 96 * 1024),
        ("metadata", 300),
        ("logs/console.log", 24 * 1024),
        ("logs/metrics.log", 6 * 1024),
    ];
    for (i, (name, len)) in small.into_iter().enumerate() {
        let mut data = vec![0u8; len];
        fill(&mut data, i as u64);
        let mut f = File::create_new(dir.join(name))?;
        f.write_all(&data)?;
        f.sync_all()?;
    }
    sync_tree(dir)
}

/// fsyncs every file and directory under `dir` (and `dir` itself, and its
/// parent, which holds its name): what makes the baseline's copy durable.
fn sync_tree(dir: &Path) -> BenchResult<()> {
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                File::open(entry.path())?.sync_all()?;
            }
        }
        File::open(&d)?.sync_all()?;
    }
    if let Some(parent) = dir.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// The baseline: `cp -a ARGS SRC DST`, then [`sync_tree`] of `DST`.
fn cp_durable(args: &[&str], src: &Path, dst: &Path) -> BenchResult<()> {
    let status = Command::new("cp")
        .arg("-a")
        .args(args)
        .arg(src)
        .arg(dst)
        .status()?;
    if !status.success() {
        return Err(format!("cp -a {args:?} {} failed: {status}", src.display()).into());
    }
    sync_tree(dst)
}

// ------------------------------------------------------------ filesystems

/// A filesystem under test: where the agent's root and the baseline's
/// copies go, and how `cp` copies there.
struct Target {
    name: &'static str,
    /// Empty directory on the filesystem; everything goes below it.
    dir: PathBuf,
    cp_args: &'static [&'static str],
    /// Goal of ours / baseline for snapshots and restores.
    goal: f64,
}

/// An XFS image with `reflink=1` on a loop device, mounted; unmounted,
/// detached and removed on drop, whatever happened.
struct XfsMount {
    image: PathBuf,
    device: Option<String>,
    mount: PathBuf,
    mounted: bool,
}

impl XfsMount {
    /// Under `dir` (a temporary directory): a sparse image of `bytes`.
    fn new(dir: &Path, bytes: u64) -> Result<Self, String> {
        let mut guard = Self {
            image: dir.join("xfs.img"),
            device: None,
            mount: dir.join("mnt"),
            mounted: false,
        };
        File::create_new(&guard.image)
            .and_then(|f| f.set_len(bytes))
            .map_err(|e| format!("cannot create the image: {e}"))?;
        run_tool("mkfs.xfs", &["-q", "-m", "reflink=1"], &guard.image)?;
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&guard.image)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        guard.device = Some(device.clone());
        fs::create_dir(&guard.mount).map_err(|e| format!("mkdir: {e}"))?;
        run_tool("mount", &[&device], &guard.mount)?;
        guard.mounted = true;
        Ok(guard)
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        if self.mounted
            && let Err(e) = run_tool("umount", &[], &self.mount)
        {
            eprintln!("datapath: cannot unmount {}: {e}", self.mount.display());
        }
        if let Some(device) = &self.device
            && let Err(e) = run_tool("losetup", &["-d"], Path::new(device))
        {
            eprintln!("datapath: cannot detach {device}: {e}");
        }
        let _ = fs::remove_file(&self.image);
    }
}

/// Runs `tool ARGS PATH`; the error says what it printed.
fn run_tool(tool: &str, args: &[&str], path: &Path) -> Result<(), String> {
    let out = Command::new(tool)
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| format!("{tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} {args:?} {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The reflink filesystem, or why there is none.
fn reflink_fs(dir: &Path, plan: &Plan) -> Result<XfsMount, String> {
    can_drop_caches().map_err(|_| "they need root (loop devices)".to_owned())?;
    let have_mkfs = || {
        Command::new("sh")
            .args(["-c", "command -v mkfs.xfs"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have_mkfs() {
        // Bounded: a machine without package access must not stall the run.
        eprintln!("datapath: no mkfs.xfs, trying apt-get install -y xfsprogs (20 s at most)");
        let _ = Command::new("timeout")
            .args(["20", "apt-get", "install", "-y", "-qq", "xfsprogs"])
            .output();
        if !have_mkfs() {
            return Err("mkfs.xfs is missing and xfsprogs did not install".into());
        }
    }
    // Room for every image at once plus the filesystem's own needs.
    let data: u64 = plan.chart.iter().map(|s| s / 4).sum();
    XfsMount::new(dir, (data * 3).max(GIB) + 2 * GIB)
}

// ------------------------------------------------------------------ cases

/// One filesystem's agent, with a sandbox directory per size.
struct Bench<'a> {
    rt: &'a Runtime,
    target: &'a Target,
    agent: DirHostAgent,
    runs: usize,
    /// Counter for unique names.
    n: u64,
}

/// Warm snapshot medians of one filesystem, for the chart: (size, ours,
/// baseline).
type Points = Vec<(u64, Duration, Duration)>;

impl<'a> Bench<'a> {
    fn open(rt: &'a Runtime, target: &'a Target, runs: usize) -> BenchResult<Self> {
        let agent = rt.block_on(DirHostAgent::open(target.dir.join("agent")))?;
        Ok(Self {
            rt,
            target,
            agent,
            runs,
            n: 0,
        })
    }

    fn next(&mut self) -> u64 {
        self.n += 1;
        self.n
    }

    fn key(&mut self, what: &str) -> BenchResult<SnapshotKey> {
        let n = self.next();
        Ok(SnapshotKey::parse(&format!("{what}-{n}"))?)
    }

    fn cp_dir(&mut self) -> PathBuf {
        let n = self.next();
        self.target.dir.join(format!("cp-{n}"))
    }

    /// A registered sandbox whose state directory is the fixture, with
    /// `count` written extents.
    fn sandbox(&mut self, apparent: u64, count: u64) -> BenchResult<(SandboxId, PathBuf)> {
        let id = SandboxId::new();
        let dir = self.agent.root().join("sandboxes").join(id.to_string());
        sandbox_fixture(&dir, apparent, count)?;
        Ok((id, dir))
    }

    /// Medians of ours and the baseline snapshotting `id` (at `src`),
    /// alternating sides; every copy is removed before the next run.
    fn snapshot(
        &mut self,
        id: SandboxId,
        src: &Path,
        cache: Cache,
    ) -> BenchResult<(Duration, Duration)> {
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        for _ in 0..self.runs {
            let key = self.key("snap")?;
            let agent = &self.agent;
            ours.push(timed(cache, || {
                self.rt
                    .block_on(agent.create_snapshot(CreateSnapshotRequest::new(id, key.clone())))?;
                Ok(())
            })?);
            self.rt
                .block_on(agent.delete_snapshot(DeleteSnapshotRequest::new(key)))?;
            let dst = self.cp_dir();
            base.push(timed(cache, || cp_durable(self.target.cp_args, src, &dst))?);
            fs::remove_dir_all(&dst)?;
        }
        Ok((median(ours), median(base)))
    }

    /// Medians of ours and the baseline restoring the snapshot `key` (at
    /// `src`) into a new sandbox.
    fn restore(
        &mut self,
        key: &SnapshotKey,
        src: &Path,
        cache: Cache,
    ) -> BenchResult<(Duration, Duration)> {
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        for _ in 0..self.runs {
            let id = SandboxId::new();
            let agent = &self.agent;
            ours.push(timed(cache, || {
                self.rt
                    .block_on(agent.create_sandbox(CreateSandboxRequest::new(id, key.clone())))?;
                Ok(())
            })?);
            self.rt
                .block_on(agent.destroy_sandbox(DestroySandboxRequest::new(id)))?;
            let dst = self.cp_dir();
            base.push(timed(cache, || cp_durable(self.target.cp_args, src, &dst))?);
            fs::remove_dir_all(&dst)?;
        }
        Ok((median(ours), median(base)))
    }

    fn row(&self, what: &str, size: u64, cache: Cache, (ours, base): (Duration, Duration)) -> Row {
        let ratio = ours.as_secs_f64() / base.as_secs_f64();
        let goal = self.target.goal;
        Row {
            case: format!(
                "{what}, {}: {} sparse (25 % written), {} cache",
                self.target.name,
                size_name(size),
                cache.name()
            ),
            ours: format!("median {}", secs(ours)),
            baseline: format!(
                "`cp -a {}` + fsync: median {}",
                self.target.cp_args.join(" "),
                secs(base)
            ),
            ratio,
            goal: format!("≤ {goal}"),
            met: ratio <= goal,
        }
    }

    /// Every case on this filesystem: rows, and the warm snapshot points.
    fn cases(&mut self, plan: &Plan, caches: &[Cache]) -> BenchResult<(Vec<Row>, Points)> {
        let mut rows = Vec::new();
        let mut points = Points::new();
        for &size in &plan.chart {
            let began = Instant::now();
            let (id, src) = self.sandbox(size, standard_extents(size))?;
            let with_rows = plan.rows.contains(&size);
            let warm = self.snapshot(id, &src, Cache::Warm)?;
            points.push((size, warm.0, warm.1));
            if with_rows {
                rows.push(self.row("snapshot", size, Cache::Warm, warm));
                for &cache in caches.iter().filter(|&&c| c == Cache::Cold) {
                    let cold = self.snapshot(id, &src, cache)?;
                    rows.push(self.row("snapshot", size, cache, cold));
                }
                let key = self.key("restore")?;
                self.rt.block_on(
                    self.agent
                        .create_snapshot(CreateSnapshotRequest::new(id, key.clone())),
                )?;
                let snap = self.agent.root().join("snapshots").join(key.as_str());
                for &cache in caches {
                    let r = self.restore(&key, &snap, cache)?;
                    rows.push(self.row("restore", size, cache, r));
                }
                self.rt
                    .block_on(self.agent.delete_snapshot(DeleteSnapshotRequest::new(key)))?;
            }
            fs::remove_dir_all(&src)?;
            eprintln!(
                "datapath: {} {} done in {:.1} s",
                self.target.name,
                size_name(size),
                began.elapsed().as_secs_f64()
            );
        }
        Ok((rows, points))
    }
}

/// Every data path case; see the module docs.
pub(super) fn cases(rt: &Runtime) -> BenchResult<Vec<Row>> {
    let plan = Plan::new();
    let caches = match can_drop_caches() {
        Ok(()) => vec![Cache::Warm, Cache::Cold],
        Err(reason) => {
            eprintln!("skipping the cold-cache rows: {reason}");
            vec![Cache::Warm]
        }
    };
    let mut rows = Vec::new();

    let dir = tempfile::Builder::new().prefix("datapath-").tempdir()?;
    let plain = Target {
        name: "copy",
        dir: dir.path().to_path_buf(),
        cp_args: &["--sparse=always"],
        goal: 1.1,
    };
    let (plain_rows, plain_points) = Bench::open(rt, &plain, plan.runs)?.cases(&plan, &caches)?;
    rows.extend(plain_rows);
    drop(dir);

    let mut reflink_points = None;
    let xfs_dir = tempfile::Builder::new().prefix("datapath-xfs-").tempdir()?;
    match reflink_fs(xfs_dir.path(), &plan) {
        Err(reason) => eprintln!("skipping the reflink cases: {reason}"),
        Ok(mount) => {
            let reflink = Target {
                name: "XFS reflink",
                dir: mount.mount.clone(),
                cp_args: &["--reflink=always"],
                goal: 1.5,
            };
            // On error `mount` is dropped on the way out: unmounted, detached.
            let mut bench = Bench::open(rt, &reflink, plan.runs)?;
            let (reflink_rows, points) = bench.cases(&plan, &caches)?;
            rows.extend(reflink_rows);
            rows.extend(constant_row(&plan, &points));
            rows.extend(bench.same_extents_row(&plan, &points)?);
            reflink_points = Some(points);
            drop(mount);
        }
    }

    chart(&plain_points, reflink_points.as_deref())?;
    Ok(rows)
}

/// Ours on reflink at the largest row size against the smallest: a clone
/// costs the same whatever the file's size.
fn constant_row(plan: &Plan, points: &Points) -> Option<Row> {
    let (small, large) = (*plan.rows.first()?, *plan.rows.last()?);
    let at = |size| points.iter().find(|p| p.0 == size).map(|p| p.1);
    let (s, l) = (at(small)?, at(large)?);
    Some(size_row(&size_name(large), small, s, l))
}

/// A row of ours at `large` (described) against ours at `small`, warm.
fn size_row(large: &str, small: u64, s: Duration, l: Duration) -> Row {
    let ratio = l.as_secs_f64() / s.as_secs_f64();
    Row {
        case: format!(
            "snapshot, XFS reflink: ours at {large} against ours at {}, warm cache",
            size_name(small)
        ),
        ours: format!("median {}", secs(l)),
        baseline: format!("ours at {}: median {}", size_name(small), secs(s)),
        ratio,
        goal: "≤ 1.3".into(),
        met: ratio <= 1.3,
    }
}

impl Bench<'_> {
    /// Ours at the largest row size with the smallest's extent count,
    /// against ours at the smallest (its warm point): what a clone costs
    /// as the file grows and its extents do not. A clone remaps extent by
    /// extent, so [`constant_row`], whose larger image also has four times
    /// the extents, measures the extent count as much as the size.
    fn same_extents_row(&mut self, plan: &Plan, points: &Points) -> BenchResult<Option<Row>> {
        let (Some(&small), Some(&large)) = (plan.rows.first(), plan.rows.last()) else {
            return Ok(None);
        };
        let Some(s) = points.iter().find(|p| p.0 == small).map(|p| p.1) else {
            return Ok(None);
        };
        let count = standard_extents(small);
        let (id, src) = self.sandbox(large, count)?;
        let (l, _) = self.snapshot(id, &src, Cache::Warm)?;
        fs::remove_dir_all(&src)?;
        let large = format!(
            "{} with {count} extent{} (as {})",
            size_name(large),
            if count == 1 { "" } else { "s" },
            size_name(small)
        );
        Ok(Some(size_row(&large, small, s, l)))
    }
}

// ------------------------------------------------------------------ chart

/// Where the chart goes: `target/bench/` of `CARGO_TARGET_DIR` or the
/// crate's target directory, and `SNAPSHOTS_BENCH_CHART` when set.
fn chart_paths() -> Vec<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let mut paths = vec![target.join("bench").join("snapshot_time.svg")];
    if let Some(extra) = std::env::var_os("SNAPSHOTS_BENCH_CHART").filter(|p| !p.is_empty()) {
        paths.push(PathBuf::from(extra));
    }
    paths
}

/// Snapshot time (warm cache) against the image's apparent size, log-log.
fn chart(plain: &Points, reflink: Option<&[(u64, Duration, Duration)]>) -> BenchResult<()> {
    use plotters::prelude::*;

    let ms = |d: Duration| (d.as_secs_f64() * 1000.0).max(0.01);
    let mib = |b: u64| b as f64 / MIB as f64;
    // (legend, colour, (MiB, ms) points)
    type Series = (String, RGBColor, Vec<(f64, f64)>);
    let mut series: Vec<Series> = vec![
        (
            "ours (DirHostAgent, extent copy)".into(),
            RGBColor(0x1f, 0x77, 0xb4),
            plain.iter().map(|p| (mib(p.0), ms(p.1))).collect(),
        ),
        (
            "cp -a --sparse=always + fsync".into(),
            RGBColor(0xff, 0x7f, 0x0e),
            plain.iter().map(|p| (mib(p.0), ms(p.2))).collect(),
        ),
    ];
    if let Some(points) = reflink {
        series.push((
            "ours on XFS reflink".into(),
            RGBColor(0x2c, 0xa0, 0x2c),
            points.iter().map(|p| (mib(p.0), ms(p.1))).collect(),
        ));
        series.push((
            "cp -a --reflink=always + fsync (XFS)".into(),
            RGBColor(0xd6, 0x27, 0x28),
            points.iter().map(|p| (mib(p.0), ms(p.2))).collect(),
        ));
    }
    let all = || series.iter().flat_map(|s| s.2.iter());
    let (x_lo, x_hi) = all().fold((f64::MAX, 0f64), |(lo, hi), p| (lo.min(p.0), hi.max(p.0)));
    let (y_lo, y_hi) = all().fold((f64::MAX, 0f64), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if series[0].2.is_empty() {
        return Ok(());
    }

    let paths = chart_paths();
    let first = &paths[0];
    if let Some(parent) = first.parent() {
        fs::create_dir_all(parent)?;
    }
    {
        let root = SVGBackend::new(first, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Snapshot of a sandbox directory (25 % written), warm cache",
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(
                (x_lo / 1.5..x_hi * 1.5).log_scale(),
                (y_lo / 2.0..y_hi * 2.0).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("apparent size of the disk image (MiB)")
            .y_desc("time to a durable copy (ms)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                if *y >= 10.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.2}")
                }
            })
            .draw()?;
        for (label, color, points) in &series {
            let color = *color;
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    for extra in &paths[1..] {
        fs::copy(first, extra)?;
    }
    for path in &paths {
        eprintln!("datapath: chart written to {}", path.display());
    }
    Ok(())
}
