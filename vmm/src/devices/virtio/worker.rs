//! The thread a virtio device processes its queues on: an epoll loop over the queue eventfds, the
//! device's backend descriptors (tap, sockets), a control eventfd and a stop eventfd.
//!
//! A worker can be paused (its thread ends and hands the loop back: handler, queues, epoll) and
//! resumed (a new thread runs the same loop), which is how a device holds still for a snapshot or a
//! migration and how its queue positions are read.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::Kind;

/// What a device does on its worker thread.
pub trait QueueHandler: Send + 'static {
    /// Backend descriptors to watch besides the queues, with the events wanted.
    fn backend_fds(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }
    /// Queue `index` was kicked by the driver.
    fn queue_event(&mut self, index: usize);
    /// Backend descriptor `index` (into `backend_fds`) is ready.
    fn backend_event(&mut self, _index: usize, _events: EventSet) {}
    /// The control eventfd fired (requests from the VMM, e.g. "refresh balloon stats").
    fn control_event(&mut self) {}
    /// The live queues, by their index in the device (for snapshots: their ring positions).
    fn queues(&self) -> Vec<(usize, &Queue)>;
    /// Called when the worker pauses (not when it is dropped): give back buffers held across
    /// requests, so no device state hides outside the queues.
    fn pausing(&mut self) {}
}

/// Where a queue's processing stands: what the device saves besides the driver's queue set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePosition {
    pub index: usize,
    pub next_avail: u16,
    pub next_used: u16,
}

/// A worker seen from its device, whatever its handler: what snapshots and migration use.
pub trait WorkerControl {
    /// Stops processing; the handler and its queues stay. Idempotent.
    fn pause(&mut self);
    /// Processes again after [`WorkerControl::pause`].
    fn resume(&mut self) -> std::io::Result<()>;
    /// The queues' positions (exact while paused).
    fn positions(&self) -> Vec<QueuePosition>;
}

/// The epoll loop, with everything it owns; runs on a thread, or rests while paused.
struct Loop<H: QueueHandler> {
    handler: H,
    epoll: Epoll,
    queue_evts: Vec<EventFd>,
    stop: EventFd,
    control: EventFd,
    backend_base: u64,
}

const STOP: u64 = 0;
const CONTROL: u64 = 1;
const FIRST_QUEUE: u64 = 2;

impl<H: QueueHandler> Loop<H> {
    fn run(mut self) -> Self {
        // Kicks that arrived before activation (or while paused) are processed once at start.
        for i in 0..self.queue_evts.len() {
            self.handler.queue_event(i);
        }
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "virtio worker epoll failed; device stops");
                    return self;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    STOP => {
                        let _ = self.stop.read();
                        return self;
                    }
                    CONTROL => {
                        let _ = self.control.read();
                        self.handler.control_event();
                    }
                    t if t < self.backend_base => {
                        let i = (t - FIRST_QUEUE) as usize;
                        let _ = self.queue_evts[i].read();
                        self.handler.queue_event(i);
                    }
                    t => self
                        .handler
                        .backend_event((t - self.backend_base) as usize, ev.event_set()),
                }
            }
        }
    }
}

enum State<H: QueueHandler> {
    Running(JoinHandle<Loop<H>>),
    Paused(Loop<H>),
    /// The thread panicked; the device is dead until the driver resets it.
    Gone,
}

/// A device's worker thread.
pub struct Worker<H: QueueHandler> {
    name: String,
    stop: EventFd,
    control: EventFd,
    state: State<H>,
}

impl<H: QueueHandler> Worker<H> {
    pub fn spawn(name: &str, queue_evts: Vec<EventFd>, handler: H) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let control = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, events: EventSet, token: u64| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        };
        add(stop.as_raw_fd(), EventSet::IN, STOP)?;
        add(control.as_raw_fd(), EventSet::IN, CONTROL)?;
        for (i, e) in queue_evts.iter().enumerate() {
            add(e.as_raw_fd(), EventSet::IN, FIRST_QUEUE + i as u64)?;
        }
        let backend_base = FIRST_QUEUE + queue_evts.len() as u64;
        for (i, (fd, events)) in handler.backend_fds().into_iter().enumerate() {
            add(fd, events, backend_base + i as u64)?;
        }
        let lp = Loop {
            handler,
            epoll,
            queue_evts,
            stop: stop.try_clone()?,
            control: control.try_clone()?,
            backend_base,
        };
        let mut w = Worker {
            name: name.into(),
            stop,
            control,
            state: State::Paused(lp),
        };
        w.resume()?;
        Ok(w)
    }

    /// A function that pokes the worker, for whoever needs to from another thread.
    pub fn poker(&self) -> std::io::Result<impl Fn() + Send + 'static> {
        let control = self.control.try_clone()?;
        Ok(move || {
            let _ = control.write(1);
        })
    }

    /// The handler, while paused.
    pub fn handler(&self) -> Option<&H> {
        match &self.state {
            State::Paused(lp) => Some(&lp.handler),
            _ => None,
        }
    }

    /// The handler, while paused.
    pub fn handler_mut(&mut self) -> Option<&mut H> {
        match &mut self.state {
            State::Paused(lp) => Some(&mut lp.handler),
            _ => None,
        }
    }
}

impl<H: QueueHandler> WorkerControl for Worker<H> {
    fn pause(&mut self) {
        if let State::Running(_) = self.state {
            let _ = self.stop.write(1);
            let State::Running(t) = std::mem::replace(&mut self.state, State::Gone) else {
                return;
            };
            match t.join() {
                Ok(mut lp) => {
                    lp.handler.pausing();
                    self.state = State::Paused(lp);
                }
                Err(_) => tracing::error!(worker = self.name, "virtio worker thread panicked"),
            }
        }
    }

    fn resume(&mut self) -> std::io::Result<()> {
        if !matches!(self.state, State::Paused(_)) {
            return Ok(());
        }
        let State::Paused(lp) = std::mem::replace(&mut self.state, State::Gone) else {
            return Ok(());
        };
        // On failure the loop is lost with the closure; the device then needs a reset.
        let t = crate::seccomp::spawn(Kind::Device, self.name.clone(), move || lp.run())?;
        self.state = State::Running(t);
        Ok(())
    }

    fn positions(&self) -> Vec<QueuePosition> {
        self.handler()
            .map(|h| {
                h.queues()
                    .into_iter()
                    .map(|(index, q)| QueuePosition {
                        index,
                        next_avail: q.next_avail(),
                        next_used: q.next_used(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl<H: QueueHandler> Drop for Worker<H> {
    fn drop(&mut self) {
        if let State::Running(_) = self.state {
            let _ = self.stop.write(1);
            if let State::Running(t) = std::mem::replace(&mut self.state, State::Gone) {
                let _ = t.join();
            }
        }
    }
}
