//! HTTPS served by the server itself: a generated certificate kept in the data folder, the
//! operator's certificate files, and handshakes that never finish.

use crate::common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// `AA:BB:...` of the DER certificate, computed here rather than by the code under test.
fn colon_hex_sha256(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What `curl --pinnedpubkey` takes for a public key (SubjectPublicKeyInfo, DER).
fn pin_of(spki_der: &[u8]) -> String {
    use base64::Engine;
    format!(
        "sha256//{}",
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(spki_der))
    )
}

/// The value of `key=` in the fingerprint file.
fn field(file: &str, key: &str) -> String {
    file.lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {file}"))
        .to_owned()
}

fn cert_der_of(pem_file: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(pem_file).unwrap()
}

/// A client trusting `cert_pem` and nothing else.
fn client_trusting(cert_pem: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The leaf the server presents, read through a handshake that trusts only `trust`.
async fn served_certificate(
    addr: SocketAddr,
    trust: &CertificateDer<'static>,
) -> Result<CertificateDer<'static>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .map_err(|elapsed| format!("handshake: {elapsed}"))?
    .map_err(|e| e.to_string())?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or("no certificate presented")?;
    Ok(leaf.clone().into_owned())
}

/// The error and its sources, as one line.
fn error_chain(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

async fn health_status(client: &reqwest::Client, url: &str) -> u16 {
    client.get(url).send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_certificate_is_served_kept_across_restarts_and_pinned() {
    let db = fresh_db(Backend::Sqlite).await;
    let dir = db.dir.path().to_path_buf();
    let srv = server::start(test_config(&db, &[("TLS", "auto")]))
        .await
        .unwrap();

    let cert_pem = std::fs::read(dir.join("tls-cert.pem")).unwrap();
    let cert_der = cert_der_of(&dir.join("tls-cert.pem"));
    let key_pem = std::fs::read_to_string(dir.join("tls-key.pem")).unwrap();
    let fingerprint_file = std::fs::read_to_string(dir.join("tls-fingerprint")).unwrap();
    assert_eq!(
        field(&fingerprint_file, "sha256_fingerprint"),
        colon_hex_sha256(&cert_der)
    );
    let public_key = rcgen::KeyPair::from_pem(&key_pem).unwrap().public_key_der();
    assert_eq!(
        field(&fingerprint_file, "pinned_pubkey"),
        pin_of(&public_key)
    );
    assert!(!fingerprint_file.contains("PRIVATE KEY"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("tls-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key file mode {:o}", mode & 0o777);
    }
    assert_eq!(
        served_certificate(srv.addr, &cert_der).await,
        Ok(cert_der.clone())
    );

    // Trusting that certificate and nothing else is enough, by address and by name.
    let trusted = client_trusting(&cert_pem);
    let by_ip = format!("https://{}/api/health", srv.addr);
    assert_eq!(health_status(&trusted, &by_ip).await, 200);
    let by_name = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&cert_pem).unwrap())
        .resolve("localhost", srv.addr)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/api/health", srv.addr.port());
    assert_eq!(health_status(&by_name, &url).await, 200);

    // The usual trust store does not know it.
    let err = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(&by_ip)
        .send()
        .await
        .unwrap_err();
    let chain = error_chain(&err);
    assert!(
        chain.contains("UnknownIssuer") || chain.contains("certificate"),
        "{chain}"
    );
    // Plain HTTP on the same port gets no HTTP answer.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("http://{}/api/health", srv.addr))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");

    srv.stop().await;
    let again = server::start(test_config(&db, &[("TLS", "auto")]))
        .await
        .unwrap();
    assert_eq!(
        served_certificate(again.addr, &cert_der).await,
        Ok(cert_der.clone()),
        "a restart keeps the certificate"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("tls-key.pem")).unwrap(),
        key_pem
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("tls-fingerprint")).unwrap(),
        fingerprint_file
    );
    let url = format!("https://{}/api/health", again.addr);
    assert_eq!(health_status(&trusted, &url).await, 200);
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_certificate_files_are_served() {
    let db = fresh_db(Backend::Sqlite).await;
    let files = tempfile::tempdir().unwrap();
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_path = files.path().join("server.crt");
    let key_path = files.path().join("server.key");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.key_pair.serialize_pem()).unwrap();
    let (cert_arg, key_arg) = (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );

    // A key that is not the certificate's stops the start, naming the file, not its contents.
    let other_key = files.path().join("other.key");
    let stranger = rcgen::KeyPair::generate().unwrap();
    std::fs::write(&other_key, stranger.serialize_pem()).unwrap();
    let other_arg = other_key.display().to_string();
    let refused = server::start(test_config(
        &db,
        &[
            ("TLS", "files"),
            ("TLS_CERT_FILE", &cert_arg),
            ("TLS_KEY_FILE", &other_arg),
        ],
    ))
    .await
    .err()
    .expect("a key that does not fit must stop the start");
    let text = format!("{refused:#}");
    assert!(text.contains("other.key"), "{text}");
    assert!(!text.contains("PRIVATE KEY"), "{text}");

    let srv = server::start(test_config(
        &db,
        &[
            ("TLS", "files"),
            ("TLS_CERT_FILE", &cert_arg),
            ("TLS_KEY_FILE", &key_arg),
        ],
    ))
    .await
    .unwrap();
    let expected = CertificateDer::from(certified.cert.der().to_vec());
    assert_eq!(
        served_certificate(srv.addr, &expected).await,
        Ok(expected.clone())
    );
    let fingerprint_file = std::fs::read_to_string(db.dir.path().join("tls-fingerprint")).unwrap();
    assert_eq!(
        field(&fingerprint_file, "sha256_fingerprint"),
        colon_hex_sha256(certified.cert.der())
    );
    assert_eq!(
        field(&fingerprint_file, "pinned_pubkey"),
        pin_of(&certified.key_pair.public_key_der())
    );
    assert!(
        !db.dir.path().join("tls-cert.pem").exists() && !db.dir.path().join("tls-key.pem").exists(),
        "no certificate is generated when files are given"
    );
    let trusted = client_trusting(certified.cert.pem().as_bytes());
    let url = format!("https://{}/api/health", srv.addr);
    assert_eq!(health_status(&trusted, &url).await, 200);
    srv.stop().await;
}

