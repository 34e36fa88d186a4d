//! The REST API under load (issue 14): the real axum server on loopback,
//! driven by real HTTP clients (`reqwest`, keep-alive), against the library
//! called directly at the same concurrency on the same kind of store, and a
//! list's tail latency with and without that load.

use reqwest::StatusCode;
use sandbox_snapshots::http::{API_KEY_HEADER, ApiState};

use super::*;

/// Ready templates of the team that the list client lists.
const LISTED: usize = 100;

/// Concurrent clients and the length of each measurement.
fn scale() -> (usize, Duration) {
    if quick() {
        (8, Duration::from_secs(1))
    } else {
        (64, Duration::from_secs(3))
    }
}

/// What one concurrent run of create+delete loops measured. An op is one
/// create or one delete.
struct Load {
    ops_per_sec: f64,
    p99: Duration,
    errors: u64,
}

impl Load {
    /// Merges the clients' latencies and errors over `elapsed`.
    fn of(per_client: Vec<(Vec<Duration>, u64)>, elapsed: Duration) -> Self {
        let mut latencies = Vec::new();
        let mut errors = 0;
        for (l, e) in per_client {
            latencies.extend(l);
            errors += e;
        }
        let ops_per_sec = latencies.len() as f64 / elapsed.as_secs_f64();
        let p99 = if latencies.is_empty() {
            Duration::ZERO
        } else {
            percentile(&mut latencies, 0.99)
        };
        Self {
            ops_per_sec,
            p99,
            errors,
        }
    }
}

/// Case 1 (REST create+delete against the library) and case 2 (list p99
/// during that load against the same list without it).
pub(super) fn cases(rt: &Runtime, dir: &Path) -> BenchResult<Vec<Row>> {
    let (clients, budget) = scale();
    let library = rt.block_on(library_load(dir, clients, budget))?;
    let (http, listed) = rt.block_on(http_load(dir, clients, budget))?;
    let ratio = http.ops_per_sec / library.ops_per_sec;
    let list_ratio = listed.loaded.as_secs_f64() / listed.idle.as_secs_f64();
    Ok(vec![
        Row {
            case: format!(
                "REST API, {clients} clients create+delete on distinct sandboxes (FULL), {} errors",
                http.errors + library.errors
            ),
            ours: format!("{:.0} ops/s, p99 {}", http.ops_per_sec, ms(http.p99)),
            baseline: format!(
                "library, {clients} tasks: {:.0} ops/s, p99 {}",
                library.ops_per_sec,
                ms(library.p99)
            ),
            ratio,
            goal: "≥ 0.7, 0 errors".into(),
            met: ratio >= 0.7 && http.errors == 0 && library.errors == 0,
        },
        Row {
            case: format!(
                "REST list of {LISTED} during that load ({} lists, {} errors)",
                listed.count, listed.errors
            ),
            ours: format!("p99 {} under load", ms(listed.loaded)),
            baseline: format!(
                "p99 {} without load (same server); the floor, `GET /healthz`: p99 {} under load, {} without ({:.1}×)",
                ms(listed.idle),
                ms(listed.health_loaded),
                ms(listed.health_idle),
                listed.health_loaded.as_secs_f64() / listed.health_idle.as_secs_f64()
            ),
            ratio: list_ratio,
            goal: "≤ 3".into(),
            met: list_ratio <= 3.0 && listed.errors == 0,
        },
    ])
}

