//! The VM configuration: what `vmm run` was asked to build, validated before anything is created.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest number of vCPUs this VMM describes to a guest: xAPIC ids in the MADT are 8-bit and 0xff is
/// the broadcast id.
pub const MAX_VCPUS: u8 = 254;
/// Largest accepted command line, including the terminating NUL (Linux's COMMAND_LINE_SIZE is 2048 on
/// x86; newer kernels accept more).
pub const MAX_CMDLINE_LEN: usize = 4096;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error("--vcpus {requested} is more than this host allows ({max})")]
    TooManyVcpus { requested: u32, max: u32 },
    #[error("--max-vcpus {max} is fewer than --vcpus {vcpus}")]
    MaxBelowVcpus { max: u32, vcpus: u32 },
    #[error("--max-vcpus {requested} is more than this host allows ({max})")]
    TooManyMaxVcpus { requested: u32, max: u32 },
    #[error("--memory-mib must be at least 1")]
    NoMemory,
    #[error("--memory-mib {0} is too large")]
    MemoryTooLarge(u64),
    #[error("--max-memory-mib {max} is less than --memory-mib {memory}")]
    MaxMemoryBelow { max: u64, memory: u64 },
    #[error("--max-memory-mib {max} is more than --memory-mib {memory} plus a whole number of {block} MiB blocks (the hot-pluggable part must be)", block = crate::devices::virtio::mem::BLOCK_SIZE >> 20)]
    MaxMemoryNotBlocks { max: u64, memory: u64 },
    #[error("kernel {0}: {1}")]
    Kernel(PathBuf, std::io::Error),
    #[error("initrd {0}: {1}")]
    Initrd(PathBuf, std::io::Error),
    #[error("the command line is {0} bytes; at most {MAX_CMDLINE_LEN} are allowed")]
    CmdlineTooLong(usize),
    #[error("invalid --serial '{0}': expected 'stdio' or 'file:PATH'")]
    Serial(String),
    #[error("invalid --disk '{0}': expected PATH or PATH,ro")]
    Disk(String),
    #[error("disk image {0}: {1}")]
    DiskImage(PathBuf, std::io::Error),
    #[error("invalid --net '{0}': expected tap=NAME[,mac=aa:bb:cc:dd:ee:ff]")]
    Net(String),
    #[error("invalid --vsock '{0}': expected cid=N,socket=PATH with N >= 3")]
    Vsock(String),
}

/// `--vsock cid=N,socket=PATH`: the guest's CID and the host-side Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: PathBuf,
}

impl std::str::FromStr for VsockConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Vsock(s.to_string());
        let (mut cid, mut socket) = (None, None);
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("cid", v)) => cid = Some(v.parse::<u64>().map_err(|_| bad())?),
                Some(("socket", v)) if !v.is_empty() => socket = Some(PathBuf::from(v)),
                _ => return Err(bad()),
            }
        }
        match (cid, socket) {
            (Some(cid), Some(socket)) if (3..=u64::from(u32::MAX)).contains(&cid) => {
                Ok(VsockConfig { cid, socket })
            }
            _ => Err(bad()),
        }
    }
}

/// A virtio-net device on a tap: `--net tap=NAME[,mac=MAC]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: String,
    pub mac: Option<String>,
}

impl std::str::FromStr for NetConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Net(s.to_string());
        let (mut tap, mut mac) = (None, None);
        for kv in s.split(',') {
            match kv.split_once('=') {
                // Each key once: a second `tap=` must not replace the first unnoticed.
                Some(("tap", v)) if tap.is_none() && !v.is_empty() && v.len() <= 15 => {
                    tap = Some(v.to_string())
                }
                Some(("mac", v))
                    if mac.is_none() && v.parse::<vmm_api::Mac>().is_ok_and(|m| m.is_unicast()) =>
                {
                    mac = Some(v.to_string())
                }
                _ => return Err(bad()),
            }
        }
        Ok(NetConfig {
            tap: tap.ok_or_else(bad)?,
            mac,
        })
    }
}

