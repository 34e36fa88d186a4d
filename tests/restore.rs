//! Restore (SPEC §7, §4a "Restore") through the public API, on each store
//! (see [`conformance!`]):
//!
//! - placement: only hosts that hold the template's files, only online
//!   ones, the least loaded of those; a base template without placements
//!   on any online host;
//! - compatibility of the recorded `HostInfo` with each host's, unknown on
//!   either side allowed, and what the template object shows;
//! - team isolation, request validation, sandbox ids never reused;
//! - the fault matrix of `CreateSandbox` (every way an agent call can fail,
//!   before or after starting the VM, ours and the Go-like agent), of the
//!   `ListSandboxes` asked after an ambiguous failure, and of the queued
//!   `DestroySandbox`;
//! - a delete or an overwrite racing a restore in flight, a caller that
//!   goes away, a shutdown, and restores interrupted by a crash.
//!
//! After every case the invariants of §4a hold once the worker drained: no
//! VM runs that its caller was told failed, every registered `running`
//! restored sandbox runs on its host, nothing stays `starting`, no journal
//! entry stays open and no destroy stays queued once the host answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::failure::{Failure, When};
use common::*;
use sandbox_snapshots::agent::{AgentOp, Fault, Hold};
use sandbox_snapshots::*;

conformance!(
    placement_follows_the_files_the_host_status_and_the_load,
    restores_in_flight_count_as_load,
    compatibility_is_checked_against_the_recorded_host_info,
    the_template_shows_compat_hosts_state_and_last_use,
    teams_restore_only_their_own_and_platform_templates,
    requests_are_validated,
    sandbox_ids_are_never_reused,
    create_sandbox_failures,
    list_sandboxes_failures_after_an_ambiguous_restore,
    the_listed_status_after_an_ambiguous_failure_decides,
    a_host_back_online_does_not_cut_the_destroy_grace,
    a_host_that_cannot_say_keeps_its_cached_host_info,
    destroy_sandbox_failures_are_retried_until_the_host_confirms,
    a_delete_during_a_restore_keeps_the_files_until_it_ends,
    a_dropped_caller_does_not_abort_the_restore,
    a_shutdown_waits_for_a_restore_in_flight,
    interrupted_restores_are_finished_or_rolled_back,
    another_teams_vm_under_the_id_is_never_taken_nor_destroyed,
);

/// The create, list and delete timeouts of these tests.
const TIMEOUT: Duration = Duration::from_millis(300);

fn options() -> ManagerOptions {
    let mut o = fast_options();
    o.create_timeout = TIMEOUT;
    o.list_timeout = TIMEOUT;
    o.delete_timeout = TIMEOUT;
    o
}

/// A host of the test: its id and its agent.
#[derive(Clone)]
struct Node {
    id: HostId,
    agent: Arc<MemoryHostAgent>,
}

/// The host every [`Env`] starts with.
fn first(env: &Env) -> Node {
    Node {
        id: env.host,
        agent: env.agent.clone(),
    }
}

/// Another host serving `agent`, registered online.
async fn add_host(env: &Env, agent: MemoryHostAgent) -> Node {
    let node = Node {
        id: HostId::new(),
        agent: Arc::new(agent),
    };
    env.transport.add_host(node.id, node.agent.clone());
    env.manager
        .registry()
        .register_host(node.id, "name", HostStatus::Online)
        .await
        .unwrap();
    node
}

/// A snapshot of `team` (2 vCPUs, 512 MiB) whose files `holders` hold.
async fn snapshot_on(
    env: &Env,
    team: TeamId,
    n: &str,
    holders: &[&Node],
    compat: Option<HostInfo>,
) -> Template {
    let mut new = NewTemplate::new(team, name(n), TemplateType::Snapshot)
        .shape(2, 512)
        .size_bytes(1 << 20)
        .on_hosts(holders.iter().map(|h| h.id));
    if let Some(compat) = compat {
        new = new.compat(compat);
    }
    let t = env.manager.registry().register_template(new).await.unwrap();
    for h in holders {
        h.agent.put_snapshot(&t.id.to_string(), 1 << 20, None);
    }
    t
}

/// A base template of `team` (1 vCPU, 256 MiB) recorded on `placed` (none:
/// available everywhere), which every agent of `fleet` can start.
async fn base_on(env: &Env, team: TeamId, n: &str, placed: &[&Node], fleet: &[Node]) -> Template {
    let new = NewTemplate::new(team, name(n), TemplateType::Base)
        .shape(1, 256)
        .on_hosts(placed.iter().map(|h| h.id));
    let t = env.manager.registry().register_template(new).await.unwrap();
    for h in fleet {
        h.agent.add_base_template(&t.id.to_string());
    }
    t
}

/// Registers `n` sandboxes of another team on `host`, with `status`.
async fn load(env: &Env, host: &Node, n: usize, status: SandboxStatus) {
    let team = TeamId::new();
    for _ in 0..n {
        let sandbox = Sandbox::new(SandboxId::new(), team, Some(host.id), status, 1, 64);
        env.manager
            .registry()
            .register_sandbox(sandbox)
            .await
            .unwrap();
    }
}

fn req(n: &str) -> RestoreRequest {
    RestoreRequest::new(name(n))
}

async fn restore(env: &Env, team: TeamId, request: RestoreRequest) -> Result<Sandbox> {
    env.manager.restore(&caller(team), request).await
}

/// Checks that `result` is the error `code` and returns it.
fn expect_code<T: std::fmt::Debug>(case: &str, result: Result<T>, code: ErrorCode) -> Error {
    let err = result.expect_err(case);
    assert_eq!(err.code(), code, "{case}: {err:?}");
    assert_eq!(err.http_status(), code.http_status(), "{case}");
    err
}

/// The `sandbox.restore` entries of `team`'s audit log about `sandbox`.
async fn restore_entries(env: &Env, team: TeamId, sandbox: SandboxId) -> Vec<AuditEntry> {
    env.manager
        .audit_log(&caller(team), AuditQuery::new())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.action == actions::SANDBOX_RESTORE && e.resource_id == sandbox.to_string())
        .collect()
}

/// Checks the one audit entry of a restore of `template` into `sandbox`:
/// keyed by the sandbox, naming the template, with the caller's error.
async fn check_audit(
    case: &str,
    env: &Env,
    team: TeamId,
    sandbox: SandboxId,
    template: &Template,
    error: Option<&Error>,
) {
    let entries = restore_entries(env, team, sandbox).await;
    assert_eq!(entries.len(), 1, "{case}: {entries:?}");
    let e = &entries[0];
    assert_eq!(e.resource_type, RESOURCE_SANDBOX, "{case}: {e:?}");
    assert_eq!(
        e.metadata["template"],
        template.name.as_str(),
        "{case}: {e:?}"
    );
    assert_eq!(
        e.metadata["template_id"],
        template.id.to_string(),
        "{case}: {e:?}"
    );
    match error {
        None => {
            assert_eq!(e.outcome, AuditOutcome::Success, "{case}: {e:?}");
            assert_eq!(e.error_code, None, "{case}: {e:?}");
        }
        Some(err) => {
            assert_eq!(e.outcome, AuditOutcome::Failure, "{case}: {e:?}");
            assert_eq!(
                e.error_code.as_deref(),
                Some(err.code().as_str()),
                "{case}: {e:?}"
            );
        }
    }
}

/// Whether a destroy of `sandbox` is queued, or was already attempted (the
/// worker may be faster than the test).
async fn destroy_queued_or_done(env: &Env, node: &Node, sandbox: SandboxId) -> bool {
    let queued = env
        .manager
        .pending_destroys()
        .await
        .unwrap()
        .iter()
        .any(|d| d.sandbox == sandbox && d.host == node.id);
    queued || node.agent.calls(AgentOp::DestroySandbox) >= 1
}

/// Runs the background work, faults cleared, until no restore is open and
/// no destroy is queued (at most 10 s).
async fn drain_restores(env: &Env, fleet: &[Node]) {
    for node in fleet {
        node.agent.clear_faults();
        node.agent.set_unavailable(false);
    }
    eventually("the worker drains the restores", || async {
        let _ = env.manager.run_pending_work().await;
        env.manager.pending_destroys().await.unwrap().is_empty()
            && env.count("SELECT count(*) FROM restores").await == 0
    })
    .await;
}

