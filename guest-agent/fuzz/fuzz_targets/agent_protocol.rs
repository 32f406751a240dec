#![no_main]
//! The agent protocol on hostile bytes, both ways: the host reading what a guest sends
//! (`HelloReply`, `ServerFrame`) and the agent reading what the host sends (`Hello`,
//! `ClientFrame`). The input is a stream of frames, as on the socket.
//!
//! Promised: a frame's payload never exceeds the limit in force and is exactly as long as its
//! header says; a payload either decodes or is an error, never a panic; whatever decodes encodes
//! again into one frame no longer than what came in and decodes back to the same message; what
//! the host derives from a decoded message (the exit code) never panics.

use guest_agent::protocol::messages::{
    ClientFrame, ClientMsg, ExecRequest, ExitStatus, Hello, HelloReply, ServerFrame, ServerMsg,
};
use guest_agent::protocol::{decode, encode_frame, read_frame, FrameError, MAX_FRAME_LEN};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

// One seed writer for every fuzz workspace.
#[path = "../../../snapshot/fuzz/fuzz_targets/seeds.rs"]
mod seeds;

fn seeds() -> Vec<Vec<u8>> {
    let frame = |m: &dyn Fn() -> Vec<u8>| {
        let mut v = vec![1u8];
        v.extend(m());
        v
    };
    vec![
        frame(&|| {
            encode_frame(&Hello {
                magic: *b"MAGT",
                version: 1,
                client: "seed".into(),
            })
            .unwrap()
        }),
        frame(&|| {
            let mut v = encode_frame(&HelloReply::Accepted {
                version: 1,
                agent: "0.1.0".into(),
            })
            .unwrap();
            for msg in [
                ServerMsg::Stdout(b"hello\n".to_vec()),
                ServerMsg::Exited(ExitStatus {
                    code: None,
                    signal: Some(15),
                    timed_out: true,
                }),
                ServerMsg::End(6),
            ] {
                v.extend(encode_frame(&ServerFrame { id: 1, msg }).unwrap());
            }
            v
        }),
        frame(&|| {
            encode_frame(&ClientFrame {
                id: 3,
                msg: ClientMsg::Exec(ExecRequest {
                    argv: vec!["sh".into(), "-c".into(), "true".into()],
                    env: vec![("A".into(), "b".into())],
                    cwd: Some("/".into()),
                    stdin: Some(vec![1, 2]),
                    timeout_ms: Some(10),
                    ..ExecRequest::default()
                }),
            })
            .unwrap()
        }),
    ]
}

/// A decoded message must survive re-encoding unchanged, in one frame no longer than the input.
fn check<T>(payload: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let m: T = decode(payload).ok()?;
    let frame = encode_frame(&m).expect("a decoded message re-encodes");
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4);
    assert!(len <= payload.len(), "{len} > {}", payload.len());
    let back: T = decode(&frame[4..]).expect("a re-encoded message decodes");
    assert_eq!(back, m);
    Some(m)
}

fuzz_target!(
    init: seeds::write_if_empty(seeds),
    |data: &[u8]| {
        // The first byte picks the limit: the real one, or a small one to reach its edge.
        let Some((&sel, mut stream)) = data.split_first() else {
            return;
        };
        let max = if sel & 1 == 1 {
            MAX_FRAME_LEN
        } else {
            usize::from(sel) * 8
        };
        loop {
            let before = stream.len();
            match read_frame(&mut stream, max) {
                Ok(Some(payload)) => {
                    assert!(payload.len() <= max);
                    assert_eq!(before - stream.len(), 4 + payload.len());
                    check::<Hello>(&payload);
                    check::<HelloReply>(&payload);
                    check::<ClientFrame>(&payload);
                    if let Some(f) = check::<ServerFrame>(&payload) {
                        if let ServerMsg::Exited(status) = f.msg {
                            let _ = status.shell_code();
                        }
                    }
                }
                Ok(None) => {
                    assert_eq!(before, 0);
                    break;
                }
                Err(FrameError::TooLarge { len, max: m }) => {
                    assert!(len as usize > m);
                    break;
                }
                Err(FrameError::Truncated { got, expected }) => {
                    assert!(got < expected);
                    break;
                }
                Err(FrameError::Io(e)) => panic!("a slice never fails: {e}"),
            }
        }
    }
);
