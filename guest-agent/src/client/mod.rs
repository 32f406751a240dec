//! The host side: a client over any [`Connection`], with requests multiplexed by id.
//!
//! One background thread reads the agent's frames and hands each to the call waiting for its id
//! (a bounded queue per call: a slow consumer slows the connection down instead of buffering
//! without limit). Calls may be made from several threads at once; `Client` is `Send + Sync`.

mod error;
mod retry;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub use error::ClientError;
pub use retry::RetryPolicy;

use crate::lock;
use crate::protocol::messages::{
    AfterRestoreRequest, ClientFrame, ClientMsg, ExecRequest, ExitStatus, FileInfo, Hello,
    HelloReply, PrepareReport, PrepareRequest, ReadFileRequest, RestoreReport, ServerFrame,
    ServerMsg, VersionInfo, WriteFileRequest,
};
use crate::protocol::{
    encode_frame, read_message, write_message, CHUNK_LEN, HELLO_MAGIC, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use crate::transport::{hybrid, Connection, VsockStream};

/// How long the agent may take to answer the hello (and the VMM the `CONNECT`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames queued per call before the reader thread waits for the caller.
const CALL_QUEUE: usize = 64;

/// A connection to the agent.
pub struct Client {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    version: u32,
    agent: String,
    timeout: Option<Duration>,
}

struct Shared {
    out: Mutex<Box<dyn Write + Send>>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    closer: Box<dyn Fn() + Send + Sync>,
}

#[derive(Default)]
struct Pending {
    calls: HashMap<u64, SyncSender<ServerMsg>>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// What a running `exec` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// A chunk of standard output.
    Stdout(Vec<u8>),
    /// A chunk of standard error.
    Stderr(Vec<u8>),
    /// The process ended (the last event).
    Exited(ExitStatus),
}

/// The collected result of an `exec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// All of standard output.
    pub stdout: Vec<u8>,
    /// All of standard error.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub status: ExitStatus,
}

