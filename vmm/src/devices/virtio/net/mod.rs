//! virtio-net (virtio 1.x §5.1) with a passt or tap back end. No offloads: every frame carries
//! the 12-byte `virtio_net_hdr_v1` with no checksum or GSO work asked of anyone.
//!
//! With passt the device offers VIRTIO_NET_F_MTU at passt's own MTU (65520, what its DHCP hands
//! out too): the guest then sends one frame per 64 KiB instead of per 1.5 KiB, and Linux posts
//! receive buffers that large. Per-frame cost is what limits a guest's TCP here (on nested KVM its
//! kernel is emulated, ~25 ms a round trip), so this is the guest's throughput. A tap keeps 1500:
//! the frames go on to a host bridge or link whose MTU we do not know.
//!
//! Queues: rx, tx and, when the driver takes VIRTIO_NET_F_CTRL_VQ, the control queue (index 2)
//! through which it sets the MAC address on a running link ([`ctrl`]). A device restored from a
//! snapshot taken before the control queue existed keeps offering what it offered then (its
//! saved feature bits): two queues, no live MAC change.

pub mod backend;
pub mod ctrl;

use std::io::ErrorKind;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::backend::{Backend, BackendError, Passt, Tap, MAX_FRAME};
use super::chain::{self, BufReader, BufWriter};
use super::{drain_queue, VirtioCommon, VirtioDevice, COMMON_FEATURES, TYPE_NET};
use crate::component_state::Persist;
use crate::devices::config::{MacAddr, NetBackendConfig, NetConfig};

pub const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const CTRLQ: usize = 2;
/// The control queue is small: Linux has one command in flight at a time.
pub const CTRL_QUEUE_SIZE: u16 = 64;
const QUEUE_SIZES_CTRL: [u16; 3] = [QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE];
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
/// What a new device offers besides COMMON_FEATURES.
const FEATURES: u64 = 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_STATUS
    | 1 << VIRTIO_NET_F_CTRL_VQ
    | 1 << VIRTIO_NET_F_CTRL_MAC_ADDR;
/// virtio_net_hdr_v1 (with num_buffers): always present with VIRTIO_F_VERSION_1.
pub const NET_HDR_LEN: usize = 12;
/// passt's default MTU, the largest frame its tap side takes (65520 + link header < MAX_FRAME).
pub const PASST_MTU: u16 = 65_520;
/// Config space: mac (6), status (2), max_virtqueue_pairs (2), mtu (2).
const CONFIG_LEN: usize = 12;

const EV_RXQ: u32 = 0;
const EV_TXQ: u32 = 1;
const EV_BACKEND: u32 = 2;
const EV_CONTROL: u32 = 3;
const EV_CTRLQ: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// What a snapshot keeps of a net device. The back end (passt process, tap) is re-created, and
/// the guest's connections through it are gone after a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The address in force (config space), as the driver last set it.
    pub mac: MacAddr,
    /// What the device offered: a snapshot from before the control queue has no
    /// VIRTIO_NET_F_CTRL_VQ here, and its restored device has two queues as then.
    pub avail_features: u64,
}

/// Frame counters (for tests and diagnostics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

pub struct Net {
    /// The address in config space now (the driver may change it through the control queue).
    mac: MacAddr,
    /// The configured address, which a device reset returns to.
    base_mac: MacAddr,
    backend: Backend,
    config: [u8; CONFIG_LEN],
    common: VirtioCommon,
    control_evt: EventFd,
    /// A frame read from the back end that no guest buffer has taken yet.
    pending_rx: Option<Vec<u8>>,
    backend_readable: bool,
    /// The back end's connection broke (a supervised passt restarting): reconnect on activity.
    backend_lost: Option<std::time::Instant>,
    frame: Vec<u8>,
    stats: NetStats,
}

/// How often a lost passt connection is tried again, at most.
const RECONNECT_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

