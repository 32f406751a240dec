//! virtio-rng (entropy device, virtio 1.x §5.4): fills the guest's buffers from the host's
//! getrandom(2).

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;

use super::chain::{self, BufWriter};
use super::{drain_queue, VirtioCommon, VirtioDevice, COMMON_FEATURES, TYPE_RNG};
use crate::component_state::Persist;

pub const QUEUE_SIZE: u16 = 256;
/// Bytes handed out per request at most; a driver asking for more gets this much (the used
/// length tells it).
pub const MAX_REQUEST: usize = 64 * 1024;

/// virtio-rng has no state beyond its transport's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {}

#[derive(Debug, thiserror::Error)]
#[error("cannot create an eventfd: {0}")]
pub struct RngError(#[source] pub std::io::Error);

pub struct Rng {
    common: VirtioCommon,
    buf: Vec<u8>,
}

impl Rng {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            common: VirtioCommon::new(COMMON_FEATURES, 1)?,
            buf: Vec::new(),
        })
    }

    /// Serves every pending request; returns whether the guest was interrupted.
    pub fn process_queue(&mut self) -> bool {
        let Some(a) = self.common.active.as_mut() else {
            return false;
        };
        let buf = &mut self.buf;
        let mem = &a.mem;
        let max = usize::from(a.queues[0].size());
        let drained = drain_queue(&mut a.queues[0], mem, |c| {
            let Ok(c) = chain::collect(c, mem, max) else {
                return Some(0);
            };
            let want = c.writable_len().min(MAX_REQUEST as u64) as usize;
            buf.resize(want, 0);
            if getrandom(buf).is_err() {
                return Some(0);
            }
            let mut w = BufWriter::new(mem, &c.writable);
            let _ = w.write_all(buf);
            Some(w.written() as u32)
        });
        if drained.notify {
            a.interrupt.signal_used_queue();
        }
        drained.notify
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the kernel writes at most `len` bytes into the valid buffer we pass.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Nothing but the queues, which the transport restores.
impl Persist for Rng {
    type State = RngState;
    type ConstructorArgs<'a> = ();
    type Error = RngError;

    fn save(&self) -> Result<RngState, RngError> {
        Ok(RngState {})
    }

    fn restore((): (), _state: &RngState) -> Result<Self, RngError> {
        Self::new().map_err(RngError)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.common.queue_evts[0], EventSet::IN)) {
            tracing::error!("virtio-rng: cannot watch its queue: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.common.queue_evts[0].read();
        self.process_queue();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::chain::tests::{d, mem};
    use crate::devices::virtio::{ActiveQueues, Interrupt};
    use std::sync::Arc;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_writable_buffers_and_survives_hostile_chains() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(
            &[
                // 1: two writable buffers.
                d(0x10_0000, 100, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                d(0x10_1000, 28, VRING_DESC_F_WRITE, 0),
                // 2: out of guest memory.
                d(0x4000_0000, 64, VRING_DESC_F_WRITE, 0),
                // 3: huge, capped.
                d(0x10_4000, 0x8_0000, VRING_DESC_F_WRITE, 0),
                // 4: a loop (4 -> 5 -> 4).
                d(0x10_2000, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 5),
                d(0x10_3000, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 4),
            ],
            0,
        )
        .unwrap();
        let mut rng = Rng::new().unwrap();
        let irq = Arc::new(Interrupt::new().unwrap());
        rng.activate(ActiveQueues {
            mem: m.clone(),
            acked_features: COMMON_FEATURES,
            queues: vec![vq.create_queue::<Queue>().unwrap()],
            interrupt: irq.clone(),
        })
        .unwrap();
        assert!(rng.process_queue());
        let used = |i: u64| -> u32 {
            m.read_obj(vq.used_addr().unchecked_add(4 + 8 * i + 4))
                .unwrap()
        };
        use vm_memory::Address;
        assert_eq!(
            m.read_obj::<u16>(vq.used_addr().unchecked_add(2)).unwrap(),
            4
        );
        assert_eq!(used(0), 128);
        assert_eq!(used(1), 0);
        assert_eq!(used(2), MAX_REQUEST as u32);
        assert_eq!(used(3), 0);
        let mut out = [0u8; 100];
        m.read_slice(&mut out, GuestAddress(0x10_0000)).unwrap();
        assert!(out.iter().any(|&b| b != 0));
        assert_eq!(irq.status(), 1);
        assert_eq!(rng.active_queues().unwrap()[0].next_used(), 4);
    }

    #[test]
    fn a_bogus_avail_index_is_not_served() {
        let m = mem();
        let q = crate::devices::virtio::testutil::TestQueue::new(&m, 0, 16);
        let mut rng = Rng::new().unwrap();
        rng.activate(ActiveQueues {
            mem: m.clone(),
            acked_features: COMMON_FEATURES,
            queues: vec![q.queue()],
            interrupt: Arc::new(Interrupt::new().unwrap()),
        })
        .unwrap();
        q.set_avail_idx(500);
        assert!(!rng.process_queue());
        assert_eq!(q.used_idx(), 0);
    }
}