/// A virtio-blk disk: `--disk PATH[,ro]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            Some(_) => return Err(ConfigError::Disk(s.to_string())),
            None => (s, false),
        };
        if path.is_empty() {
            return Err(ConfigError::Disk(s.to_string()));
        }
        Ok(DiskConfig {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// Where the guest's COM1 goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialOutput {
    /// Console on the VMM's stdout, input from its stdin.
    Stdio,
    /// Console appended to a file; no input.
    File(PathBuf),
}

impl std::str::FromStr for SerialOutput {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialOutput::Stdio),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialOutput::File(PathBuf::from(p))),
                _ => Err(ConfigError::Serial(s.to_string())),
            },
        }
    }
}

/// A validated VM configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// vCPUs present at boot.
    pub vcpus: u8,
    /// vCPU slots the guest is told about (ACPI, CPUID topology): the most it can have once CPUs
    /// are hot-added. At least `vcpus`.
    pub max_vcpus: u8,
    /// RAM at boot (the e820 map's); the VM's size is this plus what virtio-mem has plugged.
    pub memory_mib: u64,
    /// The most the VM may grow to with virtio-mem (`--max-memory-mib`); `None`: it cannot grow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    pub serial: SerialOutput,
    pub api_socket: Option<PathBuf>,
    /// virtio devices.
    pub devices: DeviceConfig,
}

/// The virtio devices a VM gets, in the order they appear to the guest.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceConfig {
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub rng: bool,
    pub balloon: Option<BalloonConfig>,
    pub vsock: Option<VsockConfig>,
}

/// `--balloon [deflate-on-oom]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    pub deflate_on_oom: bool,
    /// Ask the guest for memory statistics this often (0: only when the API asks).
    #[serde(default)]
    pub stats_interval_ms: u64,
}

impl VmConfig {
    /// Checks everything that can be checked without KVM. `host_max_vcpus` is what the host
    /// allows; `max_vcpus` defaults to `vcpus`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
        vcpus: u32,
        max_vcpus: Option<u32>,
        memory_mib: u64,
        serial: SerialOutput,
        api_socket: Option<PathBuf>,
        devices: DeviceConfig,
        host_max_vcpus: u32,
    ) -> Result<Self, ConfigError> {
        let max_vcpus = max_vcpus.unwrap_or(vcpus);
        check_limits(vcpus, max_vcpus, memory_mib, &cmdline, host_max_vcpus)?;
        std::fs::metadata(&kernel).map_err(|e| ConfigError::Kernel(kernel.clone(), e))?;
        if let Some(initrd) = &initrd {
            std::fs::metadata(initrd).map_err(|e| ConfigError::Initrd(initrd.clone(), e))?;
        }
        check_disks(&devices)?;
        Ok(VmConfig {
            kernel,
            initrd,
            cmdline,
            vcpus: vcpus as u8,
            max_vcpus: max_vcpus as u8,
            memory_mib,
            max_memory_mib: None,
            serial,
            api_socket,
            devices,
        })
    }

    /// `--max-memory-mib`: lets the VM grow to `max` MiB with virtio-mem (equal to the boot size,
    /// or none: it cannot grow).
    pub fn with_max_memory(mut self, max: Option<u64>) -> Result<Self, ConfigError> {
        self.max_memory_mib = max.filter(|m| *m != self.memory_mib);
        check_max_memory(self.memory_mib, self.max_memory_mib)?;
        Ok(self)
    }

    /// The limits [`VmConfig::new`] checks, for a configuration read from a snapshot: a
    /// snapshot file is input like a command line, and an edited one (0 or 255 vCPUs, a memory
    /// size that overflows) must be refused before anything starts, exactly as `run` refuses it.
    /// (Its disks are checked by `snapshot::check_external`, which names what is missing.)
    pub fn check(&self, host_max_vcpus: u32) -> Result<(), ConfigError> {
        check_limits(
            u32::from(self.vcpus),
            u32::from(self.max_vcpus),
            self.memory_mib,
            &self.cmdline,
            host_max_vcpus,
        )?;
        check_max_memory(self.memory_mib, self.max_memory_mib)
    }

    /// Where guest RAM lies: boot RAM, then the virtio-mem region (rounded up to the guest's
    /// memory-block size, so none of it is unusable to Linux; only `max_memory_mib` is ever
    /// plugged).
    pub fn memory_layout(&self) -> crate::memory::Layout {
        use crate::devices::virtio::mem::REGION_ALIGN;
        let hotplug = self
            .max_memory_mib
            .map(|m| ((m - self.memory_mib) << 20).div_ceil(REGION_ALIGN) * REGION_ALIGN)
            .unwrap_or(0);
        crate::memory::Layout {
            boot: self.memory_mib << 20,
            hotplug,
        }
    }

    /// The size of the memory file: every region, the hotplug one included.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_layout().total()
    }
}

