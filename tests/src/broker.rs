//! A real Mosquitto broker for the end-to-end tests, configured exactly as a fleet's broker is
//! (`broker-config/mosquitto/`), and MQTT clients that talk to it over mutual TLS.
//!
//! Map:
//! - [`Mosquitto`]: starts `/usr/sbin/mosquitto` (or `$MICROFED_MOSQUITTO`) on a free loopback port in a
//!   temporary folder, with certificates made by `make-certs.sh` for the names a test asks for, the
//!   fleet's ACL file and a copy of `mosquitto.conf` with its placeholders filled in. `stop`/`restart`
//!   keep the port and the persistence database, so a test can take the broker away and bring it back.
//! - [`make_certs`]: runs `make-certs.sh` (also for a second, foreign CA).
//! - [`tls_options`], [`client_tls_config`], [`mqtt_options`]: rumqttc 0.25 options over rustls with the
//!   `ring` provider and client-certificate authentication, packets up to [`MAX_PACKET_SIZE`].
//! - [`TestClient`]: a connected rumqttc client whose event loop runs in a task; it keeps what arrives
//!   (publishes, acknowledgements, the end of the connection) for the test to wait on.
//!
//! Layout of a broker's folder: `certs/` (make-certs.sh output), `acl`, `data/` (persistence),
//! `mosquitto.conf`, `mosquitto.log`.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;

/// Largest MQTT packet the federation allows (docs/protocol.md): 1 MiB, on brokers and clients.
pub const MAX_PACKET_SIZE: usize = 1_048_576;

/// Where Debian's package installs the broker.
pub const MOSQUITTO_BIN: &str = "/usr/sbin/mosquitto";

/// Address every test broker listens on (its server certificate names it).
pub const BROKER_HOST: &str = "127.0.0.1";

/// The broker binary: `$MICROFED_MOSQUITTO` when set, else [`MOSQUITTO_BIN`].
pub fn mosquitto_bin() -> PathBuf {
    std::env::var_os("MICROFED_MOSQUITTO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(MOSQUITTO_BIN))
}

/// `broker-config/mosquitto/` of this repository.
pub fn mosquitto_config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker-config/mosquitto")
}

