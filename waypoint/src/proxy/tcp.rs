//! Opaque TCP through the waypoint: bytes copied both ways, a half-close on one side forwarded to the other
//! (tokio's `copy_bidirectional` shuts the peer's write side down when a side reaches EOF).

use tokio::io::{AsyncRead, AsyncWrite};

use crate::upstream::UpstreamIo;

pub async fn splice<IO>(mut downstream: IO, mut upstream: UpstreamIo)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((sent, received)) => tracing::debug!(sent, received, "tcp tunnel closed"),
        Err(e) => tracing::debug!(error = %e, "tcp tunnel ended with an error"),
    }
}
