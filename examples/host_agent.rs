//! Run with: cargo run --example host_agent -- --listen 127.0.0.1:50051 --root ./agent-root
//!
//! The reference host agent (`DirHostAgent`) served over gRPC, gRPC-Web and
//! the Connect protocol (binary and JSON; `curl` works, see README.md) on one
//! port, for a single-node self-hoster: a sandbox's state lives in
//! `ROOT/sandboxes/<sandbox_id>/`, snapshots go to `ROOT/snapshots/<key>/`.
//!
//! Options:
//!   --listen ADDR   address to listen on (default 127.0.0.1:50051; port 0
//!                   picks a free port)
//!   --root DIR      the agent's root directory (required)
//!   --token TOKEN   require `authorization: Bearer TOKEN` on every call
//!                   (or set HOST_AGENT_TOKEN)
//!   --tls-cert PEM --tls-key PEM
//!                   serve over TLS with this certificate and key
//!   --client-ca PEM require client certificates signed by this CA
//!   --images DIR    base templates sandboxes may start from (default
//!                   ROOT/images)
//!   --vmm NAME --vmm-version V --snapshot-format F
//!                   what GetHostInfo reports this host runs (defaults
//!                   describe the reference agent itself)
//!
//! Prints `listening on ADDR` once it accepts calls, logs each call, and on
//! Ctrl-C or SIGTERM stops accepting and finishes the calls in progress.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use sandbox_snapshots::agent::ServerTls;
use sandbox_snapshots::{BearerToken, DirHostAgent, HostAgentServer};

type Failure = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    listen: SocketAddr,
    root: PathBuf,
    token: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    images: Option<PathBuf>,
    vmm: Option<(String, String, String)>,
}

fn usage() -> String {
    "usage: host_agent --root DIR [--listen ADDR] [--token TOKEN] \
     [--tls-cert PEM --tls-key PEM [--client-ca PEM]] [--images DIR] \
     [--vmm NAME --vmm-version V --snapshot-format F]"
        .to_owned()
}

fn parse_args() -> Result<Args, Failure> {
    let mut listen: SocketAddr = "127.0.0.1:50051".parse()?;
    let mut root = None;
    let (mut tls_cert, mut tls_key, mut client_ca) = (None, None, None);
    let (mut images, mut vmm, mut vmm_version, mut snapshot_format) = (None, None, None, None);
    let mut token = std::env::var("HOST_AGENT_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{arg} needs a value\n{}", usage()))
        };
        match arg.as_str() {
            "--listen" => listen = value()?.parse()?,
            "--root" => root = Some(PathBuf::from(value()?)),
            "--token" => token = Some(value()?),
            "--tls-cert" => tls_cert = Some(PathBuf::from(value()?)),
            "--tls-key" => tls_key = Some(PathBuf::from(value()?)),
            "--client-ca" => client_ca = Some(PathBuf::from(value()?)),
            "--images" => images = Some(PathBuf::from(value()?)),
            "--vmm" => vmm = Some(value()?),
            "--vmm-version" => vmm_version = Some(value()?),
            "--snapshot-format" => snapshot_format = Some(value()?),
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{}", usage()).into()),
        }
    }
    let root = root.ok_or_else(usage)?;
    if tls_cert.is_some() != tls_key.is_some() || (client_ca.is_some() && tls_cert.is_none()) {
        return Err(format!("--tls-cert and --tls-key go together\n{}", usage()).into());
    }
    let vmm = match (vmm, vmm_version, snapshot_format) {
        (None, None, None) => None,
        (Some(vmm), Some(version), Some(format)) => Some((vmm, version, format)),
        _ => {
            return Err(format!(
                "--vmm, --vmm-version and --snapshot-format go together\n{}",
                usage()
            )
            .into());
        }
    };
    Ok(Args {
        listen,
        root,
        token,
        tls_cert,
        tls_key,
        client_ca,
        images,
        vmm,
    })
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = parse_args()?;
    let mut agent = DirHostAgent::open(&args.root).await?;
    if let Some(images) = &args.images {
        agent = agent.with_images(images);
    }
    if let Some((vmm, version, format)) = &args.vmm {
        agent = agent.with_vmm(vmm, version, format);
    }
    let mut server = HostAgentServer::new(Arc::new(agent));
    if let Some(token) = args.token {
        server = server.with_token(BearerToken::new(token));
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let mut tls = ServerTls::new(std::fs::read(cert)?, std::fs::read(key)?);
        if let Some(ca) = &args.client_ca {
            tls = tls.client_ca(std::fs::read(ca)?);
        }
        server = server.with_tls(tls);
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(root = %args.root.display(), "host agent ready");
    // A line on stdout that scripts (and tests) wait for.
    println!("listening on {addr}");
    server
        .serve(listener, sandbox_snapshots::shutdown_signal())
        .await?;
    tracing::info!("stopped");
    Ok(())
}
