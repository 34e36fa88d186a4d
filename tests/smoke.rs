#![allow(clippy::unwrap_used)]
mod common;
use common::*;
use sandbox_snapshots::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke() {
    let env = Env::new().await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let t = env.create(team, sb, "first").await.unwrap();
    assert_eq!(t.name.as_str(), "first");
    assert_eq!(env.names(team).await, vec!["first"]);
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Paused);
    let t2 = env.overwrite(team, sb, "first").await.unwrap();
    assert_ne!(t.id, t2.id);
    eventually("old files deleted", || async { env.agent.snapshot_keys() == vec![t2.id.to_string()] }).await;
    let d = env.manager.delete(&caller(team), &name("first")).await.unwrap();
    assert_eq!(d.hosts_confirmed, vec![env.host]);
    assert!(env.agent.snapshot_keys().is_empty());
    assert_eq!(env.count("SELECT count(*) FROM templates"), 0);
}