impl Net {
    /// Starts the back end now, so a missing passt or tap is an error at start-up.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        let backend = match &config.backend {
            NetBackendConfig::Passt { binary, args } => {
                Backend::Passt(Passt::spawn(binary.as_deref(), args)?)
            }
            NetBackendConfig::PasstSocket { path } => Backend::Passt(Passt::connect(path)?),
            NetBackendConfig::Tap { name } => Backend::Tap(Tap::open(name)?),
        };
        Self::with_backend(config.mac, backend)
    }

    pub fn with_backend(mac: MacAddr, backend: Backend) -> Result<Self, NetError> {
        let mut cfg = [0u8; CONFIG_LEN];
        cfg[..6].copy_from_slice(&mac.0);
        cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        let mut features = COMMON_FEATURES | FEATURES;
        if matches!(backend, Backend::Passt(_)) {
            cfg[10..12].copy_from_slice(&PASST_MTU.to_le_bytes());
            features |= 1 << VIRTIO_NET_F_MTU;
        }
        Ok(Self {
            mac,
            base_mac: mac,
            backend,
            config: cfg,
            common: VirtioCommon::new(features, QUEUE_SIZES_CTRL.len())
                .map_err(NetError::EventFd)?,
            control_evt: EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd)?,
            pending_rx: None,
            backend_readable: true,
            backend_lost: None,
            frame: Vec::with_capacity(MAX_FRAME),
            stats: NetStats::default(),
        })
    }

    fn set_mac(&mut self, mac: MacAddr) {
        self.mac = mac;
        self.config[..6].copy_from_slice(&mac.0);
    }

    /// The address in config space now.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    fn has_ctrl_queue(&self) -> bool {
        self.common.avail_features & 1 << VIRTIO_NET_F_CTRL_VQ != 0
    }

    /// Answers the driver's control commands (a MAC address change, mostly).
    pub fn process_ctrl(&mut self) -> bool {
        let Some(a) = self.common.active.as_mut() else {
            return false;
        };
        let Some(q) = a.queues.get_mut(CTRLQ) else {
            return false;
        };
        let mem = &a.mem;
        let mut mac = self.mac;
        let drained = drain_queue(q, mem, |c| {
            Some(ctrl::handle(c, mem, usize::from(CTRL_QUEUE_SIZE), &mut mac))
        });
        if drained.notify {
            a.interrupt.signal_used_queue();
        }
        if mac != self.mac {
            self.set_mac(mac);
        }
        drained.notify
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Sends the guest's frames to the back end.
    pub fn process_tx(&mut self) -> bool {
        let Some(a) = self.common.active.as_mut() else {
            return false;
        };
        let mem = &a.mem;
        let frame = &mut self.frame;
        let backend = &mut self.backend;
        let stats = &mut self.stats;
        let drained = drain_queue(&mut a.queues[TXQ], mem, |c| {
            let ok = chain::collect(c, mem, usize::from(QUEUE_SIZE))
                .ok()
                .filter(|c| c.writable.is_empty())
                .filter(|c| {
                    let n = c.readable_len();
                    n > NET_HDR_LEN as u64 && n <= (NET_HDR_LEN + MAX_FRAME) as u64
                })
                .and_then(|c| {
                    let mut r = BufReader::new(mem, &c.readable);
                    frame.resize(c.readable_len() as usize, 0);
                    r.read_exact(frame).ok()
                })
                .is_some();
            let sent = ok && matches!(backend.send(&frame[NET_HDR_LEN..]), Ok(true));
            if sent {
                stats.tx_frames += 1;
            } else {
                stats.tx_dropped += 1;
            }
            Some(0)
        });
        if drained.notify {
            a.interrupt.signal_used_queue();
        }
        drained.notify
    }

    /// Moves frames from the back end into the guest's RX buffers while both have some.
    pub fn process_rx(&mut self) -> bool {
        let Some(a) = self.common.active.as_mut() else {
            return false;
        };
        let mem = &a.mem;
        let q = &mut a.queues[RXQ];
        let mut used_any = false;
        let mut rechecked = false;
        loop {
            let frame = match self.pending_rx.take() {
                Some(f) => f,
                None => {
                    if !self.backend_readable {
                        break;
                    }
                    let mut f = Vec::with_capacity(2048);
                    match self.backend.recv(&mut f) {
                        Ok(Some(_)) => f,
                        Ok(None) => {
                            self.backend_readable = false;
                            break;
                        }
                        Err(e) => {
                            if e.kind() == ErrorKind::UnexpectedEof && self.backend_lost.is_none() {
                                tracing::warn!("virtio-net: the network back end closed");
                                self.backend_lost = Some(std::time::Instant::now());
                            }
                            self.backend_readable = false;
                            break;
                        }
                    }
                }
            };
            let Some(c) = q.pop_descriptor_chain(mem) else {
                self.pending_rx = Some(frame);
                // Ask for a kick when buffers come, and look once more (only once: a bogus
                // avail index must not spin us).
                if !rechecked && matches!(q.enable_notification(mem), Ok(true)) {
                    rechecked = true;
                    continue;
                }
                break;
            };
            let head = c.head_index();
            let checked = chain::collect(c, mem, usize::from(QUEUE_SIZE))
                .ok()
                .filter(|c| c.readable.is_empty());
            let Some(c) = checked else {
                let _ = q.add_used(mem, head, 0);
                used_any = true;
                self.pending_rx = Some(frame);
                continue;
            };
            if c.writable_len() < (NET_HDR_LEN + frame.len()) as u64 {
                // This buffer is too small for the frame: the frame is lost, the buffer reused.
                q.go_to_previous_position();
                self.stats.rx_dropped += 1;
                continue;
            }
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[10] = 1; // num_buffers
            let mut w = BufWriter::new(mem, &c.writable);
            let len = if w.write_all(&hdr).is_ok() && w.write_all(&frame).is_ok() {
                self.stats.rx_frames += 1;
                w.written() as u32
            } else {
                0
            };
            let _ = q.add_used(mem, head, len);
            used_any = true;
        }
        let notify = used_any && q.needs_notification(mem).unwrap_or(true);
        if notify {
            a.interrupt.signal_used_queue();
        }
        notify
    }
}

