//! The host-agent messages written out by hand from SPEC §5, independent of
//! the generated code: what an existing agent would decode. Used by the
//! test Connect server and by raw gRPC probes.
#![allow(dead_code, unreachable_pub)]

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateSnapshotRequest {
    #[prost(string, tag = "1")]
    pub sandbox_id: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(string, tag = "3")]
    pub team_id: String,
    #[prost(string, tag = "4")]
    pub template_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateSnapshotResponse {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(int64, tag = "2")]
    pub size_bytes: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteSnapshotRequest {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub team_id: String,
    #[prost(string, tag = "3")]
    pub template_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SandboxInfo {
    #[prost(string, tag = "1")]
    pub sandbox_id: String,
    #[prost(string, tag = "2")]
    pub status: String,
    #[prost(string, tag = "3")]
    pub template: String,
    #[prost(int32, tag = "4")]
    pub vcpus: i32,
    #[prost(int32, tag = "5")]
    pub memory_mb: i32,
    #[prost(string, tag = "6")]
    pub host_ip: String,
    #[prost(int64, tag = "7")]
    pub created_at_unix: i64,
    #[prost(int64, tag = "8")]
    pub last_active_at_unix: i64,
    #[prost(int32, tag = "9")]
    pub timeout_sec: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListSandboxesResponse {
    #[prost(message, repeated, tag = "1")]
    pub sandboxes: Vec<SandboxInfo>,
    #[prost(string, repeated, tag = "2")]
    pub auto_paused_sandbox_ids: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(int64, tag = "2")]
    pub size_bytes: i64,
    #[prost(int64, tag = "3")]
    pub created_at_unix: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListSnapshotsResponse {
    #[prost(message, repeated, tag = "1")]
    pub snapshots: Vec<SnapshotInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateSandboxRequest {
    #[prost(string, tag = "1")]
    pub template: String,
    #[prost(int32, tag = "2")]
    pub vcpus: i32,
    #[prost(int32, tag = "3")]
    pub memory_mb: i32,
    #[prost(int32, tag = "4")]
    pub timeout_sec: i32,
    #[prost(string, tag = "5")]
    pub sandbox_id: String,
    #[prost(int32, tag = "6")]
    pub disk_size_mb: i32,
    #[prost(string, tag = "7")]
    pub team_id: String,
    #[prost(string, tag = "8")]
    pub template_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateSandboxResponse {
    #[prost(string, tag = "1")]
    pub sandbox_id: String,
    #[prost(string, tag = "2")]
    pub status: String,
    #[prost(string, tag = "3")]
    pub host_ip: String,
    #[prost(map = "string, string", tag = "4")]
    pub metadata: std::collections::HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DestroySandboxRequest {
    #[prost(string, tag = "1")]
    pub sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HostInfo {
    #[prost(string, tag = "1")]
    pub vmm: String,
    #[prost(string, tag = "2")]
    pub vmm_version: String,
    #[prost(string, tag = "3")]
    pub snapshot_format: String,
    #[prost(string, tag = "4")]
    pub kernel_version: String,
    #[prost(string, tag = "5")]
    pub cpu_vendor: String,
    #[prost(string, tag = "6")]
    pub cpu_model: String,
    #[prost(string, repeated, tag = "7")]
    pub cpu_flags: Vec<String>,
    #[prost(string, tag = "8")]
    pub arch: String,
}
