//! The `wol` provider: Wake-on-LAN for pool machines without a BMC, and [`WakeListener`], the
//! machine side of a magic packet for tests and the load generator.
//!
//! Power on sends one magic packet (6 x 0xFF, then the machine's MAC 16 times, then the optional
//! 6-byte SecureOn password from the server's credentials) as a UDP datagram to the server's
//! `broadcast` address (`255.255.255.255:9` when omitted), with `SO_BROADCAST` set. UDP may lose
//! it: the factory's join timeout and retries cover that, as they cover a machine that does not
//! boot.
//!
//! Wake-on-LAN has no way back: [`WolProvider::status`] is always [`PowerState::Unknown`], and the
//! factory learns that a machine is on from its cell's heartbeats (and that it is off from their
//! end). Nor can a packet turn a machine off: [`WolProvider::power_off`] asks the machine's cell,
//! through a [`ShutdownAsker`], to drain and shut its machine down.
//!
//! A magic packet cannot carry [`JoinData`] either: the machine reads its join URL and token from
//! its own boot configuration or DNS TXT records.

use std::io;
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::process::{Child, Command};
use tokio::sync::{watch, Mutex};

use super::{read_credentials, JoinData, PowerError, PowerProvider, PowerState, ServerSpec};

/// Where magic packets go when a server names no `broadcast`.
pub const DEFAULT_BROADCAST: &str = "255.255.255.255:9";

/// A MAC address.
pub type Mac = [u8; 6];
/// A SecureOn password.
pub type SecureOn = [u8; 6];

/// Six bytes as `aa:bb:cc:dd:ee:ff` (or with '-' between, as Windows writes them).
pub fn parse_six_bytes(text: &str) -> Result<[u8; 6], String> {
    let text = text.trim();
    let separator = if text.contains('-') { '-' } else { ':' };
    let parts: Vec<&str> = text.split(separator).collect();
    if parts.len() != 6 {
        return Err(format!(
            "{text:?} is not six hexadecimal bytes like aa:bb:cc:dd:ee:ff"
        ));
    }
    let mut bytes = [0u8; 6];
    for (byte, part) in bytes.iter_mut().zip(&parts) {
        if part.len() != 2 {
            return Err(format!("{text:?}: {part:?} is not two hexadecimal digits"));
        }
        *byte = u8::from_str_radix(part, 16)
            .map_err(|_| format!("{text:?}: {part:?} is not two hexadecimal digits"))?;
    }
    Ok(bytes)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The magic packet: 6 x 0xFF, 16 x MAC, then the SecureOn password if any (102 or 108 bytes).
pub fn magic_packet(mac: &Mac, password: Option<&SecureOn>) -> Vec<u8> {
    let mut packet = Vec::with_capacity(108);
    packet.extend_from_slice(&[0xFF; 6]);
    for _ in 0..16 {
        packet.extend_from_slice(mac);
    }
    if let Some(password) = password {
        packet.extend_from_slice(password);
    }
    packet
}

/// What a datagram held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MagicPacket {
    pub mac: Mac,
    /// The six bytes after the sixteen MACs, when the datagram has them.
    pub password: Option<SecureOn>,
}

/// Find the magic sequence in a datagram. As a network card does, it is looked for anywhere in
/// the payload: 6 x 0xFF followed by one MAC 16 times. `None` when there is none.
pub fn parse_magic_packet(datagram: &[u8]) -> Option<MagicPacket> {
    const BODY: usize = 6 + 16 * 6;
    if datagram.len() < BODY {
        return None;
    }
    (0..=datagram.len() - BODY).find_map(|start| {
        let candidate = &datagram[start..];
        if candidate[..6] != [0xFF; 6] {
            return None;
        }
        let mac: Mac = candidate[6..12].try_into().expect("six bytes were sliced");
        if !candidate[6..BODY].chunks_exact(6).all(|chunk| chunk == mac) {
            return None;
        }
        let password = candidate
            .get(BODY..BODY + 6)
            .map(|p| p.try_into().expect("six bytes were sliced"));
        Some(MagicPacket { mac, password })
    })
}

/// Asks a machine's cell to drain and shut its machine down. The factory implements it with a
/// signed control message to the cell; tests with whatever stands for the machine.
#[async_trait::async_trait]
pub trait ShutdownAsker: Send + Sync {
    /// Returns once the cell accepted the request (not once the machine is off: that shows as the
    /// end of its heartbeats).
    async fn ask(&self, server: &ServerSpec) -> Result<(), PowerError>;
}

