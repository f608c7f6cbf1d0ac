//! `cell boot`: what a blank pool machine runs. It knows a factory's join URL and a one-time
//! token, nothing else: it redeems the token at `POST /join`, receives its role, cell id, its
//! parent's configuration and the cluster key, and becomes that cell (`cell run ROLE ...`, in
//! this same process, so the machine's power-off ends it).
//!
//! The join data comes from the command line or the environment (`HOMEOSTAT_JOIN`,
//! `HOMEOSTAT_TOKEN`: a cloud instance's user data sets them), or from a file on the machine's
//! boot volume (`--token-file`, lines `KEY=value`, which the factory writes before power-on).
//!
//! The join reply names the organism's release (`factory::release`): when this machine's own
//! `cell` is another build, the release is downloaded into the state directory (kept there for
//! the next boot), checked byte for byte against its SHA-256, and that is what the machine
//! becomes. So a machine booted from an old image joins running the organism's build, and a
//! live upgrade reaches the pool's roles.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use factory::pool::{JoinReply, JoinRequest};

#[derive(Args)]
pub struct BootArgs {
    /// A factory's URL (its `POST /join`).
    #[arg(long, env = "HOMEOSTAT_JOIN")]
    join: Option<String>,
    /// The one-time join token, ID.SECRET.
    #[arg(long, env = "HOMEOSTAT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file of `HOMEOSTAT_JOIN=...` and `HOMEOSTAT_TOKEN=...` lines (the boot volume).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// This machine's host name, for the record (default: the system's).
    #[arg(long)]
    hostname: Option<String>,
    /// Where to keep the configuration the organism gives (default: a directory under the
    /// system's temporary directory).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Read the join URL (and other `key=value` settings) from the DNS TXT records of
    /// `HOSTNAME.DOMAIN` at this DNS server (`ip:port`).
    #[arg(long)]
    dns: Option<std::net::SocketAddr>,
    /// The domain the machine's TXT records are under (with --dns).
    #[arg(long, default_value = "")]
    dns_domain: String,
    /// How long to keep trying to reach the factory, seconds.
    #[arg(long, default_value_t = 60)]
    join_timeout_secs: u64,
}

/// What `--token-file` holds.
fn read_token_file(path: &std::path::Path) -> anyhow::Result<(Option<String>, Option<String>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the join file {}", path.display()))?;
    let (mut join, mut token) = (None, None);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some(("HOMEOSTAT_JOIN", v)) => join = Some(v.trim().to_string()),
            Some(("HOMEOSTAT_TOKEN", v)) => token = Some(v.trim().to_string()),
            Some((k, _)) => {
                tracing::warn!(file = %path.display(), line = n + 1, key = k, "ignoring an unknown key")
            }
            None => anyhow::bail!("{}:{}: expected KEY=value", path.display(), n + 1),
        }
    }
    Ok((join, token))
}

pub async fn boot(args: BootArgs) -> anyhow::Result<()> {
    let (mut join, mut token) = (args.join.clone(), args.token.clone());
    if let Some(file) = &args.token_file {
        let (j, t) = read_token_file(file)?;
        join = join.or(j);
        token = token.or(t);
        // Single use: nothing is left for a later boot to present.
        let _ = std::fs::remove_file(file);
    }
    let hostname = args.hostname.clone().or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
    });
    if let Some(server) = args.dns {
        let host = hostname
            .clone()
            .context("--dns needs this machine's host name (--hostname)")?;
        let settings = dns_settings(server, &host, &args.dns_domain).await?;
        for (k, v) in &settings {
            match k.as_str() {
                "join" => join = join.or(Some(v.clone())),
                "token" => token = token.or(Some(v.clone())),
                other => tracing::warn!(key = other, "ignoring an unknown DNS TXT setting"),
            }
        }
    }
    let join = join.context("no join URL: give --join, HOMEOSTAT_JOIN, --token-file or --dns")?;
    let token = token.context("no join token: give --token, HOMEOSTAT_TOKEN or --token-file")?;
    let join = join.trim_end_matches('/').to_string();
    url::Url::parse(&join).with_context(|| format!("--join {join:?} is not a URL"))?;
    let reply = redeem(
        &join,
        &token,
        hostname,
        Duration::from_secs(args.join_timeout_secs),
    )
    .await?;
    tracing::info!(cell_id = %reply.cell_id, role = %reply.role, "joined the organism");
    let dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("homeostat-boot-{}", reply.cell_id)),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let infra = dir.join("organism.toml");
    std::fs::write(&infra, &reply.infra_toml)
        .with_context(|| format!("writing {}", infra.display()))?;
    let exe = release_exe(reply.release.as_ref(), &dir, &reply.cluster_key).await?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("run")
        .arg(&reply.role)
        .arg("--infra")
        .arg(&infra)
        .arg("--cell-id")
        .arg(&reply.cell_id)
        .args(&reply.args)
        .env("HOMEOSTAT_CLUSTER_KEY", &reply.cluster_key)
        .env_remove("HOMEOSTAT_TOKEN");
    if let Some(parent) = &reply.parent {
        cmd.arg("--parent").arg(parent);
    }
    // Become the cell: same process, so the machine's power-off (or its process group's) ends it.
    let err = cmd.exec();
    Err(anyhow::anyhow!("becoming {}: {err}", reply.role))
}