/// The invariants of §4a "Restore" once the worker drained: no sandbox
/// stays `starting`, no journal entry open, no destroy queued; none of
/// `failed` (whose callers were told the restore failed) is registered or
/// runs on any host; each of `running` is registered `running` and runs on
/// its host; and no other restored sandbox is registered `running`.
async fn assert_restore_invariants(
    case: &str,
    env: &Env,
    fleet: &[Node],
    failed: &[SandboxId],
    running: &[SandboxId],
) {
    let count = |sql: &'static str| env.count(sql);
    assert_eq!(
        count("SELECT count(*) FROM sandboxes WHERE status = 'starting'").await,
        0,
        "{case}: a sandbox stays starting"
    );
    assert_eq!(
        count("SELECT count(*) FROM restores").await,
        0,
        "{case}: a restore stays open"
    );
    let pending = env.manager.pending_destroys().await.unwrap();
    assert!(pending.is_empty(), "{case}: destroys left: {pending:?}");
    for id in failed {
        let registered = env.manager.registry().sandbox(*id).await.unwrap();
        assert_eq!(registered, None, "{case}: failed {id} is registered");
        for node in fleet {
            assert_eq!(
                node.agent.sandbox_status(*id),
                None,
                "{case}: failed {id} runs on {}",
                node.id
            );
        }
    }
    for id in running {
        let sandbox = env
            .manager
            .registry()
            .sandbox(*id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{case}: {id} is not registered"));
        assert_eq!(sandbox.status, SandboxStatus::Running, "{case}");
        let host = fleet
            .iter()
            .find(|n| Some(n.id) == sandbox.host)
            .unwrap_or_else(|| panic!("{case}: {id} is on an unknown host"));
        assert_eq!(
            host.agent.sandbox_status(*id).as_deref(),
            Some("running"),
            "{case}: {id} does not run on its host"
        );
    }
    let restored = count(
        "SELECT count(*) FROM sandboxes WHERE status = 'running' AND template_id IS NOT NULL",
    )
    .await;
    assert_eq!(
        restored,
        i64::try_from(running.len()).unwrap(),
        "{case}: restored sandboxes registered running"
    );
}

// ------------------------------------------------------------ placement

/// One placement scene: three hosts, which of them hold the template, how
/// many running (and paused) sandboxes each has, their status, and where
/// the restore lands (the host's index) or the error.
struct Scene {
    what: &'static str,
    kind: TemplateType,
    holds: [bool; 3],
    running: [usize; 3],
    paused: [usize; 3],
    status: [HostStatus; 3],
    lands: std::result::Result<usize, ErrorCode>,
}

const ON: HostStatus = HostStatus::Online;
const NO: bool = false;
const YES: bool = true;

fn scenes() -> Vec<Scene> {
    use TemplateType::{Base, Snapshot};
    let scene = |what, kind, holds, running, status, lands| Scene {
        what,
        kind,
        holds,
        running,
        paused: [0; 3],
        status,
        lands,
    };
    let mut scenes = vec![
        scene(
            "the only holder wins, although the most loaded",
            Snapshot,
            [YES, NO, NO],
            [3, 0, 0],
            [ON; 3],
            Ok(0),
        ),
        scene(
            "two holders: the less loaded",
            Snapshot,
            [NO, YES, YES],
            [0, 2, 1],
            [ON; 3],
            Ok(2),
        ),
        scene(
            "two holders, loads the other way round",
            Snapshot,
            [NO, YES, YES],
            [0, 1, 2],
            [ON; 3],
            Ok(1),
        ),
        scene(
            "two holders, the less loaded offline",
            Snapshot,
            [NO, YES, YES],
            [0, 2, 1],
            [ON, ON, HostStatus::Offline],
            Ok(1),
        ),
        scene(
            "a snapshot that no host holds",
            Snapshot,
            [NO; 3],
            [0; 3],
            [ON; 3],
            Err(ErrorCode::HostUnavailable),
        ),
        scene(
            "a base template without placements: the least loaded online host",
            Base,
            [NO; 3],
            [2, 1, 0],
            [ON, ON, HostStatus::Offline],
            Ok(1),
        ),
        scene(
            "a base template without placements, no host online",
            Base,
            [NO; 3],
            [0; 3],
            [
                HostStatus::Offline,
                HostStatus::Draining,
                HostStatus::Pending,
            ],
            Err(ErrorCode::HostUnavailable),
        ),
        scene(
            "a base template with placements: only those",
            Base,
            [NO, NO, YES],
            [0, 0, 5],
            [ON; 3],
            Ok(2),
        ),
    ];
    for status in [
        HostStatus::Offline,
        HostStatus::Unreachable,
        HostStatus::Draining,
        HostStatus::Pending,
    ] {
        scenes.push(scene(
            "the only holder is not online",
            Snapshot,
            [YES, NO, NO],
            [0; 3],
            [status, ON, ON],
            Err(ErrorCode::HostUnavailable),
        ));
    }
    scenes.push(Scene {
        paused: [0, 5, 0],
        ..scene(
            "paused sandboxes are no load",
            Snapshot,
            [NO, YES, YES],
            [0, 0, 1],
            [ON; 3],
            Ok(1),
        )
    });
    scenes
}

async fn placement_follows_the_files_the_host_status_and_the_load(backend: Backend) {
    for scene in scenes() {
        let case = format!("{} ({:?})", scene.what, scene.status);
        let env = Env::on(&backend, options(), Mode::Ours).await;
        let fleet = vec![
            first(&env),
            add_host(&env, MemoryHostAgent::new()).await,
            add_host(&env, MemoryHostAgent::new()).await,
        ];
        let team = TeamId::new();
        let holders: Vec<&Node> = fleet
            .iter()
            .zip(scene.holds)
            .filter_map(|(n, holds)| holds.then_some(n))
            .collect();
        let t = match scene.kind {
            TemplateType::Snapshot => snapshot_on(&env, team, "t", &holders, None).await,
            _ => base_on(&env, team, "t", &holders, &fleet).await,
        };
        for (i, node) in fleet.iter().enumerate() {
            load(&env, node, scene.running[i], SandboxStatus::Running).await;
            load(&env, node, scene.paused[i], SandboxStatus::Paused).await;
            env.manager
                .registry()
                .set_host_status(node.id, scene.status[i])
                .await
                .unwrap();
        }

        let result = restore(&env, team, req("t")).await;
        match scene.lands {
            Ok(i) => {
                let sandbox = result.expect(&case);
                assert_eq!(sandbox.host, Some(fleet[i].id), "{case}");
                assert_eq!(sandbox.status, SandboxStatus::Running, "{case}");
                assert_eq!(sandbox.team, team, "{case}");
                assert_eq!(sandbox.template, Some(name("t")), "{case}");
                assert_eq!(sandbox.template_id, Some(t.id), "{case}");
                assert_eq!(
                    (sandbox.vcpus, sandbox.memory_mb),
                    (t.vcpus, t.memory_mb),
                    "{case}: the template's sizes"
                );
                assert_eq!(
                    fleet[i].agent.sandbox_status(sandbox.id).as_deref(),
                    Some("running"),
                    "{case}"
                );
                for (j, node) in fleet.iter().enumerate() {
                    let expected = usize::from(i == j);
                    assert_eq!(
                        node.agent.calls(AgentOp::CreateSandbox),
                        expected,
                        "{case}: host {j}"
                    );
                }
                assert_eq!(
                    env.manager
                        .sandbox(&caller(team), sandbox.id)
                        .await
                        .expect(&case),
                    sandbox,
                    "{case}"
                );
                check_audit(&case, &env, team, sandbox.id, &t, None).await;
                assert_restore_invariants(&case, &env, &fleet, &[], &[sandbox.id]).await;
            }
            Err(code) => {
                expect_code(&case, result, code);
                for node in &fleet {
                    assert_eq!(node.agent.calls(AgentOp::CreateSandbox), 0, "{case}");
                }
                assert_restore_invariants(&case, &env, &fleet, &[], &[]).await;
            }
        }
    }
}

/// Restores in flight count as load: with two restores starting on one
/// holder, the next goes to the other holder, although that one runs a
/// sandbox already.
async fn restores_in_flight_count_as_load(backend: Backend) {
    let env = Env::on(&backend, options(), Mode::Ours).await;
    let (a, b) = (first(&env), add_host(&env, MemoryHostAgent::new()).await);
    let team = TeamId::new();
    snapshot_on(&env, team, "only-a", &[&a], None).await;
    snapshot_on(&env, team, "both", &[&a, &b], None).await;
    load(&env, &b, 1, SandboxStatus::Running).await;
    let hold = Hold::new();
    a.agent
        .inject_times(AgentOp::CreateSandbox, Fault::Hold(hold.clone()), 2);
    let spawn = |n: &'static str| {
        let manager = env.manager.clone();
        tokio::spawn(async move { manager.restore(&caller(team), req(n)).await })
    };
    let starting = [spawn("only-a"), spawn("only-a")];
    hold.arrived(2).await;
    let next = restore(&env, team, req("both")).await.unwrap();
    assert_eq!(next.host, Some(b.id), "2 starting on a, 1 running on b");
    hold.release();
    let mut running = vec![next.id];
    for task in starting {
        let sandbox = task.await.unwrap().unwrap();
        assert_eq!(sandbox.host, Some(a.id));
        running.push(sandbox.id);
    }
    assert_restore_invariants("in flight", &env, &[a, b], &[], &running).await;
}

// -------------------------------------------------------- compatibility

fn host_info(vmm: &str, format: &str, arch: &str, cpu: &str) -> HostInfo {
    HostInfo::new(vmm, "1.7.0", format, arch).cpu("GenuineIntel", cpu, ["avx2", "sse4_2"])
}

/// What the host that holds the snapshot says of itself.
enum Says {
    Info(HostInfo),
    /// `GetHostInfo` unimplemented.
    Nothing,
    /// A Go-like agent: no `GetHostInfo` either.
    GoLike,
}

impl Says {
    fn agent(&self) -> MemoryHostAgent {
        match self {
            Says::Info(info) => {
                let agent = MemoryHostAgent::new();
                agent.set_host_info(Some(info.clone()));
                agent
            }
            Says::Nothing => {
                let agent = MemoryHostAgent::new();
                agent.set_host_info(None);
                agent
            }
            Says::GoLike => MemoryHostAgent::go_like(),
        }
    }
}