impl Client {
    /// Says hello over `conn` and starts the reader thread.
    pub fn new<C: Connection>(conn: C) -> Result<Self, ClientError> {
        let mut reader = conn;
        let mut writer = reader.clone_handle()?;
        let closer = reader.clone_handle()?;
        reader.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        write_message(
            &mut writer,
            &Hello {
                magic: HELLO_MAGIC,
                version: PROTOCOL_VERSION,
                client: format!("microagent-host {}", env!("CARGO_PKG_VERSION")),
            },
        )?;
        let reply: HelloReply = read_message(&mut reader)?.ok_or(ClientError::HandshakeClosed)?;
        let (version, agent) = match reply {
            HelloReply::Accepted { version, agent } => (version, agent),
            HelloReply::Rejected { min, max, message } => {
                return Err(ClientError::Rejected { min, max, message })
            }
        };
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            closer.close();
            return Err(ClientError::BadVersion(version));
        }
        reader.set_read_timeout(None)?;
        let shared = Arc::new(Shared {
            out: Mutex::new(Box::new(writer)),
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(1),
            closer: {
                let closer = Mutex::new(closer);
                Box::new(move || lock(&closer).close())
            },
        });
        let reader_shared = Arc::clone(&shared);
        let reader = thread::Builder::new()
            .name("agent-client-reader".into())
            .spawn(move || read_loop(reader, &reader_shared))?;
        Ok(Self {
            shared,
            reader: Some(reader),
            version,
            agent,
            timeout: None,
        })
    }

    /// Connects to an agent serving a Unix socket (`microagent-agent --unix PATH`).
    pub fn connect_unix(path: &Path) -> Result<Self, ClientError> {
        Self::new(UnixStream::connect(path)?)
    }

    /// Connects to guest port `port` through the VMM's hybrid vsock socket (`<workspace>/vsock.sock`).
    pub fn connect_hybrid_vsock(socket: &Path, port: u32) -> Result<Self, ClientError> {
        let (stream, _host_port) = hybrid::connect(socket, port, HANDSHAKE_TIMEOUT)?;
        Self::new(stream)
    }

    /// [`Client::connect_hybrid_vsock`], retried within `policy` while the failure is transient (the
    /// VMM restarting, the guest resuming, the agent not listening yet).
    pub fn connect_hybrid_vsock_with_retry(
        socket: &Path,
        port: u32,
        policy: &RetryPolicy,
    ) -> Result<Self, ClientError> {
        policy.retry(|| Self::connect_hybrid_vsock(socket, port))
    }

    /// [`Client::connect_hybrid_vsock_with_retry`], refusing (at once, without retrying) a
    /// listener that `check` refuses: see [`hybrid::PeerCheck`].
    pub fn connect_hybrid_vsock_checked(
        socket: &Path,
        port: u32,
        policy: &RetryPolicy,
        check: hybrid::PeerCheck<'_>,
    ) -> Result<Self, ClientError> {
        policy.retry(|| {
            let (stream, _host_port) =
                hybrid::connect_checked(socket, port, HANDSHAKE_TIMEOUT, check)?;
            Self::new(stream)
        })
    }

    /// Connects over AF_VSOCK directly (from a guest, or through vsock loopback).
    pub fn connect_vsock(cid: u32, port: u32) -> Result<Self, ClientError> {
        Self::new(VsockStream::connect(cid, port)?)
    }

    /// The protocol version agreed in the handshake.
    pub fn protocol_version(&self) -> u32 {
        self.version
    }

    /// The agent's build version, from the handshake.
    pub fn agent_version(&self) -> &str {
        &self.agent
    }

    /// Bounds the wait for each frame of an answer (`None`, the default: wait as long as the
    /// connection lives). An `exec` with no output waits for its exit, so leave room for that.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// False once the connection ended.
    pub fn is_connected(&self) -> bool {
        lock(&self.shared.pending).closed.is_none()
    }

    /// Round trip time of a `Ping`.
    pub fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        let call = self.start(ClientMsg::Ping)?;
        match call.next()? {
            ServerMsg::Pong => Ok(start.elapsed()),
            other => Err(unexpected("Pong", &other)),
        }
    }

    /// The agent's versions.
    pub fn version(&self) -> Result<VersionInfo, ClientError> {
        let call = self.start(ClientMsg::Version)?;
        match call.next()? {
            ServerMsg::Version(info) => Ok(info),
            other => Err(unexpected("Version", &other)),
        }
    }

    /// Starts a process; read its events from the returned call.
    pub fn exec_start(&self, req: ExecRequest) -> Result<ExecCall<'_>, ClientError> {
        Ok(ExecCall {
            call: self.start(ClientMsg::Exec(req))?,
        })
    }

    /// Runs a process, handing each output chunk to `on_output` as it arrives.
    pub fn exec(
        &self,
        req: ExecRequest,
        mut on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus, ClientError> {
        let call = self.exec_start(req)?;
        loop {
            match call.next_event()? {
                ExecEvent::Stdout(d) => on_output(OutputStream::Stdout, &d),
                ExecEvent::Stderr(d) => on_output(OutputStream::Stderr, &d),
                ExecEvent::Exited(status) => return Ok(status),
            }
        }
    }

    /// Runs a process and collects its output.
    pub fn exec_output(&self, req: ExecRequest) -> Result<ExecOutput, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let status = self.exec(req, |stream, data| match stream {
            OutputStream::Stdout => stdout.extend_from_slice(data),
            OutputStream::Stderr => stderr.extend_from_slice(data),
        })?;
        Ok(ExecOutput {
            stdout,
            stderr,
            status,
        })
    }

    /// Reads a guest file into `sink`; returns what the agent said about it and the bytes received.
    pub fn read_file(
        &self,
        path: &str,
        mut sink: impl Write,
    ) -> Result<(FileInfo, u64), ClientError> {
        let call = self.start(ClientMsg::ReadFile(ReadFileRequest {
            path: path.to_owned(),
        }))?;
        let info = match call.next()? {
            ServerMsg::FileStart(info) => info,
            other => return Err(unexpected("FileStart", &other)),
        };
        let mut total = 0u64;
        loop {
            match call.next()? {
                ServerMsg::Data(data) => {
                    sink.write_all(&data).map_err(ClientError::Sink)?;
                    total += data.len() as u64;
                }
                ServerMsg::End(sent) if sent == total => break,
                ServerMsg::End(sent) => {
                    return Err(ClientError::Unexpected(format!(
                        "the agent sent {sent} bytes but {total} arrived"
                    )))
                }
                other => return Err(unexpected("Data or End", &other)),
            }
        }
        sink.flush().map_err(ClientError::Sink)?;
        Ok((info, total))
    }

    /// Writes `source` to a guest file (atomically replaced); returns the bytes written.
    pub fn write_file(
        &self,
        req: WriteFileRequest,
        mut source: impl Read,
    ) -> Result<u64, ClientError> {
        let call = self.start(ClientMsg::WriteFile(req))?;
        let mut buf = vec![0u8; CHUNK_LEN];
        loop {
            let n = match fill(&mut source, &mut buf) {
                Ok(n) => n,
                Err(e) => {
                    let _ = call.send(ClientMsg::Cancel);
                    return Err(ClientError::Source(e));
                }
            };
            if n == 0 {
                break;
            }
            // The agent answers early only to refuse (bad path, no space...): stop sending then.
            if let Some(early) = call.try_next() {
                return Err(match early {
                    Err(e) => e,
                    Ok(other) => unexpected("nothing before End", &other),
                });
            }
            call.send(ClientMsg::Data(buf[..n].to_vec()))?;
        }
        call.send(ClientMsg::End)?;
        match call.next()? {
            ServerMsg::Written(n) => Ok(n),
            other => Err(unexpected("Written", &other)),
        }
    }

    /// Scrubs secrets and freezes filesystems before a capture.
    pub fn prepare_snapshot(&self, req: PrepareRequest) -> Result<PrepareReport, ClientError> {
        let call = self.start(ClientMsg::PrepareSnapshot(req))?;
        match call.next()? {
            ServerMsg::Prepared(report) => Ok(report),
            other => Err(unexpected("Prepared", &other)),
        }
    }

    /// Thaws, reseeds, takes a new identity and writes secrets back after a capture, restore or fork.
    pub fn after_restore(&self, req: AfterRestoreRequest) -> Result<RestoreReport, ClientError> {
        let call = self.start(ClientMsg::AfterRestore(req))?;
        match call.next()? {
            ServerMsg::Restored(report) => Ok(report),
            other => Err(unexpected("Restored", &other)),
        }
    }

    /// Registers a new call and sends its first frame.
    fn start(&self, msg: ClientMsg) -> Result<Call<'_>, ClientError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(CALL_QUEUE);
        {
            let mut pending = lock(&self.shared.pending);
            if let Some(reason) = &pending.closed {
                return Err(ClientError::Disconnected(reason.clone()));
            }
            pending.calls.insert(id, tx);
        }
        let call = Call {
            client: self,
            id,
            rx,
        };
        call.send(msg)?;
        Ok(call)
    }

    fn send_frame(&self, id: u64, msg: ClientMsg) -> Result<(), ClientError> {
        let frame =
            encode_frame(&ClientFrame { id, msg }).map_err(crate::protocol::ProtocolError::from)?;
        let mut out = lock(&self.shared.out);
        out.write_all(&frame)
            .and_then(|()| out.flush())
            .map_err(|e| ClientError::Disconnected(format!("sending to the agent: {e}")))
    }

    fn disconnected(&self) -> ClientError {
        let reason = lock(&self.shared.pending)
            .closed
            .clone()
            .unwrap_or_else(|| "connection closed".into());
        ClientError::Disconnected(reason)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        (self.shared.closer)();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn read_loop<R: Read>(mut reader: R, shared: &Shared) {
    let reason = loop {
        match read_message::<ServerFrame, _>(&mut reader) {
            Ok(Some(ServerFrame { id: 0, msg })) => {
                break match msg {
                    ServerMsg::Error(e) => {
                        format!("the agent closed the connection: {}", e.message)
                    }
                    other => format!("the agent sent {other:?} for request 0"),
                };
            }
            Ok(Some(frame)) => {
                let tx = lock(&shared.pending).calls.get(&frame.id).cloned();
                if let Some(tx) = tx {
                    // Fails only when the call was dropped meanwhile.
                    let _ = tx.send(frame.msg);
                }
            }
            Ok(None) => break "the agent closed the connection".to_owned(),
            Err(e) => break e.to_string(),
        }
    };
    let mut pending = lock(&shared.pending);
    pending.closed = Some(reason);
    pending.calls.clear();
}

/// Reads until `buf` is full or the source ends.
fn fill(source: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match source.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn unexpected(wanted: &str, got: &ServerMsg) -> ClientError {
    let got = match got {
        ServerMsg::Data(d) | ServerMsg::Stdout(d) | ServerMsg::Stderr(d) => {
            format!("a chunk of {} bytes", d.len())
        }
        other => format!("{other:?}"),
    };
    ClientError::Unexpected(format!("wanted {wanted}, got {got}"))
}

/// One request in flight.
struct Call<'a> {
    client: &'a Client,
    id: u64,
    rx: Receiver<ServerMsg>,
}

impl Call<'_> {
    fn send(&self, msg: ClientMsg) -> Result<(), ClientError> {
        self.client.send_frame(self.id, msg)
    }

    /// The next frame for this call; an `Error` frame becomes `ClientError::Remote`.
    fn next(&self) -> Result<ServerMsg, ClientError> {
        let msg = match self.client.timeout {
            Some(t) => self.rx.recv_timeout(t).map_err(|e| match e {
                RecvTimeoutError::Timeout => ClientError::Timeout(t),
                RecvTimeoutError::Disconnected => self.client.disconnected(),
            })?,
            None => self.rx.recv().map_err(|_| self.client.disconnected())?,
        };
        remote_error(msg)
    }

    fn try_next(&self) -> Option<Result<ServerMsg, ClientError>> {
        match self.rx.try_recv() {
            Ok(msg) => Some(remote_error(msg)),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(self.client.disconnected())),
        }
    }
}

