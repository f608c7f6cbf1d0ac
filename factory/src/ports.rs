//! Ports chosen ahead of the cell that will listen on them.
//!
//! An organism's fixed addresses (its factories, health checkers and front doors, when the
//! operator leaves the port to the organism) are chosen before the cells that bind them start:
//! every cell is told them all. A port the kernel handed out (`bind` to port 0, then close) is
//! free only for a moment: it lies in the kernel's ephemeral range, and the very next outgoing
//! connection or port-0 bind of any process may take it before the cell binds it (`Address
//! already in use`). So a fixed port is chosen below that range, where the kernel never hands
//! ports out by itself; only another explicit bind of the same number can collide, and the
//! choice is checked by binding it.
//!
//! Two organisms started at once on one machine (or two test binaries) choose from the same
//! window, and both checks pass before either cell binds: both are told the same port, and one
//! organism's front door answers as the other's health checker. So a chosen port is also
//! reserved across processes: an exclusive lock on a file named for it in a shared directory,
//! held by the choosing process until it exits (the kernel drops the lock with the process, so a
//! crash leaves nothing reserved). A port another process holds is skipped, and so is one this
//! process already chose (the lock is per open file, so a second choice of the same number in one
//! process conflicts too). Where the directory cannot be used, the bind check alone stands.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use rand::Rng as _;

/// Where the kernel's ephemeral range is read on Linux.
const EPHEMERAL_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// How many ports below the ephemeral range a fixed port is chosen from.
const WIDTH: u16 = 5000;
/// The lowest port the window may reach (below it lie the well-known and registered services
/// an operator is likely to run: databases, brokers, their clustering ports).
const FLOOR: u16 = 20000;
/// How many candidates are tried before giving up on the window.
const TRIES: usize = 64;
/// The directory, under the system's temporary directory, where chosen ports are locked.
const RESERVATIONS: &str = "homeostat-ports";

/// The locks this process holds on the ports it chose, kept until it exits.
static HELD: Mutex<Vec<Flock<File>>> = Mutex::new(Vec::new());

/// The transport a port is chosen for (a TCP and a UDP port of one number do not collide).
#[derive(Clone, Copy, Debug)]
enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// What reserving a port found.
enum Reservation {
    /// This process now holds the port's lock.
    Held(Flock<File>),
    /// Another process (or an earlier choice of this one) holds it.
    Taken,
    /// The shared directory cannot be used: nothing to coordinate with.
    Unavailable,
}

fn reservation_dir() -> PathBuf {
    std::env::temp_dir().join(RESERVATIONS)
}

/// Make the shared directory, once per choice: shared by every user of the machine, like /tmp
/// itself (sticky: each removes only its own). False when it cannot be used.
fn prepare(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    if std::fs::create_dir_all(dir).is_err() {
        return false;
    }
    match std::fs::metadata(dir) {
        Ok(meta) if meta.permissions().mode() & 0o7777 == 0o1777 => true,
        // Ours to open up, or another user's that lets us in anyway.
        Ok(_) => {
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777));
            true
        }
        Err(_) => false,
    }
}

/// Lock the file for `port` in the prepared `dir`. The lock names the port alone, not the
/// address: a port bound on every interface collides with the same port on loopback.
fn reserve(dir: &std::path::Path, transport: Transport, port: u16) -> Reservation {
    let path = dir.join(format!("{}-{port}.lock", transport.name()));
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(file) => file,
        Err(_) => match File::open(&path) {
            // Another user's lock file: flock needs only a descriptor, not write access.
            Ok(file) => file,
            Err(_) => return Reservation::Unavailable,
        },
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => Reservation::Held(locked),
        Err((_, Errno::EWOULDBLOCK)) => Reservation::Taken,
        Err(_) => Reservation::Unavailable,
    }
}

fn hold(file: Flock<File>) {
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
}

/// The kernel's ephemeral port range (first, last), where it can be read.
pub fn ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string(EPHEMERAL_RANGE).ok()?;
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(first)), Some(Ok(last))) => Some((first, last)),
        _ => None,
    }
}

/// The window fixed ports are chosen from: the `WIDTH` ports below the ephemeral range, when
/// that leaves them above `FLOOR`.
fn window(ephemeral: Option<(u16, u16)>) -> Option<std::ops::Range<u16>> {
    let (first, _) = ephemeral?;
    let start = first.checked_sub(WIDTH)?;
    (start >= FLOOR).then_some(start..first)
}