async fn compatibility_is_checked_against_the_recorded_host_info(backend: Backend) {
    let made = host_info("firecracker", "v1", "x86_64", "Xeon 8375C");
    let with = |f: &dyn Fn(&mut HostInfo)| {
        let mut info = made.clone();
        f(&mut info);
        info
    };
    let cases: Vec<(&str, Option<HostInfo>, Says, Option<&str>)> = vec![
        (
            "the same host",
            Some(made.clone()),
            Says::Info(made.clone()),
            None,
        ),
        (
            "another kernel and VMM version are not compared",
            Some(made.clone()),
            Says::Info(with(&|i| {
                i.kernel_version = "6.1.0".into();
                i.vmm_version = "1.8.0".into();
                i.cpu_flags.clear();
            })),
            None,
        ),
        (
            "another cpu_model",
            Some(made.clone()),
            Says::Info(with(&|i| i.cpu_model = "EPYC 7R13".into())),
            Some("cpu_model"),
        ),
        (
            "another snapshot_format",
            Some(made.clone()),
            Says::Info(with(&|i| i.snapshot_format = "v2".into())),
            Some("snapshot_format"),
        ),
        (
            "another vmm",
            Some(made.clone()),
            Says::Info(with(&|i| i.vmm = "cloud-hypervisor".into())),
            Some("vmm"),
        ),
        (
            "another arch",
            Some(made.clone()),
            Says::Info(with(&|i| i.arch = "aarch64".into())),
            Some("arch"),
        ),
        (
            "the host's cpu_model unknown",
            Some(made.clone()),
            Says::Info(with(&|i| i.cpu_model.clear())),
            None,
        ),
        (
            "the host without GetHostInfo",
            Some(made.clone()),
            Says::Nothing,
            None,
        ),
        ("a Go-like host", Some(made.clone()), Says::GoLike, None),
        (
            "what made the snapshot unknown",
            None,
            Says::Info(with(&|i| i.cpu_model = "EPYC 7R13".into())),
            None,
        ),
    ];
    for (what, compat, says, refused) in cases {
        let case = format!("compat: {what}");
        let env = Env::on(&backend, options(), Mode::Ours).await;
        let holder = add_host(&env, says.agent()).await;
        let team = TeamId::new();
        let t = snapshot_on(&env, team, "snap", &[&holder], compat).await;
        let result = restore(&env, team, req("snap")).await;
        let fleet = [first(&env), holder.clone()];
        match refused {
            Some(field) => {
                let err = expect_code(&case, result, ErrorCode::Incompatible);
                assert_eq!(err.http_status(), 409, "{case}");
                assert!(
                    err.message().contains(field),
                    "{case}: the message names {field}: {err:?}"
                );
                assert!(
                    err.message().contains(&holder.id.to_string()),
                    "{case}: the message names the host: {err:?}"
                );
                assert_eq!(holder.agent.calls(AgentOp::CreateSandbox), 0, "{case}");
                assert_restore_invariants(&case, &env, &fleet, &[], &[]).await;
            }
            None => {
                let sandbox = result.expect(&case);
                assert_eq!(sandbox.host, Some(holder.id), "{case}");
                check_audit(&case, &env, team, sandbox.id, &t, None).await;
                assert_restore_invariants(&case, &env, &fleet, &[], &[sandbox.id]).await;
            }
        }
    }

    // Two holders, the less loaded one incompatible: the other one.
    let case = "compat: the compatible holder, although more loaded";
    let env = Env::on(&backend, options(), Mode::Ours).await;
    let other = with(&|i| i.cpu_model = "EPYC 7R13".into());
    let fits = add_host(&env, Says::Info(made.clone()).agent()).await;
    let misfit = add_host(&env, Says::Info(other.clone()).agent()).await;
    let team = TeamId::new();
    snapshot_on(&env, team, "snap", &[&fits, &misfit], Some(made.clone())).await;
    load(&env, &fits, 3, SandboxStatus::Running).await;
    let sandbox = restore(&env, team, req("snap")).await.expect(case);
    assert_eq!(sandbox.host, Some(fits.id), "{case}");
    assert_eq!(misfit.agent.calls(AgentOp::CreateSandbox), 0, "{case}");

    // What a host runs is asked again when it comes back online.
    let case = "compat: a host that comes back online is asked again";
    fits.agent.set_host_info(Some(other));
    let registry = env.manager.registry();
    registry
        .set_host_status(fits.id, HostStatus::Offline)
        .await
        .unwrap();
    registry
        .set_host_status(fits.id, HostStatus::Online)
        .await
        .unwrap();
    let err = expect_code(
        case,
        restore(&env, team, req("snap")).await,
        ErrorCode::Incompatible,
    );
    assert!(err.message().contains("cpu_model"), "{case}: {err:?}");
    let fleet = [first(&env), fits, misfit];
    assert_restore_invariants(case, &env, &fleet, &[], &[sandbox.id]).await;
}

/// A snapshot made by a real create records what made it (ours: the
/// agent's `HostInfo`; the Go-like agent: unknown), and the template
/// object shows it with `hosts`, `state` and `last_used_at`.
async fn the_template_shows_compat_hosts_state_and_last_use(backend: Backend) {
    for mode in Mode::ALL {
        let case = format!("{mode:?}");
        let env = Env::on(&backend, options(), mode).await;
        let team = TeamId::new();
        let source = env.sandbox(team).await;
        let t = env.create(team, source, "snap").await.expect(&case);
        let expected = match mode {
            Mode::Ours => Some(env.agent.host_info().await.unwrap()),
            Mode::GoLike => None,
        };
        let get = || async { env.manager.get(&caller(team), &name("snap")).await };
        for shown in [t.clone(), get().await.unwrap()] {
            assert_eq!(shown.compat, expected, "{case}");
            assert_eq!(shown.hosts, 1, "{case}");
            assert_eq!(shown.state, TemplateState::Ready, "{case}");
            assert_eq!(shown.last_used_at, None, "{case}");
        }

        // A failed restore is no use.
        env.agent.inject_times(
            AgentOp::CreateSandbox,
            Fault::Fail(AgentError::rejected(AgentCode::NotFound, "no")),
            1,
        );
        let failed = SandboxId::new();
        let err = expect_code(
            &case,
            restore(&env, team, req("snap").sandbox_id(failed)).await,
            ErrorCode::NotFound,
        );
        check_audit(&case, &env, team, failed, &t, Some(&err)).await;
        assert_eq!(get().await.unwrap().last_used_at, None, "{case}");

        let request = req("snap").timeout_sec(600).disk_size_mb(4096);
        let sandbox = restore(&env, team, request).await.expect(&case);
        assert_eq!(sandbox.host, Some(env.host), "{case}");
        // What the agent was asked: the template's files by id, for the
        // caller's team, with the template's sizes.
        let listed = env.agent.list_sandboxes().await.unwrap().sandboxes;
        let info = listed
            .iter()
            .find(|s| s.sandbox_id == sandbox.id.to_string())
            .expect(&case);
        assert_eq!(
            (
                info.template.as_str(),
                info.template_id.as_str(),
                info.team_id.as_str()
            ),
            (
                t.id.to_string().as_str(),
                t.id.to_string().as_str(),
                team.to_string().as_str()
            ),
            "{case}"
        );
        assert_eq!(
            (info.vcpus, info.memory_mb, info.timeout_sec),
            (2, 512, 600),
            "{case}"
        );
        assert_eq!(sandbox.template, Some(name("snap")), "{case}");
        assert_eq!(sandbox.template_id, Some(t.id), "{case}");
        assert_eq!((sandbox.vcpus, sandbox.memory_mb), (2, 512), "{case}");
        assert_eq!(
            env.agent.sandbox_status(sandbox.id).as_deref(),
            Some("running"),
            "{case}"
        );
        let used = get().await.unwrap();
        let first_use = used.last_used_at.expect(&case);
        assert!(first_use >= t.created_at, "{case}: {used:?}");
        assert_eq!(
            (used.compat.clone(), used.hosts, used.state),
            (expected.clone(), 1, TemplateState::Ready),
            "{case}"
        );
        let listed = env
            .manager
            .list(&caller(team), ListQuery::new())
            .await
            .unwrap()
            .items;
        assert_eq!(listed, vec![used.clone()], "{case}: list shows the same");
        check_audit(&case, &env, team, sandbox.id, &t, None).await;

        tokio::time::sleep(Duration::from_millis(5)).await;
        let again = restore(&env, team, req("snap")).await.expect(&case);
        let second_use = get().await.unwrap().last_used_at.expect(&case);
        assert!(second_use > first_use, "{case}: {second_use:?}");
        assert_restore_invariants(
            &case,
            &env,
            &[first(&env)],
            &[failed],
            &[sandbox.id, again.id],
        )
        .await;
    }
}

// ------------------------------------------------------ teams and input

