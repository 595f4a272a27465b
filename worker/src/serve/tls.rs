//! Mutual TLS between a deployment's workers.
//!
//! Every gateway, stage and expert shard of a deployment holds a certificate issued by that
//! deployment's own CA (the operator keeps one per MoEDeployment; `moe-worker local` makes one
//! at start). A server asks every client for a certificate and refuses, at the handshake, one
//! that its CA bundle does not trust; a client checks the server the same way. Peers are
//! dialled by pod address, so the name checked is the fixed [`SERVER_NAME`] every worker
//! certificate carries: what proves a peer is the deployment's CA, not a DNS name.
//!
//! The files are the layout of a Kubernetes TLS Secret plus its CA: `ca.crt` (one or more CA
//! certificates: during a CA rotation the bundle holds the old and the new), `tls.crt` (the
//! worker's certificate chain) and `tls.key`. They are re-read when they change, so a renewed
//! certificate is used by every new connection and handshake while established connections go
//! on: a rotation drops no request.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{Error, Result};

pub use moe_certs::{CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE, SERVER_NAME};

/// How often the files are checked for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond are closed at once.
const MAX_HANDSHAKES: usize = 256;

/// How a worker secures its gRPC traffic, as every role is told.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Folder with the deployment's CA bundle (`ca.crt`) and this worker's certificate and key
    /// (`tls.crt`, `tls.key`): worker-to-worker traffic is then mutual TLS, and a peer without
    /// a certificate of that CA is refused at the handshake. The files are re-read when they
    /// change (certificate rotation).
    #[arg(long, env = "MOE_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,

    /// Plaintext worker traffic: neither encrypted nor authenticated. An explicit opt-out for
    /// benchmarks and single-machine tests; one of --tls-dir or --plaintext is required.
    #[arg(long, env = "MOE_PLAINTEXT", conflicts_with = "tls_dir")]
    pub plaintext: bool,
}

static PROCESS: OnceLock<Option<Arc<Tls>>> = OnceLock::new();

/// Sets this process's transport security from its arguments (once; roles call it at start)
/// and starts watching the files. Neither flag is an error that names both: worker traffic is
/// never plaintext by accident.
pub fn init(args: &TlsArgs) -> Result<()> {
    let tls = match (&args.tls_dir, args.plaintext) {
        (Some(dir), _) => Some(Tls::load(dir)?),
        (None, true) => None,
        (None, false) => {
            return Err(Error::invalid(
                "tls-dir",
                "worker traffic needs --tls-dir DIR (mutual TLS with the deployment's \
                 certificates) or an explicit --plaintext",
            ));
        }
    };
    if let Some(t) = &tls {
        tokio::spawn(watch(Arc::downgrade(t)));
    }
    PROCESS
        .set(tls)
        .map_err(|_| Error::invalid("tls-dir", "transport security was already set"))
}

/// This process's TLS, if it uses TLS.
pub fn current() -> Option<Arc<Tls>> {
    PROCESS.get().cloned().flatten()
}

/// The arguments that give a child process the same transport security.
pub fn child_args(args: &TlsArgs) -> Vec<String> {
    match &args.tls_dir {
        Some(d) => vec!["--tls-dir".into(), d.display().to_string()],
        None => vec!["--plaintext".into()],
    }
}

struct Configs {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// The loaded certificates, reloaded when their files change.
pub struct Tls {
    dir: PathBuf,
    configs: RwLock<Arc<Configs>>,
    /// Modification time and length of each file at the last load.
    stamp: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tls({})", self.dir.display())
    }
}