/// Opens a connection and sends the start of a TLS record announcing a ClientHello that
/// never comes.
fn stalled_client(addr: SocketAddr) -> std::net::TcpStream {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
    stream.set_nonblocking(true).unwrap();
    stream
}

/// True while the server keeps the connection open without having sent anything.
fn still_open(stream: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Resolves when the server closes the connection; panics after `deadline`.
async fn closed_within(stream: std::net::TcpStream, deadline: Duration, what: &str) {
    let mut stream = tokio::net::TcpStream::from_std(stream).unwrap();
    let mut buf = [0u8; 256];
    let started = Instant::now();
    loop {
        match tokio::time::timeout(
            deadline.saturating_sub(started.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => panic!("{what}: still open after {deadline:?}"),
            // An alert, then the close.
            Ok(Ok(n)) if n > 0 => continue,
            Ok(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_that_never_finish_block_neither_clients_nor_the_shutdown() {
    let db = fresh_db(Backend::Sqlite).await;
    let mut config = test_config(&db, &[("TLS", "auto")]);
    // Longer than the test: whatever happens here happens while the stalled clients hang.
    config.tls_handshake_timeout = Duration::from_secs(120);
    let srv = server::start(config).await.unwrap();
    let cert_pem = std::fs::read(db.dir.path().join("tls-cert.pem")).unwrap();
    let mut stalled: Vec<_> = (0..16).map(|_| stalled_client(srv.addr)).collect();

    // Fresh connections each time, so every request needs a handshake of its own.
    let url = format!("https://{}/api/health", srv.addr);
    for round in 0..3 {
        let client = client_trusting(&cert_pem);
        let status = tokio::time::timeout(Duration::from_secs(5), health_status(&client, &url))
            .await
            .unwrap_or_else(|_| panic!("round {round}: no answer within 5 s"));
        assert_eq!(status, 200);
    }
    for (i, stream) in stalled.iter_mut().enumerate() {
        assert!(still_open(stream), "stalled client {i} was already dropped");
    }

    // Stopping does not wait for handshakes in progress.
    tokio::time::timeout(Duration::from_secs(10), srv.stop())
        .await
        .expect("stop waited for handshakes that never finish");
    for stream in stalled {
        closed_within(stream, Duration::from_secs(5), "after stop").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_finishes_is_dropped_after_the_timeout() {
    let db = fresh_db(Backend::Sqlite).await;
    let mut config = test_config(&db, &[("TLS", "auto")]);
    config.tls_handshake_timeout = Duration::from_millis(300);
    let srv = server::start(config).await.unwrap();
    let silent = std::net::TcpStream::connect(srv.addr).unwrap();
    silent.set_nonblocking(true).unwrap();
    let partial = stalled_client(srv.addr);
    let started = Instant::now();
    closed_within(silent, Duration::from_secs(10), "silent client").await;
    closed_within(partial, Duration::from_secs(10), "partial ClientHello").await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "dropped before the timeout: {:?}",
        started.elapsed()
    );
    let cert_pem = std::fs::read(db.dir.path().join("tls-cert.pem")).unwrap();
    let url = format!("https://{}/api/health", srv.addr);
    assert_eq!(health_status(&client_trusting(&cert_pem), &url).await, 200);
    srv.stop().await;
}