async fn teams_restore_only_their_own_and_platform_templates(backend: Backend) {
    let env = Env::on(&backend, options(), Mode::Ours).await;
    let host = first(&env);
    let (a, b) = (TeamId::new(), TeamId::new());
    let a_snap = snapshot_on(&env, a, "snap", &[&host], None).await;

    // Another team's template by name: not found, and nothing is asked.
    expect_code(
        "b restores a's snap",
        restore(&env, b, req("snap")).await,
        ErrorCode::NotFound,
    );
    // Nor by its id guessed as the name (ids are keys on hosts, never
    // names a team can use to reach another team's files).
    expect_code(
        "b restores a's snap by its id",
        restore(&env, b, req(&a_snap.id.to_string())).await,
        ErrorCode::NotFound,
    );
    assert_eq!(host.agent.calls(AgentOp::CreateSandbox), 0);

    // Each team restores its own template of that name.
    let b_snap = snapshot_on(&env, b, "snap", &[&host], None).await;
    let from_a = restore(&env, a, req("snap")).await.unwrap();
    let from_b = restore(&env, b, req("snap")).await.unwrap();
    assert_eq!(
        (from_a.team, from_a.template_id),
        (a, Some(a_snap.id)),
        "a's own"
    );
    assert_eq!(
        (from_b.team, from_b.template_id),
        (b, Some(b_snap.id)),
        "b's own"
    );

    // A team sees its own sandboxes only.
    let b_registered = env.sandbox(b).await;
    for (team, id, visible) in [
        (a, from_a.id, true),
        (b, from_a.id, false),
        (b, from_b.id, true),
        (a, from_b.id, false),
        (a, b_registered, false),
        (b, b_registered, true),
        (a, SandboxId::new(), false),
    ] {
        let case = format!("team {team} asks for sandbox {id}");
        let shown = env.manager.sandbox(&caller(team), id).await;
        if visible {
            assert_eq!(shown.expect(&case).team, team, "{case}");
        } else {
            let err = expect_code(&case, shown, ErrorCode::NotFound);
            assert_eq!(err.message(), "sandbox not found", "{case}");
        }
    }

    // Platform templates are restorable by every team, into its own sandbox.
    let platform = TeamId::PLATFORM;
    let fleet = [host.clone()];
    let base = base_on(&env, platform, "platform-base", &[], &fleet).await;
    let snap = snapshot_on(&env, platform, "platform-snap", &[&host], None).await;
    let mut running = vec![from_a.id, from_b.id];
    for team in [a, b] {
        for t in [&base, &snap] {
            let case = format!("team {team} restores {}", t.name);
            let sandbox = restore(&env, team, req(t.name.as_str()))
                .await
                .expect(&case);
            assert_eq!(sandbox.team, team, "{case}");
            assert_eq!(sandbox.template_id, Some(t.id), "{case}");
            assert_eq!(sandbox.template.as_ref(), Some(&t.name), "{case}");
            check_audit(&case, &env, team, sandbox.id, t, None).await;
            let other = if team == a { b } else { a };
            assert!(
                restore_entries(&env, other, sandbox.id).await.is_empty(),
                "{case}: in the other team's log"
            );
            running.push(sandbox.id);
        }
    }
    assert_restore_invariants("teams", &env, &fleet, &[], &running).await;
}

async fn requests_are_validated(backend: Backend) {
    let env = Env::on(&backend, options(), Mode::Ours).await;
    let host = first(&env);
    let fleet = [host.clone()];
    let team = TeamId::new();
    snapshot_on(&env, team, "snap", &[&host], None).await;
    base_on(&env, team, "base", &[], &fleet).await;

    // The request itself, as an API parses it.
    for (template, sandbox_id, message) in [
        ("", None, "template is required"),
        ("a/b", None, "invalid template name"),
        (".x", None, "invalid template name"),
        ("snap", Some("sb-nope"), "invalid sandbox_id"),
        (
            "snap",
            Some("tpl-0000000000000000000000000"),
            "invalid sandbox_id",
        ),
        (
            "snap",
            Some("sb-zzzzzzzzzzzzzzzzzzzzzzzzz"),
            "invalid sandbox_id",
        ),
    ] {
        let case = format!("parse({template:?}, {sandbox_id:?})");
        let err = expect_code(
            &case,
            RestoreRequest::parse(template, sandbox_id),
            ErrorCode::InvalidRequest,
        );
        assert!(err.message().starts_with(message), "{case}: {err:?}");
    }
    let id = SandboxId::new();
    let parsed = RestoreRequest::parse("snap", Some(&id.to_string())).unwrap();
    assert_eq!(parsed, req("snap").sandbox_id(id));

    // Sizes: the template's by default; a snapshot's memory cannot change.
    let rejected: Vec<(&str, RestoreRequest, &str)> = vec![
        (
            "a snapshot with other memory",
            req("snap").memory_mb(1024),
            "memory_mb",
        ),
        ("no vcpus", req("snap").vcpus(0), "vcpus"),
        ("no memory", req("base").memory_mb(0), "memory_mb"),
        ("too many vcpus", req("base").vcpus(MAX_VCPUS + 1), "vcpus"),
        (
            "too much memory",
            req("base").memory_mb(MAX_MEMORY_MB + 1),
            "memory_mb",
        ),
    ];
    for (what, request, field) in rejected {
        let err = expect_code(
            what,
            restore(&env, team, request).await,
            ErrorCode::InvalidRequest,
        );
        assert!(err.message().contains(field), "{what}: {err:?}");
    }
    expect_code(
        "an unknown template",
        restore(&env, team, req("nope")).await,
        ErrorCode::NotFound,
    );
    assert_eq!(host.agent.calls(AgentOp::CreateSandbox), 0);
    assert_restore_invariants("rejected", &env, &fleet, &[], &[]).await;

    let accepted = [
        ("the snapshot's own sizes", req("snap"), (2, 512)),
        (
            "the snapshot's memory, given",
            req("snap").memory_mb(512),
            (2, 512),
        ),
        ("more vcpus of a snapshot", req("snap").vcpus(4), (4, 512)),
        (
            "other sizes of a base template",
            req("base").vcpus(MAX_VCPUS).memory_mb(2048),
            (MAX_VCPUS, 2048),
        ),
    ];
    let mut running = Vec::new();
    for (what, request, sizes) in accepted {
        let sandbox = restore(&env, team, request).await.expect(what);
        assert_eq!((sandbox.vcpus, sandbox.memory_mb), sizes, "{what}");
        running.push(sandbox.id);
    }
    assert_restore_invariants("accepted", &env, &fleet, &[], &running).await;
}

async fn sandbox_ids_are_never_reused(backend: Backend) {
    let env = Env::on(&backend, options(), Mode::Ours).await;
    let host = first(&env);
    let fleet = [host.clone()];
    let team = TeamId::new();
    let t = snapshot_on(&env, team, "snap", &[&host], None).await;
    let taken = |case: &str, result: Result<Sandbox>| {
        let err = expect_code(case, result, ErrorCode::AlreadyExists);
        assert_eq!(err.http_status(), 409, "{case}");
    };

    // A registered sandbox's id (of any team): refused, and the sandbox is
    // left as it was.
    let registered = env.sandbox(TeamId::new()).await;
    taken(
        "a registered id",
        restore(&env, team, req("snap").sandbox_id(registered)).await,
    );
    let kept = env.manager.registry().sandbox(registered).await.unwrap();
    assert_eq!(
        kept.map(|s| (s.status, s.template)),
        Some((SandboxStatus::Running, None))
    );
    assert_eq!(host.agent.calls(AgentOp::CreateSandbox), 0);

    // The id of a restored sandbox.
    let restored = restore(&env, team, req("snap")).await.unwrap();
    taken(
        "a restored sandbox's id",
        restore(&env, team, req("snap").sandbox_id(restored.id)).await,
    );

    // The id of a restore in flight.
    let hold = Hold::new();
    host.agent
        .inject_times(AgentOp::CreateSandbox, Fault::Hold(hold.clone()), 1);
    let in_flight = SandboxId::new();
    let task = {
        let manager = env.manager.clone();
        tokio::spawn(async move {
            manager
                .restore(&caller(team), req("snap").sandbox_id(in_flight))
                .await
        })
    };
    hold.arrived(1).await;
    taken(
        "the id of a restore in flight",
        restore(&env, team, req("snap").sandbox_id(in_flight)).await,
    );
    hold.release();
    let in_flight = task.await.unwrap().unwrap().id;

    // The id of a restore that failed ambiguously: its destroy is queued,
    // and even once it is confirmed the id stays used.
    host.agent.inject_times(
        AgentOp::CreateSandbox,
        Fault::Fail(AgentError::rejected(AgentCode::Internal, "x")),
        1,
    );
    let ambiguous = SandboxId::new();
    expect_code(
        "an ambiguous failure",
        restore(&env, team, req("snap").sandbox_id(ambiguous)).await,
        ErrorCode::AgentError,
    );
    assert!(destroy_queued_or_done(&env, &host, ambiguous).await);
    taken(
        "the id of a failed restore whose destroy is queued",
        restore(&env, team, req("snap").sandbox_id(ambiguous)).await,
    );
    // The background worker destroys it by itself (NotFound counts).
    eventually("the worker destroys the VM", || async {
        host.agent.calls(AgentOp::DestroySandbox) >= 1
            && env.manager.pending_destroys().await.unwrap().is_empty()
    })
    .await;
    taken(
        "the id of a failed restore whose destroy is confirmed",
        restore(&env, team, req("snap").sandbox_id(ambiguous)).await,
    );

    // A VM the host runs under an id the store never saw: the agent says
    // AlreadyExists, and that VM (not ours) is left alone.
    let foreign = SandboxId::new();
    host.agent.add_sandbox(foreign, "running", 1, 64);
    let err = expect_code(
        "an id the host already runs",
        restore(&env, team, req("snap").sandbox_id(foreign)).await,
        ErrorCode::AlreadyExists,
    );
    check_audit("foreign", &env, team, foreign, &t, Some(&err)).await;

    // A definite failure started nothing: the caller may retry the id.
    host.agent.inject_times(
        AgentOp::CreateSandbox,
        Fault::Fail(AgentError::rejected(AgentCode::FailedPrecondition, "x")),
        1,
    );
    let retried = SandboxId::new();
    expect_code(
        "a definite failure",
        restore(&env, team, req("snap").sandbox_id(retried)).await,
        ErrorCode::Conflict,
    );
    let again = restore(&env, team, req("snap").sandbox_id(retried))
        .await
        .expect("a retry after a definite failure");
    assert_eq!(again.id, retried);

    drain_restores(&env, &fleet).await;
    assert_eq!(
        host.agent.sandbox_status(foreign).as_deref(),
        Some("running"),
        "the foreign VM"
    );
    assert_eq!(
        host.agent.sandbox_status(registered).as_deref(),
        Some("running"),
        "the registered sandbox's VM"
    );
    assert_restore_invariants(
        "ids",
        &env,
        &fleet,
        &[ambiguous],
        &[restored.id, in_flight, retried],
    )
    .await;
}

