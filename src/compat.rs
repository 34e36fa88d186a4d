//! Whether a host can restore a snapshot (SPEC §7 "Compatibility").
//!
//! Firecracker (and every VMM we know of) restores a snapshot only with the
//! same VMM and snapshot format, on the same architecture and CPU model.
//! A snapshot records the [`HostInfo`] that produced it; each host's is
//! asked when it registers or comes online. [`CompatPolicy`] decides; the
//! default, [`DefaultCompatPolicy`], compares exactly those four fields.

use crate::agent::HostInfo;

/// Decides whether a host may restore a snapshot. `snapshot` is what
/// produced the template, `host` what the host runs; either is `None` when
/// unknown.
pub trait CompatPolicy: std::fmt::Debug + Send + Sync + 'static {
    /// `Ok` when the host may restore it, else the reason (which field
    /// differs), shown to the caller in the 409 `incompatible` answer.
    fn check(&self, snapshot: Option<&HostInfo>, host: Option<&HostInfo>) -> Result<(), String>;
}

/// The default policy: vmm, snapshot_format, arch and cpu_model must be
/// equal. Unknown on either side (no `HostInfo`, or the field empty) is
/// allowed: an agent without `GetHostInfo` still works (it is logged).
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultCompatPolicy;

impl CompatPolicy for DefaultCompatPolicy {
    fn check(&self, snapshot: Option<&HostInfo>, host: Option<&HostInfo>) -> Result<(), String> {
        let (Some(snapshot), Some(host)) = (snapshot, host) else {
            return Ok(());
        };
        let fields = [
            ("vmm", &snapshot.vmm, &host.vmm),
            (
                "snapshot_format",
                &snapshot.snapshot_format,
                &host.snapshot_format,
            ),
            ("arch", &snapshot.arch, &host.arch),
            ("cpu_model", &snapshot.cpu_model, &host.cpu_model),
        ];
        for (field, want, have) in fields {
            if !want.is_empty() && !have.is_empty() && want != have {
                return Err(format!(
                    "{field} differs: the snapshot was made with {want:?}, the host has {have:?}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(vmm: &str, format: &str, arch: &str, cpu: &str) -> HostInfo {
        HostInfo::new(vmm, "1", format, arch).cpu("GenuineIntel", cpu, ["avx2"])
    }

    #[test]
    fn each_compared_field_decides_and_unknown_is_allowed() {
        let base = info("firecracker", "v1", "x86_64", "Xeon 8375C");
        let policy = DefaultCompatPolicy;
        assert_eq!(policy.check(Some(&base), Some(&base.clone())), Ok(()));
        for (field, other) in [
            (
                "vmm",
                info("cloud-hypervisor", "v1", "x86_64", "Xeon 8375C"),
            ),
            (
                "snapshot_format",
                info("firecracker", "v2", "x86_64", "Xeon 8375C"),
            ),
            ("arch", info("firecracker", "v1", "aarch64", "Xeon 8375C")),
            (
                "cpu_model",
                info("firecracker", "v1", "x86_64", "EPYC 7R13"),
            ),
        ] {
            let err = policy.check(Some(&base), Some(&other)).unwrap_err();
            assert!(err.starts_with(field), "{field}: {err}");
        }
        // Another kernel or vmm_version is not compared.
        let mut kernel = base.clone();
        kernel.kernel_version = "6.1".into();
        kernel.vmm_version = "2".into();
        assert_eq!(policy.check(Some(&base), Some(&kernel)), Ok(()));
        // Unknown on either side, whole or per field.
        assert_eq!(policy.check(None, Some(&base)), Ok(()));
        assert_eq!(policy.check(Some(&base), None), Ok(()));
        let mut no_cpu = base.clone();
        no_cpu.cpu_model.clear();
        let other_cpu = info("firecracker", "v1", "x86_64", "EPYC 7R13");
        assert_eq!(policy.check(Some(&no_cpu), Some(&other_cpu)), Ok(()));
    }
}
