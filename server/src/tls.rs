//! HTTPS: the certificate the server presents and the accept loop that serves the router
//! over it.
//!
//! The certificate is either the operator's (`TLS_CERT_FILE`, `TLS_KEY_FILE`) or a
//! self-signed one made on first start and kept in the data folder (`tls-cert.pem`,
//! `tls-key.pem`), so its fingerprint stays the same from one start to the next. Either
//! way the server logs the certificate's SHA-256 fingerprint and the SHA-256 of its public
//! key (what `curl --pinnedpubkey` takes) and writes both to `tls-fingerprint`.
//!
//! Serving is a small loop over tokio-rustls and hyper-util rather than `axum::serve`, which
//! has no TLS: every connection's handshake runs on its own task under a deadline, so a
//! client that connects and never finishes its handshake holds nothing but its own task,
//! and only until the deadline. Shutdown is graceful as with `axum::serve`: the listener
//! closes, handshakes in progress are dropped, and open connections finish the requests
//! they are serving.

use crate::config::{Config, TlsMode};
use anyhow::Context;
use base64::Engine;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::net::TcpListener;
pub use tokio_rustls::TlsAcceptor;

/// The generated certificate, in the data folder.
pub const CERT_FILE: &str = "tls-cert.pem";
/// The generated certificate's private key, in the data folder (mode 0600).
pub const KEY_FILE: &str = "tls-key.pem";
/// Fingerprint and public-key pin of the certificate being served, in the data folder.
pub const FINGERPRINT_FILE: &str = "tls-fingerprint";

/// Validity of a generated certificate: 825 days, the longest Apple platforms accept.
const GENERATED_VALIDITY: time::Duration = time::Duration::days(825);
/// A generated certificate this close to its end is replaced at start, with the same key.
const RENEW_BEFORE: time::Duration = time::Duration::days(30);
/// Longest an HTTP/1 client may take to send a request's headers once connected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What identifies the certificate being served; nothing here is secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// SHA-256 of the leaf certificate (DER), as `AA:BB:...`.
    pub sha256_fingerprint: String,
    /// `sha256//` and the base64 SHA-256 of the leaf's SubjectPublicKeyInfo.
    pub pinned_pubkey: String,
    pub not_after: OffsetDateTime,
}

impl Identity {
    /// Identifies a DER certificate.
    pub fn of(cert_der: &[u8]) -> anyhow::Result<Self> {
        let facts = cert_facts(cert_der).context("not an X.509 certificate")?;
        let spki_hash = Sha256::digest(facts.spki);
        Ok(Self {
            sha256_fingerprint: fingerprint(cert_der),
            pinned_pubkey: format!(
                "sha256//{}",
                base64::engine::general_purpose::STANDARD.encode(spki_hash)
            ),
            not_after: facts.not_after,
        })
    }
}

/// `AA:BB:...`: SHA-256 of `der` in upper-case hex, bytes separated by colons.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Readies the certificate `config` asks for, logs what identifies it and writes that to
/// `data_dir/tls-fingerprint`; `None` when `TLS=off`.
pub fn prepare(config: &Config) -> anyhow::Result<Option<TlsAcceptor>> {
    let (cert, key, source) = match &config.tls {
        TlsMode::Off => {
            tracing::warn!(
                "TLS=off: serving plain HTTP; tokens and data cross the network in clear \
                 unless a reverse proxy in front terminates TLS"
            );
            return Ok(None);
        }
        TlsMode::Files { cert, key } => (cert.clone(), key.clone(), "files"),
        TlsMode::Generated => {
            let (cert, key) = ensure_generated(&config.data_dir, &config.tls_subject_names)?;
            (cert, key, "generated")
        }
    };
    let (acceptor, identity) = load(&cert, &key)?;
    let now = OffsetDateTime::now_utc();
    if identity.not_after <= now {
        tracing::error!(certificate = %cert.display(), not_after = %identity.not_after, "the TLS certificate has expired; clients will refuse it");
    } else if identity.not_after - now < RENEW_BEFORE {
        tracing::warn!(certificate = %cert.display(), not_after = %identity.not_after, "the TLS certificate expires soon");
    }
    write_fingerprint_file(&config.data_dir, &cert, &identity)?;
    tracing::info!(
        source,
        certificate = %cert.display(),
        sha256_fingerprint = %identity.sha256_fingerprint,
        pinned_pubkey = %identity.pinned_pubkey,
        not_after = %identity.not_after,
        "serving HTTPS"
    );
    Ok(Some(acceptor))
}