// --------------------------------------------------------- fault matrix

impl Failure {
    /// What the caller of a restore sees when `CreateSandbox` fails so
    /// (SPEC §7: agent codes mapped as for a create).
    fn restore_error(self) -> ErrorCode {
        match self {
            Failure::NotSent => ErrorCode::HostUnavailable,
            Failure::Code(AgentCode::NotFound) => ErrorCode::NotFound,
            Failure::Code(AgentCode::InvalidArgument) => ErrorCode::InvalidRequest,
            Failure::Code(AgentCode::AlreadyExists) => ErrorCode::AlreadyExists,
            Failure::Code(AgentCode::FailedPrecondition | AgentCode::ResourceExhausted) => {
                ErrorCode::Conflict
            }
            _ => ErrorCode::AgentError,
        }
    }

    /// Whether the manager takes the failure as definite (the agent did
    /// nothing): then it asks the host nothing and queues no destroy. Both
    /// agents send `CreateSandbox` codes as they are.
    fn definite_restore(self) -> bool {
        self == Failure::NotSent || self.definite()
    }
}

/// Step: the `CreateSandbox` call of a restore.
async fn create_sandbox_failures(backend: Backend) {
    for (mode, failure, when) in Failure::matrix() {
        let case = format!("{mode:?}: CreateSandbox {failure:?} {when:?}");
        let env = Env::on(&backend, options(), mode).await;
        let host = first(&env);
        let fleet = [host.clone()];
        let team = TeamId::new();
        let t = snapshot_on(&env, team, "snap", &[&host], None).await;
        host.agent
            .inject_times(AgentOp::CreateSandbox, failure.fault(when), 1);
        let id = SandboxId::new();

        let result = restore(&env, team, req("snap").sandbox_id(id)).await;
        let definite = failure.definite_restore();
        // The VM runs when the agent started it (after the work); an
        // ambiguous answer is then settled by the host's list: success.
        let started = when == When::After;
        let succeeded = started && !definite;
        assert_eq!(host.agent.calls(AgentOp::CreateSandbox), 1, "{case}");
        assert_eq!(
            host.agent.calls(AgentOp::ListSandboxes) >= 1,
            !definite,
            "{case}: the host is asked after an ambiguous failure only"
        );
        if succeeded {
            let sandbox = result.expect(&case);
            assert_eq!(
                (sandbox.id, sandbox.status, sandbox.host),
                (id, SandboxStatus::Running, Some(host.id)),
                "{case}"
            );
            check_audit(&case, &env, team, id, &t, None).await;
            assert!(
                env.manager.pending_destroys().await.unwrap().is_empty(),
                "{case}"
            );
        } else {
            let err = expect_code(&case, result, failure.restore_error());
            assert!(
                !err.message().contains("injected"),
                "{case}: the agent's text leaked: {err:?}"
            );
            check_audit(&case, &env, team, id, &t, Some(&err)).await;
            assert_eq!(
                env.manager.registry().sandbox(id).await.unwrap(),
                None,
                "{case}: the row is removed at once"
            );
            // A VM that may exist is queued for destruction.
            assert_eq!(
                destroy_queued_or_done(&env, &host, id).await,
                !definite,
                "{case}"
            );
        }
        assert_eq!(
            env.count("SELECT count(*) FROM restores").await,
            0,
            "{case}: the journal entry is closed"
        );

        drain_restores(&env, &fleet).await;
        assert_eq!(
            env.manager
                .get(&caller(team), &name("snap"))
                .await
                .unwrap()
                .last_used_at
                .is_some(),
            succeeded,
            "{case}"
        );
        if succeeded {
            assert_restore_invariants(&case, &env, &fleet, &[], &[id]).await;
        } else if started {
            // The agent started the VM and then claimed it did nothing: the
            // manager takes a definite answer at its word (it asks nothing
            // and destroys nothing — the id may be another's VM, as with
            // AlreadyExists). Only this lying agent is left running it.
            assert_eq!(
                host.agent.sandbox_status(id).as_deref(),
                Some("running"),
                "{case}"
            );
            assert_eq!(host.agent.calls(AgentOp::DestroySandbox), 0, "{case}");
            host.agent.remove_sandbox(id);
            assert_restore_invariants(&case, &env, &fleet, &[id], &[]).await;
        } else {
            assert_restore_invariants(&case, &env, &fleet, &[id], &[]).await;
        }
        assert_eq!(restore_entries(&env, team, id).await.len(), 1, "{case}");
        // The template is still restorable.
        let again = restore(&env, team, req("snap")).await.expect(&case);
        assert_eq!(again.status, SandboxStatus::Running, "{case}");
    }
}

/// Step: the `ListSandboxes` call after an ambiguous `CreateSandbox`
/// failure (the agent started the VM and answered Internal). The host
/// cannot say, so the caller is told the restore failed and the VM must
/// go: its destroy needs no list.
async fn list_sandboxes_failures_after_an_ambiguous_restore(backend: Backend) {
    let cases = Mode::ALL
        .iter()
        .flat_map(|mode| Failure::all().into_iter().map(move |f| (*mode, f)));
    for (mode, failure) in cases {
        let case = format!("{mode:?}: ListSandboxes {failure:?}");
        let env = Env::on(&backend, options(), mode).await;
        let host = first(&env);
        let fleet = [host.clone()];
        let team = TeamId::new();
        let t = snapshot_on(&env, team, "snap", &[&host], None).await;
        host.agent.inject_times(
            AgentOp::CreateSandbox,
            Failure::Code(AgentCode::Internal).fault(When::After),
            1,
        );
        host.agent
            .inject(AgentOp::ListSandboxes, failure.fault(When::Before));
        let id = SandboxId::new();

        let err = expect_code(
            &case,
            restore(&env, team, req("snap").sandbox_id(id)).await,
            ErrorCode::AgentError,
        );
        assert!(host.agent.calls(AgentOp::ListSandboxes) >= 1, "{case}");
        check_audit(&case, &env, team, id, &t, Some(&err)).await;
        let entry = &restore_entries(&env, team, id).await[0];
        assert_eq!(entry.metadata["destroy_queued"], true, "{case}: {entry:?}");
        assert_eq!(env.manager.registry().sandbox(id).await.unwrap(), None);
        assert_eq!(env.count("SELECT count(*) FROM restores").await, 0);
        assert!(destroy_queued_or_done(&env, &host, id).await, "{case}");
        assert!(
            host.agent.sandbox_status(id).is_some()
                || host.agent.calls(AgentOp::DestroySandbox) >= 1,
            "{case}: the VM the agent started"
        );

        // The list still fails; the destroy does not need it.
        eventually(&case, || async {
            let _ = env.manager.run_pending_work().await;
            env.manager.pending_destroys().await.unwrap().is_empty()
        })
        .await;
        assert_eq!(
            host.agent.sandbox_status(id),
            None,
            "{case}: the VM is gone"
        );
        drain_restores(&env, &fleet).await;
        assert_restore_invariants(&case, &env, &fleet, &[id], &[]).await;
    }
}