/// A TCP port on `ip` that no socket holds now, outside the kernel's ephemeral range when the
/// machine leaves room below it (else one the kernel hands out, as a last resort).
///
/// The port stays reserved for this process (no other process choosing through this module is
/// handed it, nor this one again) until the process exits.
pub fn fixed_tcp(ip: IpAddr) -> std::io::Result<SocketAddr> {
    choose(&reservation_dir(), ip, Transport::Tcp, |addr| {
        std::net::TcpListener::bind(addr)?.local_addr()
    })
}

/// The same for a UDP port.
pub fn fixed_udp(ip: IpAddr) -> std::io::Result<SocketAddr> {
    choose(&reservation_dir(), ip, Transport::Udp, |addr| {
        std::net::UdpSocket::bind(addr)?.local_addr()
    })
}

fn choose(
    dir: &std::path::Path,
    ip: IpAddr,
    transport: Transport,
    bind: impl Fn(SocketAddr) -> std::io::Result<SocketAddr>,
) -> std::io::Result<SocketAddr> {
    let shared = prepare(dir);
    let try_reserve = |port| {
        if shared {
            reserve(dir, transport, port)
        } else {
            Reservation::Unavailable
        }
    };
    if let Some(window) = window(ephemeral_range()) {
        let mut rng = rand::rng();
        for _ in 0..TRIES {
            let addr = SocketAddr::new(ip, rng.random_range(window.clone()));
            let lock = match try_reserve(addr.port()) {
                Reservation::Taken => continue,
                Reservation::Held(file) => Some(file),
                Reservation::Unavailable => None,
            };
            if let Ok(bound) = bind(addr) {
                if let Some(file) = lock {
                    hold(file);
                }
                return Ok(bound);
            }
            // Bound by something that does not choose through here: the lock drops with `lock`.
        }
    }
    // No room below the ephemeral range (or every try was taken): what the kernel hands out,
    // reserved like the rest so that no other organism is told it.
    for _ in 0..TRIES {
        let bound = bind(SocketAddr::new(ip, 0))?;
        match try_reserve(bound.port()) {
            Reservation::Taken => continue,
            Reservation::Held(file) => hold(file),
            Reservation::Unavailable => {}
        }
        return Ok(bound);
    }
    bind(SocketAddr::new(ip, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_lies_below_the_ephemeral_range() {
        assert_eq!(window(Some((32768, 60999))), Some(27768..32768));
        // Too low to leave room above the floor: no window (the kernel's own choice is used).
        assert_eq!(window(Some((1024, 65535))), None);
        assert_eq!(window(None), None);
    }

    #[test]
    fn a_chosen_port_is_free_and_outside_the_ephemeral_range() {
        let loopback = IpAddr::from([127, 0, 0, 1]);
        let addr = fixed_tcp(loopback).expect("a port");
        if let Some((first, last)) = ephemeral_range() {
            if window(Some((first, last))).is_some() {
                assert!(
                    !(first..=last).contains(&addr.port()),
                    "{addr} is ephemeral"
                );
            }
        }
        // Free: it binds.
        std::net::TcpListener::bind(addr).expect("the chosen port binds");
        let udp = fixed_udp(loopback).expect("a UDP port");
        std::net::UdpSocket::bind(udp).expect("the chosen UDP port binds");
    }

    #[test]
    fn a_reserved_port_is_not_chosen_again() {
        let dir = tempfile::tempdir().expect("a directory");
        let loopback = IpAddr::from([127, 0, 0, 1]);
        // Taken once, a port's lock is refused to every later reservation (in another process
        // as in this one: the lock belongs to the open file).
        let Reservation::Held(_held) = reserve(dir.path(), Transport::Tcp, 40000) else {
            panic!("a fresh port reserves");
        };
        assert!(matches!(
            reserve(dir.path(), Transport::Tcp, 40000),
            Reservation::Taken
        ));
        // The other transport's port of the same number is another port.
        assert!(matches!(
            reserve(dir.path(), Transport::Udp, 40000),
            Reservation::Held(_)
        ));
        // Every port choice skips the ports already chosen: many choices, all different, even
        // though the bind check alone would pass them all (nothing binds them here).
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let addr = choose(dir.path(), loopback, Transport::Tcp, |addr| {
                let bound = std::net::TcpListener::bind(addr)?.local_addr()?;
                Ok(bound)
            })
            .expect("a port");
            assert!(seen.insert(addr.port()), "{addr} was chosen twice");
        }
    }

    #[test]
    fn a_lock_dropped_frees_the_port() {
        let dir = tempfile::tempdir().expect("a directory");
        let held = reserve(dir.path(), Transport::Tcp, 40001);
        assert!(matches!(held, Reservation::Held(_)));
        drop(held);
        // The kernel releases a lock with its file (and with its process, when that exits).
        assert!(matches!(
            reserve(dir.path(), Transport::Tcp, 40001),
            Reservation::Held(_)
        ));
    }
}