fn check_max_memory(memory_mib: u64, max: Option<u64>) -> Result<(), ConfigError> {
    let Some(max) = max else { return Ok(()) };
    if max < memory_mib {
        return Err(ConfigError::MaxMemoryBelow {
            max,
            memory: memory_mib,
        });
    }
    if max > 1 << 20 {
        return Err(ConfigError::MemoryTooLarge(max));
    }
    if !((max - memory_mib) << 20).is_multiple_of(crate::devices::virtio::mem::BLOCK_SIZE) {
        return Err(ConfigError::MaxMemoryNotBlocks {
            max,
            memory: memory_mib,
        });
    }
    Ok(())
}

fn check_limits(
    vcpus: u32,
    max_vcpus: u32,
    memory_mib: u64,
    cmdline: &str,
    host_max_vcpus: u32,
) -> Result<(), ConfigError> {
    if vcpus == 0 {
        return Err(ConfigError::NoVcpus);
    }
    let max = host_max_vcpus.min(u32::from(MAX_VCPUS));
    if vcpus > max {
        return Err(ConfigError::TooManyVcpus {
            requested: vcpus,
            max,
        });
    }
    if max_vcpus < vcpus {
        return Err(ConfigError::MaxBelowVcpus {
            max: max_vcpus,
            vcpus,
        });
    }
    if max_vcpus > max {
        return Err(ConfigError::TooManyMaxVcpus {
            requested: max_vcpus,
            max,
        });
    }
    if memory_mib == 0 {
        return Err(ConfigError::NoMemory);
    }
    // 1 TiB: beyond what the 4-level identity map and e820 layout here are written for.
    if memory_mib > 1 << 20 {
        return Err(ConfigError::MemoryTooLarge(memory_mib));
    }
    if cmdline.len() + 1 > MAX_CMDLINE_LEN {
        return Err(ConfigError::CmdlineTooLong(cmdline.len() + 1));
    }
    Ok(())
}