/// Runs `make-certs.sh OUT_DIR NAME...`: a CA in `out_dir` (kept if present), the server certificate,
/// and `clients/NAME.crt`/`.key` for each name.
pub fn make_certs(out_dir: &Path, names: &[&str]) -> anyhow::Result<()> {
    let script = mosquitto_config_dir().join("make-certs.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(out_dir)
        .args(names)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    ensure!(
        out.status.success(),
        "{} {} {} failed ({}):\n{}{}",
        script.display(),
        out_dir.display(),
        names.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A running Mosquitto with the fleet's configuration, in its own temporary folder. Dropping it kills
/// the broker and removes the folder.
pub struct Mosquitto {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts a broker with client certificates for `names` (device ids, `aggregator`,
    /// `fleet-manager`, ...) on a free loopback port, and waits until it accepts connections.
    pub fn start(names: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_binary(&mosquitto_bin(), names)
    }

    /// [`Mosquitto::start`] with another broker binary.
    pub fn start_with_binary(bin: &Path, names: &[&str]) -> anyhow::Result<Self> {
        if !bin.is_file() {
            bail!(
                "Mosquitto not found at {}: install it with `apt-get install mosquitto` \
                 (tests/run.sh does), or point MICROFED_MOSQUITTO at the binary",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("microfed-mosquitto-")
            .tempdir()
            .context("creating the broker's temporary folder")?;
        make_certs(&dir.path().join("certs"), names)?;
        let acl = mosquitto_config_dir().join("acl");
        std::fs::copy(&acl, dir.path().join("acl"))
            .with_context(|| format!("copying {}", acl.display()))?;
        std::fs::create_dir(dir.path().join("data")).context("creating data/")?;

        // A free port: bind port 0, read the port, release it, hand it to Mosquitto. Another process
        // may grab it in between; then Mosquitto fails to listen, and we try another.
        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port()?;
            match launch(bin, dir.path(), port) {
                Ok(child) => {
                    return Ok(Self {
                        dir,
                        bin: bin.to_owned(),
                        port,
                        child: Some(child),
                    });
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("no attempt made")))
    }

    /// The TLS listener's port on [`BROKER_HOST`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's folder (certificates, ACL, persistence, configuration, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM) that signed the broker's and the clients' certificates.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir().join("certs/ca.crt")
    }

    /// The certificate and key (PEM) of client `name` (one of the names the broker was started with,
    /// or added with [`Mosquitto::add_clients`]).
    pub fn client_cert(&self, name: &str) -> (PathBuf, PathBuf) {
        let clients = self.dir().join("certs/clients");
        (
            clients.join(format!("{name}.crt")),
            clients.join(format!("{name}.key")),
        )
    }

    /// Issues certificates for more clients from the same CA (the running broker accepts them at once).
    pub fn add_clients(&self, names: &[&str]) -> anyhow::Result<()> {
        make_certs(&self.dir().join("certs"), names)
    }

    /// The rendered configuration the broker runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("mosquitto.conf")
    }

    /// The broker's log file (debug level: every denied PUBLISH is there).
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("mosquitto.log")
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the broker process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Stops the broker cleanly (SIGTERM: it saves its persistence database) and waits for it to exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_none() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .context("running kill -TERM")?;
            ensure!(status.success(), "kill -TERM {} failed", child.id());
            let end = Instant::now() + Duration::from_secs(10);
            while child.try_wait()?.is_none() {
                if Instant::now() > end {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "Mosquitto did not stop within 10 s of SIGTERM; log:\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Stops the broker (if running) and starts it again on the same port with the same folder: the
    /// persistence database brings back retained messages and persistent sessions.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.child = Some(launch(&self.bin, self.dir.path(), self.port)?);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        // Never leave a broker running after a test, whatever happened.
        self.kill();
    }
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// Renders the configuration for a broker in `dir` on `port`, starts `bin` with it and waits until the
/// port accepts connections; on failure the process is gone and the error carries the broker's log.
fn launch(bin: &Path, dir: &Path, port: u16) -> anyhow::Result<Child> {
    let config_path = dir.join("mosquitto.conf");
    std::fs::write(&config_path, render_config(dir, port)?).context("writing mosquitto.conf")?;
    let stderr_path = dir.join("mosquitto.stderr");
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Mosquitto prints to stderr only what it cannot log to its file (a bad configuration).
        .stderr(std::fs::File::create(&stderr_path)?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let logs = || {
        format!(
            "{}{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default(),
            std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
        )
    };
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "Mosquitto exited at start-up ({status}, port {port}):\n{}",
                logs()
            );
        }
        // The listener opens after the persistence database is loaded: a connection means ready. (This
        // bare TCP probe shows in the broker log as a failed TLS connection.)
        if TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok() {
            return Ok(child);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "Mosquitto did not listen on port {port} within 10 s; log:\n{}",
                logs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `broker-config/mosquitto/mosquitto.conf` with its placeholders filled in for a broker in `dir` on
/// `port`, plus debug logging (so that denied publishes appear in the log).
pub fn render_config(dir: &Path, port: u16) -> anyhow::Result<String> {
    let template_path = mosquitto_config_dir().join("mosquitto.conf");
    let template = std::fs::read_to_string(&template_path)
        .with_context(|| format!("reading {}", template_path.display()))?;
    let d = dir.display().to_string();
    let user = current_user()?;
    let mut text = template
        .replace("@BIND_ADDRESS@", BROKER_HOST)
        .replace("@PORT@", &port.to_string())
        .replace("@CERT_DIR@", &format!("{d}/certs"))
        .replace("@ACL_FILE@", &format!("{d}/acl"))
        .replace("@DATA_DIR@", &format!("{d}/data"))
        .replace("@LOG_FILE@", &format!("{d}/mosquitto.log"))
        .replace("@USER@", &user);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if !line.starts_with('#') && line.contains('@') {
            bail!(
                "{} line {}: placeholder left unfilled: {line}",
                template_path.display(),
                n + 1
            );
        }
    }
    text.push_str("\n# Added by tests/src/broker.rs: denied publishes are logged at debug level.\nlog_type debug\n");
    Ok(text)
}

/// The user this process runs as: Mosquitto started as root would otherwise drop to `mosquitto`, which
/// cannot read a private temporary folder.
fn current_user() -> anyhow::Result<String> {
    let out = Command::new("id")
        .arg("-un")
        .output()
        .context("running id -un")?;
    ensure!(out.status.success(), "id -un failed");
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// A rustls client configuration (ring provider, TLS 1.2 and 1.3) that trusts the CA in `ca_pem` and,
/// when given, authenticates with a client certificate and key (PEM).
pub fn client_tls_config(
    ca_pem: &Path,
    client: Option<(&Path, &Path)>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca_pem)? {
        roots
            .add(cert)
            .with_context(|| format!("CA certificate in {}", ca_pem.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let chain = read_certs(cert)?;
            let key_pem =
                std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                .with_context(|| format!("parsing {}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .with_context(|| format!("client certificate {}", cert.display()))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))?;
    ensure!(!certs.is_empty(), "no certificate in {}", path.display());
    Ok(certs)
}

/// MQTT options for `client_id` at [`BROKER_HOST`]:`port` over TLS with `tls`, packets up to
/// [`MAX_PACKET_SIZE`] both ways.
pub fn mqtt_options(client_id: &str, port: u16, tls: Arc<rustls::ClientConfig>) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, BROKER_HOST, port);
    options
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
        .set_max_packet_size(MAX_PACKET_SIZE, MAX_PACKET_SIZE)
        .set_keep_alive(Duration::from_secs(30));
    options
}

/// Options for client `client_name` of `broker`: its certificate (CN = `client_name`) and key, the
/// broker's CA, client id `client_name`.
///
/// # Panics
/// If the certificate files of `client_name` cannot be read (the broker was not started with that name):
/// a test set-up error. [`try_tls_options`] returns it instead.
pub fn tls_options(broker: &Mosquitto, client_name: &str) -> MqttOptions {
    try_tls_options(broker, client_name)
        .unwrap_or_else(|e| panic!("TLS options for {client_name}: {e:#}"))
}

/// [`tls_options`], returning an error instead of panicking.
pub fn try_tls_options(broker: &Mosquitto, client_name: &str) -> anyhow::Result<MqttOptions> {
    let (cert, key) = broker.client_cert(client_name);
    let tls = client_tls_config(&broker.ca_pem(), Some((&cert, &key)))?;
    Ok(mqtt_options(client_name, broker.port(), tls))
}

/// What a [`TestClient`]'s event loop saw.
#[derive(Debug)]
enum Seen {
    Publish(Publish),
    SubAck(Vec<SubscribeReasonCode>),
    PubAck,
    /// The connection ended (error text, or "disconnected" after our DISCONNECT).
    Closed(String),
}

/// A connected MQTT client for tests: its event loop runs in a tokio task (so PUBACKs and pings flow
/// while the test waits), and what arrives is kept until the test asks for it.
pub struct TestClient {
    pub client: AsyncClient,
    /// Whether the broker resumed a stored session (CONNACK's session-present flag).
    pub session_present: bool,
    events: mpsc::UnboundedReceiver<Seen>,
    publishes: VecDeque<Publish>,
    acks: VecDeque<Seen>,
    closed: Option<String>,
    task: tokio::task::JoinHandle<()>,
}

/// How long [`TestClient::connect`] waits for CONNACK.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl TestClient {
    /// Connects and waits for the broker's CONNACK; a refused connection or a failed TLS handshake is
    /// the error.
    pub async fn connect(options: MqttOptions) -> Result<Self, ConnectionError> {
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let session_present = tokio::time::timeout(CONNECT_TIMEOUT, wait_connack(&mut eventloop))
            .await
            .map_err(|_| ConnectionError::NetworkTimeout)??;
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(run_eventloop(eventloop, tx));
        Ok(Self {
            client,
            session_present,
            events,
            publishes: VecDeque::new(),
            acks: VecDeque::new(),
            closed: None,
            task,
        })
    }

    /// Subscribes and waits for the SUBACK; returns its reason codes.
    pub async fn subscribe(
        &mut self,
        filter: &str,
        qos: QoS,
    ) -> anyhow::Result<Vec<SubscribeReasonCode>> {
        self.client.subscribe(filter, qos).await?;
        match self.next_ack(Duration::from_secs(5)).await? {
            Seen::SubAck(codes) => Ok(codes),
            other => bail!("expected SUBACK for {filter}, got {other:?}"),
        }
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK. The broker sends it after it has decided
    /// what to do with the message (forwarded, stored, or refused by the ACL), so anything published
    /// afterwards is processed after this message. One publish in flight at a time.
    pub async fn publish_acked(
        &mut self,
        topic: &str,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.into())
            .await?;
        match self.next_ack(Duration::from_secs(5)).await? {
            Seen::PubAck => Ok(()),
            other => bail!("expected PUBACK for {topic}, got {other:?}"),
        }
    }

    /// The next message that arrives within `timeout`, or `None`.
    pub async fn next_publish(&mut self, timeout: Duration) -> Option<Publish> {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(p) = self.publishes.pop_front() {
                return Some(p);
            }
            if self.closed.is_some() {
                return None;
            }
            match tokio::time::timeout_at(end, self.events.recv()).await {
                Ok(Some(seen)) => self.keep(seen),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next message; an error naming `what` if none arrives within `timeout`.
    pub async fn expect_publish(
        &mut self,
        what: &str,
        timeout: Duration,
    ) -> anyhow::Result<Publish> {
        self.next_publish(timeout).await.ok_or_else(|| {
            anyhow!(
                "no message within {timeout:?} while waiting for {what}{}",
                self.closed
                    .as_deref()
                    .map(|c| format!(" (connection closed: {c})"))
                    .unwrap_or_default()
            )
        })
    }

    /// Every message that arrives within `timeout`.
    pub async fn drain(&mut self, timeout: Duration) -> Vec<Publish> {
        let end = tokio::time::Instant::now() + timeout;
        let mut all = Vec::new();
        while let Some(p) = self
            .next_publish(end.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            all.push(p);
        }
        all
    }

    /// Waits up to `timeout` for the connection to end; returns why, or `None` if it is still open.
    pub async fn wait_closed(&mut self, timeout: Duration) -> Option<String> {
        let end = tokio::time::Instant::now() + timeout;
        while self.closed.is_none() {
            match tokio::time::timeout_at(end, self.events.recv()).await {
                Ok(Some(seen)) => self.keep(seen),
                Ok(None) => self.closed = Some("event loop ended".into()),
                Err(_) => break,
            }
        }
        self.closed.clone()
    }

    /// Sends DISCONNECT (the broker then discards the last will) and waits for the connection to end.
    pub async fn disconnect(mut self) -> anyhow::Result<()> {
        self.client.disconnect().await?;
        let closed = self.wait_closed(Duration::from_secs(5)).await;
        self.task.abort();
        ensure!(
            closed.is_some(),
            "connection still open 5 s after DISCONNECT"
        );
        Ok(())
    }

    /// Drops the TCP connection without DISCONNECT, as a board that loses power or network would: the
    /// event loop (which owns the socket) is stopped and the socket closed. The broker then publishes
    /// the client's last will.
    pub async fn drop_link(mut self) {
        self.task.abort();
        // Wait for the task to be gone, so the socket is closed when this returns.
        let _ = (&mut self.task).await;
    }

    async fn next_ack(&mut self, timeout: Duration) -> anyhow::Result<Seen> {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(ack) = self.acks.pop_front() {
                return Ok(ack);
            }
            if let Some(why) = &self.closed {
                bail!("connection closed: {why}");
            }
            match tokio::time::timeout_at(end, self.events.recv()).await {
                Ok(Some(seen)) => self.keep(seen),
                Ok(None) => self.closed = Some("event loop ended".into()),
                Err(_) => bail!("no acknowledgement within {timeout:?}"),
            }
        }
    }

    fn keep(&mut self, seen: Seen) {
        match seen {
            Seen::Publish(p) => self.publishes.push_back(p),
            Seen::Closed(why) => self.closed = Some(why),
            ack => self.acks.push_back(ack),
        }
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls until CONNACK; returns its session-present flag.
async fn wait_connack(eventloop: &mut EventLoop) -> Result<bool, ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(ack)) = eventloop.poll().await? {
            // rumqttc turns a refusing CONNACK into ConnectionRefused; this one accepted.
            return Ok(ack.session_present);
        }
    }
}

/// Drives the event loop until the connection ends, forwarding what the tests wait on. It never
/// reconnects: a test decides when a client comes back.
async fn run_eventloop(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Seen>) {
    let mut disconnecting = false;
    loop {
        let seen = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => Seen::Publish(p),
            Ok(Event::Incoming(Packet::SubAck(ack))) => Seen::SubAck(ack.return_codes),
            Ok(Event::Incoming(Packet::PubAck(_))) => Seen::PubAck,
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                disconnecting = true;
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                let why = if disconnecting {
                    "disconnected".to_owned()
                } else {
                    e.to_string()
                };
                let _ = tx.send(Seen::Closed(why));
                return;
            }
        };
        if tx.send(seen).is_err() {
            return;
        }
    }
}
