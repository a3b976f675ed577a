//! The control API: newline-delimited JSON over a Unix socket (protocol in `docs/api.md`).
//!
//! The request and result types and the client live in the `vmm-api` crate, shared with `vmm ctl`
//! and the host agent; `server` accepts connections and hands each parsed request, with the
//! [`Reply`] its answer goes to, to the VMM's control loop.

pub mod server;

pub use vmm_api::*;

/// Where the answer to one request goes: the connection thread waits on the other end, writes the
/// answer to the socket and acknowledges, so a VMM about to exit can make sure its last answer left.
pub struct Reply {
    tx: std::sync::mpsc::Sender<Response>,
    written: std::sync::mpsc::Receiver<()>,
}

impl Reply {
    /// A reply and the connection side's ends: the answer's receiver and the written-ack sender.
    pub fn new() -> (
        Reply,
        std::sync::mpsc::Receiver<Response>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (tx, rx) = std::sync::mpsc::channel();
        let (ack_tx, ack_rx) = std::sync::mpsc::channel();
        (
            Reply {
                tx,
                written: ack_rx,
            },
            rx,
            ack_tx,
        )
    }

    pub fn send(self, r: Response) {
        let _ = self.tx.send(r);
    }

    /// Sends the answer and waits (bounded) until it has been written to the socket.
    pub fn send_and_flush(self, r: Response) {
        if self.tx.send(r).is_ok() {
            let _ = self.written.recv_timeout(std::time::Duration::from_secs(2));
        }
    }
}