fn check_disks(devices: &DeviceConfig) -> Result<(), ConfigError> {
    for d in &devices.disks {
        std::fs::metadata(&d.path).map_err(|e| ConfigError::DiskImage(d.path.clone(), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_config_is_checked_like_a_command_line() {
        let mut c = VmConfig {
            kernel: "/nonexistent-kernel".into(),
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            max_vcpus: 1,
            memory_mib: 64,
            max_memory_mib: None,
            serial: SerialOutput::Stdio,
            api_socket: None,
            devices: DeviceConfig::default(),
        };
        // The kernel is not needed to restore: memory holds it.
        assert!(c.check(8).is_ok());
        c.vcpus = 0;
        assert!(matches!(c.check(8), Err(ConfigError::NoVcpus)));
        c.vcpus = 255;
        assert!(matches!(c.check(8), Err(ConfigError::TooManyVcpus { .. })));
        c.vcpus = 2;
        assert!(matches!(c.check(8), Err(ConfigError::MaxBelowVcpus { .. })));
        c.max_vcpus = 9;
        assert!(matches!(
            c.check(8),
            Err(ConfigError::TooManyMaxVcpus { .. })
        ));
        c.max_vcpus = 4;
        assert!(c.check(8).is_ok());
        c.memory_mib = u64::MAX >> 10;
        assert!(matches!(c.check(8), Err(ConfigError::MemoryTooLarge(_))));
        c.memory_mib = 64;
        c.max_memory_mib = Some(32);
        assert!(matches!(
            c.check(8),
            Err(ConfigError::MaxMemoryBelow { .. })
        ));
        c.max_memory_mib = Some(65);
        assert!(matches!(
            c.check(8),
            Err(ConfigError::MaxMemoryNotBlocks { .. })
        ));
        c.max_memory_mib = Some(96);
        assert!(c.check(8).is_ok());
        // The region is whole memory blocks; only 32 MiB of it is ever plugged.
        assert_eq!(c.memory_layout().hotplug, 128 << 20);
        c.max_memory_mib = None;
        c.cmdline = "x".repeat(MAX_CMDLINE_LEN);
        assert!(matches!(c.check(8), Err(ConfigError::CmdlineTooLong(_))));
    }

    fn cfg(vcpus: u32, mem: u64) -> Result<VmConfig, ConfigError> {
        VmConfig::new(
            "/proc/self/exe".into(),
            None,
            String::new(),
            vcpus,
            None,
            mem,
            SerialOutput::Stdio,
            None,
            DeviceConfig::default(),
            8,
        )
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(cfg(0, 128), Err(ConfigError::NoVcpus)));
        assert!(matches!(
            cfg(9, 128),
            Err(ConfigError::TooManyVcpus {
                requested: 9,
                max: 8
            })
        ));
        assert!(matches!(cfg(1, 0), Err(ConfigError::NoMemory)));
        assert!(cfg(8, 128).is_ok());
    }

    #[test]
    fn parses_serial() {
        assert_eq!(
            "stdio".parse::<SerialOutput>().unwrap(),
            SerialOutput::Stdio
        );
        assert_eq!(
            "file:/tmp/x".parse::<SerialOutput>().unwrap(),
            SerialOutput::File("/tmp/x".into())
        );
        assert!("file:".parse::<SerialOutput>().is_err());
        assert!("tcp".parse::<SerialOutput>().is_err());
    }

    #[test]
    fn parses_disks() {
        let d: DiskConfig = "/a/b.img,ro".parse().unwrap();
        assert_eq!((d.path.to_str().unwrap(), d.read_only), ("/a/b.img", true));
        let d: DiskConfig = "/a/b.img".parse().unwrap();
        assert!(!d.read_only);
        assert!("/a/b.img,rx".parse::<DiskConfig>().is_err());
        assert!(",ro".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn parses_nets() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:00:00:01".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac.as_deref(), Some("52:54:00:00:00:01"));
        assert!("tap=".parse::<NetConfig>().is_err());
        assert!("mac=52:54:00:00:00:01".parse::<NetConfig>().is_err());
        assert!("tap=t,mac=zz".parse::<NetConfig>().is_err());
        assert!("tap=t,tap=u".parse::<NetConfig>().is_err());
        assert!("tap=t,mac=01:00:00:00:00:01".parse::<NetConfig>().is_err());
        assert!("tap=averyveryverylongname".parse::<NetConfig>().is_err());
    }

    #[test]
    fn parses_vsock() {
        let v: VsockConfig = "cid=3,socket=/tmp/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.socket.to_str().unwrap()), (3, "/tmp/v.sock"));
        assert!("cid=2,socket=/tmp/v".parse::<VsockConfig>().is_err());
        assert!("cid=3".parse::<VsockConfig>().is_err());
        assert!("cid=x,socket=/a".parse::<VsockConfig>().is_err());
    }

    #[test]
    fn missing_kernel_is_named() {
        let e = VmConfig::new(
            "/nonexistent/k".into(),
            None,
            String::new(),
            1,
            None,
            128,
            SerialOutput::Stdio,
            None,
            DeviceConfig::default(),
            8,
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/k"), "{e}");
    }
}
