//! Devices the guest sees: legacy port-I/O devices now, virtio-mmio devices later, all reached
//! through an address bus from the vCPU exit handler.

pub mod bus;
pub mod legacy;
pub mod manager;

pub use manager::{DeviceError, DeviceManager};
