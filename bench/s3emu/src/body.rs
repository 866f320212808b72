//! The GetObject response body: zero-copy chunks sliced from the stored
//! `Bytes`, paced by the bandwidth knob, optionally cut short (injected reset)
//! or with one byte flipped (injected corruption), counting bytes as they are
//! handed to the connection.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use s3s::StdError;
use s3s::stream::{ByteStream, RemainingLength};
use tokio::time::{Instant, Sleep};

use crate::emulation::{Counters, Knobs};

/// Size of the slices handed to hyper.
pub const CHUNK: usize = 256 * 1024;
/// Chunk size while a bandwidth cap is active (smoother pacing).
pub const PACED_CHUNK: usize = 64 * 1024;
/// How far behind schedule a paced stream may fall and still catch up.
const PACING_SLACK: Duration = Duration::from_millis(5);

pub struct GetBody {
    data: Bytes,
    pos: usize,
    /// Error out once `pos` reaches this (injected connection reset).
    cut: Option<usize>,
    /// Flip the byte at this offset of `data`.
    corrupt_at: Option<usize>,
    knobs: Arc<Knobs>,
    counters: Arc<Counters>,
    /// Virtual send time of the next chunk under the bandwidth cap.
    next_at: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
    done: bool,
}

impl GetBody {
    pub fn new(
        data: Bytes,
        cut: Option<usize>,
        corrupt_at: Option<usize>,
        knobs: Arc<Knobs>,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            data,
            pos: 0,
            cut,
            corrupt_at,
            knobs,
            counters,
            next_at: None,
            sleep: None,
            done: false,
        }
    }
}

impl Stream for GetBody {
    type Item = Result<Bytes, StdError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let end = this.cut.unwrap_or(this.data.len()).min(this.data.len());
        if this.pos >= end {
            this.done = true;
            if this.cut.is_some_and(|c| c < this.data.len()) {
                let err = std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "s3emu: injected connection reset",
                );
                return Poll::Ready(Some(Err(Box::new(err))));
            }
            return Poll::Ready(None);
        }

        let bandwidth = this.knobs.bandwidth();
        if let Some(bw) = bandwidth {
            if let Some(sleep) = this.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            } else if let Some(at) = this.next_at
                && at > Instant::now()
            {
                let mut sleep = Box::pin(tokio::time::sleep_until(at));
                if sleep.as_mut().poll(cx).is_pending() {
                    this.sleep = Some(sleep);
                    return Poll::Pending;
                }
            }
            let n = (end - this.pos).min(PACED_CHUNK);
            // Virtual-time pacing. Timer wake-ups run late by up to a tick, so
            // a little credit (PACING_SLACK) may be carried; a reader that
            // stalled for longer gets no burst beyond that.
            let now = Instant::now();
            let floor = now.checked_sub(PACING_SLACK).unwrap_or(now);
            let base = this.next_at.map_or(now, |at| at.max(floor));
            this.next_at = Some(base + Duration::from_secs_f64(n as f64 / bw as f64));
        } else {
            this.next_at = None;
        }

        let max = if bandwidth.is_some() {
            PACED_CHUNK
        } else {
            CHUNK
        };
        let n = (end - this.pos).min(max);
        let range = this.pos..this.pos + n;
        let chunk = match this.corrupt_at {
            Some(at) if range.contains(&at) => {
                let mut buf = BytesMut::from(&this.data[range.clone()]);
                buf[at - range.start] ^= 0xFF;
                buf.freeze()
            }
            _ => this.data.slice(range),
        };
        this.pos += n;
        Counters::add(&this.counters.get_bytes, n as u64);
        Poll::Ready(Some(Ok(chunk)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let rem = self.data.len().saturating_sub(self.pos);
        (
            rem.div_ceil(CHUNK),
            Some(rem.div_ceil(PACED_CHUNK.min(CHUNK))),
        )
    }
}

impl ByteStream for GetBody {
    fn remaining_length(&self) -> RemainingLength {
        RemainingLength::new_exact(self.data.len().saturating_sub(self.pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn knobs(bw: Option<u64>) -> Arc<Knobs> {
        Arc::new(Knobs::new(Duration::ZERO, bw))
    }

    #[tokio::test]
    async fn chunks_cover_data_and_count_bytes() {
        let data = Bytes::from((0..1_000_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let counters = Arc::new(Counters::default());
        let mut body = GetBody::new(data.clone(), None, None, knobs(None), counters.clone());
        let mut out = Vec::new();
        while let Some(c) = body.next().await {
            out.extend_from_slice(&c.unwrap());
        }
        assert_eq!(out, data);
        assert_eq!(counters.snapshot().get_bytes, 1_000_000);
    }

    #[tokio::test]
    async fn cut_errors_and_corrupt_flips() {
        let data = Bytes::from(vec![7u8; 300_000]);
        let counters = Arc::new(Counters::default());
        let mut body = GetBody::new(
            data.clone(),
            Some(100_000),
            Some(5),
            knobs(None),
            counters.clone(),
        );
        let mut out = Vec::new();
        let mut saw_err = false;
        while let Some(c) = body.next().await {
            match c {
                Ok(c) => out.extend_from_slice(&c),
                Err(_) => saw_err = true,
            }
        }
        assert!(saw_err);
        assert_eq!(out.len(), 100_000);
        assert_eq!(out[5], 7 ^ 0xFF);
        assert_eq!(out.iter().filter(|&&b| b != 7).count(), 1);
    }

    #[tokio::test]
    async fn bandwidth_paces() {
        let data = Bytes::from(vec![0u8; 512 * 1024]);
        let start = std::time::Instant::now();
        let mut body = GetBody::new(
            data,
            None,
            None,
            knobs(Some(4 * 1024 * 1024)),
            Arc::new(Counters::default()),
        );
        while body.next().await.is_some() {}
        // 512 KiB at 4 MiB/s = 125 ms, the first chunk is free.
        assert!(
            start.elapsed() >= Duration::from_millis(100),
            "{:?}",
            start.elapsed()
        );
    }
}
