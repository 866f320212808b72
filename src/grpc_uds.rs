//! gRPC servers on unix sockets that every client can talk to. gRPC's Go client sends
//! `localhost` as a unix socket's `:authority`, but gRPC C-core (Python, C++, Ruby) sends the
//! socket's path, percent-encoded (`tmp%2Fplugin.sock`), and grpc-java the raw path. h2,
//! under tonic, refuses both as malformed and resets the stream (hyperium/h2#487, open), so
//! such a client could not call the CSI node plugin or the Argo artifact driver at all.
//!
//! [`incoming`] wraps each accepted connection in [`AuthorityFix`], which rewrites what the
//! client sends before h2 reads it: every request's header block is decoded (HPACK, with
//! the client's dynamic table, by the `hpack` crate) and re-encoded as literals without
//! indexing, with an `:authority` that is not a valid authority replaced by `localhost`.
//! Everything else — the preface, every other frame, everything the server sends — passes
//! through byte for byte. Hand-written because h2 exposes no hook for this; the frame
//! layout is RFC 9113 §4–6 and the encoding RFC 7541 §6.2.2.
//!
//! It must not look at message bodies or change anything but header blocks' encoding and
//! an invalid `:authority`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame a client may send before the server raises it: h2's default.
const MAX_OUT_FRAME: usize = 16_384;
/// A frame larger than this is not HTTP/2 from a gRPC client (2^24 - 1 is the protocol's).
const MAX_IN_FRAME: usize = 16 * 1024 * 1024;

/// The connections of `listener`, each with its `:authority` fixed.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<AuthorityFix>> {
    futures::stream::unfold(listener, |l| async move {
        let conn = l.accept().await.map(|(s, _)| AuthorityFix::new(s));
        Some((conn, l))
    })
}

/// A unix connection whose client's header blocks are re-encoded (see the module doc).
pub struct AuthorityFix {
    inner: UnixStream,
    /// Bytes read from the client and not yet rewritten.
    raw: Vec<u8>,
    /// Rewritten bytes not yet handed to the server.
    out: Vec<u8>,
    out_at: usize,
    preface_done: bool,
    /// A header block spread over HEADERS + CONTINUATION frames: (stream, flags, bytes).
    block: Option<(u32, u8, Vec<u8>)>,
    decoder: hpack::Decoder<'static>,
    /// The client sent something that is not HTTP/2: pass the rest through untouched and
    /// let h2 say what is wrong.
    passthrough: bool,
}

impl AuthorityFix {
    fn new(inner: UnixStream) -> Self {
        AuthorityFix {
            inner,
            raw: Vec::new(),
            out: Vec::new(),
            out_at: 0,
            preface_done: false,
            block: None,
            decoder: hpack::Decoder::new(),
            passthrough: false,
        }
    }

    /// Moves every complete unit of `raw` (the preface, whole frames) to `out`.
    fn process(&mut self) {
        if self.passthrough {
            self.out.append(&mut self.raw);
            return;
        }
        if !self.preface_done {
            if self.raw.len() < PREFACE_LEN {
                return;
            }
            self.out.extend(self.raw.drain(..PREFACE_LEN));
            self.preface_done = true;
        }
        loop {
            if self.raw.len() < FRAME_HEADER {
                return;
            }
            let len = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
            if len > MAX_IN_FRAME {
                self.passthrough = true;
                self.out.append(&mut self.raw);
                return;
            }
            if self.raw.len() < FRAME_HEADER + len {
                return;
            }
            let frame: Vec<u8> = self.raw.drain(..FRAME_HEADER + len).collect();
            let (kind, flags) = (frame[3], frame[4]);
            let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            let payload = &frame[FRAME_HEADER..];
            match kind {
                HEADERS => {
                    let Some(fragment) = header_fragment(flags, payload) else {
                        self.out.extend_from_slice(&frame); // malformed: h2 will say so
                        continue;
                    };
                    self.block = Some((stream, flags & END_STREAM, fragment.to_vec()));
                    if flags & END_HEADERS != 0 {
                        self.finish_block();
                    }
                }
                CONTINUATION if self.block.as_ref().is_some_and(|b| b.0 == stream) => {
                    if let Some(b) = self.block.as_mut() {
                        b.2.extend_from_slice(payload);
                    }
                    if flags & END_HEADERS != 0 {
                        self.finish_block();
                    }
                }
                _ => self.out.extend_from_slice(&frame),
            }
        }
    }

