//! A fixed address handed from a live cell to its successor, without a refused or reset
//! connection: the listening socket itself is passed on (`SCM_RIGHTS` over a Unix socket in the
//! data directory), as HAProxy's seamless reload and systemd's socket activation do.
//!
//! A cell of a fixed-address role (front door, health checker) that binds its address offers a
//! copy of its listening socket at `DATA_DIR/handover/ADDR.sock`. A new cell started on the same
//! address while the old one lives (a live upgrade: mitosis before apoptosis) finds the address
//! taken, asks there, and receives the very same socket: both accept from one queue, so when the
//! old cell drains and closes its copy, every connection waiting in the queue is still taken by
//! the new one. The new cell then offers the socket in its turn.
//!
//! The Unix socket is created mode 0600 in the organism's data directory: only the organism's
//! user can take its addresses.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::net::TcpListener;

/// Where the offer for `listen` lives.
fn offer_path(dir: &Path, listen: &str) -> PathBuf {
    dir.join(format!(
        "{}.sock",
        listen.replace([':', '/', '[', ']'], "_")
    ))
}

/// Bind `listen`, or take its socket over from the live cell that holds it; then offer it to a
/// successor.
pub async fn bind(
    role: &str,
    listen: &str,
    dir: &Path,
    take_over: bool,
) -> anyhow::Result<TcpListener> {
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) if take_over && e.kind() == std::io::ErrorKind::AddrInUse => {
            let path = offer_path(dir, listen);
            let taken = tokio::task::spawn_blocking(move || take(&path))
                .await
                .context("taking over a listening socket")?
                .with_context(|| {
                    format!("binding the {role} to {listen}: it is in use, and no cell offers it")
                })?;
            let local = taken.local_addr()?;
            if local.to_string() != listen {
                anyhow::bail!("the socket offered for {listen} listens on {local}");
            }
            taken.set_nonblocking(true)?;
            tracing::info!(
                listen,
                "took the listening socket over from the cell that held it"
            );
            TcpListener::from_std(taken)?
        }
        Err(e) => return Err(e).with_context(|| format!("binding the {role} to {listen}")),
    };
    // Only a fixed address has a successor to hand over to.
    if !listen.ends_with(":0") {
        offer(&listener, dir, listen)?;
    }
    Ok(listener)
}

/// Serve copies of `listener`'s socket at the offer path, from a thread of its own, for the
/// life of the process.
fn offer(listener: &TcpListener, dir: &Path, listen: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let socket: OwnedFd = listener.as_fd().try_clone_to_owned()?;
    let path = offer_path(dir, listen);
    // A predecessor's offer (alive or not) gives way: the successor offers from now on.
    let _ = std::fs::remove_file(&path);
    let unix =
        UnixListener::bind(&path).with_context(|| format!("offering at {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            for stream in unix.incoming() {
                match stream.and_then(|s| give(&s, socket.as_raw_fd())) {
                    Ok(()) => tracing::info!("handed the listening socket to a successor"),
                    Err(e) => tracing::warn!(error = %e, "a handover failed"),
                }
            }
        })?;
    Ok(())
}

fn give(stream: &UnixStream, fd: RawFd) -> std::io::Result<()> {
    let fds = [fd];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(b"L")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

fn take(path: &Path) -> std::io::Result<std::net::TcpListener> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            let mut owned: Vec<OwnedFd> = fds
                .into_iter()
                // SAFETY: the kernel has just installed these descriptors in this process
                // (SCM_RIGHTS); nothing else refers to them, so each is owned exactly once here.
                .map(|fd| {
                    #[allow(unsafe_code)] // taking ownership of descriptors received by recvmsg
                    unsafe {
                        OwnedFd::from_raw_fd(fd)
                    }
                })
                .collect();
            if let Some(fd) = owned.pop() {
                return Ok(std::net::TcpListener::from(fd));
            }
        }
    }
    Err(std::io::Error::other("the offer carried no socket"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_successor_takes_the_same_socket_and_no_connection_is_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let listen = first.local_addr().expect("addr").to_string();
        offer(&first, dir.path(), &listen).expect("offer");
        // Not asked to take over (two cells given one address): an error, the socket untouched.
        let refused = bind("frontdoor", &listen, dir.path(), false).await;
        assert!(
            refused.is_err(),
            "a taken address is not taken over unasked"
        );
        let second = bind("frontdoor", &listen, dir.path(), true)
            .await
            .expect("take over");
        assert_eq!(second.local_addr().expect("addr").to_string(), listen);
        // A connection made now waits in the one queue; the first cell closes its copy
        // (drains) and the second still accepts it.
        let _client = tokio::net::TcpStream::connect(&listen)
            .await
            .expect("connected");
        drop(first);
        let accepted = tokio::time::timeout(Duration::from_secs(5), second.accept()).await;
        assert!(matches!(accepted, Ok(Ok(_))), "the successor accepts it");
    }
}
