//! The part every virtio device here shares: the feature bits it offers, one eventfd per queue,
//! and the queues it runs on from activation to reset. A device holds one [`VirtioCommon`] and
//! hands it to [`VirtioDevice`](super::VirtioDevice), whose default methods do the queue,
//! feature, activation and reset work on it.

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::{queue_eventfds, ActivateError, ActiveQueues};

pub struct VirtioCommon {
    /// Every feature bit the device offers, `COMMON_FEATURES` included. A restored device
    /// offers what it offered when saved: its driver negotiated against those bits.
    pub avail_features: u64,
    /// Signalled by the guest's QueueNotify (a KVM ioeventfd), one per queue.
    pub queue_evts: Vec<EventFd>,
    /// Memory, negotiated features, queues and interrupt line while the driver has the device
    /// running (DRIVER_OK until reset).
    pub active: Option<ActiveQueues>,
}

impl VirtioCommon {
    /// A device offering `avail_features`, with `queues` queue eventfds, not yet activated.
    pub fn new(avail_features: u64, queues: usize) -> std::io::Result<Self> {
        Ok(Self {
            avail_features,
            queue_evts: queue_eventfds(queues)?,
            active: None,
        })
    }

    /// Takes the queues the transport validated; refuses other than `expected` of them.
    pub fn activate(&mut self, active: ActiveQueues, expected: usize) -> Result<(), ActivateError> {
        active.check_count(expected)?;
        self.active = Some(active);
        Ok(())
    }

    pub fn active_queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|a| a.queues.as_slice())
    }

    /// Drops the queues: the device touches guest memory no more until activated again.
    pub fn reset(&mut self) {
        self.active = None;
    }

    /// Wakes the device's handler of queue `index` as a guest kick would.
    pub fn kick(&self, index: usize) {
        if let Some(evt) = self.queue_evts.get(index) {
            // Fails only when the counter is saturated, i.e. a kick is pending anyway.
            let _ = evt.write(1);
        }
    }
}
