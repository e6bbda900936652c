//! An app's answer that arrives before the caller's upload has been sent whole (an early `401`
//! or `413`) reaches the caller complete, whatever the app then does with the rest of the upload.
//!
//! Three pieces, one per place the answer could be lost (HTTP/1.1 only: over h2 an app ends an
//! upload with `RST_STREAM`, which hyper already handles per stream):
//!
//! - [`PodIo`], the connection to the pod. An app that answers without reading the upload and
//!   then closes makes the kernel reset the connection, and the next write of the upload fails.
//!   hyper treats a failed write as the end of the whole connection, throwing away the answer it
//!   has not read yet (a `502`, or a response cut short). Here a write that fails because the pod
//!   reset or closed the connection stops the upload instead: the write side stays pending
//!   forever, and reading goes on until the answer is read and the connection's end is seen.
//! - [`CallerBody`], the caller's upload as it is sent to the pod: it tells whether the upload
//!   was read to its end, so an answer that comes first is sent with `Connection: close`, and the
//!   caller's connection is closed gently after it.
//! - [`CallerIo`], the caller's connection. A server that closes a socket with unread input makes
//!   the kernel send a reset, which can overtake the answer still on its way to the caller (or
//!   not yet acknowledged) and destroy it. When an upload was left unread, closing the
//!   connection first sends the answer and a FIN, then reads and discards what the caller still
//!   sends, for at most [`LINGER_TIME`] and [`LINGER_BYTES`], before the socket is closed.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Longest a caller's connection stays half-closed after an answer that left its upload unread.
/// Enough for the answer to reach any caller in the cluster; the connection keeps its place
/// under `--max-connections` meanwhile.
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// Most of an unread upload read and discarded while lingering; past it the connection only
/// waits out [`LINGER_TIME`] (TCP flow control holds the caller back). A few MiB lets a caller
/// that sends its whole upload before it reads (many simple clients do) finish sending and read
/// the answer, for the uploads an early `413` typically refuses.
pub const LINGER_BYTES: u64 = 8 * 1024 * 1024;

/// One HTTP/1.1 connection's uploads, shared by its requests (HTTP/1.1 carries one at a time).
#[derive(Debug, Default)]
pub struct UploadState {
    /// The current request's body has not been read to its end yet.
    open: AtomicBool,
    /// A request's body was dropped before its end: the caller may still be sending it.
    left_unread: AtomicBool,
}

impl UploadState {
    /// Whether the current request's body has not been (and now may never be) read to its
    /// end: it is still being sent to the pod, or it was given up. (Once a body is given up the
    /// connection closes after the answer, so "some request" is "this request".)
    pub fn unfinished(&self) -> bool {
        self.open.load(Ordering::Acquire) || self.left_unread()
    }

    /// Whether some request on this connection left part of its body unread.
    pub fn left_unread(&self) -> bool {
        self.left_unread.load(Ordering::Acquire)
    }
}

/// The caller's request body on its way to the pod. For an HTTP/1.1 request with a body, it
/// records in the connection's [`UploadState`] whether it was read to its end.
pub struct CallerBody {
    body: Incoming,
    upload: Option<Arc<UploadState>>,
}

impl CallerBody {
    /// A body whose end is not watched (h2, or a request without a body).
    pub fn unwatched(body: Incoming) -> Self {
        Self { body, upload: None }
    }

    /// A body whose end is recorded in `upload`.
    pub fn watched(body: Incoming, upload: &Arc<UploadState>) -> Self {
        if body.is_end_stream() {
            return Self::unwatched(body);
        }
        upload.open.store(true, Ordering::Release);
        Self {
            body,
            upload: Some(Arc::clone(upload)),
        }
    }

    fn ended(&mut self) {
        if let Some(upload) = self.upload.take() {
            upload.open.store(false, Ordering::Release);
        }
    }
}

impl Drop for CallerBody {
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take() {
            upload.open.store(false, Ordering::Release);
            upload.left_unread.store(true, Ordering::Release);
        }
    }
}

impl Body for CallerBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            // A caller that breaks off its upload is not one to linger for.
            None | Some(Err(_)) => self.ended(),
            Some(Ok(_)) if self.body.is_end_stream() => self.ended(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection to a pod whose write side stops, rather than failing the connection, once the
/// pod has reset or closed it: whatever the pod sent before is still read.
pub struct PodIo {
    stream: TcpStream,
    /// Whether a write the pod refused stops the write side (else it fails as usual).
    stop_writing: bool,
    write_closed: bool,
}

impl PodIo {
    /// For HTTP/1.1 exchanges: a write the pod refused stops the write side, and the pod's
    /// answer is still read.
    pub fn reading_on(stream: TcpStream) -> Self {
        Self {
            stream,
            stop_writing: true,
            write_closed: false,
        }
    }

    /// Writes fail as the socket's do (h2, whose connection serves many streams, and upgraded
    /// tunnels, whose copy ends on a failed write).
    pub fn plain(stream: TcpStream) -> Self {
        Self {
            stream,
            stop_writing: false,
            write_closed: false,
        }
    }

    /// A write error that means the pod no longer reads this connection. Its read side has
    /// ended too (a reset, or the pod's close), so reading cannot wait forever.
    fn pod_stopped_reading(err: &io::Error) -> bool {
        matches!(
            err.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
        )
    }

    fn written(&mut self, res: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match res {
            Poll::Ready(Err(err)) if self.stop_writing && Self::pod_stopped_reading(&err) => {
                tracing::debug!(error = %err, "the pod stopped reading the request; reading its answer");
                self.write_closed = true;
                // Woken by the read side, which sees the connection's end.
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncRead for PodIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PodIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Pending;
        }
        let res = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.written(res)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Pending;
        }
        let res = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.written(res)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_closed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_closed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A caller's connection that, when closed after an answer that left an upload unread, lingers
/// half-closed (see the module's comment).
pub struct CallerIo {
    stream: TcpStream,
    upload: Arc<UploadState>,
    linger: Option<Linger>,
}

struct Linger {
    deadline: Pin<Box<Sleep>>,
    discarded: u64,
}

impl CallerIo {
    pub fn new(stream: TcpStream, upload: Arc<UploadState>) -> Self {
        Self {
            stream,
            upload,
            linger: None,
        }
    }

    /// Reads and discards what the caller still sends until it closes, [`LINGER_TIME`] passes
    /// or [`LINGER_BYTES`] were read (then only the time is waited out).
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let linger = self.linger.get_or_insert_with(|| Linger {
            deadline: Box::pin(tokio::time::sleep(LINGER_TIME)),
            discarded: 0,
        });
        if linger.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let mut scratch = [0u8; 16 * 1024];
        while linger.discarded < LINGER_BYTES {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(()),
                Poll::Ready(Ok(())) => linger.discarded += buf.filled().len() as u64,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Pending
    }
}

impl AsyncRead for CallerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CallerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// hyper shuts a connection down once it is done with it, then drops it (closing the
    /// socket): the linger happens between the two.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
            if !this.upload.left_unread() {
                return Poll::Ready(Ok(()));
            }
        }
        ready!(this.poll_linger(cx));
        Poll::Ready(Ok(()))
    }
}
