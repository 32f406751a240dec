//! One connection: the handshake, then a reader loop that dispatches requests to their own threads,
//! and an outbox that every request's thread writes its frames to.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::{exec, files, Inner};
use crate::lock;
use crate::protocol::messages::{
    ClientFrame, ClientMsg, ErrorKind, ErrorReply, Hello, HelloReply, ServerFrame, ServerMsg,
    VersionInfo,
};
use crate::protocol::{
    decode, encode_frame, read_frame, FrameError, HELLO_MAGIC, MAX_FRAME_LEN, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use crate::transport::Connection;

/// How long a new connection may take to say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Chunks of a file upload buffered between the reader and the writing thread.
const UPLOAD_QUEUE: usize = 8;

/// The writing half of a connection, shared by every request's thread. A frame is written whole
/// under the lock, so frames of different requests interleave but never mix.
pub(crate) struct Outbox {
    writer: Mutex<Box<dyn Write + Send>>,
    broken: AtomicBool,
}

impl Outbox {
    fn new(writer: Box<dyn Write + Send>) -> Self {
        Self {
            writer: Mutex::new(writer),
            broken: AtomicBool::new(false),
        }
    }

    /// Sends one frame; false once the connection is gone (later frames are dropped).
    pub(crate) fn send(&self, id: u64, msg: ServerMsg) -> bool {
        let mut out = ServerFrame { id, msg };
        if self.broken.load(Ordering::Relaxed) {
            wipe(&mut out.msg);
            return false;
        }
        let frame = match encode_frame(&out) {
            Ok(frame) => frame,
            Err(e) => {
                // Only a bug can make a response too large; tell the client rather than vanish.
                let msg = ServerMsg::Error(ErrorReply {
                    kind: ErrorKind::Io,
                    message: format!("response cannot be encoded: {e}"),
                });
                match encode_frame(&ServerFrame { id, msg }) {
                    Ok(frame) => frame,
                    Err(_) => return false,
                }
            }
        };
        let mut frame = frame;
        let mut writer = lock(&self.writer);
        let ok = writer
            .write_all(&frame)
            .and_then(|()| writer.flush())
            .is_ok();
        drop(writer);
        if !ok {
            self.broken.store(true, Ordering::Relaxed);
        }
        wipe(&mut out.msg);
        crate::zeroize(&mut frame);
        ok
    }
}

/// Command output and file contents may hold secrets: leave none in freed memory, where a
/// snapshot would capture it.
fn wipe(msg: &mut ServerMsg) {
    if let ServerMsg::Stdout(b) | ServerMsg::Stderr(b) | ServerMsg::Data(b) = msg {
        crate::zeroize(b);
    }
}

/// Pieces of an upload, from the reader loop to the request's thread.
pub(crate) enum Inbound {
    /// Upload contents (perhaps secrets): zeroed when dropped, also when nobody takes them.
    Data(crate::Wiped),
    End,
    Cancel,
}

enum Inflight {
    /// A running process: its process group once started.
    Exec { pgid: Option<i32> },
    /// An upload still receiving its body.
    Upload(SyncSender<Inbound>),
    /// Anything else.
    Other,
}

/// The requests in flight on one connection, by id.
pub(crate) struct Requests {
    map: Mutex<HashMap<u64, Inflight>>,
    max: usize,
}

impl Requests {
    fn remove(&self, id: u64) {
        lock(&self.map).remove(&id);
    }

    /// Sends `signal` to the process group of exec `id`, if it is still running.
    fn signal(&self, id: u64, signal: i32) -> bool {
        let map = lock(&self.map);
        match map.get(&id) {
            Some(Inflight::Exec { pgid: Some(pgid) }) => {
                // SAFETY: plain syscall. The group leader is not reaped while its pgid is recorded
                // here (the exec thread clears it under this lock first), so the id is not reused.
                unsafe { libc::kill(-*pgid, signal) == 0 }
            }
            _ => false,
        }
    }
}

/// The handle a request's thread answers through. Dropping it (or [`Reply::finish`]) ends the request.
pub(crate) struct Reply {
    id: u64,
    out: Arc<Outbox>,
    requests: Arc<Requests>,
    finished: bool,
}

impl Reply {
    /// Sends a frame that does not end the request (a chunk). False once the connection is gone.
    pub(crate) fn send(&self, msg: ServerMsg) -> bool {
        self.out.send(self.id, msg)
    }

    /// Ends the request with its last frame.
    pub(crate) fn finish(mut self, msg: ServerMsg) {
        // Forget the id first: a client that sends its next request on seeing this frame must not
        // find this one still counted.
        self.requests.remove(self.id);
        self.finished = true;
        self.out.send(self.id, msg);
    }

    /// Ends the request with an error.
    pub(crate) fn fail(self, kind: ErrorKind, message: String) {
        self.finish(ServerMsg::Error(ErrorReply { kind, message }));
    }

    /// Records (or, with `None`, forgets before reaping) the process group of this exec.
    pub(crate) fn set_pgid(&self, pgid: Option<i32>) {
        if let Some(Inflight::Exec { pgid: slot }) = lock(&self.requests.map).get_mut(&self.id) {
            *slot = pgid;
        }
    }

    /// Sends `signal` to this exec's process group.
    pub(crate) fn signal_group(&self, signal: i32) -> bool {
        self.requests.signal(self.id, signal)
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.finished {
            self.requests.remove(self.id);
        }
    }
}

/// Serves one connection until it closes or breaks the protocol.
pub(crate) fn serve<C: Connection>(server: &Arc<Inner>, mut conn: C) {
    let (closer, writer) = match (conn.clone_handle(), conn.clone_handle()) {
        (Ok(closer), Ok(writer)) => (closer, writer),
        (Err(e), _) | (_, Err(e)) => {
            server.log(format_args!("cannot split connection: {e}"));
            conn.close();
            return;
        }
    };
    let out = Arc::new(Outbox::new(Box::new(writer)));
    let Some(version) = handshake(server, &mut conn, &out) else {
        closer.close();
        return;
    };
    let requests = Arc::new(Requests {
        map: Mutex::new(HashMap::new()),
        max: server.config.max_requests_per_connection,
    });
    let conn_state = ConnState {
        server: Arc::clone(server),
        out: Arc::clone(&out),
        requests: Arc::clone(&requests),
        version,
    };
    loop {
        let mut payload = match read_frame(&mut conn, MAX_FRAME_LEN) {
            Ok(Some(payload)) => payload,
            Ok(None) => break,
            Err(FrameError::Io(e)) => {
                server.log(format_args!("connection failed: {e}"));
                break;
            }
            Err(e) => {
                protocol_error(server, &out, &e.to_string());
                break;
            }
        };
        let frame = decode::<ClientFrame>(&payload);
        // The raw frame may hold secrets, entropy or an upload's bytes, all copied into `frame`
        // now: do not leave them in freed memory.
        crate::zeroize(&mut payload);
        match frame {
            Ok(frame) => conn_state.dispatch(frame),
            Err(e) => {
                protocol_error(server, &out, &e.to_string());
                break;
            }
        }
    }
    closer.close();
    // Abort uploads still waiting for their body: their threads see the channel close.
    lock(&requests.map).retain(|_, inflight| !matches!(inflight, Inflight::Upload(_)));
}

fn protocol_error(server: &Inner, out: &Outbox, message: &str) {
    server.log(format_args!(
        "protocol error, closing connection: {message}"
    ));
    out.send(
        0,
        ServerMsg::Error(ErrorReply {
            kind: ErrorKind::Protocol,
            message: message.to_owned(),
        }),
    );
}

/// Reads the client's hello and answers it; returns the agreed version.
fn handshake<C: Connection>(server: &Inner, conn: &mut C, out: &Outbox) -> Option<u32> {
    let reject = |message: String| {
        server.log(format_args!("handshake refused: {message}"));
        send_hello_reply(
            out,
            &HelloReply::Rejected {
                min: MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION,
                message,
            },
        );
        None
    };
    if let Err(e) = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT)) {
        server.log(format_args!("cannot set handshake timeout: {e}"));
        return None;
    }
    let payload = match read_frame(conn, MAX_FRAME_LEN) {
        Ok(Some(payload)) => payload,
        Ok(None) => return None,
        Err(FrameError::Io(e)) => {
            server.log(format_args!("handshake failed: {e}"));
            return None;
        }
        Err(e) => return reject(format!("bad hello frame: {e}")),
    };
    let hello = match decode::<Hello>(&payload) {
        Ok(hello) if hello.magic == HELLO_MAGIC => hello,
        Ok(_) => return reject("bad hello: wrong magic".into()),
        Err(e) => return reject(format!("bad hello: {e}")),
    };
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version) {
        return reject(format!(
            "unsupported protocol version {} (this agent speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})",
            hello.version
        ));
    }
    if let Err(e) = conn.set_read_timeout(None) {
        server.log(format_args!("cannot clear handshake timeout: {e}"));
        return None;
    }
    let version = hello.version;
    send_hello_reply(
        out,
        &HelloReply::Accepted {
            version,
            agent: env!("CARGO_PKG_VERSION").into(),
        },
    )
    .then_some(version)
}

