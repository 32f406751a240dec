//! microagent's virtual machine monitor on KVM, built from rust-vmm crates: guest memory, vCPUs,
//! the Linux 64-bit boot protocol, legacy devices and (later) virtio-mmio devices.
//!
//! It knows nothing of workspaces, the CLI or the on-disk layout of snapshots.

pub mod arch;
pub mod component_state;
pub mod devices;
pub mod memory;
pub mod snapshots;
pub mod thread_hook;
pub mod vcpu;
pub mod vm;

pub use vm::{Console, GuestExit, Vm, VmConfig, VmError};