fn stamp(dir: &Path) -> Vec<Option<(SystemTime, u64)>> {
    [CA_FILE, CERT_FILE, KEY_FILE]
        .iter()
        .map(|f| {
            let m = std::fs::metadata(dir.join(f)).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::checkpoint(path, format!("cannot read certificates: {e}")))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::checkpoint(path, format!("invalid PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(Error::checkpoint(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// ring's TLS 1.3 suites with AES-128-GCM first: activations are bulk data, and AES-128 has
/// four fewer rounds than AES-256 for the same AES-NI code path (the server follows the
/// client's order, and both sides use this provider).
fn provider() -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    p
}

fn build(dir: &Path) -> Result<Configs> {
    let provider = Arc::new(provider());
    let tls_err = |what: &str, e: rustls::Error| Error::checkpoint(dir, format!("{what}: {e}"));
    let mut roots = RootCertStore::empty();
    for c in pem_certs(&dir.join(CA_FILE))? {
        roots
            .add(c)
            .map_err(|e| tls_err(&format!("{CA_FILE}: not a CA certificate"), e))?;
    }
    let roots = Arc::new(roots);
    let chain = pem_certs(&dir.join(CERT_FILE))?;
    let key_path = dir.join(KEY_FILE);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| Error::checkpoint(&key_path, format!("invalid PEM private key: {e}")))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| Error::checkpoint(dir, format!("client verifier: {e}")))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("TLS versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| tls_err(&format!("{CERT_FILE} and {KEY_FILE}"), e))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("TLS versions", e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls_err(&format!("{CERT_FILE} and {KEY_FILE}"), e))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Configs {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

impl Tls {
    /// Loads `dir` (see the module's file layout).
    pub fn load(dir: &Path) -> Result<Arc<Self>> {
        let before = stamp(dir);
        let configs = build(dir)?;
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            configs: RwLock::new(Arc::new(configs)),
            stamp: Mutex::new(before),
        }))
    }

    fn configs(&self) -> Arc<Configs> {
        match self.configs.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.configs().server.clone()
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.configs().client.clone()
    }

    /// Re-reads the files if they changed; a broken update is logged and the certificates in
    /// use are kept. Returns whether new certificates were loaded.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.dir);
        {
            let Ok(mut last) = self.stamp.lock() else {
                return false;
            };
            if *last == now {
                return false;
            }
            *last = now;
        }
        match build(&self.dir) {
            Ok(c) => {
                if let Ok(mut slot) = self.configs.write() {
                    *slot = Arc::new(c);
                }
                tracing::info!(dir = %self.dir.display(), "TLS certificates reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS files changed but do not load; keeping the certificates in use");
                false
            }
        }
    }
}

async fn watch(tls: std::sync::Weak<Tls>) {
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        let Some(t) = tls.upgrade() else { return };
        // A few stat calls; the rebuild is rare.
        t.reload_if_changed();
    }
}

// ---------------------------------------------------------------------------------------------
// Server side.

/// An accepted connection: plain TCP, or TLS over it once the handshake succeeded.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<Tcp>>),
}

/// TCP under TLS, read through a buffer: rustls reads at most 4 KiB per call, so a 16 KiB
/// record would take four system calls; reading the socket in [`READ_BUFFER`] blocks takes
/// one per many records.
pub type Tcp = tokio::io::BufReader<TcpStream>;
const READ_BUFFER: usize = 64 * 1024;

fn buffered(tcp: TcpStream) -> Tcp {
    tokio::io::BufReader::with_capacity(READ_BUFFER, tcp)
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Self::Plain(s) => s.connect_info(),
            Self::Tls(s) => s.get_ref().0.get_ref().connect_info(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections `listener` accepts, with Nagle's algorithm off, through a TLS handshake
/// when `tls` is set (each handshake on its own task, bounded in time and number; a client
/// whose certificate the CA does not trust never becomes a connection).
pub fn accept(listener: TcpListener, tls: Option<Arc<Tls>>) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &tls else {
                if tx.send(Ok(Conn::Plain(tcp))).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(buffered(tcp))).await
                {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(Conn::Tls(Box::new(s)))).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

// ---------------------------------------------------------------------------------------------
// Client side.

/// Dials a peer and runs the TLS handshake with the process's current certificates (so a
/// reconnect after a rotation presents the new one).
#[derive(Clone)]
pub struct Connector {
    tls: Arc<Tls>,
}

impl Connector {
    pub fn new(tls: Arc<Tls>) -> Self {
        Self { tls }
    }
}

type Connecting = Pin<
    Box<
        dyn std::future::Future<
                Output = io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<Tcp>>>,
            > + Send,
    >,
>;

impl tower_service::Service<tonic::codegen::http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<Tcp>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let config = self.tls.client_config();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?;
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port)).await?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(SERVER_NAME)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let s = tokio_rustls::TlsConnector::from(config)
                .connect(name, buffered(tcp))
                .await?;
            Ok(hyper_util::rt::TokioIo::new(s))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Issuing (the launcher and `moe-worker certs`; the operator issues with the same crate).

