//! Reusable data buffers. A multi-megabyte allocation is a fresh mapping whose pages the
//! kernel faults in and zeroes on first write; a fill or a stream that allocates one per
//! range or block spends a large share of its CPU there (measured on 2 × 1 GiB into tmpfs:
//! `clear_page_erms` + page faults were a fifth of `fillfs populate`'s CPU). A
//! [`BufferPool`] hands out buffers of one size and takes them back when the last
//! reference to the [`Bytes`] made from them is dropped.
//!
//! This module only recycles memory; the budgets that bound how many buffers are in use
//! belong to their owners (the cache's capacity). Populate no longer uses it: it writes
//! the network's own chunks as they arrive (see `populate/copy.rs`).

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

/// Buffers of `size` bytes. Other sizes are allocated and freed as usual.
#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    /// Free buffers kept at most; the rest are freed (memory goes back to the system).
    max_free: usize,
    free: Mutex<Vec<BytesMut>>,
}

impl BufferPool {
    pub fn new(size: usize, max_free: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            size,
            max_free,
            free: Mutex::new(Vec::new()),
        })
    }

    /// An empty buffer with room for `len` bytes; pooled when `len` is the pool's size.
    pub fn take(&self, len: usize) -> BytesMut {
        if len == self.size
            && let Some(b) = self.free.lock().expect("pool lock").pop()
        {
            return b;
        }
        BytesMut::with_capacity(len)
    }

    /// Freezes `data`; when the last clone of the result is dropped, `guard` is dropped
    /// and the buffer returns to the pool.
    pub fn into_bytes<G: Send + 'static>(self: &Arc<Self>, data: BytesMut, guard: G) -> Bytes {
        Bytes::from_owner(Pooled {
            data,
            pool: self.clone(),
            _guard: guard,
        })
    }

    /// Free buffers held now.
    pub fn free_count(&self) -> usize {
        self.free.lock().expect("pool lock").len()
    }

    fn put(&self, mut buf: BytesMut) {
        if buf.capacity() != self.size {
            return;
        }
        let mut free = self.free.lock().expect("pool lock");
        if free.len() < self.max_free {
            buf.clear();
            free.push(buf);
        }
    }
}

struct Pooled<G> {
    data: BytesMut,
    pool: Arc<BufferPool>,
    _guard: G,
}

impl<G> AsRef<[u8]> for Pooled<G> {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl<G> Drop for Pooled<G> {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_when_the_last_reference_drops() {
        let pool = BufferPool::new(1024, 2);
        let mut b = pool.take(1024);
        let ptr = b.as_ptr();
        b.extend_from_slice(&[7u8; 1024]);
        let bytes = pool.into_bytes(b, ());
        let clone = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.free_count(), 0, "a slice still refers to it");
        assert_eq!(&clone[..], &[7u8; 10]);
        drop(clone);
        assert_eq!(pool.free_count(), 1);
        let again = pool.take(1024);
        assert_eq!(again.as_ptr(), ptr, "the same memory is reused");
        assert!(again.is_empty());
        // Other sizes are not pooled, and the pool keeps at most max_free.
        drop(pool.into_bytes(pool.take(10), ()));
        for _ in 0..3 {
            drop(pool.into_bytes(BytesMut::with_capacity(1024), ()));
        }
        assert_eq!(pool.free_count(), 2);
    }
}
