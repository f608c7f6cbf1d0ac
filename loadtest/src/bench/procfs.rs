//! What a process costs, read from Linux's `/proc`: peak resident memory, its own (anonymous)
//! part, and CPU time.

/// `/proc/PID/stat` counts CPU time in `USER_HZ` ticks, which Linux fixes at 100 per second
/// for userspace whatever the kernel's own tick rate.
pub const TICKS_PER_SECOND: f64 = 100.0;

/// The peak resident set size (`VmHWM`, "high water mark") in bytes, from the text of
/// `/proc/PID/status`.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    kib_field(status, "VmHWM:")
}

/// The resident anonymous memory (`RssAnon`: the process's own heap and stacks, not the
/// executable's code or other files it maps, which its `VmHWM` counts and other processes may
/// share) in bytes, from the text of `/proc/PID/status`.
pub fn parse_rss_anon(status: &str) -> Option<u64> {
    kib_field(status, "RssAnon:")
}

/// The field `name` of `/proc/PID/status`, written in kB (KiB), in bytes.
fn kib_field(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let mut words = rest.split_whitespace();
        let value: u64 = words.next()?.parse().ok()?;
        // The kernel always writes kB (KiB).
        if words.next()? != "kB" {
            return None;
        }
        value.checked_mul(1024)
    })
}

/// User plus system CPU time in ticks, from the text of `/proc/PID/stat`. The command name
/// (field 2) is in parentheses and may itself hold spaces and parentheses, so fields are
/// counted from the last `)`: utime and stime are fields 14 and 15.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // The first field after the name is field 3 (state): utime is the 12th of these.
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// The text of `/proc/PID/status`, if `pid` is alive and readable: read once, parse both
/// [`parse_vm_hwm`] and [`parse_rss_anon`] from it.
pub fn status(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

/// The peak resident set size of `pid` in bytes, if it is alive and readable.
pub fn peak_rss(pid: u32) -> Option<u64> {
    parse_vm_hwm(&status(pid)?)
}

/// The resident anonymous memory of `pid` now, in bytes, if it is alive and readable.
pub fn rss_anon(pid: u32) -> Option<u64> {
    parse_rss_anon(&status(pid)?)
}

/// The CPU time `pid` has used so far, in seconds, if it is alive and readable.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|ticks| ticks as f64 / TICKS_PER_SECOND)
}

/// The CPU time this process has used so far, in seconds.
pub fn own_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_cpu_ticks(&stat).map(|ticks| ticks as f64 / TICKS_PER_SECOND)
}
