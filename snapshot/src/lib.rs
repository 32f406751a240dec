//! Snapshots of microagent VMs: the manifest and state formats (versioned, checksummed), capture of
//! guest memory (full and diff) and the rootfs copy, restore in place and fork, and the userfaultfd
//! page server for lazy restore.
//!
//! Built in the snapshot issue; this crate holds the place in the workspace until then.
