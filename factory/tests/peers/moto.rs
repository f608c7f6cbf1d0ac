//! The `moto` EC2 server (PyPI `moto[server]`) on loopback, with authentication on: the first
//! three calls (unauthenticated, `INITIAL_NO_AUTH_ACTION_COUNT=3`) create an IAM user, its EC2
//! policy and its access key; from then on moto recomputes every request's SigV4 signature with
//! botocore and refuses one that differs. `scripts/moto.sh` installs moto into a virtual
//! environment when it is missing; a test fails (never skips) when it cannot.

use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use factory::power::ec2::query::{DescribeInstances, Instance, QueryClient};
use factory::power::ec2::sigv4::Credentials;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;

pub const REGION: &str = "us-east-1";

/// A `moto_server` child in its own process group, killed with its group when dropped (also
/// when the test panics).
pub struct Moto {
    child: Child,
    pub endpoint: String,
    /// Its last lines of output, for a failure's message.
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The path of `moto_server`, from `scripts/moto.sh` (which installs it when missing).
pub fn moto_server() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/moto.sh");
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}): it installs moto[server] from PyPI into a Python virtual environment \
         and needs python3 (3.9+, with venv) and access to PyPI; run it by hand to see why",
        script.display(),
        out.status
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Start moto on a free loopback port (it binds port 0 and says which port it got), with
/// authentication turned on after three calls. Returns it and how long it took to answer.
pub fn start_moto() -> (Moto, Duration) {
    let path = moto_server();
    let started = Instant::now();
    let mut child = Command::new(&path)
        .args(["-H", "127.0.0.1", "-p", "0"])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
    let stderr = child.stderr.take().expect("piped stderr");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (port_tx, port_rx) = mpsc::channel();
    let lines = log.clone();
    // Reads moto's log to its end (a full pipe would stall moto), keeping its last lines.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("Running on http://127.0.0.1:").nth(1) {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                let _ = port_tx.send(digits);
            }
            let mut lines = lines.lock().expect("log lock");
            lines.push(line);
            if lines.len() > 40 {
                lines.remove(0);
            }
        }
    });
    let mut moto = Moto {
        child,
        endpoint: String::new(),
        log,
    };
    match port_rx.recv_timeout(Duration::from_secs(120)) {
        Ok(port) => moto.endpoint = format!("http://127.0.0.1:{port}/"),
        Err(_) => panic!(
            "moto_server did not say where it listens within 120 s; its output:\n{}",
            moto.log.lock().expect("log lock").join("\n")
        ),
    }
    (moto, started.elapsed())
}

pub fn iam(moto: &Moto, credentials: Credentials) -> QueryClient {
    QueryClient::new(
        url::Url::parse(&moto.endpoint).expect("endpoint"),
        REGION,
        "iam",
        "2010-05-08",
        credentials,
        Duration::from_secs(20),
    )
    .expect("client")
}

#[derive(Deserialize)]
struct CreateAccessKeyResponse {
    #[serde(rename = "CreateAccessKeyResult")]
    result: CreateAccessKeyResult,
}
#[derive(Deserialize)]
struct CreateAccessKeyResult {
    #[serde(rename = "AccessKey")]
    key: AccessKey,
}
#[derive(Deserialize)]
struct AccessKey {
    #[serde(rename = "AccessKeyId")]
    id: String,
    #[serde(rename = "SecretAccessKey")]
    secret: String,
}

/// Spend moto's three unauthenticated calls on a user allowed `ec2:*` and its access key.
pub async fn access_key(moto: &Moto) -> (String, String) {
    let anyone = iam(moto, Credentials::new("AKIDSETUP", "setup"));
    let user = || ("UserName".to_string(), "homeostat-factory".to_string());
    anyone
        .call("CreateUser", &[user()])
        .await
        .expect("CreateUser");
    let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"ec2:*","Resource":"*"}]}"#;
    anyone
        .call(
            "PutUserPolicy",
            &[
                user(),
                ("PolicyName".into(), "ec2".into()),
                ("PolicyDocument".into(), policy.into()),
            ],
        )
        .await
        .expect("PutUserPolicy");
    let created: CreateAccessKeyResponse = anyone
        .call_as("CreateAccessKey", &[user()])
        .await
        .expect("CreateAccessKey");
    (created.result.key.id, created.result.key.secret)
}

/// A credentials file `file:` reference (the file lives as long as the returned guard).
pub fn credentials_file(id: &str, secret: &str) -> (tempfile::NamedTempFile, String) {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    writeln!(file, "{id}:{secret}").expect("write credentials");
    let reference = format!("file:{}", file.path().display());
    (file, reference)
}

/// Every instance moto holds.
pub async fn all_instances(ec2: &QueryClient) -> Vec<Instance> {
    let answer: DescribeInstances = ec2
        .call_as("DescribeInstances", &[])
        .await
        .expect("DescribeInstances");
    answer
        .reservations
        .item
        .into_iter()
        .flat_map(|r| r.instances.item)
        .collect()
}

pub fn live(instances: &[Instance]) -> Vec<&Instance> {
    instances
        .iter()
        .filter(|i| i.state.name != "terminated" && i.state.name != "shutting-down")
        .collect()
}

#[derive(Deserialize)]
struct DescribeInstanceAttributeResponse {
    #[serde(rename = "userData")]
    user_data: Value,
}
#[derive(Deserialize)]
struct Value {
    value: String,
}

/// An instance's user data, decoded.
pub async fn user_data(ec2: &QueryClient, instance: &str) -> Vec<u8> {
    let answer: DescribeInstanceAttributeResponse = ec2
        .call_as(
            "DescribeInstanceAttribute",
            &[
                ("InstanceId".into(), instance.into()),
                ("Attribute".into(), "userData".into()),
            ],
        )
        .await
        .expect("DescribeInstanceAttribute");
    base64::engine::general_purpose::STANDARD
        .decode(answer.user_data.value)
        .expect("user data is base64")
}
