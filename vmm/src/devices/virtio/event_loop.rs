//! The thread that runs every device's queue and back-end work: an `event-manager` epoll loop.
//!
//! The loop can be paused (for a snapshot: no device touches guest memory or its queues while
//! paused) and stopped. Both go through an eventfd the loop itself watches, so a request takes
//! effect between two device events, never in the middle of one.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What the event manager holds: each device, shared with its transport.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the device event loop: {0}")]
    Create(String),
    #[error("cannot start the device event loop thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the device event loop thread is gone")]
    Gone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Run,
    Pause,
    Stop,
}

struct Control {
    evt: EventFd,
    command: Mutex<Command>,
    resumed: Condvar,
    paused_tx: Mutex<Sender<()>>,
}

/// Sees the control eventfd inside the loop and parks the thread while paused.
struct ControlSubscriber(Arc<Control>);

impl MutEventSubscriber for ControlSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.evt, EventSet::IN)) {
            tracing::error!("device event loop: cannot watch its control eventfd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.evt.read();
        let mut cmd = self.0.command.lock().unwrap_or_else(|e| e.into_inner());
        if *cmd == Command::Pause {
            let _ = self
                .0
                .paused_tx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(());
            while *cmd == Command::Pause {
                cmd = self.0.resumed.wait(cmd).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

/// A running device event loop.
pub struct EventLoop {
    control: Arc<Control>,
    paused_rx: Mutex<Receiver<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the loop thread with `subscribers` registered (their `init` runs on this thread,
    /// before the loop starts).
    pub fn start(subscribers: Vec<Subscriber>) -> Result<Self, EventLoopError> {
        let mut em: EventManager<Subscriber> =
            EventManager::new().map_err(|e| EventLoopError::Create(format!("{e:?}")))?;
        let (paused_tx, paused_rx) = channel();
        let control = Arc::new(Control {
            evt: EventFd::new(EFD_NONBLOCK).map_err(|e| EventLoopError::Create(e.to_string()))?,
            command: Mutex::new(Command::Run),
            resumed: Condvar::new(),
            paused_tx: Mutex::new(paused_tx),
        });
        em.add_subscriber(Arc::new(Mutex::new(ControlSubscriber(control.clone()))));
        for s in subscribers {
            em.add_subscriber(s);
        }
        let c = control.clone();
        let thread = std::thread::Builder::new()
            .name("virtio-devices".into())
            .spawn(move || {
                crate::thread_hook::enter(crate::thread_hook::ThreadKind::Devices);
                loop {
                    if let Err(e) = em.run() {
                        tracing::error!("device event loop: epoll failed: {e:?}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if *c.command.lock().unwrap_or_else(|e| e.into_inner()) == Command::Stop {
                        break;
                    }
                }
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(Self {
            control,
            paused_rx: Mutex::new(paused_rx),
            thread: Some(thread),
        })
    }

    fn command(&self, cmd: Command) {
        *self
            .control
            .command
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = cmd;
        self.control.resumed.notify_all();
        let _ = self.control.evt.write(1);
    }

    /// Returns once the loop is parked: no device processes anything until `resume`.
    pub fn pause(&self) -> Result<(), EventLoopError> {
        let rx = self.paused_rx.lock().unwrap_or_else(|e| e.into_inner());
        // Already parked: the thread waits for `resume` and would never acknowledge again.
        if *self
            .control
            .command
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            == Command::Pause
        {
            return Ok(());
        }
        // Forget acknowledgements of earlier pauses.
        while rx.try_recv().is_ok() {}
        self.command(Command::Pause);
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| EventLoopError::Gone)
    }

    pub fn resume(&self) {
        self.command(Command::Run);
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.command(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Counter {
        evt: EventFd,
        n: Arc<AtomicU32>,
    }
    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.evt.read();
            self.n.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn wait_for(n: &AtomicU32, v: u32) -> bool {
        for _ in 0..500 {
            if n.load(Ordering::SeqCst) == v {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    #[test]
    fn runs_pauses_resumes_and_stops() {
        let n = Arc::new(AtomicU32::new(0));
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let c = Counter {
            evt: evt.try_clone().unwrap(),
            n: n.clone(),
        };
        let el = EventLoop::start(vec![Arc::new(Mutex::new(c))]).unwrap();
        evt.write(1).unwrap();
        assert!(wait_for(&n, 1));
        el.pause().unwrap();
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(n.load(Ordering::SeqCst), 1, "processed while paused");
        el.resume();
        assert!(wait_for(&n, 2));
        el.pause().unwrap();
        // A second pause of a paused loop returns at once (it used to wait 10 s and fail).
        let t = std::time::Instant::now();
        el.pause().unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        el.resume();
        drop(el);
    }
}