/// A TLS acceptor for the PEM chain in `cert` and the PEM key in `key`, and the leaf's
/// identity. Errors name the files, never their contents.
pub fn load(cert: &Path, key: &Path) -> anyhow::Result<(TlsAcceptor, Identity)> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?;
    let leaf = chain
        .first()
        .with_context(|| format!("no certificate in {}", cert.display()))?;
    let identity = Identity::of(leaf)
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?;
    let private_key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the TLS private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .with_context(|| {
            format!(
                "the TLS private key {} does not fit the certificate {}",
                key.display(),
                cert.display()
            )
        })?;
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(server_config)), identity))
}

/// The generated certificate and key in `dir`, made on first start and reused afterwards.
/// A certificate near its end (or missing beside its key) is made again with the same key,
/// so the public-key pin survives; only a missing key means a new key.
fn ensure_generated(dir: &Path, extra_names: &[String]) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let key_pem = match std::fs::read_to_string(&key_path) {
        Ok(pem) => Some(pem),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => {
            return Err(err).with_context(|| format!("reading {}", key_path.display()));
        }
    };
    let key_pair = match key_pem {
        Some(pem) => {
            warn_if_readable_by_others(&key_path);
            let key_pair = rcgen::KeyPair::from_pem(&pem)
                .with_context(|| format!("{} is not a PKCS#8 private key", key_path.display()))?;
            match std::fs::read(&cert_path) {
                Ok(existing) => {
                    let der = CertificateDer::from_pem_slice(&existing)
                        .with_context(|| format!("reading {}", cert_path.display()))?;
                    let facts = cert_facts(&der)
                        .with_context(|| format!("{} is not a certificate", cert_path.display()))?;
                    if facts.not_after - OffsetDateTime::now_utc() > RENEW_BEFORE {
                        return Ok((cert_path, key_path));
                    }
                    tracing::warn!(
                        certificate = %cert_path.display(),
                        not_after = %facts.not_after,
                        "the generated TLS certificate is near its end; making a new one with \
                         the same key: its fingerprint changes, its public-key pin does not"
                    );
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(certificate = %cert_path.display(), "generated TLS certificate missing beside its key; making it again with the same key");
                }
                Err(err) => {
                    return Err(err).with_context(|| format!("reading {}", cert_path.display()));
                }
            }
            key_pair
        }
        None => {
            if cert_path.exists() {
                tracing::warn!(key = %key_path.display(), "the generated TLS certificate's key is missing; making a new key and certificate: the fingerprint changes");
            }
            let key_pair = rcgen::KeyPair::generate().context("generating a TLS key")?;
            write_atomically(&key_path, key_pair.serialize_pem().as_bytes(), true)?;
            key_pair
        }
    };
    let names = subject_names(extra_names);
    let cert = self_signed(&key_pair, &names)?;
    write_atomically(&cert_path, cert.pem().as_bytes(), false)?;
    tracing::info!(certificate = %cert_path.display(), names = ?names, "generated a self-signed TLS certificate");
    Ok((cert_path, key_path))
}

/// localhost, the loopback addresses, the machine's hostname and `extra`, without repeats.
fn subject_names(extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Some(host) = hostname() {
        names.push(host);
    }
    names.extend(extra.iter().cloned());
    let mut unique = Vec::with_capacity(names.len());
    for name in names {
        if !unique.contains(&name) {
            unique.push(name);
        }
    }
    unique
}

