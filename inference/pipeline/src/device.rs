//! Opening the device a command asks for (`auto`, `cuda` or `cpu`) and saying what it is.
//!
//! Guarantees: `cuda` never silently becomes the CPU — no usable GPU is an [`Error::Device`]
//! (exit code 17) whose message says why; `auto` falls back to the CPU only with a warning the
//! caller logs and reports; no CUDA failure panics, even where the driver library is missing.

use candle_core::Device;
use sd35_contract::{ComputeCapability, DeviceKind, Fp8Path};

use crate::{Error, Result};

/// A device ready to load a model on, with what the API reports about it.
#[derive(Debug, Clone)]
pub struct OpenedDevice {
    /// The candle device.
    pub device: Device,
    /// `Cuda` or `Cpu`: what it really is (never `Auto`).
    pub kind: DeviceKind,
    /// The GPU's name (`NVIDIA H100 80GB HBM3`) on CUDA; `None` on the CPU.
    pub gpu_name: Option<String>,
    /// The GPU's compute capability on CUDA; `None` on the CPU.
    pub compute_capability: Option<ComputeCapability>,
    /// Set when `auto` fell back to the CPU: why, for the log and `/v1/models`.
    pub warning: Option<String>,
}

impl OpenedDevice {
    /// The CPU.
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            kind: DeviceKind::Cpu,
            gpu_name: None,
            compute_capability: None,
            warning: None,
        }
    }

    /// The FP8 path this device could take: tensor cores from compute capability 8.9, else
    /// weight-only; on the CPU, f32 compute.
    pub fn fp8_capability(&self) -> Fp8Path {
        match (self.kind, self.compute_capability) {
            (DeviceKind::Cuda, Some(cc)) => cc.fp8_path(),
            (DeviceKind::Cuda, None) => Fp8Path::WeightOnly,
            _ => Fp8Path::Cpu,
        }
    }

    /// The FP8 path this build really runs: fp8 weights stay F8E4M3 in memory and are
    /// dequantised to bf16 at use on every GPU (the tensor-core FP8 product is not wired into
    /// the pipeline yet), f32 compute on the CPU.
    pub fn fp8_path(&self) -> Fp8Path {
        match self.kind {
            DeviceKind::Cuda => sd35_contract::SERVED_GPU_FP8_PATH,
            _ => Fp8Path::Cpu,
        }
    }
}

/// Free and total bytes of a device's memory, as far as this process may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Free now.
    pub free: u64,
    /// In all.
    pub total: u64,
}

impl OpenedDevice {
    /// The device's memory now: the CUDA driver's free and total bytes; on the CPU the
    /// kernel's available memory, bounded by this process's cgroup (a container's limit).
    /// `None` when it cannot be read.
    pub fn memory(&self) -> Option<DeviceMemory> {
        match &self.device {
            Device::Cpu => cpu_memory(),
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
                Some(DeviceMemory {
                    free: free as u64,
                    total: total as u64,
                })
            }
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

/// `MemAvailable` and `MemTotal` of `/proc/meminfo`, bounded by the cgroup v2 limit of this
/// process (`memory.max` less `memory.current`) where one is set.
fn cpu_memory() -> Option<DeviceMemory> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    let mut memory = DeviceMemory {
        free: field("MemAvailable:")?,
        total: field("MemTotal:")?,
    };
    if let Some((limit, used)) = cgroup_memory() {
        memory.total = memory.total.min(limit);
        memory.free = memory.free.min(limit.saturating_sub(used));
    }
    Some(memory)
}

/// The cgroup v2 `memory.max` and `memory.current` of this process, when a limit is set.
fn cgroup_memory() -> Option<(u64, u64)> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let limit: u64 = read("memory.max")?.trim().parse().ok()?;
    let used: u64 = read("memory.current")?.trim().parse().ok()?;
    Some((limit, used))
}

/// Opens CUDA device 0, turning every way it can fail (no CUDA in this build, no driver
/// library, no device) into a message.
fn open_cuda() -> std::result::Result<OpenedDevice, String> {
    if !candle_core::utils::cuda_is_available() {
        return Err("this sd35-server binary was built without CUDA (use the CUDA image)".into());
    }
    // The CUDA bindings load the driver library on first use and panic when it is missing;
    // a start-up check must report that, not abort with a backtrace.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Device::new_cuda(0));
    std::panic::set_hook(previous_hook);
    let device = match opened {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => return Err(format!("CUDA device 0 is not usable: {e}")),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "the CUDA driver could not be loaded".to_owned());
            return Err(format!("no CUDA driver: {}", first_line(&why)));
        }
    };
    Ok(OpenedDevice {
        gpu_name: gpu_name(&device),
        compute_capability: compute_capability(&device),
        device,
        kind: DeviceKind::Cuda,
        warning: None,
    })
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s).trim()
}

#[cfg(feature = "cuda")]
fn gpu_name(device: &Device) -> Option<String> {
    match device {
        Device::Cuda(d) => d.cuda_stream().context().name().ok(),
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_name(_: &Device) -> Option<String> {
    None
}

#[cfg(feature = "cuda")]
fn compute_capability(device: &Device) -> Option<ComputeCapability> {
    match device {
        Device::Cuda(d) => {
            let (major, minor) = d.cuda_stream().context().compute_capability().ok()?;
            Some(ComputeCapability {
                major: u32::try_from(major).ok()?,
                minor: u32::try_from(minor).ok()?,
            })
        }
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
fn compute_capability(_: &Device) -> Option<ComputeCapability> {
    None
}

/// Opens the device `choice` names.
pub fn open(choice: DeviceKind) -> Result<OpenedDevice> {
    match choice {
        DeviceKind::Cpu => Ok(OpenedDevice::cpu()),
        DeviceKind::Cuda => open_cuda().map_err(|why| {
            Error::Device(format!(
                "--device cuda: no usable GPU: {why}; check the node's NVIDIA driver and device \
                 plugin and that the pod requests a GPU, or run with --device cpu"
            ))
        }),
        DeviceKind::Auto => Ok(open_cuda().unwrap_or_else(|why| OpenedDevice {
            warning: Some(format!(
                "--device auto: running on the CPU because {why}; images take minutes, not \
                 seconds"
            )),
            ..OpenedDevice::cpu()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_the_cpu_and_auto_says_why_it_fell_back() {
        let cpu = open(DeviceKind::Cpu).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cpu.fp8_path(), Fp8Path::Cpu);
        assert_eq!((cpu.kind, cpu.warning), (DeviceKind::Cpu, None));
        // This test machine has no GPU: auto runs on the CPU and says so; cuda refuses.
        if candle_core::utils::cuda_is_available() && Device::new_cuda(0).is_ok() {
            return;
        }
        let auto = open(DeviceKind::Auto).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(auto.kind, DeviceKind::Cpu);
        assert!(
            auto.warning
                .as_deref()
                .is_some_and(|w| w.contains("running on the CPU")),
            "{:?}",
            auto.warning
        );
        let err = open(DeviceKind::Cuda).unwrap_err();
        assert_eq!(err.exit_reason(), sd35_contract::ExitReason::GpuUnavailable);
        assert!(err.to_string().contains("--device cuda"), "{err}");
    }
}
