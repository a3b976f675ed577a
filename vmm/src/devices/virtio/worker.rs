//! The thread a virtio device processes its queues on: an epoll loop over the queue eventfds, the
//! device's backend descriptors (tap, sockets) and a stop eventfd.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

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
}

/// A running worker; stopping it hands the handler (and so the queues) back.
pub struct Worker<H: QueueHandler> {
    stop: EventFd,
    control: EventFd,
    thread: Option<JoinHandle<H>>,
}

const STOP: u64 = 0;
const CONTROL: u64 = 1;
const FIRST_QUEUE: u64 = 2;

impl<H: QueueHandler> Worker<H> {
    pub fn spawn(name: &str, queue_evts: Vec<EventFd>, mut handler: H) -> std::io::Result<Self> {
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
        let (stop2, control2) = (stop.try_clone()?, control.try_clone()?);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // Kicks that arrived before activation are processed once at start.
                for i in 0..queue_evts.len() {
                    handler.queue_event(i);
                }
                let mut events = vec![EpollEvent::default(); 32];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!(error = %e, "virtio worker epoll failed; device stops");
                            return handler;
                        }
                    };
                    for ev in &events[..n] {
                        let token = ev.data();
                        match token {
                            STOP => {
                                let _ = stop2.read();
                                return handler;
                            }
                            CONTROL => {
                                let _ = control2.read();
                                handler.control_event();
                            }
                            t if t < backend_base => {
                                let i = (t - FIRST_QUEUE) as usize;
                                let _ = queue_evts[i].read();
                                handler.queue_event(i);
                            }
                            t => handler.backend_event((t - backend_base) as usize, ev.event_set()),
                        }
                    }
                }
            })?;
        Ok(Worker {
            stop,
            control,
            thread: Some(thread),
        })
    }

    /// A function that pokes the worker, for whoever needs to from another thread.
    pub fn poker(&self) -> std::io::Result<impl Fn() + Send + 'static> {
        let control = self.control.try_clone()?;
        Ok(move || {
            let _ = control.write(1);
        })
    }

    /// Stops the thread and returns the handler, with its queues (what a device snapshot will
    /// read; a plain reset just drops the worker).
    pub fn stop(mut self) -> Option<H> {
        let _ = self.stop.write(1);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl<H: QueueHandler> Drop for Worker<H> {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}