/// The executable this machine becomes: its own `cell` when it is the organism's release (or
/// none is named), else the release, downloaded into `dir` once and checked against its SHA-256.
async fn release_exe(
    release: Option<&factory::release::ReleaseRef>,
    dir: &Path,
    key_hex: &str,
) -> anyhow::Result<PathBuf> {
    let own = std::env::current_exe().context("locating the cell executable")?;
    let Some(release) = release else {
        return Ok(own);
    };
    anyhow::ensure!(
        factory::release::is_sha256(&release.sha256),
        "the join reply names release {:?}, which is not a SHA-256",
        release.sha256
    );
    let want = release.sha256.to_ascii_lowercase();
    if sha256_of(Path::new("/proc/self/exe")).await? == want {
        return Ok(own);
    }
    let path = dir.join(format!("cell-{}", &want[..12]));
    if path.is_file() && sha256_of(&path).await? == want {
        tracing::info!(release = %want, path = %path.display(), "running the release kept from an earlier boot");
        return Ok(path);
    }
    let key = control::ClusterKey::from_hex(key_hex)
        .context("the join reply's cluster key is not a key")?;
    let mut pause = Duration::from_millis(200);
    let mut tries = 0;
    loop {
        tries += 1;
        match download(&release.url, &key.read_authorization(), &want, &path).await {
            Ok(()) => break,
            Err(e) if tries < 4 => {
                tracing::warn!(url = %release.url, error = %format!("{e:#}"), tries, "downloading the release failed; trying again");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Err(e) => {
                return Err(e.context(format!("downloading the release from {}", release.url)))
            }
        }
    }
    tracing::info!(release = %want, path = %path.display(), "downloaded the organism's release");
    // Earlier releases on this disk are no longer wanted.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("cell-") && entry.path() != path {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(path)
}

/// The SHA-256 (hex) of a file, read off the async runtime.
async fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || control::build::sha256_of_file(&owned))
        .await?
        .with_context(|| format!("reading {}", path.display()))
}

/// Download `url` to `path` (through a temporary file beside it, renamed once every byte
/// matched `sha256`), executable.
async fn download(url: &str, authorization: &str, sha256: &str, path: &Path) -> anyhow::Result<()> {
    use sha2::Digest as _;
    use std::os::unix::fs::PermissionsExt as _;
    use tokio::io::AsyncWriteExt as _;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(600))
        .build()?;
    let mut resp = client
        .get(url)
        .header(reqwest::header::AUTHORIZATION, authorization)
        .send()
        .await?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        anyhow::bail!("the factory answered {status}: {text}");
    }
    let tmp = path.with_extension(format!("part{}", std::process::id()));
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| format!("creating {}", tmp.display()))?;
    let mut hasher = sha2::Sha256::new();
    let written: anyhow::Result<()> = async {
        while let Some(chunk) = resp.chunk().await? {
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        file.sync_all().await?;
        Ok(())
    }
    .await;
    drop(file);
    let got = hex::encode(hasher.finalize());
    let checked = written.and_then(|()| {
        anyhow::ensure!(
            got == sha256,
            "the bytes received have SHA-256 {got}, not the release's {sha256}"
        );
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    });
    if checked.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    checked
}

/// The `key=value` pairs of the TXT records of `host.domain` at DNS server `server`
/// (configuration keyed by the machine's host name). A record that is not `key=value` is an
/// error naming it.
async fn dns_settings(
    server: std::net::SocketAddr,
    host: &str,
    domain: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
    use hickory_resolver::name_server::TokioConnectionProvider;
    use hickory_resolver::proto::xfer::Protocol;
    let mut config = ResolverConfig::new();
    config.add_name_server(NameServerConfig::new(server, Protocol::Udp));
    let mut opts = ResolverOpts::default();
    opts.attempts = 3;
    opts.timeout = Duration::from_secs(2);
    opts.cache_size = 0;
    let resolver =
        hickory_resolver::Resolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(opts)
            .build();
    let name = if domain.is_empty() {
        format!("{host}.")
    } else {
        format!("{host}.{}.", domain.trim_matches('.'))
    };
    let lookup = resolver
        .txt_lookup(name.clone())
        .await
        .with_context(|| format!("reading the TXT records of {name} at {server}"))?;
    let mut settings = Vec::new();
    for record in lookup.iter() {
        let text: String = record
            .txt_data()
            .iter()
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect();
        let (k, v) = text
            .split_once('=')
            .with_context(|| format!("TXT record {text:?} of {name} is not key=value"))?;
        settings.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(settings)
}

/// Redeem the token, retrying while the factory cannot be reached (the machine may boot before
/// its network is up); a refusal is final (the token is single use).
async fn redeem(
    join: &str,
    token: &str,
    hostname: Option<String>,
    timeout: Duration,
) -> anyhow::Result<JoinReply> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let body = JoinRequest {
        v: 1,
        token: token.to_string(),
        hostname,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(100);
    loop {
        let last = match client.post(format!("{join}/join")).json(&body).send().await {
            Ok(resp) if resp.status().is_success() => {
                let reply: JoinReply = resp
                    .json()
                    .await
                    .context("the factory's join answer is not a join reply")?;
                anyhow::ensure!(
                    reply.v == 1,
                    "join reply version {} (this cell reads 1)",
                    reply.v
                );
                return Ok(reply);
            }
            Ok(resp) if resp.status().is_client_error() => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                anyhow::bail!("the factory refused to let this machine join ({status}): {text}");
            }
            Ok(resp) => format!("the factory answered {}", resp.status()),
            Err(e) => format!("{e}"),
        };
        if tokio::time::Instant::now() + pause > deadline {
            anyhow::bail!("could not join through {join} within {timeout:?}: {last}");
        }
        tracing::warn!(join, error = %last, "joining failed; trying again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