/// After an ambiguous failure the host is asked: a VM it lists alive
/// (running, starting, paused) is the caller's; one it lists in another
/// status is not usable, so the caller is told it failed and it is
/// destroyed, as one not listed.
async fn the_listed_status_after_an_ambiguous_failure_decides(backend: Backend) {
    for (status, kept) in [
        ("running", true),
        ("starting", true),
        ("paused", true),
        ("error", false),
        ("stopped", false),
    ] {
        let case = format!("listed {status}");
        let env = Env::on(&backend, options(), Mode::Ours).await;
        let host = first(&env);
        let fleet = [host.clone()];
        let team = TeamId::new();
        snapshot_on(&env, team, "snap", &[&host], None).await;
        host.agent.inject_times(
            AgentOp::CreateSandbox,
            Failure::Code(AgentCode::Internal).fault(When::After),
            1,
        );
        let hold = Hold::new();
        host.agent
            .inject_times(AgentOp::ListSandboxes, Fault::Hold(hold.clone()), 1);
        let id = SandboxId::new();
        let task = {
            let manager = env.manager.clone();
            tokio::spawn(async move {
                manager
                    .restore(&caller(team), req("snap").sandbox_id(id))
                    .await
            })
        };
        hold.arrived(1).await;
        host.agent.set_sandbox_status(id, status);
        hold.release();
        let result = task.await.unwrap();
        if kept {
            let sandbox = result.expect(&case);
            assert_eq!(sandbox.status, SandboxStatus::Running, "{case}");
            host.agent.set_sandbox_status(id, "running");
            drain_restores(&env, &fleet).await;
            assert_restore_invariants(&case, &env, &fleet, &[], &[id]).await;
        } else {
            expect_code(&case, result, ErrorCode::AgentError);
            drain_restores(&env, &fleet).await;
            assert_restore_invariants(&case, &env, &fleet, &[id], &[]).await;
        }
    }
}

/// A destroy queued after an ambiguous failure waits out the grace (a
/// late-booting VM must not be answered NotFound and then left running),
/// even when its host goes offline and comes back meanwhile: coming back
/// skips retry backoff, not that grace.
async fn a_host_back_online_does_not_cut_the_destroy_grace(backend: Backend) {
    let mut o = options();
    o.late_write_grace = Duration::from_secs(2);
    o.create_timeout = Duration::from_secs(2);
    let env = Env::on(&backend, o, Mode::Ours).await;
    let host = first(&env);
    let fleet = [host.clone()];
    let team = TeamId::new();
    snapshot_on(&env, team, "snap", &[&host], None).await;
    host.agent
        .inject_times(AgentOp::CreateSandbox, Fault::Fail(AgentError::Timeout), 1);
    let id = SandboxId::new();
    let queued_at = tokio::time::Instant::now();
    expect_code(
        "a timeout",
        restore(&env, team, req("snap").sandbox_id(id)).await,
        ErrorCode::AgentError,
    );
    let registry = env.manager.registry();
    registry
        .set_host_status(host.id, HostStatus::Offline)
        .await
        .unwrap();
    registry
        .set_host_status(host.id, HostStatus::Online)
        .await
        .unwrap();
    while queued_at.elapsed() < Duration::from_millis(1500) {
        env.manager.run_pending_work().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        host.agent.calls(AgentOp::DestroySandbox),
        0,
        "destroyed within the grace"
    );
    drain_restores(&env, &fleet).await;
    assert!(
        host.agent.calls(AgentOp::DestroySandbox) >= 1,
        "destroyed after it"
    );
    assert_restore_invariants("after the grace", &env, &fleet, &[id], &[]).await;
}

/// A host that comes back online is asked what it runs again; if it cannot
/// say then, what it said before stands (an incompatible host does not
/// become allowed because its agent hiccuped).
async fn a_host_that_cannot_say_keeps_its_cached_host_info(backend: Backend) {
    let env = Env::on(&backend, options(), Mode::Ours).await;
    let made = host_info("firecracker", "v1", "x86_64", "Xeon 8375C");
    let mut other = made.clone();
    other.cpu_model = "EPYC 7R13".into();
    let host = add_host(&env, Says::Info(other).agent()).await;
    let team = TeamId::new();
    snapshot_on(&env, team, "snap", &[&host], Some(made)).await;
    let err = expect_code(
        "asked first",
        restore(&env, team, req("snap")).await,
        ErrorCode::Incompatible,
    );
    assert!(err.message().contains("cpu_model"), "{err:?}");
    host.agent.inject(
        AgentOp::GetHostInfo,
        Fault::Fail(AgentError::unavailable("agent restarting")),
    );
    let registry = env.manager.registry();
    registry
        .set_host_status(host.id, HostStatus::Offline)
        .await
        .unwrap();
    registry
        .set_host_status(host.id, HostStatus::Online)
        .await
        .unwrap();
    let asked = host.agent.calls(AgentOp::GetHostInfo);
    let err = expect_code(
        "cannot say now",
        restore(&env, team, req("snap")).await,
        ErrorCode::Incompatible,
    );
    assert!(err.message().contains("cpu_model"), "{err:?}");
    assert!(
        host.agent.calls(AgentOp::GetHostInfo) > asked,
        "asked again"
    );
    assert_eq!(host.agent.calls(AgentOp::CreateSandbox), 0);
}

/// What becomes of a queued destroy while every `DestroySandbox` fails
/// one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DestroyOutcome {
    /// The agent answered NotFound without destroying: the manager takes
    /// the host's word, and the VM stays on this lying agent.
    ConfirmedVmLeft,
    /// The agent destroyed the VM and answered NotFound: confirmed.
    Confirmed,
    /// The first attempt destroys the VM and fails; a retry hears NotFound
    /// and confirms while the fault lasts.
    DestroyedThenConfirmed,
    /// Every attempt fails and the VM stays; retried until the host
    /// answers.
    Retried,
}

impl Failure {
    fn destroy_outcome(self, when: When) -> DestroyOutcome {
        match (self, when) {
            (Failure::Code(AgentCode::NotFound), When::Before) => DestroyOutcome::ConfirmedVmLeft,
            (Failure::Code(AgentCode::NotFound), When::After) => DestroyOutcome::Confirmed,
            (_, When::Before) => DestroyOutcome::Retried,
            (_, When::After) => DestroyOutcome::DestroyedThenConfirmed,
        }
    }
}

/// Step: the `DestroySandbox` of a VM whose restore failed ambiguously
/// (the agent started it, answered Internal, and could not list).
async fn destroy_sandbox_failures_are_retried_until_the_host_confirms(backend: Backend) {
    for (mode, failure, when) in Failure::matrix() {
        let case = format!("{mode:?}: DestroySandbox {failure:?} {when:?}");
        let outcome = failure.destroy_outcome(when);
        // The worker runs only when asked, so that its reports add up.
        let mut o = options();
        o.run_janitor = false;
        let env = Env::on(&backend, o, mode).await;
        let host = first(&env);
        let fleet = [host.clone()];
        let team = TeamId::new();
        snapshot_on(&env, team, "snap", &[&host], None).await;
        host.agent.inject_times(
            AgentOp::CreateSandbox,
            Fault::FailAfter(AgentError::rejected(AgentCode::Internal, "x")),
            1,
        );
        host.agent.inject_times(
            AgentOp::ListSandboxes,
            Fault::Fail(AgentError::unavailable("x")),
            1,
        );
        host.agent
            .inject(AgentOp::DestroySandbox, failure.fault(when));
        let id = SandboxId::new();
        expect_code(
            &case,
            restore(&env, team, req("snap").sandbox_id(id)).await,
            ErrorCode::AgentError,
        );

        let pending = || async { env.manager.pending_destroys().await.unwrap() };
        let (confirmed, failed) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        let pass = || async {
            let report = env.manager.run_pending_work().await.unwrap();
            confirmed.set(confirmed.get() + report.destroys_confirmed);
            failed.set(failed.get() + report.destroys_failed);
        };
        if outcome == DestroyOutcome::Retried {
            eventually(&case, || async {
                pass().await;
                pending()
                    .await
                    .iter()
                    .any(|d| d.attempts >= 1 && d.last_error.is_some())
            })
            .await;
            let queued = pending().await;
            assert_eq!(queued.len(), 1, "{case}: {queued:?}");
            assert_eq!(
                (queued[0].sandbox, queued[0].team, queued[0].host),
                (id, team, host.id),
                "{case}"
            );
            assert_eq!(
                host.agent.sandbox_status(id).as_deref(),
                Some("running"),
                "{case}"
            );
            assert_eq!(confirmed.get(), 0, "{case}");
            assert!(failed.get() >= 1, "{case}");
        } else {
            eventually(&case, || async {
                pass().await;
                pending().await.is_empty()
            })
            .await;
            let calls = if outcome == DestroyOutcome::DestroyedThenConfirmed {
                2
            } else {
                1
            };
            assert!(host.agent.calls(AgentOp::DestroySandbox) >= calls, "{case}");
            assert_eq!(
                host.agent.sandbox_status(id).is_some(),
                outcome == DestroyOutcome::ConfirmedVmLeft,
                "{case}"
            );
            assert_eq!(confirmed.get(), 1, "{case}");
            assert_eq!(
                failed.get() >= 1,
                outcome == DestroyOutcome::DestroyedThenConfirmed,
                "{case}"
            );
        }

        drain_restores(&env, &fleet).await;
        if outcome == DestroyOutcome::ConfirmedVmLeft {
            // The manager does not keep asking a host that said NotFound.
            let calls = host.agent.calls(AgentOp::DestroySandbox);
            env.manager.run_pending_work().await.unwrap();
            assert_eq!(host.agent.calls(AgentOp::DestroySandbox), calls, "{case}");
            host.agent.remove_sandbox(id);
        }
        assert_restore_invariants(&case, &env, &fleet, &[id], &[]).await;
    }
}

// ------------------------------------------------- delete, drop and crash

/// How a test takes a template's name away while a restore from it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replace {
    /// The template is deleted (and a new one takes the name).
    Delete,
    /// A new snapshot overwrites it.
    Overwrite,
}