/// The kernel's hostname when it is usable as a DNS name.
fn hostname() -> Option<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()?;
    let host = raw.trim().to_ascii_lowercase();
    let usable = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    usable.then_some(host)
}

fn self_signed(key_pair: &rcgen::KeyPair, names: &[String]) -> anyhow::Result<rcgen::Certificate> {
    let mut params = rcgen::CertificateParams::new(names.to_vec())
        .context("subject names of the TLS certificate")?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "vm-healthcheck");
    params.distinguished_name = dn;
    // Random: browsers refuse a new certificate with an issuer and serial they saw before.
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + GENERATED_VALIDITY;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params
        .self_signed(key_pair)
        .context("signing the TLS certificate")
}

/// Writes through a temporary file and a rename, so a crash leaves the old file or the
/// new one; `private` files are created readable by their owner only.
fn write_atomically(path: &Path, contents: &[u8], private: bool) -> anyhow::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    // A leftover from a crash may have other permissions; the mode applies only on creation.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", tmp.display())),
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(file);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(key = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "the TLS private key is readable by others than its owner; chmod 600 it");
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

fn write_fingerprint_file(dir: &Path, cert: &Path, identity: &Identity) -> anyhow::Result<()> {
    let text = format!(
        "# The TLS certificate vm-healthcheck serves: {cert}\n\
         # Compare sha256_fingerprint with what a browser shows for the certificate. Clients\n\
         # can trust the certificate file itself (curl --cacert), or pin the public key:\n\
         #   curl -k --pinnedpubkey '{pin}' https://HOST:PORT/api/health\n\
         # The certificate is valid until {not_after}.\n\
         sha256_fingerprint={fingerprint}\n\
         pinned_pubkey={pin}\n",
        cert = cert.display(),
        pin = identity.pinned_pubkey,
        fingerprint = identity.sha256_fingerprint,
        not_after = identity.not_after,
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomically(&dir.join(FINGERPRINT_FILE), text.as_bytes(), false)
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves, then stops accepting,
/// drops handshakes in progress and waits for open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    // Dropping the sender tells handshakes in progress to give up.
    let (stop_handshakes, handshakes_stopped) = tokio::sync::watch::channel(());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) if is_connection_error(&err) => continue,
                Err(err) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::error!(error = %err, "accepting a connection failed");
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        let watcher = graceful.watcher();
        let mut stopped = handshakes_stopped.clone();
        let (acceptor, app, builder) = (acceptor.clone(), app.clone(), builder.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp));
            let tls = tokio::select! {
                result = handshake => match result {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, error = %err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                _ = stopped.changed() => return,
            };
            // The peer address, as `axum::serve` gives it, for the audit log and throttles.
            let app = tower::ServiceExt::map_request(
                app,
                move |mut request: axum::http::Request<hyper::body::Incoming>| {
                    request
                        .extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    request
                },
            );
            let service = hyper_util::service::TowerToHyperService::new(app);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            if let Err(err) = watcher.watch(connection).await {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(stop_handshakes);
    graceful.shutdown().await;
    Ok(())
}

/// Errors of one connection that say nothing about the listener (as `axum::serve` has it).
fn is_connection_error(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// What the server reads from a certificate.
struct CertFacts<'a> {
    /// The SubjectPublicKeyInfo, header included.
    spki: &'a [u8],
    not_after: OffsetDateTime,
}

/// One DER element: its tag, its contents, the whole encoding, and what follows it.
struct Der<'a> {
    tag: u8,
    contents: &'a [u8],
    whole: &'a [u8],
}

fn der_next(input: &[u8]) -> Option<(Der<'_>, &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(count)?;
        let len = bytes
            .iter()
            .fold(0usize, |len, byte| (len << 8) | usize::from(*byte));
        (len, rest)
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    let whole = input.get(..input.len() - rest.len())?;
    Some((
        Der {
            tag,
            contents,
            whole,
        },
        rest,
    ))
}

const SEQUENCE: u8 = 0x30;