pub use moe_certs::Authority;

fn issuing(e: moe_certs::Error) -> Error {
    Error::invalid("certificate", e.to_string())
}

/// Writes a CA (certificate and key) and a fresh worker certificate into `dir`.
pub fn write_authority(dir: &Path, ca: &Authority, key_pem: &str, hours: u32) -> Result<()> {
    write_private(dir, CA_KEY_FILE, key_pem)?;
    write_private(dir, CA_FILE, ca.cert_pem())?;
    renew(dir, ca, hours)
}

/// The CA set in `dir` (written by [`write_authority`] and [`rotate_ca`]).
pub fn read_ca_set(dir: &Path) -> Result<moe_certs::CaSet> {
    moe_certs::CaSet::from_files(|f| std::fs::read_to_string(dir.join(f)).ok()).ok_or_else(|| {
        Error::invalid(
            "certificate",
            format!(
                "{}: no usable CA ({CA_FILE} and {CA_KEY_FILE}; make them with `moe-worker certs init`)",
                dir.display()
            ),
        )
    })
}

/// The CA that signs in `dir`.
pub fn read_authority(dir: &Path) -> Result<Authority> {
    read_ca_set(dir)?.authority().map_err(issuing)
}

/// One step of a CA rotation in `dir` (see [`moe_certs::CaSet`]): introduce a new CA into the
/// trust bundle, promote it to signing (and renew the worker certificate from it), or retire
/// the previous one. Workers using `dir` pick each step up by themselves; give them a few
/// seconds between steps.
pub fn rotate_ca(dir: &Path, ca_days: u32, hours: u32) -> Result<moe_certs::Step> {
    let mut set = read_ca_set(dir)?;
    let step = set.step(ca_days).map_err(issuing)?;
    let files = set.files();
    // The bundle last: what it trusts is on disk before any worker reads it.
    for (name, content) in files.iter().filter(|f| f.0 != CA_FILE) {
        match content {
            Some(text) => write_private(dir, name, text)?,
            None => match std::fs::remove_file(dir.join(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(Error::io(&dir.join(name), e));
                }
                _ => {}
            },
        }
    }
    write_private(dir, CA_FILE, &set.bundle())?;
    if step == moe_certs::Step::Promoted {
        renew(dir, &set.authority().map_err(issuing)?, hours)?;
    }
    Ok(step)
}

/// Issues a new worker certificate into `dir`, atomically per file (key first: a reader that
/// sees the new key with the old certificate fails to load and keeps what it has, then loads
/// both on its next look).
pub fn renew(dir: &Path, ca: &Authority, hours: u32) -> Result<()> {
    let (cert, key) = ca.issue("moe-worker", hours).map_err(issuing)?;
    write_private(dir, KEY_FILE, &key)?;
    write_private(dir, CERT_FILE, &cert)
}

/// Writes a file readable by its owner only, replacing any old one atomically.
fn write_private(dir: &Path, name: &str, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
}

// ---------------------------------------------------------------------------------------------
// `moe-worker certs`.

#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// A new CA (ca.crt, ca.key) and a worker certificate (tls.crt, tls.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 3650)]
        ca_days: u32,
        /// Hours the worker certificate is valid.
        #[arg(long, default_value_t = 720)]
        hours: u32,
    },
    /// A new worker certificate from the CA in DIR (workers using DIR pick it up by themselves).
    Renew {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 720)]
        hours: u32,
    },
    /// One step of a CA rotation in DIR: the first call adds a new CA to the trust bundle,
    /// the second makes it sign (and renews the worker certificate), the third drops the old
    /// CA. Wait until every worker has read each step (a few seconds) before the next.
    RotateCa {
        #[arg(long)]
        dir: PathBuf,
        /// Days a new CA is valid.
        #[arg(long, default_value_t = 3650)]
        ca_days: u32,
        /// Hours the renewed worker certificate is valid.
        #[arg(long, default_value_t = 720)]
        hours: u32,
    },
}