fn send_hello_reply(out: &Outbox, reply: &HelloReply) -> bool {
    let Ok(frame) = encode_frame(reply) else {
        return false;
    };
    let mut writer = lock(&out.writer);
    writer
        .write_all(&frame)
        .and_then(|()| writer.flush())
        .is_ok()
}

struct ConnState {
    server: Arc<Inner>,
    out: Arc<Outbox>,
    requests: Arc<Requests>,
    version: u32,
}

impl ConnState {
    fn dispatch(&self, frame: ClientFrame) {
        let id = frame.id;
        match frame.msg {
            ClientMsg::Ping => {
                self.out.send(id, ServerMsg::Pong);
            }
            ClientMsg::Version => {
                self.out.send(
                    id,
                    ServerMsg::Version(VersionInfo {
                        agent: env!("CARGO_PKG_VERSION").into(),
                        protocol: self.version,
                        min_protocol: MIN_PROTOCOL_VERSION,
                        max_protocol: PROTOCOL_VERSION,
                    }),
                );
            }
            ClientMsg::Exec(req) => {
                self.start(id, Inflight::Exec { pgid: None }, move |reply| {
                    exec::run(req, reply)
                });
            }
            ClientMsg::Signal(signal) => {
                // No answer: the exec's own Exited frame tells what happened.
                self.requests.signal(id, signal);
            }
            ClientMsg::ReadFile(req) => {
                self.start(id, Inflight::Other, move |reply| files::read(req, reply));
            }
            ClientMsg::WriteFile(req) => {
                let (tx, rx): (SyncSender<Inbound>, Receiver<Inbound>) = sync_channel(UPLOAD_QUEUE);
                self.start(id, Inflight::Upload(tx), move |reply| {
                    files::write(req, rx, reply)
                });
            }
            ClientMsg::Data(bytes) => self.route(id, Inbound::Data(crate::Wiped(bytes))),
            ClientMsg::End => self.route(id, Inbound::End),
            ClientMsg::Cancel => {
                if !self.requests.signal(id, libc::SIGKILL) {
                    self.route(id, Inbound::Cancel);
                }
            }
            ClientMsg::PrepareSnapshot(req) => {
                let server = Arc::clone(&self.server);
                self.start(id, Inflight::Other, move |reply| {
                    server.hooks.prepare(&server.config, &req, reply)
                });
            }
            ClientMsg::AfterRestore(req) => {
                let server = Arc::clone(&self.server);
                self.start(id, Inflight::Other, move |reply| {
                    server.hooks.after_restore(&server.config, req, reply)
                });
            }
        }
    }

