//! The SSRF guard: the crawler only connects to globally routable addresses, or to addresses the
//! configuration allows explicitly.
//!
//! Names go through [`GuardedResolver`], which reqwest uses for every connection (so redirects
//! and robots.txt fetches are covered as well); literal IP hosts never reach a resolver, so
//! [`check_literal_host`] must be called before each request.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Why an address may not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("address {addr} is not allowed ({class})")]
    Address { addr: IpAddr, class: &'static str },
    #[error("{name} resolves to no address")]
    NoAddress { name: String },
}

/// The class of a non-globally-routable address, `None` for a public one.
pub fn non_global_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => v6_class(v6),
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let class = match (a, b, c) {
        _ if ip == Ipv4Addr::new(169, 254, 169, 254) => "cloud metadata",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_broadcast() => "broadcast",
        (0, _, _) => "this network",
        (127, _, _) => "loopback",
        (10, _, _) => "private",
        (172, 16..=31, _) => "private",
        (192, 168, _) => "private",
        (169, 254, _) => "link-local",
        (100, 64..=127, _) => "shared address space (CGNAT)",
        (192, 0, 0) => "IETF protocol assignments",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking",
        (192, 88, 99) => "6to4 relay anycast",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved",
        _ => return None,
    };
    Some(class)
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        // ::ffff:a.b.c.d is the IPv4 address a.b.c.d on a dual-stack socket.
        return v4_class(v4);
    }
    let seg = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    let class = match seg {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        // ::a.b.c.d, the deprecated IPv4-compatible form: judge the embedded address.
        [0, 0, 0, 0, 0, 0, hi, lo] => return v4_class(embedded_v4(hi, lo)).or(Some("reserved")),
        // NAT64 (64:ff9b::/96 and the local-use 64:ff9b:1::/48) reach the embedded IPv4 address.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => return v4_class(embedded_v4(hi, lo)),
        [0x64, 0xff9b, 1, ..] => "NAT64 local use",
        // 6to4 embeds the IPv4 address in the prefix.
        [0x2002, hi, lo, ..] => return v4_class(embedded_v4(hi, lo)),
        [0x100, 0, 0, 0, ..] => "discard-only",
        [0x2001, 0xdb8, ..] => "documentation",
        [0x2001, 0x0..=0x1ff, ..] => "IETF protocol assignments",
        [s0, ..] if s0 & 0xfe00 == 0xfc00 => "unique local (ULA)",
        [s0, ..] if s0 & 0xffc0 == 0xfe80 => "link-local",
        [s0, ..] if s0 & 0xffc0 == 0xfec0 => "site-local",
        [s0, ..] if s0 & 0xff00 == 0xff00 => "multicast",
        // Only 2000::/3 is allocated as global unicast.
        [s0, ..] if s0 & 0xe000 != 0x2000 => "reserved",
        _ => return None,
    };
    Some(class)
}

/// The policy: which addresses may be connected to.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allow: Vec<IpNet>,
}

impl AddressPolicy {
    pub fn new(allow: Vec<IpNet>) -> Self {
        Self { allow }
    }

    /// `Ok` when `ip` is globally routable or inside an allowed network.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        // Judge the IPv4 address behind an IPv4-mapped IPv6 one against the allowlist too.
        let plain = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        if self
            .allow
            .iter()
            .any(|net| net.contains(&ip) || net.contains(&plain))
        {
            return Ok(());
        }
        match non_global_class(ip) {
            None => Ok(()),
            Some(class) => Err(Refusal::Address { addr: ip, class }),
        }
    }
}

/// Refuse a URL whose host is a literal IP address that the policy does not allow.
pub fn check_literal_host(policy: &AddressPolicy, url: &Url) -> Result<(), Refusal> {
    match url.host() {
        Some(Host::Ipv4(v4)) => policy.check(IpAddr::V4(v4)),
        Some(Host::Ipv6(v6)) => policy.check(IpAddr::V6(v6)),
        Some(Host::Domain(_)) | None => Ok(()),
    }
}

/// Static name -> address overrides: a key matches its exact name, a key starting with `.`
/// matches every name ending with it, and a plain key also matches its subdomains. The
/// longest matching key wins.
#[derive(Debug, Clone, Default)]
pub struct StaticNames {
    entries: Vec<(String, SocketAddr)>,
}

impl StaticNames {
    pub fn new(map: &BTreeMap<String, SocketAddr>) -> Self {
        let mut entries: Vec<(String, SocketAddr)> = map
            .iter()
            .map(|(k, v)| (k.trim_end_matches('.').to_ascii_lowercase(), *v))
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
        Self { entries }
    }

    pub fn lookup(&self, name: &str) -> Option<SocketAddr> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.entries.iter().find_map(|(key, addr)| {
            let hit = if let Some(suffix) = key.strip_prefix('.') {
                name == suffix || name.ends_with(key.as_str())
            } else {
                name == *key
                    || name
                        .strip_suffix(key.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            };
            hit.then_some(*addr)
        })
    }
}

/// reqwest's resolver: static names first, then the system resolver, then the address policy.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    names: Arc<StaticNames>,
    policy: Arc<AddressPolicy>,
}

impl GuardedResolver {
    pub fn new(names: Arc<StaticNames>, policy: Arc<AddressPolicy>) -> Self {
        Self { names, policy }
    }