/// Wake-on-LAN power control.
#[derive(Clone)]
pub struct WolProvider {
    asker: Arc<dyn ShutdownAsker>,
}

impl std::fmt::Debug for WolProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WolProvider").finish_non_exhaustive()
    }
}

impl WolProvider {
    /// `asker` turns machines off (a magic packet cannot).
    pub fn new(asker: Arc<dyn ShutdownAsker>) -> Self {
        Self { asker }
    }

    /// Send the server's magic packet; returns the address it went to.
    pub async fn wake(&self, server: &ServerSpec) -> Result<SocketAddr, PowerError> {
        let config = |detail: String| PowerError::Config {
            server: server.name.clone(),
            detail,
        };
        let mac_text = server
            .mac
            .as_deref()
            .ok_or_else(|| config("mac: missing (required for wol)".to_string()))?;
        let mac = parse_six_bytes(mac_text).map_err(|e| config(format!("mac: {e}")))?;
        let password = read_credentials(server)?
            .map(|secret| {
                parse_six_bytes(&secret)
                    .map_err(|e| config(format!("credentials: SecureOn password: {e}")))
            })
            .transpose()?;
        let target_text = server.broadcast.as_deref().unwrap_or(DEFAULT_BROADCAST);
        let target = resolve(target_text)
            .await
            .map_err(|e| config(format!("broadcast {target_text:?}: {e}")))?;
        let transient = |doing: &str, e: io::Error| PowerError::Transient {
            server: server.name.clone(),
            detail: format!("wake-on-lan to {target}: {doing}: {e}"),
        };
        let bind: SocketAddr = if target.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind)
            .await
            .map_err(|e| transient("binding a socket", e))?;
        socket
            .set_broadcast(true)
            .map_err(|e| transient("setting SO_BROADCAST", e))?;
        let packet = magic_packet(&mac, password.as_ref());
        let sent = socket
            .send_to(&packet, target)
            .await
            .map_err(|e| transient("sending the magic packet", e))?;
        if sent != packet.len() {
            return Err(transient(
                "sending the magic packet",
                io::Error::other(format!("sent {sent} of {} bytes", packet.len())),
            ));
        }
        tracing::debug!(server = %server.name, mac = %format_mac(&mac), %target, secure_on = password.is_some(), "wol: magic packet sent");
        Ok(target)
    }
}

/// `host:port` to a socket address (a literal address without a lookup).
async fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| "not host:port".to_string())?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} resolves to no address"))
}

#[async_trait::async_trait]
impl PowerProvider for WolProvider {
    /// One magic packet. The join data stays unused: a magic packet cannot carry it.
    async fn power_on(&self, server: &ServerSpec, _join: &JoinData) -> Result<(), PowerError> {
        self.wake(server).await.map(|_| ())
    }

    /// Ask the machine's cell to drain and shut its machine down.
    async fn power_off(&self, server: &ServerSpec) -> Result<(), PowerError> {
        self.asker.ask(server).await
    }

    /// Always [`PowerState::Unknown`]: Wake-on-LAN cannot tell. The factory goes by heartbeats.
    async fn status(&self, _server: &ServerSpec) -> Result<PowerState, PowerError> {
        Ok(PowerState::Unknown)
    }
}

/// What a [`WakeListener`] has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WakeCounts {
    /// Magic packets that started the machine.
    pub woken: u64,
    /// Magic packets for this machine while it was already running (nothing to do).
    pub already_awake: u64,
    /// Magic packets for another MAC.
    pub other_mac: u64,
    /// Magic packets for this MAC with a missing or wrong SecureOn password.
    pub bad_password: u64,
    /// Datagrams holding no magic packet.
    pub garbage: u64,
    /// Machine processes that could not be started (the error is logged).
    pub start_failures: u64,
    /// Machine processes that ended (shut down or exited by themselves).
    pub stopped: u64,
}

impl WakeCounts {
    /// Datagrams that did not start anything.
    pub fn ignored(&self) -> u64 {
        self.other_mac + self.bad_password + self.garbage
    }
}