/// The SubjectPublicKeyInfo and the end of validity of an X.509 certificate (RFC 5280
/// 4.1): Certificate = SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
/// serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, ... }, ... }.
fn cert_facts(der: &[u8]) -> Option<CertFacts<'_>> {
    let (certificate, _) = der_next(der)?;
    let (tbs, _) = der_next(certificate.contents)?;
    if certificate.tag != SEQUENCE || tbs.tag != SEQUENCE {
        return None;
    }
    let (mut field, mut rest) = der_next(tbs.contents)?;
    if field.tag == 0xa0 {
        (field, rest) = der_next(rest)?;
    }
    // field is the serial number; then signature, issuer, validity.
    let (_signature, rest) = der_next(rest)?;
    let (_issuer, rest) = der_next(rest)?;
    let (validity, rest) = der_next(rest)?;
    let (_subject, rest) = der_next(rest)?;
    let (spki, _) = der_next(rest)?;
    if field.tag != 0x02 || validity.tag != SEQUENCE || spki.tag != SEQUENCE {
        return None;
    }
    let (_not_before, after) = der_next(validity.contents)?;
    let (not_after, _) = der_next(after)?;
    Some(CertFacts {
        spki: spki.whole,
        not_after: der_time(not_after.tag, not_after.contents)?,
    })
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), as certificates use
/// them (RFC 5280 4.1.2.5).
fn der_time(tag: u8, text: &[u8]) -> Option<OffsetDateTime> {
    let number = |from: usize, to: usize| -> Option<u32> {
        let digits = text.get(from..to)?;
        digits.iter().try_fold(0u32, |n, d| {
            d.is_ascii_digit()
                .then(|| n * 10 + u32::from(d.saturating_sub(b'0')))
        })
    };
    let (year, at) = match (tag, text.len()) {
        (0x17, 13) => {
            let yy = number(0, 2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        (0x18, 15) => (number(0, 4)?, 4),
        _ => return None,
    };
    if text.last() != Some(&b'Z') {
        return None;
    }
    let narrow = |n: u32| u8::try_from(n).ok();
    let date = time::Date::from_calendar_date(
        i32::try_from(year).ok()?,
        time::Month::try_from(narrow(number(at, at + 2)?)?).ok()?,
        narrow(number(at + 2, at + 4)?)?,
    )
    .ok()?;
    let clock = time::Time::from_hms(
        narrow(number(at + 4, at + 6)?)?,
        narrow(number(at + 6, at + 8)?)?,
        narrow(number(at + 8, at + 10)?)?,
    )
    .ok()?;
    Some(time::PrimitiveDateTime::new(date, clock).assume_utc())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cert_until(not_after: OffsetDateTime) -> (rcgen::KeyPair, rcgen::Certificate) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_after = not_after;
        let cert = params.self_signed(&key).unwrap();
        (key, cert)
    }

    #[test]
    fn the_public_key_and_end_of_validity_are_read_from_the_certificate() {
        // Before 2050 certificates carry UTCTime, from 2050 on GeneralizedTime.
        for end in [
            time::macros::datetime!(2031-02-03 04:05:06 UTC),
            time::macros::datetime!(2061-12-31 23:59:58 UTC),
        ] {
            let (key, cert) = cert_until(end);
            let facts = cert_facts(cert.der()).unwrap();
            assert_eq!(facts.spki, key.public_key_der().as_slice());
            assert_eq!(facts.not_after, end);
        }
    }

    #[test]
    fn the_pin_is_the_hash_of_the_public_key() {
        let (key, cert) = cert_until(time::macros::datetime!(2040-01-01 0:00 UTC));
        let identity = Identity::of(cert.der()).unwrap();
        let expected =
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(key.public_key_der()));
        assert_eq!(identity.pinned_pubkey, format!("sha256//{expected}"));
        assert_eq!(identity.sha256_fingerprint.len(), 32 * 3 - 1);
        assert_eq!(
            proxmox::tls::parse_fingerprint(&identity.sha256_fingerprint),
            Some(Sha256::digest(cert.der()).into())
        );
    }

    #[test]
    fn damaged_certificates_are_refused() {
        let (_, cert) = cert_until(time::macros::datetime!(2040-01-01 0:00 UTC));
        let der = cert.der().to_vec();
        for cut in [0, 1, 10, der.len() / 2, der.len() - 1] {
            // Truncated inside the TBS: the outer length no longer fits.
            assert!(
                cert_facts(der.split_at_checked(cut).unwrap().0).is_none(),
                "cut at {cut}"
            );
        }
        assert!(Identity::of(b"not a certificate").is_err());
        assert_eq!(
            der_time(0x17, b"991231235959Z"),
            Some(time::macros::datetime!(1999-12-31 23:59:59 UTC))
        );
        assert_eq!(der_time(0x17, b"991331235959Z"), None);
        assert_eq!(der_time(0x18, b"2031020304050+Z"), None);
    }

    #[test]
    fn generated_certificates_cover_the_local_names_and_the_extra_ones() {
        let names = subject_names(&["monitor.example.org".into(), "localhost".into()]);
        assert_eq!(names.first().map(String::as_str), Some("localhost"));
        assert!(names.contains(&"127.0.0.1".to_string()));
        assert!(names.contains(&"monitor.example.org".to_string()));
        assert_eq!(names.iter().filter(|n| *n == "localhost").count(), 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = self_signed(&key, &names).unwrap();
        let facts = cert_facts(cert.der()).unwrap();
        let left = facts.not_after - OffsetDateTime::now_utc();
        assert!(
            left > GENERATED_VALIDITY - time::Duration::minutes(5),
            "{left}"
        );
        assert!(left <= GENERATED_VALIDITY);
    }

    #[test]
    fn a_generated_certificate_is_kept_then_renewed_with_its_key_near_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = ensure_generated(dir.path(), &[]).unwrap();
        let first = std::fs::read(&cert_path).unwrap();
        let key = std::fs::read(&key_path).unwrap();
        ensure_generated(dir.path(), &[]).unwrap();
        assert_eq!(std::fs::read(&cert_path).unwrap(), first, "reused");

        // A certificate 10 days from its end is made again with the same key.
        let key_pair = rcgen::KeyPair::from_pem(std::str::from_utf8(&key).unwrap()).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_after = OffsetDateTime::now_utc() + time::Duration::days(10);
        std::fs::write(&cert_path, params.self_signed(&key_pair).unwrap().pem()).unwrap();
        let near_end = std::fs::read(&cert_path).unwrap();
        ensure_generated(dir.path(), &[]).unwrap();
        let renewed = std::fs::read(&cert_path).unwrap();
        assert_ne!(renewed, near_end);
        assert_eq!(std::fs::read(&key_path).unwrap(), key, "same key");
        let (_, before) = load(&cert_path, &key_path).unwrap();
        assert!(before.not_after - OffsetDateTime::now_utc() > time::Duration::days(800));

        // Without its key the certificate is replaced by a new pair.
        std::fs::remove_file(&key_path).unwrap();
        ensure_generated(dir.path(), &[]).unwrap();
        let (_, after) = load(&cert_path, &key_path).unwrap();
        assert_ne!(after.pinned_pubkey, before.pinned_pubkey);
    }

    #[test]
    fn a_key_that_does_not_fit_the_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, cert) = cert_until(time::macros::datetime!(2040-01-01 0:00 UTC));
        let other = rcgen::KeyPair::generate().unwrap();
        let cert_path = dir.path().join("c.pem");
        let key_path = dir.path().join("k.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, other.serialize_pem()).unwrap();
        let err = load(&cert_path, &key_path).err().unwrap();
        let text = format!("{err:#}");
        assert!(text.contains("does not fit"), "{text}");
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        std::fs::write(&key_path, "garbage").unwrap();
        assert!(load(&cert_path, &key_path).is_err());
    }
}