fn remote_error(msg: ServerMsg) -> Result<ServerMsg, ClientError> {
    match msg {
        ServerMsg::Error(e) => Err(ClientError::Remote {
            kind: e.kind,
            message: e.message,
        }),
        other => Ok(other),
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        lock(&self.client.shared.pending).calls.remove(&self.id);
    }
}

/// A running `exec`.
pub struct ExecCall<'a> {
    call: Call<'a>,
}

impl ExecCall<'_> {
    /// The request id (for logs).
    pub fn id(&self) -> u64 {
        self.call.id
    }

    /// Sends `signal` to the process group (no answer; the exit status tells).
    pub fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.call.send(ClientMsg::Signal(signal))
    }

    /// Kills the process group.
    pub fn cancel(&self) -> Result<(), ClientError> {
        self.call.send(ClientMsg::Cancel)
    }

    /// The next output chunk, or the exit (the last event).
    pub fn next_event(&self) -> Result<ExecEvent, ClientError> {
        match self.call.next()? {
            ServerMsg::Stdout(d) => Ok(ExecEvent::Stdout(d)),
            ServerMsg::Stderr(d) => Ok(ExecEvent::Stderr(d)),
            ServerMsg::Exited(status) => Ok(ExecEvent::Exited(status)),
            other => Err(unexpected("Stdout, Stderr or Exited", &other)),
        }
    }
}
