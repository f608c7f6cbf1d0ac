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

use std::net::{IpAddr, SocketAddr};

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
pub fn fixed_tcp(ip: IpAddr) -> std::io::Result<SocketAddr> {
    choose(ip, |addr| std::net::TcpListener::bind(addr)?.local_addr())
}

/// The same for a UDP port.
pub fn fixed_udp(ip: IpAddr) -> std::io::Result<SocketAddr> {
    choose(ip, |addr| std::net::UdpSocket::bind(addr)?.local_addr())
}

fn choose(
    ip: IpAddr,
    bind: impl Fn(SocketAddr) -> std::io::Result<SocketAddr>,
) -> std::io::Result<SocketAddr> {
    if let Some(window) = window(ephemeral_range()) {
        let mut rng = rand::rng();
        for _ in 0..TRIES {
            let addr = SocketAddr::new(ip, rng.random_range(window.clone()));
            if let Ok(bound) = bind(addr) {
                return Ok(bound);
            }
        }
    }
    // No room below the ephemeral range (or every try was taken): what the kernel hands out.
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
}