    /// Resolve `name` to the addresses the policy allows, or say why there are none.
    pub async fn resolve_allowed(&self, name: &str) -> Result<Vec<SocketAddr>, ResolveError> {
        let candidates: Vec<SocketAddr> = match self.names.lookup(name) {
            Some(addr) => vec![addr],
            None => tokio::net::lookup_host((name, 0))
                .await
                .map_err(|e| ResolveError::Lookup(format!("dns lookup of {name} failed: {e}")))?
                .collect(),
        };
        let mut first_refusal = None;
        let allowed: Vec<SocketAddr> = candidates
            .into_iter()
            .filter(|addr| match self.policy.check(addr.ip()) {
                Ok(()) => true,
                Err(refusal) => {
                    first_refusal.get_or_insert(refusal);
                    false
                }
            })
            .collect();
        if allowed.is_empty() {
            let refusal = first_refusal.unwrap_or(Refusal::NoAddress {
                name: name.to_string(),
            });
            tracing::debug!(name, %refusal, "ssrf guard refused a name");
            return Err(ResolveError::Refused(refusal));
        }
        Ok(allowed)
    }
}

/// A resolution failure. `Refused` is how the fetch code tells an SSRF refusal from a DNS error
/// once reqwest has wrapped it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error("{0}")]
    Refused(Refusal),
    #[error("{0}")]
    Lookup(String),
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        let name = name.as_str().to_string();
        Box::pin(async move {
            let addrs = this.resolve_allowed(&name).await?;
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip literal")
    }

    #[test]
    fn classifies_non_global_addresses() {
        let cases = [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("::1", "loopback"),
            ("10.0.0.1", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.1.1", "link-local"),
            ("169.254.169.254", "cloud metadata"),
            ("fc00::1", "unique local (ULA)"),
            ("fd12:3456::1", "unique local (ULA)"),
            ("fe80::1", "link-local"),
            ("100.64.0.1", "shared address space (CGNAT)"),
            ("100.127.255.254", "shared address space (CGNAT)"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.1.2.3", "private"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("64:ff9b::a00:1", "private"),
            ("2002:7f00:1::", "loopback"),
            ("2001:db8::1", "documentation"),
        ];
        for (addr, want) in cases {
            assert_eq!(non_global_class(ip(addr)), Some(want), "{addr}");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(non_global_class(ip(public)), None, "{public}");
        }
    }

    #[test]
    fn policy_allows_listed_networks_only() {
        let policy = AddressPolicy::new(vec!["127.0.0.1/32".parse().expect("net")]);
        assert_eq!(policy.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(policy.check(ip("::ffff:127.0.0.1")), Ok(()));
        let err = policy.check(ip("127.0.0.2")).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "address 127.0.0.2 is not allowed (loopback)"
        );
        let err = AddressPolicy::default()
            .check(ip("10.0.0.1"))
            .expect_err("refused");
        assert_eq!(err.to_string(), "address 10.0.0.1 is not allowed (private)");
        assert_eq!(AddressPolicy::default().check(ip("93.184.216.34")), Ok(()));
    }

    #[test]
    fn literal_hosts_are_checked() {
        let policy = AddressPolicy::default();
        for raw in [
            "http://127.0.0.1:8080/",
            "http://[::1]/",
            "http://169.254.169.254/latest/",
            "http://[::ffff:10.0.0.1]/",
        ] {
            let url = Url::parse(raw).expect("url");
            assert!(check_literal_host(&policy, &url).is_err(), "{raw}");
        }
        let url = Url::parse("http://a.test/").expect("url");
        assert_eq!(check_literal_host(&policy, &url), Ok(()));
    }

    #[test]
    fn static_names_match_exact_and_suffix() {
        let a: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:2".parse().expect("addr");
        let c: SocketAddr = "127.0.0.1:3".parse().expect("addr");
        let names = StaticNames::new(
            &[
                (".test".to_string(), a),
                ("www.a.test".to_string(), b),
                ("b.example".to_string(), c),
            ]
            .into(),
        );
        assert_eq!(names.lookup("a.test"), Some(a));
        assert_eq!(names.lookup("x.y.test"), Some(a));
        assert_eq!(names.lookup("WWW.A.TEST"), Some(b));
        assert_eq!(names.lookup("b.example"), Some(c));
        assert_eq!(names.lookup("sub.b.example"), Some(c));
        assert_eq!(names.lookup("bb.example"), None);
        assert_eq!(names.lookup("test.org"), None);
    }

    #[tokio::test]
    async fn resolver_refuses_names_of_internal_addresses() {
        let names = Arc::new(StaticNames::new(
            &[(".test".to_string(), "10.0.0.1:80".parse().expect("addr"))].into(),
        ));
        let resolver = GuardedResolver::new(names.clone(), Arc::new(AddressPolicy::default()));
        let err = resolver
            .resolve_allowed("a.test")
            .await
            .expect_err("refused");
        assert_eq!(err.to_string(), "address 10.0.0.1 is not allowed (private)");
        // localhost comes from the system resolver (/etc/hosts), no network needed.
        let err = resolver
            .resolve_allowed("localhost")
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("loopback"), "{err}");

        let allowing = GuardedResolver::new(
            names,
            Arc::new(AddressPolicy::new(vec!["10.0.0.0/8".parse().expect("net")])),
        );
        let addrs = allowing.resolve_allowed("a.test").await.expect("allowed");
        assert_eq!(
            addrs,
            vec!["10.0.0.1:80".parse::<SocketAddr>().expect("addr")]
        );
    }
}
