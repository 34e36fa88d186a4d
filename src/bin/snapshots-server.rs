//! The HTTP API server for self-hosters.
//!
//! Run with: cargo run --features server --bin snapshots-server -- serve
//!
//! With the embedded defaults it keeps its SQLite file in `./data` and runs
//! the reference host agent in-process over `./data/agent` (sandboxes in
//! `data/agent/sandboxes/<id>/`), registered as the local host
//! `host-0000000000000000000000001`. With `--agent grpc` or
//! `--agent connect` it reaches remote host agents registered through the
//! admin API instead.
//!
//! `--database postgres://…` (a build with the `postgres` feature) keeps
//! the state in PostgreSQL instead: any number of `snapshots-server`
//! processes may then serve one database behind a load balancer, each a
//! replica of the control plane (use `--agent grpc` or `--agent connect`
//! there: an in-process agent belongs to one process).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use sandbox_snapshots::http::{ApiKeys, ApiState};
use sandbox_snapshots::{
    AgentTransport, ApiKeyId, BearerToken, ConnectConfig, ConnectTransport, DirHostAgent,
    GrpcConfig, GrpcTransport, HostId, HostStatus, InProcessTransport, Manager, ManagerOptions,
    TeamId,
};

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// The id of the in-process host in the default setup.
const LOCAL_HOST: &str = "host-0000000000000000000000001";

#[derive(Parser)]
#[command(
    name = "snapshots-server",
    version,
    about = "Snapshot management API for microVM sandboxes"
)]
struct Cli {
    /// Where the SQLite file (and the in-process agent's files) live.
    #[arg(
        long,
        global = true,
        env = "SNAPSHOTS_DATA_DIR",
        default_value = "data"
    )]
    data_dir: PathBuf,
    /// The database: `sqlite:PATH` (default `sqlite:DATA_DIR/snapshots.db`)
    /// or `postgres://user:password@host:port/dbname` (feature `postgres`).
    /// Prefer the environment variable when the URL holds a password.
    #[arg(
        long,
        global = true,
        env = "SNAPSHOTS_DATABASE",
        hide_env_values = true
    )]
    database: Option<String>,
    /// PEM of the CA that signed the PostgreSQL server's certificate: the
    /// connections use TLS verified against it (only it), and a URL with
    /// `sslmode=require` insists on TLS.
    #[arg(long, global = true, env = "SNAPSHOTS_DATABASE_CA")]
    database_ca: Option<PathBuf>,
    /// Seconds this replica's instance lease lasts without a heartbeat
    /// (serve): another replica adopts the operations of one whose lease
    /// ended. Renewed every third of it.
    #[arg(long, global = true, env = "SNAPSHOTS_INSTANCE_LEASE", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(3..=86_400))]
    instance_lease: u64,
    /// Seconds a create or restore with an `Idempotency-Key`, or started
    /// with `Prefer: respond-async`, is remembered after it began (serve).
    #[arg(long, global = true, env = "SNAPSHOTS_REQUEST_RETENTION", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..=30 * 86_400))]
    request_retention: u64,
    /// Address to listen on (serve).
    #[arg(
        long,
        global = true,
        env = "SNAPSHOTS_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    listen: SocketAddr,
    /// How to reach host agents (serve).
    #[arg(
        long,
        global = true,
        env = "SNAPSHOTS_AGENT",
        value_enum,
        default_value = "in-process"
    )]
    agent: AgentKind,
    /// Bearer token sent to remote host agents (serve). Prefer the
    /// environment variable: command lines are visible to other users.
    #[arg(
        long,
        global = true,
        env = "SNAPSHOTS_AGENT_TOKEN",
        hide_env_values = true
    )]
    agent_token: Option<String>,
    /// Also serve `GET /metrics` here, without an API key (serve). Bind it
    /// where only the monitoring network reaches; on the API address
    /// `/metrics` needs an admin key.
    #[arg(long, global = true, env = "SNAPSHOTS_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum AgentKind {
    /// The reference agent in this process, over DATA_DIR/agent.
    InProcess,
    /// Remote agents over gRPC, at the addresses registered for their hosts.
    Grpc,
    /// Remote connect-go agents over HTTP/1.1.
    Connect,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Create a team and print its first API key (shown once).
    CreateTeam {
        /// The team's name.
        #[arg(long)]
        name: String,
    },
    /// Create another API key for a team (shown once).
    CreateKey {
        /// The team (`team-…`).
        #[arg(long)]
        team: String,
        /// A label for the key.
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// Create an admin API key, for the /v1/admin endpoints (shown once).
    CreateAdminKey {
        /// A label for the key.
        #[arg(long, default_value = "admin")]
        name: String,
    },
    /// Revoke an API key: it stops working at once.
    RevokeKey {
        /// The key's id (`key-…`, printed when it was created).
        #[arg(long)]
        key: String,
    },
}