/// The baseline of case 1: `Manager::create` + `delete` from `clients`
/// tasks, each on its own sandbox, for `budget`.
async fn library_load(dir: &Path, clients: usize, budget: Duration) -> BenchResult<Load> {
    let url = format!("sqlite:{}", dir.join("api-library.db").display());
    let f = Arc::new(fleet_on(&url, options(Synchronous::Full), Arc::new(NoopAgent)).await?);
    let mut sandboxes = Vec::new();
    for _ in 0..clients {
        sandboxes.push(f.sandbox().await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (t, sb) in sandboxes.into_iter().enumerate() {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let caller = f.caller();
            let name = TemplateName::parse(&format!("api-{t}")).map_err(|e| e.to_string())?;
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            while start.elapsed() < budget {
                let began = Instant::now();
                match f
                    .manager
                    .create(&caller, NewSnapshot::new(sb, Some(name.clone())))
                    .await
                {
                    Ok(_) => latencies.push(began.elapsed()),
                    Err(_) => {
                        errors += 1;
                        continue;
                    }
                }
                let began = Instant::now();
                match f.manager.delete(&caller, &name).await {
                    Ok(_) => latencies.push(began.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            Ok::<_, String>((latencies, errors))
        }));
    }
    let mut per_client = Vec::new();
    for task in tasks {
        per_client.push(task.await??);
    }
    let load = Load::of(per_client, start.elapsed());
    f.manager.shutdown().await;
    Ok(load)
}

/// What the list client measured.
struct Listed {
    idle: Duration,
    loaded: Duration,
    /// `GET /healthz`'s p99 on the idle server and under the same load.
    health_idle: Duration,
    health_loaded: Duration,
    count: usize,
    /// Failed lists, and failed writes of the load it ran through.
    errors: u64,
}

/// The server of cases 1 and 2: a fresh SQLite file, the same options and
/// agent as [`library_load`], the real router on a loopback port.
async fn http_load(dir: &Path, clients: usize, budget: Duration) -> BenchResult<(Load, Listed)> {
    let url = format!("sqlite:{}", dir.join("api-http.db").display());
    let mut f = fleet_on(&url, options(Synchronous::Full), Arc::new(NoopAgent)).await?;
    let state = ApiState::new(f.manager.clone());
    let writers = state.keys().create_team("writers").await?;
    let writer_key = state.keys().create_key(writers, "w", false).await?;
    let writer_key = writer_key.reveal().to_owned();
    f.team = writers;
    let mut sandboxes = Vec::new();
    for _ in 0..clients {
        sandboxes.push(f.sandbox().await?);
    }
    let readers = state.keys().create_team("readers").await?;
    let reader_key = state.keys().create_key(readers, "r", false).await?;
    let reader_key = reader_key.reveal().to_owned();
    for i in 0..LISTED {
        f.manager
            .registry()
            .register_template(
                NewTemplate::new(
                    readers,
                    TemplateName::parse(&format!("listed-{i}"))?,
                    TemplateType::Base,
                )
                .on_hosts(vec![f.host]),
            )
            .await?;
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = {
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let app = sandbox_snapshots::http::router(state);
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        })
    };

    // Case 2's baseline: the same list on the idle server.
    let list_url = format!("{base}/v1/snapshots");
    let probe = |probe| lists_apart(&list_url, &reader_key, budget, probe);
    let (mut idle, idle_errors) = probe(Probe::List).await?;
    let (mut health_idle, health_idle_errors) = probe(Probe::Health).await?;

    // Case 1 alone (the list client's work would be counted against it),
    // then again with case 2's list client running through it, and once
    // more with `/healthz` asked instead: the floor under that load.
    let load = writes(&base, &writer_key, &sandboxes, budget).await?;
    let write = || writes(&base, &writer_key, &sandboxes, budget);
    let (during, listed) = tokio::join!(write(), probe(Probe::List));
    let (mut loaded, loaded_errors) = listed?;
    let (during_health, health) = tokio::join!(write(), probe(Probe::Health));
    let (mut health_loaded, health_errors) = health?;
    let _ = stop.send(());
    server.await??;
    f.manager.shutdown().await;
    let count = loaded.len();
    let listed = Listed {
        idle: percentile(&mut idle, 0.99),
        loaded: percentile(&mut loaded, 0.99),
        health_idle: percentile(&mut health_idle, 0.99),
        health_loaded: percentile(&mut health_loaded, 0.99),
        count,
        errors: idle_errors
            + loaded_errors
            + health_idle_errors
            + health_errors
            + during?.errors
            + during_health?.errors,
    };
    Ok((load, listed))
}

/// Case 1's load: one client per sandbox, each with its own keep-alive
/// pool, creating and deleting one template over and over for `budget`.
async fn writes(
    base: &str,
    key: &str,
    sandboxes: &[SandboxId],
    budget: Duration,
) -> BenchResult<Load> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (t, sb) in sandboxes.iter().enumerate() {
        let (base, key, sb) = (base.to_owned(), key.to_owned(), *sb);
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .tcp_nodelay(true)
                .build()
                .map_err(|e| e.to_string())?;
            let name = format!("api-{t}");
            let create =
                serde_json::json!({ "sandbox_id": sb.to_string(), "name": name }).to_string();
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            while start.elapsed() < budget {
                let began = Instant::now();
                let created = http
                    .post(format!("{base}/v1/snapshots"))
                    .header(API_KEY_HEADER, &key)
                    .header("content-type", "application/json")
                    .body(create.clone())
                    .send()
                    .await;
                if !answer(created, StatusCode::CREATED).await {
                    errors += 1;
                    continue;
                }
                latencies.push(began.elapsed());
                let began = Instant::now();
                let deleted = http
                    .delete(format!("{base}/v1/snapshots/{name}"))
                    .header(API_KEY_HEADER, &key)
                    .send()
                    .await;
                match answer(deleted, StatusCode::NO_CONTENT).await {
                    true => latencies.push(began.elapsed()),
                    false => errors += 1,
                }
            }
            Ok::<_, String>((latencies, errors))
        }));
    }
    let mut per_client = Vec::new();
    for task in tasks {
        per_client.push(task.await??);
    }
    Ok(Load::of(per_client, start.elapsed()))
}

