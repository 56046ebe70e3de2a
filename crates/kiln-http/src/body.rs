//! A response body made of several `Bytes` chunks, so backend output buffers are sent
//! without being copied into one contiguous body; or a stream of chunks sent as they
//! arrive (server-sent events).
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc::UnboundedReceiver;

/// Chunks sent in order.
#[derive(Debug, Default)]
pub struct ChunkedBody {
    chunks: VecDeque<Bytes>,
    remaining: u64,
    /// Chunks still to come, sent as they arrive; the body ends when the sender drops.
    tail: Option<UnboundedReceiver<Bytes>>,
}

impl ChunkedBody {
    /// A body of these chunks.
    pub fn new(chunks: Vec<Bytes>) -> Self {
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        ChunkedBody {
            chunks: chunks.into_iter().filter(|c| !c.is_empty()).collect(),
            remaining,
            tail: None,
        }
    }

    /// A body whose chunks are sent as `rx` yields them, of a length not known ahead.
    pub fn streaming(rx: UnboundedReceiver<Bytes>) -> Self {
        ChunkedBody {
            tail: Some(rx),
            ..ChunkedBody::default()
        }
    }

    /// Whether chunks are still to come from a stream (such a body cannot be compressed).
    pub fn is_streaming(&self) -> bool {
        self.tail.is_some()
    }

    /// Concatenates the chunks (for compression).
    pub fn concat(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.remaining as usize);
        for c in self.chunks {
            v.extend_from_slice(&c);
        }
        v
    }
}

impl Body for ChunkedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(c) = self.chunks.pop_front() {
            self.remaining -= c.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        let Some(rx) = self.tail.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(c)) => Poll::Ready(Some(Ok(Frame::data(c)))),
            Poll::Ready(None) => {
                self.tail = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.tail.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.tail.is_some() {
            SizeHint::default()
        } else {
            SizeHint::with_exact(self.remaining)
        }
    }
}