fn database_url(database: Option<&str>, data_dir: &Path) -> String {
    match database {
        Some(url) => url.to_owned(),
        None => format!("sqlite:{}", data_dir.join("snapshots.db").display()),
    }
}

async fn serve(
    database: &str,
    options: ManagerOptions,
    data_dir: &Path,
    listen: SocketAddr,
    agent: AgentKind,
    token: Option<String>,
    metrics_listen: Option<SocketAddr>,
) -> Result<(), Failure> {
    // Before the manager exists, so that its first counts are recorded.
    let metrics = sandbox_snapshots::http::install_prometheus()?;
    let local = HostId::parse(LOCAL_HOST)?;
    let transport: Arc<dyn AgentTransport> = match agent {
        AgentKind::InProcess => {
            let root = data_dir.join("agent");
            let agent = DirHostAgent::open(&root).await?;
            let transport = InProcessTransport::new();
            transport.add_host(local, Arc::new(agent));
            tracing::info!(root = %root.display(), host = %local, "in-process host agent");
            Arc::new(transport)
        }
        AgentKind::Grpc => {
            let mut config = GrpcConfig::default();
            if let Some(t) = token {
                config = config.token(BearerToken::new(t));
            }
            Arc::new(GrpcTransport::new(config))
        }
        AgentKind::Connect => {
            let mut config = ConnectConfig::default();
            if let Some(t) = token {
                config = config.token(BearerToken::new(t));
            }
            Arc::new(ConnectTransport::new(config))
        }
    };
    let manager = Manager::open_url(database, transport, options).await?;
    if matches!(agent, AgentKind::InProcess) {
        manager
            .registry()
            .register_host(local, "in-process", HostStatus::Online)
            .await?;
    }
    if let Some(metrics_listen) = metrics_listen {
        let listener = tokio::net::TcpListener::bind(metrics_listen).await?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "serving /metrics without a key");
        println!("metrics listening on {addr}");
        let handle = metrics.clone();
        tokio::spawn(async move {
            let serving = sandbox_snapshots::http::serve_metrics(
                listener,
                handle,
                sandbox_snapshots::shutdown_signal(),
            );
            if let Err(err) = serving.await {
                tracing::error!(error = %err, "the metrics listener stopped");
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %data_dir.display(), "serving");
    // A line on stdout that scripts (and tests) wait for.
    println!("listening on {addr}");
    sandbox_snapshots::http::serve(
        listener,
        ApiState::new(manager).with_metrics(metrics),
        sandbox_snapshots::shutdown_signal(),
    )
    .await?;
    tracing::info!("stopped; in-flight snapshots were recorded");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let data_dir = cli.data_dir;
    let database = database_url(cli.database.as_deref(), &data_dir);
    let mut options = ManagerOptions::default();
    options.instance_lease = std::time::Duration::from_secs(cli.instance_lease);
    options.request_retention = std::time::Duration::from_secs(cli.request_retention);
    if let Some(ca) = &cli.database_ca {
        let pem = std::fs::read(ca)
            .map_err(|e| format!("cannot read the database CA {}: {e}", ca.display()))?;
        #[cfg(feature = "postgres")]
        {
            options.postgres.tls = Some(sandbox_snapshots::agent::TlsConfig::new(pem));
        }
        #[cfg(not(feature = "postgres"))]
        {
            let _ = pem;
            return Err("--database-ca needs a build with the `postgres` feature".into());
        }
    }
    let keys = || ApiKeys::open(&database, &options);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            serve(
                &database,
                options.clone(),
                &data_dir,
                cli.listen,
                cli.agent,
                cli.agent_token,
                cli.metrics_listen,
            )
            .await
        }
        Command::CreateTeam { name } => {
            let keys = keys().await?;
            let team = keys.create_team(&name).await?;
            let key = keys.create_key(team, "default", false).await?;
            println!("team_id={team}");
            println!("key_id={}", key.id);
            println!("api_key={}", key.reveal());
            eprintln!("store the key now: it is not shown again");
            Ok(())
        }
        Command::CreateKey { team, name } => {
            let keys = keys().await?;
            let key = keys.create_key(TeamId::parse(&team)?, &name, false).await?;
            println!("key_id={}", key.id);
            println!("api_key={}", key.reveal());
            Ok(())
        }
        Command::CreateAdminKey { name } => {
            let keys = keys().await?;
            let key = keys.create_key(TeamId::PLATFORM, &name, true).await?;
            println!("key_id={}", key.id);
            println!("api_key={}", key.reveal());
            Ok(())
        }
        Command::RevokeKey { key } => {
            let keys = keys().await?;
            keys.revoke(ApiKeyId::parse(&key)?).await?;
            println!("revoked {key}");
            Ok(())
        }
    }
}