/// Constructor argument: the network as configured now (a fork's is its own back end and MAC).
impl Persist for Net {
    type State = NetState;
    type ConstructorArgs<'a> = &'a NetConfig;
    type Error = NetError;

    fn save(&self) -> Result<NetState, NetError> {
        Ok(NetState {
            mac: self.mac,
            avail_features: self.common.avail_features,
        })
    }

    /// The guest continues with the address it had (`state.mac`); `config.mac` (a fork's own)
    /// is what a device reset returns to, and what the fork's guest is asked to take.
    fn restore(config: &NetConfig, state: &NetState) -> Result<Self, NetError> {
        let mut n = Self::new(config)?;
        n.set_mac(state.mac);
        n.common.avail_features = state.avail_features;
        // The guest keeps the MTU it read at boot whatever the new back end is: the config space
        // says what it was offered then (a snapshot from before the MTU offer: nothing).
        let mtu = if state.avail_features & 1 << VIRTIO_NET_F_MTU != 0 {
            PASST_MTU
        } else {
            0
        };
        n.config[10..12].copy_from_slice(&mtu.to_le_bytes());
        Ok(n)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        if self.has_ctrl_queue() {
            &QUEUE_SIZES_CTRL
        } else {
            &QUEUE_SIZES
        }
    }
    fn queues_in_use(&self, acked_features: u64) -> usize {
        if acked_features & 1 << VIRTIO_NET_F_CTRL_VQ != 0 && self.has_ctrl_queue() {
            3
        } else {
            2
        }
    }
    fn config_space(&self) -> &[u8] {
        &self.config
    }
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
    /// Frames the guest queued for TX, and control commands, wait on the loop's next turn.
    fn activated(&mut self) {
        let _ = self.control_evt.write(1);
    }
    fn reset(&mut self) {
        self.common.reset();
        self.pending_rx = None;
        self.set_mac(self.base_mac);
    }
}

impl Net {
    /// A supervised passt that went away is dialled again, at most every RECONNECT_EVERY,
    /// whenever the guest or the loop gives us a turn; frames meanwhile are lost, as on a wire.
    fn maybe_reconnect(&mut self, ops: &mut EventOps) {
        let Some(since) = self.backend_lost else {
            return;
        };
        let Backend::Passt(p) = &mut self.backend else {
            return;
        };
        if since.elapsed() < RECONNECT_EVERY {
            return;
        }
        // Unwatch the dead connection while its fd is still open (a new one may reuse it).
        let _ = ops.remove(Events::with_data_raw(p.fd(), EV_BACKEND, EventSet::empty()));
        if p.reconnect().is_err() {
            self.backend_lost = Some(std::time::Instant::now());
            return;
        }
        if let Err(e) = ops.add(Events::with_data_raw(
            p.fd(),
            EV_BACKEND,
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
        )) {
            tracing::error!("virtio-net: cannot watch the reconnected back end: {e:?}");
        }
        tracing::info!("virtio-net: reconnected to passt");
        self.backend_lost = None;
        self.backend_readable = true;
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let evs = [
            Events::with_data(&self.common.queue_evts[RXQ], EV_RXQ, EventSet::IN),
            Events::with_data(&self.common.queue_evts[TXQ], EV_TXQ, EventSet::IN),
            Events::with_data(&self.common.queue_evts[CTRLQ], EV_CTRLQ, EventSet::IN),
            Events::with_data(&self.control_evt, EV_CONTROL, EventSet::IN),
            Events::with_data_raw(
                self.backend.fd(),
                EV_BACKEND,
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            ),
        ];
        for e in evs {
            if let Err(e) = ops.add(e) {
                tracing::error!("virtio-net: cannot watch an event source: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.maybe_reconnect(ops);
        match events.data() {
            EV_RXQ => {
                let _ = self.common.queue_evts[RXQ].read();
            }
            EV_TXQ => {
                let _ = self.common.queue_evts[TXQ].read();
                self.process_tx();
            }
            EV_CTRLQ => {
                let _ = self.common.queue_evts[CTRLQ].read();
                self.process_ctrl();
            }
            EV_CONTROL => {
                let _ = self.control_evt.read();
                self.process_tx();
                self.process_ctrl();
            }
            EV_BACKEND => {
                let set = events.event_set();
                if set.contains(EventSet::OUT) {
                    let _ = self.backend.flush();
                }
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    self.backend_readable = true;
                }
            }
            _ => {}
        }
        self.process_rx();
    }
}

#[cfg(test)]
mod tests;