/// The listener's view, published on every change.
#[derive(Debug, Clone, Default)]
pub struct WakeState {
    pub counts: WakeCounts,
    /// The running machine process.
    pub machine: Option<u32>,
    /// When the last machine was started.
    pub last_wake: Option<Instant>,
}

/// Builds the command a wake runs (called once per wake).
pub type MachineCommand = Box<dyn Fn() -> Command + Send + Sync>;

/// The machine side of Wake-on-LAN, on a UDP socket: a datagram holding a magic packet for its
/// MAC (with its SecureOn password, when it has one) starts the machine, a process built by its
/// [`MachineCommand`] (in tests an observable process, for a pool a blank `cell boot`). While the
/// machine runs, further packets change nothing. Packets for other MACs, with a wrong password,
/// or holding no magic packet are ignored and counted. The machine runs in its own process group,
/// killed whole when the listener is dropped.
pub struct WakeListener {
    local_addr: SocketAddr,
    state: watch::Receiver<WakeState>,
    machine: Arc<Mutex<Option<Child>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WakeListener {
    /// Listen on `address` (e.g. `127.0.0.1:0`) for `mac`'s magic packets.
    pub async fn bind(
        address: SocketAddr,
        mac: Mac,
        password: Option<SecureOn>,
        machine_command: MachineCommand,
    ) -> io::Result<Self> {
        let socket = UdpSocket::bind(address).await?;
        let local_addr = socket.local_addr()?;
        let (publish, state) = watch::channel(WakeState::default());
        let machine: Arc<Mutex<Option<Child>>> = Arc::new(Mutex::new(None));
        let task = tokio::spawn(listen(
            socket,
            mac,
            password,
            machine_command,
            publish,
            machine.clone(),
        ));
        Ok(Self {
            local_addr,
            state,
            machine,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn state(&self) -> WakeState {
        self.state.borrow().clone()
    }

    pub fn counts(&self) -> WakeCounts {
        self.state.borrow().counts
    }

    /// Wait until the state satisfies `done` (or the listener has stopped: then the last state).
    pub async fn wait_for(&self, mut done: impl FnMut(&WakeState) -> bool) -> WakeState {
        let mut state = self.state.clone();
        let seen = state.wait_for(|s| done(s)).await.map(|seen| seen.clone());
        match seen {
            Ok(seen) => seen,
            Err(_) => state.borrow().clone(),
        }
    }

    /// Shut the machine down as its cell would: SIGTERM to its process group, SIGKILL after
    /// `grace`. Returns how it exited, `None` when no machine was running.
    pub async fn shut_down_machine(&self, grace: Duration) -> io::Result<Option<ExitStatus>> {
        let mut slot = self.machine.lock().await;
        let Some(child) = slot.as_mut() else {
            return Ok(None);
        };
        if let Some(pid) = child.id() {
            signal_group(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let status = match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                if let Some(pid) = child.id() {
                    signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                }
                child.wait().await?
            }
        };
        Ok(Some(status))
    }
}

impl Drop for WakeListener {
    fn drop(&mut self) {
        self.task.abort();
        // The whole group (a machine may have children); the child's kill_on_drop covers the
        // machine's own process in any case.
        let running = self.state.borrow().machine;
        if let Some(pid) = running {
            signal_group(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn signal_group(pid: u32, signal: nix::sys::signal::Signal) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // ESRCH: the group is gone already.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
}

async fn listen(
    socket: UdpSocket,
    mac: Mac,
    password: Option<SecureOn>,
    machine_command: MachineCommand,
    publish: watch::Sender<WakeState>,
    machine: Arc<Mutex<Option<Child>>>,
) {
    let mut buffer = vec![0u8; 2048];
    // Reaps the machine when it ends, so a later packet can start it again.
    let mut reaper = tokio::time::interval(Duration::from_millis(50));
    reaper.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buffer) => {
                let (length, from) = match received {
                    Ok(received) => received,
                    Err(e) => {
                        // ICMP errors from earlier sends and the like: nothing to stop for.
                        tracing::debug!(error = %e, "wake listener: receive failed");
                        continue;
                    }
                };
                let packet = parse_magic_packet(&buffer[..length]);
                let mut slot = machine.lock().await;
                reap(&mut slot, &publish);
                let verdict = match packet {
                    None => Verdict::Garbage,
                    Some(p) if p.mac != mac => Verdict::OtherMac,
                    Some(p) if password.is_some() && p.password != password => Verdict::BadPassword,
                    Some(_) if slot.is_some() => Verdict::AlreadyAwake,
                    Some(_) => Verdict::Wake,
                };
                match verdict {
                    Verdict::Wake => {
                        let mut command = machine_command();
                        command.kill_on_drop(true).process_group(0);
                        match command.spawn() {
                            Ok(child) => {
                                let pid = child.id();
                                *slot = Some(child);
                                tracing::info!(%from, mac = %format_mac(&mac), pid, "wake listener: machine started");
                                publish.send_modify(|s| {
                                    s.counts.woken += 1;
                                    s.machine = pid;
                                    s.last_wake = Some(Instant::now());
                                });
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "wake listener: starting the machine failed");
                                publish.send_modify(|s| s.counts.start_failures += 1);
                            }
                        }
                    }
                    Verdict::AlreadyAwake => publish.send_modify(|s| s.counts.already_awake += 1),
                    Verdict::OtherMac => publish.send_modify(|s| s.counts.other_mac += 1),
                    Verdict::BadPassword => publish.send_modify(|s| s.counts.bad_password += 1),
                    Verdict::Garbage => publish.send_modify(|s| s.counts.garbage += 1),
                }
            }
            _ = reaper.tick() => {
                let mut slot = machine.lock().await;
                reap(&mut slot, &publish);
            }
        }
    }
}

enum Verdict {
    Wake,
    AlreadyAwake,
    OtherMac,
    BadPassword,
    Garbage,
}

/// Forget a machine process that has ended.
fn reap(slot: &mut Option<Child>, publish: &watch::Sender<WakeState>) {
    let Some(child) = slot.as_mut() else { return };
    match child.try_wait() {
        Ok(None) => {}
        Ok(Some(status)) => {
            tracing::info!(%status, "wake listener: machine stopped");
            *slot = None;
            publish.send_modify(|s| {
                s.counts.stopped += 1;
                s.machine = None;
            });
        }
        Err(e) => tracing::warn!(error = %e, "wake listener: polling the machine failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn mac_and_password_parse() {
        assert_eq!(parse_six_bytes("52:54:00:12:34:56"), Ok(MAC));
        assert_eq!(parse_six_bytes("52-54-00-12-34-56"), Ok(MAC));
        assert_eq!(parse_six_bytes(" 52:54:00:12:34:56\n"), Ok(MAC));
        assert!(parse_six_bytes("52:54:00:12:34").is_err());
        assert!(parse_six_bytes("52:54:00:12:34:5g").is_err());
        assert!(parse_six_bytes("52:54:00:12:34:567").is_err());
        assert!(parse_six_bytes("").is_err());
        assert_eq!(format_mac(&MAC), "52:54:00:12:34:56");
    }

    #[test]
    fn magic_packet_round_trips() {
        let plain = magic_packet(&MAC, None);
        assert_eq!(plain.len(), 102);
        assert_eq!(&plain[..6], &[0xFF; 6]);
        assert_eq!(&plain[96..102], &MAC);
        assert_eq!(
            parse_magic_packet(&plain),
            Some(MagicPacket {
                mac: MAC,
                password: None
            })
        );
        let password = [1, 2, 3, 4, 5, 6];
        let secure = magic_packet(&MAC, Some(&password));
        assert_eq!(secure.len(), 108);
        assert_eq!(
            parse_magic_packet(&secure),
            Some(MagicPacket {
                mac: MAC,
                password: Some(password)
            })
        );
        // Found after a prefix, as a card finds it anywhere in a frame.
        let mut prefixed = vec![0x00, 0xFF, 0x17];
        prefixed.extend_from_slice(&plain);
        assert_eq!(parse_magic_packet(&prefixed).map(|p| p.mac), Some(MAC));
    }

    #[test]
    fn garbage_is_no_magic_packet() {
        assert_eq!(parse_magic_packet(b""), None);
        assert_eq!(
            parse_magic_packet(&[0xFF; 200]).map(|p| p.mac),
            Some([0xFF; 6])
        );
        let mut broken = magic_packet(&MAC, None);
        broken[50] ^= 1;
        assert_eq!(parse_magic_packet(&broken), None);
        assert_eq!(parse_magic_packet(&magic_packet(&MAC, None)[..101]), None);
        assert_eq!(parse_magic_packet(b"hello, machine"), None);
    }
}
