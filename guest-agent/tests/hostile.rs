//! Hostile peers: every bad frame is answered with an error or a closed connection, never a panic,
//! and the agent keeps serving other connections.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::TestAgent;
use guest_agent::protocol::messages::{
    ClientFrame, ClientMsg, ErrorKind, Hello, HelloReply, ServerFrame, ServerMsg,
};
use guest_agent::protocol::{decode, encode_frame, read_frame, HELLO_MAGIC, MAX_FRAME_LEN};

fn raw(agent: &TestAgent) -> UnixStream {
    let s = UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn hello(version: u32) -> Vec<u8> {
    encode_frame(&Hello {
        magic: HELLO_MAGIC,
        version,
        client: "hostile test".into(),
    })
    .unwrap()
}

/// Reads whatever the agent sends until it closes; panics if it does not close in time.
fn frames_until_close(s: &mut UnixStream) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    loop {
        match read_frame(s, MAX_FRAME_LEN) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return frames,
            Err(e) => match e {
                guest_agent::protocol::FrameError::Io(ref io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.kind() == std::io::ErrorKind::TimedOut =>
                {
                    panic!("the agent did not close the connection: {e}")
                }
                // A reset is a close too.
                _ => return frames,
            },
        }
    }
}

fn handshake(s: &mut UnixStream) {
    s.write_all(&hello(1)).unwrap();
    let reply: HelloReply = decode(&read_frame(s, MAX_FRAME_LEN).unwrap().unwrap()).unwrap();
    assert!(
        matches!(reply, HelloReply::Accepted { version: 1, .. }),
        "{reply:?}"
    );
}

fn assert_still_serving(agent: &TestAgent) {
    let client = agent.client();
    client
        .ping()
        .expect("the agent still serves new connections");
    let out = client.exec_output(common::cmd(&["echo", "alive"])).unwrap();
    assert_eq!(out.stdout, b"alive\n");
}

fn protocol_error_then_close(s: &mut UnixStream) {
    let frames = frames_until_close(s);
    assert_eq!(frames.len(), 1, "one error frame before the close");
    let frame: ServerFrame = decode(&frames[0]).unwrap();
    assert_eq!(frame.id, 0);
    assert!(
        matches!(frame.msg, ServerMsg::Error(ref e) if e.kind == ErrorKind::Protocol),
        "{frame:?}"
    );
}