/// [`lists`] from a thread and runtime of their own, as a client on
/// another machine lists: the 64 writing clients share the bench's runtime
/// with the server, and a list answer queued behind their tasks would be
/// the load generator's latency, not the server's. Both the idle and the
/// loaded lists run this way.
async fn lists_apart(
    url: &str,
    key: &str,
    budget: Duration,
    probe: Probe,
) -> BenchResult<(Vec<Duration>, u64)> {
    let (url, key) = (url.to_owned(), key.to_owned());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("list-client".into())
        .spawn(move || {
            let listed = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| {
                    rt.block_on(async {
                        let http = reqwest::Client::builder()
                            .tcp_nodelay(true)
                            .build()
                            .map_err(|e| e.to_string())?;
                        Ok(lists(&http, &url, &key, budget, probe).await)
                    })
                });
            let _ = tx.send(listed);
        })?;
    Ok(rx.await.map_err(|_| "the list client's thread died")??)
}

/// Lists `url` back to back for `budget`, checking that each answer is the
/// whole team: each list's latency, and the errors.
/// With [`Probe::Health`], `GET /healthz` on the same server instead (no
/// key, no store: what any request costs there).
async fn lists(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    budget: Duration,
    probe: Probe,
) -> (Vec<Duration>, u64) {
    let start = Instant::now();
    let (mut latencies, mut errors) = (Vec::new(), 0u64);
    while start.elapsed() < budget || latencies.len() < 20 {
        let began = Instant::now();
        let ok = match probe {
            Probe::List => {
                let listed = match http.get(url).header(API_KEY_HEADER, key).send().await {
                    Ok(r) if r.status() == StatusCode::OK => {
                        r.json::<Vec<serde_json::Value>>().await.ok()
                    }
                    _ => None,
                };
                listed.is_some_and(|items| items.len() == LISTED)
            }
            Probe::Health => {
                let health = url.replace("/v1/snapshots", "/healthz");
                answer(http.get(health).send().await, StatusCode::OK).await
            }
        };
        match ok {
            true => latencies.push(began.elapsed()),
            false => errors += 1,
        }
    }
    (latencies, errors)
}

/// What the probe client asks for.
#[derive(Clone, Copy)]
enum Probe {
    /// The list of [`LISTED`] templates.
    List,
    /// `GET /healthz`: the floor, what the server's scheduling alone costs.
    Health,
}

/// Whether `response` has `expected` status; its body is read (and the
/// connection so left reusable) either way.
async fn answer(response: reqwest::Result<reqwest::Response>, expected: StatusCode) -> bool {
    match response {
        Ok(r) => {
            let ok = r.status() == expected;
            r.bytes().await.is_ok() && ok
        }
        Err(_) => false,
    }
}
