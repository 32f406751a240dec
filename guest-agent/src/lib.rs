//! The guest agent: a static binary that runs inside a workspace and serves exec, file transfer and
//! the snapshot hooks (freeze and scrub before capture; thaw, reseed and rehydrate after restore) over
//! virtio-vsock, and the wire protocol the host side reuses.
//!
//! Built in the guest-agent issue; this crate holds the place in the workspace until then.
