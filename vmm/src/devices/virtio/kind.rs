//! The kinds of virtio device a slot can hold, as one list the device manager walks: each kind
//! is built new from its configuration at boot, or from that configuration plus its saved state
//! at restore, and saves itself as one variant of [`VirtioDeviceState`]. Adding a kind means a
//! variant, an impl of [`VirtioKind`] and a line in [`slots`]; the manager does not change.

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use serde::{Deserialize, Serialize};

use super::block::{Block, BlockState};
use super::event_loop::Subscriber;
use super::mmio::lock;
use super::net::{Net, NetState};
use super::rng::{Rng, RngError, RngState};
use super::vsock::{Vsock, VsockState};
use super::VirtioDevice;
use crate::component_state::Persist;
use crate::devices::config::DeviceConfig;
use crate::devices::manager::DeviceError;

/// A virtio device's state in a snapshot, tagged by kind.
///
/// Part of the snapshot format: CBOR carries the variant names (`{"Block": {...}}`) and the
/// version 1 (postcard) format their order, so variants are never renamed or reordered; a new
/// kind goes at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    Block(BlockState),
    Net(NetState),
    Vsock(VsockState),
    Rng(RngState),
}

/// A virtio device kind the manager can hold in a slot.
pub trait VirtioKind:
    VirtioDevice + MutEventSubscriber + Persist<Error: Into<DeviceError>> + 'static
{
    /// What the kind is called in errors ("block device").
    const NAME: &'static str;
    /// A new device, for a VM that boots.
    fn create(args: Self::ConstructorArgs<'_>) -> Result<Self, Self::Error>;
    fn wrap(state: Self::State) -> VirtioDeviceState;
    /// The kind's state, if `state` is of this kind.
    fn unwrap(state: &VirtioDeviceState) -> Option<&Self::State>;
    /// Runs once a restored VM has all its devices, before its vCPUs start: a device whose host
    /// side did not survive the snapshot tells the guest here.
    fn restored(&mut self) {}
}

impl VirtioKind for Block {
    const NAME: &'static str = "block device";
    fn create(c: Self::ConstructorArgs<'_>) -> Result<Self, Self::Error> {
        Block::new(&c.path, c.read_only, c.id.as_deref())
    }
    fn wrap(state: BlockState) -> VirtioDeviceState {
        VirtioDeviceState::Block(state)
    }
    fn unwrap(state: &VirtioDeviceState) -> Option<&BlockState> {
        match state {
            VirtioDeviceState::Block(s) => Some(s),
            _ => None,
        }
    }
}

impl VirtioKind for Net {
    const NAME: &'static str = "net device";
    fn create(c: Self::ConstructorArgs<'_>) -> Result<Self, Self::Error> {
        Net::new(c)
    }
    fn wrap(state: NetState) -> VirtioDeviceState {
        VirtioDeviceState::Net(state)
    }
    fn unwrap(state: &VirtioDeviceState) -> Option<&NetState> {
        match state {
            VirtioDeviceState::Net(s) => Some(s),
            _ => None,
        }
    }
}

impl VirtioKind for Vsock {
    const NAME: &'static str = "vsock device";
    fn create(c: Self::ConstructorArgs<'_>) -> Result<Self, Self::Error> {
        Vsock::new(c.guest_cid, &c.uds_path)
    }
    fn wrap(state: VsockState) -> VirtioDeviceState {
        VirtioDeviceState::Vsock(state)
    }
    fn unwrap(state: &VirtioDeviceState) -> Option<&VsockState> {
        match state {
            VirtioDeviceState::Vsock(s) => Some(s),
            _ => None,
        }
    }
    /// The host ends of the guest's connections are gone: the guest gets a TRANSPORT_RESET,
    /// drops its connections and keeps its listeners; clients reconnect.
    fn restored(&mut self) {
        self.transport_reset();
    }
}

impl VirtioKind for Rng {
    const NAME: &'static str = "rng device";
    fn create((): ()) -> Result<Self, RngError> {
        Rng::new().map_err(RngError)
    }
    fn wrap(state: RngState) -> VirtioDeviceState {
        VirtioDeviceState::Rng(state)
    }
    fn unwrap(state: &VirtioDeviceState) -> Option<&RngState> {
        match state {
            VirtioDeviceState::Rng(s) => Some(s),
            _ => None,
        }
    }
}

/// A live device in a slot, whatever its kind: what the transport, the event loop and a
/// snapshot need of it.
pub trait VirtioComponent: Send + Sync {
    fn device(&self) -> Arc<Mutex<dyn VirtioDevice>>;
    fn subscriber(&self) -> Subscriber;
    fn save(&self) -> Result<VirtioDeviceState, DeviceError>;
    fn restored(&self);
}

impl<D: VirtioKind> VirtioComponent for Arc<Mutex<D>> {
    fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.clone()
    }
    fn subscriber(&self) -> Subscriber {
        self.clone()
    }
    fn save(&self) -> Result<VirtioDeviceState, DeviceError> {
        lock(self).save().map(D::wrap).map_err(Into::into)
    }
    fn restored(&self) {
        lock(self).restored();
    }
}

/// One slot to fill: a device kind with its configuration.
pub trait SlotSpec {
    /// Builds the device: new, or from `saved` (refused when it is another kind's state).
    fn build(
        self: Box<Self>,
        slot: usize,
        saved: Option<&VirtioDeviceState>,
    ) -> Result<Box<dyn VirtioComponent>, DeviceError>;
}

struct Spec<'c, D: VirtioKind>(D::ConstructorArgs<'c>);

impl<D: VirtioKind> SlotSpec for Spec<'_, D> {
    fn build(
        self: Box<Self>,
        slot: usize,
        saved: Option<&VirtioDeviceState>,
    ) -> Result<Box<dyn VirtioComponent>, DeviceError> {
        let device = match saved {
            None => D::create(self.0).map_err(Into::into)?,
            Some(state) => {
                let state = D::unwrap(state).ok_or_else(|| {
                    DeviceError::StateMismatch(format!(
                        "virtio slot {slot} is not a {} in the snapshot",
                        D::NAME
                    ))
                })?;
                D::restore(self.0, state).map_err(Into::into)?
            }
        };
        Ok(Box::new(Arc::new(Mutex::new(device))))
    }
}

fn spec<'c, D: VirtioKind + 'c>(args: D::ConstructorArgs<'c>) -> Box<dyn SlotSpec + 'c> {
    Box::new(Spec::<D>(args))
}

/// The virtio slots `config` asks for, in slot order: block devices (as configured), net,
/// vsock, rng.
pub fn slots(config: &DeviceConfig) -> Vec<Box<dyn SlotSpec + '_>> {
    let mut out: Vec<Box<dyn SlotSpec + '_>> = config.blocks.iter().map(spec::<Block>).collect();
    out.extend(config.net.iter().map(spec::<Net>));
    out.extend(config.vsock.iter().map(spec::<Vsock>));
    if config.rng {
        out.push(spec::<Rng>(()));
    }
    out
}