/// A delete or an overwrite while a restore from the template is in
/// flight answers at once and frees the name; the old files on that host
/// stay until the restore is over, then the worker deletes them.
async fn a_delete_during_a_restore_keeps_the_files_until_it_ends(backend: Backend) {
    for how in [Replace::Delete, Replace::Overwrite] {
        let case = format!("{how:?} during a restore");
        let mut o = options();
        o.create_timeout = Duration::from_secs(30);
        let env = Env::on(&backend, o, Mode::Ours).await;
        let host = first(&env);
        let team = TeamId::new();
        let source = env.sandbox(team).await;
        let old = env.create(team, source, "snap").await.unwrap();
        let key = old.id.to_string();
        let hold = Hold::new();
        host.agent
            .inject_times(AgentOp::CreateSandbox, Fault::Hold(hold.clone()), 1);
        let task = {
            let manager = env.manager.clone();
            tokio::spawn(async move { manager.restore(&caller(team), req("snap")).await })
        };
        hold.arrived(1).await;

        let new = match how {
            Replace::Delete => {
                let deleted = tokio::time::timeout(
                    Duration::from_secs(1),
                    env.manager.delete(&caller(team), &name("snap")),
                )
                .await
                .expect("the delete answers at once")
                .unwrap();
                assert_eq!(deleted.template.id, old.id, "{case}");
                assert!(
                    !deleted.hosts_confirmed.contains(&host.id)
                        && deleted.hosts_pending == vec![host.id],
                    "{case}: the files are not gone yet, and the host is reported pending: \
                     {deleted:?}"
                );
                assert!(env.names(team).await.is_empty(), "{case}");
                // The name is free: a new snapshot takes it.
                env.create(team, source, "snap").await.expect(&case)
            }
            Replace::Overwrite => env.overwrite(team, source, "snap").await.expect(&case),
        };
        assert_ne!(new.id, old.id, "{case}");
        assert_eq!(env.names(team).await, vec!["snap"], "{case}");
        // The worker leaves the old files alone while the restore is open,
        // however long it takes.
        for _ in 0..5 {
            env.manager.run_pending_work().await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(
            host.agent.has_snapshot(&key),
            "{case}: deleted under a restore"
        );
        assert_eq!(host.agent.calls(AgentOp::DeleteSnapshot), 0, "{case}");
        assert!(
            env.manager
                .pending_deletions()
                .await
                .unwrap()
                .iter()
                .any(|d| d.template_id == old.id),
            "{case}: the deletion stays queued"
        );

        hold.release();
        let sandbox = task.await.unwrap().expect("the restore finishes");
        assert_eq!(sandbox.status, SandboxStatus::Running, "{case}");
        assert_eq!(sandbox.template_id, Some(old.id), "{case}");
        assert_eq!(sandbox.template, Some(name("snap")), "{case}");
        assert_eq!(
            host.agent.sandbox_status(sandbox.id).as_deref(),
            Some("running"),
            "{case}"
        );
        drain(&env).await;
        assert!(
            !host.agent.has_snapshot(&key),
            "{case}: kept after the restore"
        );
        assert!(host.agent.has_snapshot(&new.id.to_string()), "{case}");
        assert_invariants(&env, &[team]).await;
        let fleet = [host];
        assert_restore_invariants(&case, &env, &fleet, &[], &[sandbox.id]).await;
        // The new template is restorable.
        let from_new = restore(&env, team, req("snap")).await.expect(&case);
        assert_eq!(from_new.template_id, Some(new.id), "{case}");
    }
}

/// A caller that goes away does not abort its restore: the outcome is
/// recorded, the sandbox registered `running`.
async fn a_dropped_caller_does_not_abort_the_restore(backend: Backend) {
    let env = Env::on(&backend, options(), Mode::Ours).await;
    let host = first(&env);
    let team = TeamId::new();
    let t = snapshot_on(&env, team, "snap", &[&host], None).await;
    let hold = Hold::new();
    host.agent
        .inject_times(AgentOp::CreateSandbox, Fault::Hold(hold.clone()), 1);
    let id = SandboxId::new();
    let task = {
        let manager = env.manager.clone();
        tokio::spawn(async move {
            manager
                .restore(&caller(team), req("snap").sandbox_id(id))
                .await
        })
    };
    hold.arrived(1).await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    hold.release();
    eventually("the restore ends without its caller", || async {
        env.count("SELECT count(*) FROM restores").await == 0
    })
    .await;
    let sandbox = env.manager.sandbox(&caller(team), id).await.unwrap();
    assert_eq!(sandbox.status, SandboxStatus::Running);
    check_audit("dropped", &env, team, id, &t, None).await;
    assert_restore_invariants("dropped", &env, &[host], &[], &[id]).await;
}

/// An [`Env`] whose manager was shut down and dropped (one manager may use
/// an SQLite file at a time), to be opened again on the same store,
/// transport and agent.
struct Closed {
    dir: tempfile::TempDir,
    db: std::path::PathBuf,
    store: Db,
    transport: Arc<InProcessTransport>,
    agent: Arc<MemoryHostAgent>,
    host: HostId,
}

impl Closed {
    async fn of(env: Env) -> Closed {
        env.manager.shutdown().await;
        let Env {
            dir,
            db,
            store,
            manager,
            transport,
            agent,
            host,
            options: _,
        } = env;
        drop(manager);
        Closed {
            dir,
            db,
            store,
            transport,
            agent,
            host,
        }
    }

    async fn open(self, options: ManagerOptions) -> Env {
        let manager = self
            .store
            .open(self.transport.clone(), options.clone())
            .await
            .unwrap();
        Env {
            dir: self.dir,
            db: self.db,
            store: self.store,
            manager,
            transport: self.transport,
            agent: self.agent,
            host: self.host,
            options,
        }
    }
}

/// A shutdown waits for a restore in flight to record its outcome: the
/// agent holds `CreateSandbox` past the create timeout, the caller is told
/// it failed, and the VM it may have started is destroyed by the next
/// manager.
async fn a_shutdown_waits_for_a_restore_in_flight(backend: Backend) {
    for mode in Mode::ALL {
        let case = format!("{mode:?}: shutdown during a restore");
        let env = Env::on(&backend, options(), mode).await;
        let host = first(&env);
        let team = TeamId::new();
        let t = snapshot_on(&env, team, "snap", &[&host], None).await;
        let hold = Hold::new();
        host.agent
            .inject(AgentOp::CreateSandbox, Fault::Hold(hold.clone()));
        let id = SandboxId::new();
        let task = {
            let manager = env.manager.clone();
            tokio::spawn(async move {
                manager
                    .restore(&caller(team), req("snap").sandbox_id(id))
                    .await
            })
        };
        hold.arrived(1).await;
        let closed = Closed::of(env).await;
        let err = expect_code(&case, task.await.unwrap(), ErrorCode::AgentError);
        let env = closed.open(options()).await;
        assert_eq!(
            env.count("SELECT count(*) FROM restores").await,
            0,
            "{case}"
        );
        check_audit(&case, &env, team, id, &t, Some(&err)).await;
        assert!(destroy_queued_or_done(&env, &host, id).await, "{case}");
        drain_restores(&env, std::slice::from_ref(&host)).await;
        assert!(host.agent.calls(AgentOp::DestroySandbox) >= 1, "{case}");
        assert_restore_invariants(&case, &env, &[host], &[id], &[]).await;
    }
}

/// Opens a manager on `store` on a runtime of its own, starts `request`
/// there, waits until the agent holds its `CreateSandbox` at `hold`, and
/// then drops that runtime: every task of that manager stops where it is,
/// as in a killed process, and the journal stays as it was.
async fn crash_mid_restore(
    closed: &Closed,
    options: ManagerOptions,
    team: TeamId,
    request: RestoreRequest,
    hold: &Hold,
) {
    let (kill, killed) = tokio::sync::oneshot::channel::<()>();
    let (store, transport) = (closed.store.clone(), closed.transport.clone());
    let process = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let finished = runtime.block_on(async move {
            let manager = store.open(transport, options).await.unwrap();
            let who = caller(team);
            tokio::select! {
                result = manager.restore(&who, request) => Some(result),
                _ = killed => None,
            }
        });
        drop(runtime);
        finished
    });
    tokio::time::timeout(Duration::from_secs(10), hold.arrived(1))
        .await
        .expect("the restore reaches the agent");
    kill.send(()).unwrap();
    let finished = tokio::task::spawn_blocking(move || process.join().unwrap())
        .await
        .unwrap();
    assert!(
        finished.is_none(),
        "the restore ended before the crash: {finished:?}"
    );
}

/// What the host shows when the next manager recovers a restore that was
/// interrupted while the agent was starting the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AtRecovery {
    /// The VM never started.
    NoVm,
    /// The VM runs.
    VmRuns,
    /// The VM runs, but the host is offline: rolled back at once, the VM
    /// destroyed once the host is back.
    HostOffline,
    /// The VM runs; the host's first list fails, so the restore waits.
    ListFailsFirst,
    /// The VM runs; the host never lists: at `resolve_deadline` the
    /// restore is rolled back, and the VM destroyed (that needs no list).
    HostSilent,
}

