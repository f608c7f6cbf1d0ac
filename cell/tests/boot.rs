//! `cell boot`, a blank machine joining: the join URL comes from DNS TXT records keyed by the
//! machine's host name (dnsmasq on loopback), the token is one-time. A fresh token lets the
//! machine in (it becomes the role it is given, and the lineage is recorded); a reused, expired,
//! forged or unknown token is refused and starts nothing.

use std::process::Stdio;
use std::time::Duration;

use engines::pool::{NewToken, PoolLedger};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

mod support;

/// A process killed with its whole group when the test ends, even when it panics.
struct Guard(Option<Child>);

impl Guard {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }

    /// Wait for the process to end and collect what it printed.
    async fn output(mut self) -> std::process::Output {
        let child = self.0.take().expect("running");
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("ends within 60 s")
            .expect("output")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.as_ref().and_then(Child::id) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn spawn(cmd: &mut Command) -> Guard {
    cmd.kill_on_drop(true).process_group(0);
    Guard(Some(cmd.spawn().expect("spawn")))
}

fn free_udp_port() -> u16 {
    factory::ports::fixed_udp([127, 0, 0, 1].into())
        .expect("a free UDP port")
        .port()
}

/// dnsmasq serving the machine's TXT records on loopback.
fn dnsmasq(dir: &std::path::Path, port: u16, records: &[&str]) -> Guard {
    let dnsmasq = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("dnsmasq is not installed: run scripts/pool-tools.sh");
    let mut cmd = Command::new(dnsmasq);
    cmd.arg("--no-daemon")
        .arg("--keep-in-foreground")
        .arg(format!("--port={port}"))
        .arg("--listen-address=127.0.0.1")
        .arg("--bind-interfaces")
        .arg("--no-resolv")
        .arg("--no-hosts")
        .arg("--no-poll")
        .arg("--user=root")
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
        .arg("--conf-file=/dev/null");
    for r in records {
        cmd.arg(format!("--txt-record={r}"));
    }
    spawn(cmd.stdout(Stdio::null()).stderr(Stdio::null()))
}

async fn wait_dns(port: u16) {
    // dnsmasq answers once it is bound.
    for _ in 0..100 {
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("dnsmasq did not bind 127.0.0.1:{port}");
}

const POOL: &str = "[[server]]\nname = \"box-1\"\nprovider = \"local\"\nhourly_cost = 0.1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_machine_joins_with_dns_configuration_and_a_one_time_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::write(dir.path().join("pool.toml"), POOL).expect("pool.toml");
    std::fs::write(
        dir.path().join("budget.toml"),
        "per_hour = 1\nper_month = 10\n",
    )
    .expect("budget");
    let infra = dir.path().join("organism.toml");
    std::fs::write(
        &infra,
        format!(
            "[organism]\ndata_dir = \"{}\"\n\n[pool]\nfile = \"pool.toml\"\nbudget = \"budget.toml\"\n",
            data.display()
        ),
    )
    .expect("organism.toml");

    // A factory with the pool: its /join is what the machine will find through DNS.
    let mut factory = spawn(
        Command::new(env!("CARGO_BIN_EXE_cell"))
            .args(["run", "factory", "--listen", "127.0.0.1:0", "--infra"])
            .arg(&infra)
            .env(control::KEY_ENV, support::test_key().to_hex())
            .env_remove("DATABASE_URL")
            .env("HOMEOSTAT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let stdout = factory.child().stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if let Ok(Some(r)) = vitals::ReadyLine::parse(&line) {
                return r;
            }
        }
        panic!("the factory exited before it was ready")
    })
    .await
    .expect("factory ready within 60 s");
    let join_url = format!("http://{}", ready.addr.trim_start_matches("http://"));

    let port = free_udp_port();
    let record = format!("box-1.pool.test,join={join_url}");
    let _dns = dnsmasq(
        dir.path(),
        port,
        &[&record, "box-2.pool.test,not-a-setting"],
    );
    wait_dns(port).await;

    let ledger = PoolLedger::open_sqlite(&data.join("store.db").to_string_lossy())
        .await
        .expect("the factory's pool ledger");
    let now = factory::pool::now_ms();
    let token = |id: &str, expires_at_ms: i64| NewToken {
        id: id.into(),
        secret: "s3cretsecretsecr".into(),
        role: "crawler".into(),
        server: Some("box-1".into()),
        parent: Some("test-parent".into()),
        request_key: None,
        issued_at_ms: now,
        expires_at_ms,
    };
    ledger
        .issue_token(&token("fresh1", now + 600_000))
        .await
        .expect("issue");
    ledger
        .issue_token(&token("stale1", now - 1))
        .await
        .expect("issue");

    let boot = |host: &str, token: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cell"));
        cmd.arg("boot")
            .arg("--dns")
            .arg(format!("127.0.0.1:{port}"))
            .args([
                "--dns-domain",
                "pool.test",
                "--hostname",
                host,
                "--token",
                token,
            ])
            .arg("--state-dir")
            .arg(dir.path().join(format!("machine-{host}")))
            .args(["--join-timeout-secs", "5"])
            .env_remove(control::KEY_ENV)
            .env_remove("DATABASE_URL")
            .env("HOMEOSTAT_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        spawn(&mut cmd)
    };

    // The fresh token: the machine joins and becomes a crawler (its ready line says so).
    let mut machine = boot("box-1", "fresh1.s3cretsecretsecr");
    let out = machine.child().stdout.take().expect("stdout");
    let mut out = BufReader::new(out).lines();
    let became = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = out.next_line().await.expect("read") {
            if let Ok(Some(r)) = vitals::ReadyLine::parse(&line) {
                return r;
            }
        }
        panic!("the machine exited before its cell was ready")
    })
    .await
    .expect("the joined cell is ready within 60 s");
    assert_eq!(became.role, "crawler");
    let lineage = ledger.lineage().await.expect("lineage");
    assert_eq!(lineage.len(), 1, "{lineage:?}");
    assert_eq!(lineage[0].parent.as_deref(), Some("test-parent"));
    assert_eq!(lineage[0].server.as_deref(), Some("box-1"));
    drop(machine);

    // Reused, expired, forged, unknown: refused, nothing started, the reason named.
    for (token, reason) in [
        ("fresh1.s3cretsecretsecr", "already used"),
        ("stale1.s3cretsecretsecr", "expired"),
        ("fresh1.s3cretsecretsecX", "secret is wrong"),
        ("nosuch.s3cretsecretsecr", "no such join token"),
    ] {
        let out = boot("box-1", token).output().await;
        assert!(!out.status.success(), "{token}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(reason), "{token}: {stderr}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("HOMEOSTAT_READY"),
            "{token} started a cell"
        );
    }
    assert_eq!(ledger.lineage().await.expect("lineage").len(), 1);

    // A TXT record that is not key=value is named.
    let out = boot("box-2", "fresh1.s3cretsecretsecr").output().await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not-a-setting") && stderr.contains("key=value"),
        "{stderr}"
    );
}
