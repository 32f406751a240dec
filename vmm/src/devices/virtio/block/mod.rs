//! virtio-blk on a raw image file (virtio 1.x §5.2): read, write, flush (fsync), get-id,
//! read-only mode, and discard / write-zeroes by punching holes where the file system can.

mod device;
pub mod request;

pub use device::{Block, BlockError, BlockState, QUEUE_SIZE, SEG_MAX};

#[cfg(test)]
mod tests;
