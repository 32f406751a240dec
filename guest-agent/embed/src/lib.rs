//! The guest agent as bytes. `build.rs` compiles `guest-agent`'s `microagent-agent` for
//! `x86_64-unknown-linux-gnu`, statically linked and stripped; the CLI writes it into every image
//! it builds, so a plain `cargo build` (or `cargo install`) gives a complete `microagent`.

/// The static, stripped x86-64 Linux guest agent.
pub static AGENT: &[u8] = include_bytes!(env!("MICROAGENT_AGENT_ELF"));
