//! Several requests at once, on one connection and on several.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{cmd, PseudoRandom, TestAgent};
use guest_agent::protocol::messages::WriteFileRequest;

#[test]
fn requests_share_one_connection_and_run_at_once() {
    let agent = TestAgent::start();
    let client = Arc::new(agent.client());
    let start = Instant::now();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let client = Arc::clone(&client);
            thread::spawn(move || {
                let script = format!("sleep 0.5; echo {i}; echo e{i} >&2");
                client.exec_output(cmd(&["sh", "-c", &script])).unwrap()
            })
        })
        .collect();
    // Pings are answered while the execs run.
    for _ in 0..5 {
        assert!(client.ping().unwrap() < Duration::from_millis(400));
    }
    for (i, handle) in handles.into_iter().enumerate() {
        let out = handle.join().unwrap();
        assert_eq!(out.status.code, Some(0));
        assert_eq!(out.stdout, format!("{i}\n").into_bytes());
        assert_eq!(out.stderr, format!("e{i}\n").into_bytes());
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed < Duration::from_millis(2500),
        "8 half-second execs took {elapsed:?}: they did not overlap"
    );
}

#[test]
fn uploads_downloads_and_execs_interleave_on_one_connection() {
    let agent = TestAgent::start();
    let client = Arc::new(agent.client());
    let handles: Vec<_> = (0..4u64)
        .map(|i| {
            let client = Arc::clone(&client);
            let path = agent.path(&format!("f{i}"));
            thread::spawn(move || {
                let len = 3 * 1024 * 1024 + i * 1000;
                let req = WriteFileRequest {
                    path: path.to_str().unwrap().to_owned(),
                    mode: 0o644,
                    uid: None,
                    gid: None,
                    create_dirs: false,
                };
                assert_eq!(
                    client.write_file(req, PseudoRandom::new(i, len)).unwrap(),
                    len
                );
                let mut back = Vec::new();
                client.read_file(path.to_str().unwrap(), &mut back).unwrap();
                let mut expected = Vec::new();
                std::io::Read::read_to_end(&mut PseudoRandom::new(i, len), &mut expected).unwrap();
                assert!(back == expected, "file {i} differs");
                let out = client
                    .exec_output(cmd(&["wc", "-c", path.to_str().unwrap()]))
                    .unwrap();
                assert!(String::from_utf8_lossy(&out.stdout).starts_with(&len.to_string()));
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn several_connections_are_served_at_once() {
    let agent = TestAgent::start();
    let start = Instant::now();
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let client = agent.client();
            thread::spawn(move || {
                let version = client.version().unwrap();
                assert_eq!(version.protocol, 1);
                let out = client
                    .exec_output(cmd(&["sh", "-c", &format!("sleep 0.5; echo c{i}")]))
                    .unwrap();
                assert_eq!(out.stdout, format!("c{i}\n").into_bytes());
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn dropping_a_client_mid_exec_leaves_the_agent_serving() {
    let agent = TestAgent::start();
    {
        let client = agent.client();
        let call = client
            .exec_start(cmd(&[
                "sh",
                "-c",
                "echo hi; sleep 0.3; head -c 1000000 /dev/zero",
            ]))
            .unwrap();
        let _ = call.next_event().unwrap();
        // Dropped with output still coming.
    }
    let client = agent.client();
    assert_eq!(
        client.exec_output(cmd(&["true"])).unwrap().status.code,
        Some(0)
    );
}