    /// Re-encodes the collected header block and writes it as HEADERS (+ CONTINUATION).
    fn finish_block(&mut self) {
        let Some((stream, end_stream, block)) = self.block.take() else {
            return;
        };
        let encoded = match self.decoder.decode(&block) {
            Ok(headers) => encode_literal(&headers),
            Err(e) => {
                // Not decodable: hand the block over as it came, h2 will refuse it.
                tracing::debug!(error = ?e, "undecodable header block passed through");
                block
            }
        };
        let mut pieces = encoded.chunks(MAX_OUT_FRAME).peekable();
        let mut first = true;
        if pieces.peek().is_none() {
            write_frame(
                &mut self.out,
                HEADERS,
                end_stream | END_HEADERS,
                stream,
                &[],
            );
        }
        while let Some(piece) = pieces.next() {
            let last = pieces.peek().is_none();
            let (kind, mut flags) = if first {
                (HEADERS, end_stream)
            } else {
                (CONTINUATION, 0)
            };
            if last {
                flags |= END_HEADERS;
            }
            write_frame(&mut self.out, kind, flags, stream, piece);
            first = false;
        }
    }
}

/// The header block fragment of a HEADERS payload (padding and priority removed).
fn header_fragment(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & PADDED != 0 {
        let pad = *payload.first()? as usize;
        start = 1;
        end = end.checked_sub(pad)?;
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    payload.get(start..end)
}

fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = (payload.len() as u32).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The header list as literals without indexing (RFC 7541 §6.2.2, no Huffman), the
/// `:authority` replaced by `localhost` where it is not a valid authority.
fn encode_literal(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        let value: &[u8] =
            if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                b"localhost"
            } else {
                value
            };
        out.push(0x00); // literal without indexing, new name
        encode_string(&mut out, name);
        encode_string(&mut out, value);
    }
    out
}

/// A string literal, not Huffman-coded: its length as a 7-bit-prefix integer, then bytes.
fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    let mut n = s.len();
    if n < 0x7f {
        out.push(n as u8);
    } else {
        out.push(0x7f);
        n -= 0x7f;
        while n >= 0x80 {
            out.push((n & 0x7f) as u8 | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}

impl AsyncRead for AuthorityFix {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.out_at < this.out.len() {
                let n = (this.out.len() - this.out_at).min(buf.remaining());
                buf.put_slice(&this.out[this.out_at..this.out_at + n]);
                this.out_at += n;
                if this.out_at == this.out.len() {
                    this.out.clear();
                    this.out_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // End of stream: whatever is left goes as it is.
                this.out.append(&mut this.raw);
                if this.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.raw.extend_from_slice(rb.filled());
            this.process();
        }
    }
}

impl AsyncWrite for AuthorityFix {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for AuthorityFix {
    type ConnectInfo = <UnixStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(headers: &[(&[u8], &[u8])]) -> Vec<u8> {
        let owned: Vec<(Vec<u8>, Vec<u8>)> = headers
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        encode_literal(&owned)
    }

    #[test]
    fn a_path_authority_becomes_localhost_and_the_rest_is_kept() {
        let mut d = hpack::Decoder::new();
        for (sent, kept) in [
            (&b"tmp%2Fplugin.sock"[..], &b"localhost"[..]),
            (b"/var/run/x.sock", b"localhost"),
            (b"localhost", b"localhost"),
            (b"example.com:50051", b"example.com:50051"),
        ] {
            let got = d
                .decode(&block(&[
                    (b":method", b"POST"),
                    (b":authority", sent),
                    (b"te", b"trailers"),
                ]))
                .unwrap();
            assert_eq!(got[1], (b":authority".to_vec(), kept.to_vec()));
            assert_eq!(got[0], (b":method".to_vec(), b"POST".to_vec()));
            assert_eq!(got[2], (b"te".to_vec(), b"trailers".to_vec()));
        }
        let long = vec![b'x'; 300];
        let got = d.decode(&block(&[(b"x-long", &long)])).unwrap();
        assert_eq!(got[0].1, long, "multi-byte length prefix");
    }

    #[test]
    fn padding_and_priority_are_stripped_from_a_fragment() {
        let payload = [2u8, 0, 0, 0, 1, 7, 0xAA, 0xBB, 0, 0];
        assert_eq!(
            header_fragment(PADDED | PRIORITY, &payload),
            Some(&[0xAA, 0xBB][..])
        );
        assert_eq!(
            header_fragment(PADDED, &[9u8, 1]),
            None,
            "padding longer than the frame"
        );
    }
}
