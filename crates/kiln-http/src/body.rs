//! A response body made of several `Bytes` chunks, so backend output buffers are sent
//! without being copied into one contiguous body.
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Chunks sent in order.
#[derive(Debug, Default)]
pub struct ChunkedBody {
    chunks: VecDeque<Bytes>,
    remaining: u64,
}

impl ChunkedBody {
    /// A body of these chunks.
    pub fn new(chunks: Vec<Bytes>) -> Self {
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        ChunkedBody {
            chunks: chunks.into_iter().filter(|c| !c.is_empty()).collect(),
            remaining,
        }
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
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.chunks.pop_front() {
            Some(c) => {
                self.remaining -= c.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(c))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
