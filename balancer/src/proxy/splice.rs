//! CONNECT tunnels moved by splice(2): each direction goes socket -> pipe -> socket inside the
//! kernel, so a tunnel's bytes never pass through the proxy's memory (a plain copy reads each
//! byte into a buffer and writes it out again). Readiness comes from tokio's own registration
//! of the sockets (`readable`/`writable` and `try_io`), so nothing else polls them.
//!
//! Each direction ends at its source's end of stream by shutting the other socket's write side,
//! as `copy_bidirectional` does; the tunnel ends when both have, or at the first error.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    ptr,
};

use tokio::{io::Interest, net::TcpStream};

/// Each pipe's capacity: a socket delivers up to a few hundred KiB per read at full rate, and
/// the default 64 KiB pipe would take several system call pairs for it.
const PIPE_SIZE: libc::c_int = 256 * 1024;

/// A non-blocking pipe that carries one direction's bytes.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds: [libc::c_int; 2] = [0; 2];
        // SAFETY: `fds` is an array of two ints, as pipe2 requires.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on a pipe descriptor we own; a refusal keeps the default size.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        let size = usize::try_from(size).unwrap_or(0);
        Ok(Pipe {
            read,
            write,
            size: if size == 0 { 64 * 1024 } else { size },
        })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors stay open for the call (borrowed from live owners); null offsets
    // are what splice takes for pipes and sockets.
    let moved = unsafe {
        libc::splice(
            from,
            ptr::null_mut(),
            to,
            ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(moved).map_err(|_| io::Error::last_os_error())
}

/// Moves `from`'s bytes to `to` until `from` ends, then shuts `to`'s write side. `moved` hears
/// of every chunk as it is read.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    moved: &(dyn Fn(usize) + Sync),
) -> io::Result<()> {
    loop {
        // The pipe is always empty here, so EAGAIN can only mean the socket has nothing.
        from.readable().await?;
        let read = match from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.write.as_raw_fd(), pipe.size)
        }) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        };
        moved(read);
        let mut left = read;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => left -= written.min(left),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
    }
    socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)
}

/// Joins `client` and `server` until both directions have ended or either fails. `up` hears of
/// the client's bytes as they are read, `down` of the server's.
pub async fn join(
    client: &TcpStream,
    server: &TcpStream,
    up: &(dyn Fn(usize) + Sync),
    down: &(dyn Fn(usize) + Sync),
) -> io::Result<()> {
    let (to_server, to_client) = (Pipe::new()?, Pipe::new()?);
    tokio::try_join!(
        one_way(client, server, &to_server, up),
        one_way(server, client, &to_client, down),
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn moves_both_ways_counts_and_passes_half_closes_on() {
        let (mut client, client_end) = pair().await;
        let (server_end, mut server) = pair().await;
        let (up, down) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let count_up = |n: usize| {
            up.fetch_add(n, Ordering::Relaxed);
        };
        let count_down = |n: usize| {
            down.fetch_add(n, Ordering::Relaxed);
        };
        let upload = vec![0xa5u8; 3 * 1024 * 1024];
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let send = async {
            client_write.write_all(&upload).await.unwrap();
            client_write.shutdown().await.unwrap();
        };
        let receive_then_answer = async {
            let mut received = Vec::new();
            server_read.read_to_end(&mut received).await.unwrap();
            assert!(received == upload, "the upload, then its end");
            server_write.write_all(b"counted").await.unwrap();
            server_write.shutdown().await.unwrap();
        };
        let answer = async {
            let mut answer = Vec::new();
            client_read.read_to_end(&mut answer).await.unwrap();
            answer
        };
        let (joined, (), (), answer) = tokio::join!(
            join(&client_end, &server_end, &count_up, &count_down),
            send,
            receive_then_answer,
            answer,
        );
        joined.unwrap();
        assert_eq!(answer, b"counted");
        assert_eq!(up.load(Ordering::Relaxed), upload.len());
        assert_eq!(down.load(Ordering::Relaxed), b"counted".len());
    }
}
