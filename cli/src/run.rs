//! `microagent run`: one VM in the foreground, console on stdout or a file.

use std::path::PathBuf;

use clap::Args;
use vmm::vm::check_vcpus;
use vmm::{Console, GuestExit, Vm, VmConfig, VmError};

use crate::builtin;
use crate::exit::{Code, Failure};

#[derive(Args)]
pub struct RunArgs {
    /// Kernel: a vmlinux ELF or bzImage path, or `builtin:testguest` (default: the kernel
    /// `microagent kernel build` made for this host).
    #[arg(long)]
    kernel: Option<String>,
    /// Initial ramdisk (an uncompressed cpio boots fastest on nested KVM).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Number of vCPUs (1 to 8).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Write the guest's serial console to this file instead of stdout.
    #[arg(long)]
    console: Option<PathBuf>,
}

pub fn run(args: RunArgs) -> Result<(), Failure> {
    let vcpus = check_vcpus(args.vcpus).map_err(vm_failure)?;
    let spec = match args.kernel {
        Some(k) => k,
        None => crate::kernel_cmd::default_kernel()?.display().to_string(),
    };
    let kernel =
        builtin::resolve(&spec).map_err(|e| Failure::new(Code::NotFound, e.to_string()))?;
    if !spec.starts_with(builtin::PREFIX) && !kernel.path.exists() {
        return Err(Failure::new(
            Code::NotFound,
            format!("kernel {} does not exist", kernel.path.display()),
        ));
    }
    if let Some(initrd) = &args.initrd {
        if !initrd.exists() {
            return Err(Failure::new(
                Code::NotFound,
                format!("initrd {} does not exist", initrd.display()),
            ));
        }
    }
    let console = match args.console {
        Some(p) => Console::File(p),
        None => Console::Stdout,
    };
    let vm = Vm::boot(VmConfig {
        kernel: kernel.path.clone(),
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_mib: args.mem,
        vcpus,
        console,
        devices: Default::default(),
    })
    .map_err(vm_failure)?;
    match vm.wait().map_err(vm_failure)? {
        GuestExit::Reset | GuestExit::Shutdown => Ok(()),
    }
}

/// Maps a VMM error to the exit code a script can act on.
pub fn vm_failure(e: VmError) -> Failure {
    use vmm::arch::boot::BootError;
    use vmm::vcpu::VcpuError;
    let code = match &e {
        VmError::OpenKvm(_) | VmError::ApiVersion(_) | VmError::MissingCapability(_) => {
            Code::HostUnsupported
        }
        VmError::VcpuCount(_) | VmError::TooManyVcpus { .. } | VmError::Memory(_) => Code::Usage,
        VmError::Boot(BootError::OpenKernel { .. } | BootError::OpenInitrd { .. }) => {
            Code::NotFound
        }
        VmError::Boot(_) => Code::Usage,
        VmError::Vcpu(
            VcpuError::TripleFault { .. }
            | VcpuError::InternalError { .. }
            | VcpuError::FailEntry { .. }
            | VcpuError::UnexpectedExit { .. },
        ) => Code::GuestFailed,
        _ => Code::Error,
    };
    Failure::new(code, e.to_string())
}