#[test]
fn unknown_version_is_rejected_with_the_supported_range() {
    let agent = TestAgent::start();
    let mut s = raw(&agent);
    s.write_all(&hello(999)).unwrap();
    let frames = frames_until_close(&mut s);
    assert_eq!(frames.len(), 1);
    let reply: HelloReply = decode(&frames[0]).unwrap();
    match reply {
        HelloReply::Rejected { min, max, message } => {
            assert_eq!((min, max), (1, 1));
            assert!(message.contains("999"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_still_serving(&agent);
}

#[test]
fn oversized_length_closes_the_connection() {
    let agent = TestAgent::start();
    // Before the handshake.
    let mut s = raw(&agent);
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 0]).unwrap();
    let frames = frames_until_close(&mut s);
    assert!(frames.len() <= 1);
    // After the handshake: announces 1 MiB + 1.
    let mut s = raw(&agent);
    handshake(&mut s);
    s.write_all(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes())
        .unwrap();
    protocol_error_then_close(&mut s);
    assert_still_serving(&agent);
}

#[test]
fn truncated_frames_close_the_connection() {
    let agent = TestAgent::start();
    // A hello cut short.
    let mut s = raw(&agent);
    let h = hello(1);
    s.write_all(&h[..h.len() - 2]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let frames = frames_until_close(&mut s);
    assert!(frames.len() <= 1);
    // A request cut short after a good handshake.
    let mut s = raw(&agent);
    handshake(&mut s);
    let req = encode_frame(&ClientFrame {
        id: 1,
        msg: ClientMsg::Ping,
    })
    .unwrap();
    s.write_all(&req[..3]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    protocol_error_then_close(&mut s);
    assert_still_serving(&agent);
}

#[test]
fn garbage_closes_the_connection() {
    let agent = TestAgent::start();
    // Text where a hello belongs (its first four bytes read as a huge length).
    let mut s = raw(&agent);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let frames = frames_until_close(&mut s);
    assert!(frames.len() <= 1);
    // A well-framed hello of garbage.
    let mut s = raw(&agent);
    s.write_all(&[0, 0, 0, 5, 1, 2, 3, 4, 5]).unwrap();
    let frames = frames_until_close(&mut s);
    assert_eq!(frames.len(), 1);
    assert!(matches!(
        decode::<HelloReply>(&frames[0]).unwrap(),
        HelloReply::Rejected { .. }
    ));
    // A good hello with the wrong magic.
    let mut s = raw(&agent);
    s.write_all(
        &encode_frame(&Hello {
            magic: *b"NOPE",
            version: 1,
            client: String::new(),
        })
        .unwrap(),
    )
    .unwrap();
    let frames = frames_until_close(&mut s);
    assert!(matches!(
        decode::<HelloReply>(&frames[0]).unwrap(),
        HelloReply::Rejected { .. }
    ));
    // Garbage requests after a good handshake: an unknown variant, trailing bytes, random bytes.
    for payload in [
        vec![1u8, 200],
        {
            let mut v = encode_frame(&ClientFrame {
                id: 1,
                msg: ClientMsg::Ping,
            })
            .unwrap()[4..]
                .to_vec();
            v.push(0);
            v
        },
        (0..512u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect(),
        vec![],
    ] {
        let mut s = raw(&agent);
        handshake(&mut s);
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&payload);
        s.write_all(&frame).unwrap();
        protocol_error_then_close(&mut s);
    }
    assert_still_serving(&agent);
}

#[test]
fn bad_requests_inside_a_good_connection_get_errors_not_a_close() {
    let agent = TestAgent::start();
    let mut s = raw(&agent);
    handshake(&mut s);
    let send = |s: &mut UnixStream, id, msg| {
        s.write_all(&encode_frame(&ClientFrame { id, msg }).unwrap())
            .unwrap()
    };
    // Reserved id 0.
    send(&mut s, 0, ClientMsg::Exec(common::cmd(&["true"])));
    // Data for an upload that does not exist is dropped silently; then a ping proves the
    // connection lives.
    send(&mut s, 5, ClientMsg::Data(vec![1, 2, 3]));
    send(&mut s, 5, ClientMsg::End);
    send(&mut s, 6, ClientMsg::Ping);
    let first: ServerFrame = decode(&read_frame(&mut s, MAX_FRAME_LEN).unwrap().unwrap()).unwrap();
    assert_eq!(first.id, 0);
    assert!(matches!(first.msg, ServerMsg::Error(ref e) if e.kind == ErrorKind::InvalidRequest));
    let second: ServerFrame = decode(&read_frame(&mut s, MAX_FRAME_LEN).unwrap().unwrap()).unwrap();
    assert_eq!(
        second,
        ServerFrame {
            id: 6,
            msg: ServerMsg::Pong
        }
    );
}

#[test]
fn random_bytes_never_panic_the_decoder() {
    let mut state = 0x9e3779b97f4a7c15u64;
    for len in 0..2000usize {
        let bytes: Vec<u8> = (0..len % 97)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let _ = decode::<ClientFrame>(&bytes);
        let _ = decode::<ServerFrame>(&bytes);
        let _ = decode::<Hello>(&bytes);
        let _ = decode::<HelloReply>(&bytes);
        let _ = read_frame(&mut &bytes[..], 64);
    }
}

#[test]
fn a_silent_peer_does_not_block_others() {
    let agent = TestAgent::start();
    let _silent = raw(&agent); // connects and never says hello
    let mut half = raw(&agent);
    half.write_all(&[0, 0]).unwrap(); // half a header, then nothing
    assert_still_serving(&agent);
}
