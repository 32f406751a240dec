//! Devices the guest sees: legacy port-I/O devices and virtio-mmio devices, all reached through
//! an address bus from the vCPU exit handler (virtio queue kicks and interrupts bypass it through
//! ioeventfd/irqfd).

pub mod bus;
pub mod config;
pub mod legacy;
pub mod manager;
pub mod virtio;

pub use config::{BlockConfig, DeviceConfig, MacAddr, NetBackendConfig, NetConfig, VsockConfig};
pub use manager::{
    DeviceArgs, DeviceError, DeviceManager, DevicesState, VirtioDeviceState, VirtioSlotState,
};