    /// Registers request `id` and runs `work` on its own thread.
    fn start<F>(&self, id: u64, inflight: Inflight, work: F)
    where
        F: FnOnce(Reply) + Send + 'static,
    {
        let refuse = |kind, message: &str| {
            self.out.send(
                id,
                ServerMsg::Error(ErrorReply {
                    kind,
                    message: message.to_owned(),
                }),
            );
        };
        if id == 0 {
            return refuse(ErrorKind::InvalidRequest, "request id 0 is reserved");
        }
        {
            let mut map = lock(&self.requests.map);
            if map.contains_key(&id) {
                drop(map);
                return refuse(ErrorKind::InvalidRequest, "request id already in use");
            }
            if map.len() >= self.requests.max {
                drop(map);
                return refuse(ErrorKind::Busy, "too many requests in flight");
            }
            map.insert(id, inflight);
        }
        let reply = Reply {
            id,
            out: Arc::clone(&self.out),
            requests: Arc::clone(&self.requests),
            finished: false,
        };
        let spawned = thread::Builder::new()
            .name(format!("agent-req-{id}"))
            .spawn(move || work(reply));
        if let Err(e) = spawned {
            // The closure (and its Reply) was dropped, which forgot the id.
            refuse(ErrorKind::Busy, &format!("cannot start a thread: {e}"));
        }
    }

    /// Hands a piece of an upload to its thread (blocking while its queue is full). Pieces for
    /// unknown ids (an upload that already failed) are dropped.
    fn route(&self, id: u64, piece: Inbound) {
        let tx = {
            let mut map = lock(&self.requests.map);
            match map.get_mut(&id) {
                Some(slot @ Inflight::Upload(_)) => {
                    if matches!(piece, Inbound::End | Inbound::Cancel) {
                        // Nothing follows the end: let the channel close behind it.
                        match std::mem::replace(slot, Inflight::Other) {
                            Inflight::Upload(tx) => tx,
                            _ => return,
                        }
                    } else if let Inflight::Upload(tx) = slot {
                        tx.clone()
                    } else {
                        return;
                    }
                }
                _ => return,
            }
        };
        // Sending fails only when the upload's thread already gave up (and answered).
        let _ = tx.send(piece);
    }
}