pub fn certs(c: CertsCommand) -> Result<()> {
    match c {
        CertsCommand::Init {
            dir,
            ca_days,
            hours,
        } => {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            let (ca, key) = Authority::generate(ca_days).map_err(issuing)?;
            write_authority(&dir, &ca, &key, hours)?;
            println!(
                "wrote {CA_FILE}, {CA_KEY_FILE}, {CERT_FILE}, {KEY_FILE} in {}",
                dir.display()
            );
        }
        CertsCommand::Renew { dir, hours } => {
            renew(&dir, &read_authority(&dir)?, hours)?;
            println!("renewed {CERT_FILE}, {KEY_FILE} in {}", dir.display());
        }
        CertsCommand::RotateCa {
            dir,
            ca_days,
            hours,
        } => {
            let what = match rotate_ca(&dir, ca_days, hours)? {
                moe_certs::Step::Introduced => {
                    "introduced a new CA (trusted, not signing yet); run again to promote it"
                }
                moe_certs::Step::Promoted => {
                    "the new CA signs now and the worker certificate is renewed; run again to retire the old CA"
                }
                moe_certs::Step::Retired => "retired the old CA; the rotation is complete",
            };
            println!("{}: {what}", dir.display());
        }
    }
    Ok(())
}

/// A folder that holds a launcher's CA and worker certificates, removed when dropped.
pub struct TempCerts {
    pub dir: PathBuf,
}

impl TempCerts {
    /// A fresh CA and worker certificate in a new folder only this user can read. Folders
    /// that launchers killed without a chance to clean up (SIGKILL) left behind are removed
    /// first: their names carry the pid, and that process is gone.
    pub fn new() -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        Self::remove_orphans();
        let dir = std::env::temp_dir().join(format!(
            "{}{}-{:016x}",
            Self::PREFIX,
            std::process::id(),
            super::random_u64()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        let made = Self { dir };
        let (ca, key) = Authority::generate(30).map_err(issuing)?;
        write_authority(&made.dir, &ca, &key, 24 * 30)?;
        Ok(made)
    }
}

impl TempCerts {
    const PREFIX: &str = "moe-serve-tls-";

    fn remove_orphans() {
        use std::os::unix::fs::MetadataExt;
        let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        // This process's user (it owns its /proc entry).
        let Ok(me) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(Self::PREFIX)) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let ours = std::fs::metadata(e.path()).is_ok_and(|m| m.is_dir() && m.uid() == me);
            if ours && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

impl Drop for TempCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_load_and_renew_from_the_written_ca() {
        let dir = TempCerts::new().expect("certs");
        let tls = Tls::load(&dir.dir).expect("load");
        assert!(!tls.reload_if_changed(), "nothing changed");
        std::thread::sleep(Duration::from_millis(20));
        let ca = read_authority(&dir.dir).expect("read CA");
        renew(&dir.dir, &ca, 1).expect("renew");
        assert!(
            tls.reload_if_changed(),
            "a renewed certificate is picked up"
        );
        // A broken update keeps the certificates in use.
        std::fs::write(dir.dir.join(CERT_FILE), "not a certificate").expect("write");
        assert!(!tls.reload_if_changed());
        let path = dir.dir.clone();
        drop(dir);
        assert!(!path.exists(), "the folder goes with the launcher");
    }

    #[test]
    fn a_killed_launchers_certificates_are_removed_by_the_next() {
        // No process has this pid.
        let orphan = std::env::temp_dir().join(format!("{}4294967294-0", TempCerts::PREFIX));
        // Made under another name and renamed: another test's launcher may sweep orphans at
        // any moment.
        let staging = std::env::temp_dir().join(format!("staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&orphan);
        std::fs::create_dir_all(&staging).expect("mkdir");
        std::fs::write(staging.join(KEY_FILE), "secret").expect("write");
        std::fs::rename(&staging, &orphan).expect("rename");
        let live = TempCerts::new().expect("certs");
        assert!(!orphan.exists(), "the dead launcher's keys are gone");
        assert!(live.dir.exists(), "a live one's stay");
    }

    #[test]
    fn init_refuses_to_guess_the_transport() {
        let e = init(&TlsArgs::default()).expect_err("neither flag");
        assert!(e.to_string().contains("--plaintext"), "{e}");
    }
}