impl AtRecovery {
    const ALL: [AtRecovery; 5] = [
        AtRecovery::NoVm,
        AtRecovery::VmRuns,
        AtRecovery::HostOffline,
        AtRecovery::ListFailsFirst,
        AtRecovery::HostSilent,
    ];

    /// Whether recovery keeps the sandbox (the host lists it).
    fn kept(self) -> bool {
        matches!(self, AtRecovery::VmRuns | AtRecovery::ListFailsFirst)
    }

    /// Whether recovery waits for the host at least once.
    fn postponed(self) -> bool {
        matches!(self, AtRecovery::ListFailsFirst | AtRecovery::HostSilent)
    }
}

async fn interrupted_restores_are_finished_or_rolled_back(backend: Backend) {
    for (mode, at) in Mode::ALL
        .into_iter()
        .flat_map(|m| AtRecovery::ALL.map(|at| (m, at)))
    {
        let case = format!("{mode:?}: interrupted, {at:?}");
        let mut o = options();
        // Short leases, so that another replica adopts the entry soon
        // after the crash; a create timeout the crash beats.
        o.instance_lease = Duration::from_secs(1);
        o.record_patience = Duration::from_millis(200);
        o.create_timeout = Duration::from_secs(3);
        let env = Env::on(&backend, o.clone(), mode).await;
        let fleet = [first(&env)];
        let (host, agent) = (fleet[0].id, fleet[0].agent.clone());
        let team = TeamId::new();
        let t = snapshot_on(&env, team, "snap", &[&fleet[0]], None).await;
        let closed = Closed::of(env).await;

        let hold = Hold::new();
        agent.inject(AgentOp::CreateSandbox, Fault::Hold(hold.clone()));
        let id = SandboxId::new();
        crash_mid_restore(&closed, o.clone(), team, req("snap").sandbox_id(id), &hold).await;
        agent.clear_faults();
        assert_eq!(agent.sandbox_status(id), None, "{case}: held, not started");
        if at != AtRecovery::NoVm {
            // It had started on the host before the crash.
            agent.add_sandbox(id, "running", 2, 512);
        }

        let mut recovering = o.clone();
        recovering.run_janitor = false;
        if at == AtRecovery::HostSilent {
            // Past the instance lease (1 s), so that on PostgreSQL, where
            // the entry is adopted only once the crashed instance's lease
            // ends, the host is asked (and fails) at least once first.
            recovering.resolve_deadline = Duration::from_secs(3);
        }
        let env = closed.open(recovering).await;
        // Interrupted, not resolved: the sandbox is `starting`, and owned
        // by the restore.
        assert_eq!(
            env.count("SELECT count(*) FROM restores").await,
            1,
            "{case}"
        );
        let shown = env.manager.sandbox(&caller(team), id).await.expect(&case);
        assert_eq!(shown.status, SandboxStatus::Starting, "{case}");
        expect_code(
            &case,
            env.manager
                .registry()
                .set_sandbox_status(id, SandboxStatus::Stopped)
                .await,
            ErrorCode::Conflict,
        );
        match at {
            AtRecovery::HostOffline => env
                .manager
                .registry()
                .set_host_status(host, HostStatus::Offline)
                .await
                .unwrap(),
            AtRecovery::ListFailsFirst => agent.inject_times(
                AgentOp::ListSandboxes,
                Fault::Fail(AgentError::unavailable("x")),
                1,
            ),
            AtRecovery::HostSilent => agent.inject(
                AgentOp::ListSandboxes,
                Fault::Fail(AgentError::unavailable("x")),
            ),
            AtRecovery::NoVm | AtRecovery::VmRuns => {}
        }

        let mut report = WorkReport::default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while env.count("SELECT count(*) FROM restores").await > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{case}: not recovered"
            );
            let pass = env.manager.run_pending_work().await.unwrap();
            report.restores_kept += pass.restores_kept;
            report.restores_rolled_back += pass.restores_rolled_back;
            report.postponed += pass.postponed;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let kept = at.kept();
        assert_eq!(
            (report.restores_kept, report.restores_rolled_back),
            (usize::from(kept), usize::from(!kept)),
            "{case}: {report:?}"
        );
        assert_eq!(report.postponed >= 1, at.postponed(), "{case}: {report:?}");
        let entries = restore_entries(&env, team, id).await;
        assert_eq!(entries.len(), 1, "{case}: {entries:?}");
        assert_eq!(entries[0].actor, *caller(team).actor(), "{case}");
        if kept {
            assert_eq!(entries[0].outcome, AuditOutcome::Success, "{case}");
            let sandbox = env.manager.sandbox(&caller(team), id).await.expect(&case);
            assert_eq!(
                (sandbox.status, sandbox.host, sandbox.template_id),
                (SandboxStatus::Running, Some(host), Some(t.id)),
                "{case}"
            );
            let used = env.manager.get(&caller(team), &name("snap")).await;
            assert!(used.unwrap().last_used_at.is_some(), "{case}");
            drain_restores(&env, &fleet).await;
            assert_restore_invariants(&case, &env, &fleet, &[], &[id]).await;
            continue;
        }
        assert_eq!(entries[0].outcome, AuditOutcome::Failure, "{case}");
        assert_eq!(
            entries[0].error_code.as_deref(),
            Some("interrupted"),
            "{case}"
        );
        expect_code(
            &case,
            env.manager.sandbox(&caller(team), id).await,
            ErrorCode::NotFound,
        );
        assert!(destroy_queued_or_done(&env, &fleet[0], id).await, "{case}");
        match at {
            AtRecovery::HostOffline => {
                // Nothing is asked of an offline host; the VM waits.
                for _ in 0..5 {
                    env.manager.run_pending_work().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                assert_eq!(agent.calls(AgentOp::DestroySandbox), 0, "{case}");
                assert_eq!(env.manager.pending_destroys().await.unwrap().len(), 1);
                assert!(agent.sandbox_status(id).is_some(), "{case}");
                env.manager
                    .registry()
                    .set_host_status(host, HostStatus::Online)
                    .await
                    .unwrap();
            }
            AtRecovery::HostSilent => {
                // The host still cannot list; the destroy does not need it.
                eventually(&case, || async {
                    let _ = env.manager.run_pending_work().await;
                    env.manager.pending_destroys().await.unwrap().is_empty()
                })
                .await;
                assert_eq!(agent.sandbox_status(id), None, "{case}");
            }
            _ => {}
        }
        drain_restores(&env, &fleet).await;
        assert_restore_invariants(&case, &env, &fleet, &[id], &[]).await;
    }
}

/// A VM of another team runs on the host under an id the store does not
/// know (not registered yet). A restore into that id whose `CreateSandbox`
/// fails ambiguously (an agent that answers Internal for a duplicate id)
/// must not hand that VM to the caller when the host lists it, nor queue
/// its destruction: the host lists it with its own team and template.
/// Likewise when the restore was interrupted and recovery decides.
async fn another_teams_vm_under_the_id_is_never_taken_nor_destroyed(backend: Backend) {
    use sandbox_snapshots::agent::{CreateSandboxRequest, HostAgent, SnapshotKey};
    let env = Env::on(&backend, options(), Mode::Ours).await;
    let host = first(&env);
    let fleet = [host.clone()];
    let (team, other) = (TeamId::new(), TeamId::new());
    snapshot_on(&env, team, "snap", &[&host], None).await;
    let theirs = snapshot_on(&env, other, "theirs", &[&host], None).await;
    let foreign = |id: SandboxId, n: &str| {
        let agent = host.agent.clone();
        let n = n.to_owned();
        async move {
            let mut req = CreateSandboxRequest::new(id, SnapshotKey::for_template(theirs.id));
            req.team_id = Some(other);
            req.template_id = Some(theirs.id);
            agent.create_sandbox(req).await.expect(&n);
            id
        }
    };

    let id = foreign(SandboxId::new(), "a foreign VM").await;
    host.agent.inject_times(
        AgentOp::CreateSandbox,
        Fault::Fail(AgentError::rejected(AgentCode::Internal, "exists")),
        1,
    );
    let answer = restore(&env, team, req("snap").sandbox_id(id)).await;
    assert!(answer.is_err(), "the foreign VM was handed out: {answer:?}");
    assert_eq!(env.manager.registry().sandbox(id).await.unwrap(), None);

    // Interrupted: the process stops while `CreateSandbox` hangs; recovery
    // then finds another team's VM under the id.
    let id2 = SandboxId::new();
    let mut o = options();
    // Short leases, so that PostgreSQL adopts the entry soon after.
    o.instance_lease = Duration::from_secs(1);
    let closed = Closed::of(env).await;
    let hold = Hold::new();
    host.agent
        .inject(AgentOp::CreateSandbox, Fault::Hold(hold.clone()));
    crash_mid_restore(&closed, o.clone(), team, req("snap").sandbox_id(id2), &hold).await;
    host.agent.clear_faults();
    foreign(id2, "another foreign VM").await;
    let env = closed.open(o).await;
    drain_restores(&env, &fleet).await;
    let registered = env.manager.registry().sandbox(id2).await.unwrap();
    assert_eq!(registered, None, "recovery handed the foreign VM out");

    for id in [id, id2] {
        assert_eq!(
            host.agent.sandbox_status(id).as_deref(),
            Some("running"),
            "the other team's VM {id} was destroyed"
        );
    }
    assert_restore_invariants("foreign", &env, &fleet, &[], &[]).await;
}
