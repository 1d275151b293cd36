//! People and scripts: who a request is (session, API token or the bootstrap admin token),
//! passwords, the first-start setup, sign-in and sign-out, and the audit log.

pub mod sessions;

use crate::auth::{Role, bearer_token, hash_token};
use crate::config::Secret;
use crate::db::people::{self, AuditEntry, UserRow};
use crate::db::{Conn, Db, DbError, store};
use crate::state::AppState;
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use domain::UserRole;
use serde::{Deserialize, Serialize};
use sessions::USER_KEY;
use std::path::{Path, PathBuf};
use tower_sessions::Session;

/// How a request proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Session,
    ApiToken,
    /// `ADMIN_TOKEN`: the bootstrap credential, an admin.
    BootstrapToken,
}

/// Who is asking, and what they may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The user name, or "admin token" for the bootstrap credential.
    pub name: String,
    pub role: UserRole,
    pub via: Via,
}

/// What a signed-in session keeps.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionUser {
    pub user_id: i64,
    pub login_ms: i64,
    pub seen_ms: i64,
}

/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 12;
const MAX_PASSWORD_CHARS: usize = 1024;
const MAX_USERNAME_CHARS: usize = 64;
/// How often a session's idle clock is pushed forward (a write), at most.
const SEEN_REFRESH_MS: i64 = 60_000;
/// Name of the setup code in the credentials table.
const SETUP_CREDENTIAL: &str = "setup";

/// Why a username or password is not acceptable.
pub fn check_username(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_USERNAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "1 to {MAX_USERNAME_CHARS} characters: letters, digits, '.', '_', '-', '@'"
        ))
    }
}

pub fn check_password(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if (MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "at least {MIN_PASSWORD_CHARS} characters (at most {MAX_PASSWORD_CHARS})"
        ))
    }
}

/// Password hashes computed at once: each takes 19 MiB and a core, so a flood of sign-ins
/// queues here instead of exhausting memory.
static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// An argon2id hash (the crate's defaults: 19 MiB, 2 passes), off the async threads.
pub async fn hash_password(password: &str) -> anyhow::Result<String> {
    let _turn = HASHING.acquire().await?;
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
    })
    .await?
}

/// Checks a password against a stored hash; a hash that does not parse never matches.
pub async fn verify_password(password: &str, hash: &str) -> bool {
    let Ok(_turn) = HASHING.acquire().await else {
        return false;
    };
    let (password, hash) = (password.to_owned(), hash.to_owned());
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// Compared against when the user does not exist, so that timing does not tell names apart.
static DUMMY_HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

async fn dummy_hash() -> &'static str {
    if let Some(hash) = DUMMY_HASH.get() {
        return hash;
    }
    let hash = hash_password("not-a-password-of-anyone")
        .await
        .unwrap_or_default();
    DUMMY_HASH.get_or_init(|| hash)
}

/// Who the request is: a bearer token (the bootstrap admin token or a user's API token)
/// or a signed-in session. `None` when neither proves anything.
pub async fn principal(state: &AppState, parts: &Parts) -> Result<Option<Principal>, DbError> {
    if let Some(token) = bearer_token(&parts.headers) {
        if state.credentials.allows(Role::Admin, &parts.headers) {
            return Ok(Some(Principal {
                name: Role::Admin.credential_name().to_owned(),
                role: UserRole::Admin,
                via: Via::BootstrapToken,
            }));
        }
        let mut conn = state.db.conn().await?;
        let Some(owner) = people::api_token_by_hash(&mut conn, &hash_token(token)).await? else {
            return Ok(None);
        };
        let now = crate::now_ms();
        if owner
            .last_used_ms
            .is_none_or(|t| now.saturating_sub(t) > SEEN_REFRESH_MS)
        {
            people::touch_api_token(&mut conn, owner.token_id, now).await?;
        }
        return Ok(Some(Principal {
            name: owner.username,
            // A token never does more than its owner may now.
            role: owner.role.min(owner.owner_role),
            via: Via::ApiToken,
        }));
    }
    let Some(session) = parts.extensions.get::<Session>() else {
        return Ok(None);
    };
    session_principal(state, session).await
}

async fn session_principal(
    state: &AppState,
    session: &Session,
) -> Result<Option<Principal>, DbError> {
    let Ok(Some(mut user)) = session.get::<SessionUser>(USER_KEY).await else {
        return Ok(None);
    };
    let now = crate::now_ms();
    let settings = state.config.accounts;
    if now.saturating_sub(user.login_ms) > settings.session_max_ms {
        let _ = session.flush().await;
        return Ok(None);
    }
    let mut conn = state.db.conn().await?;
    let Some(row) = people::user_by_id(&mut conn, user.user_id).await? else {
        let _ = session.flush().await;
        return Ok(None);
    };
    if row.password_changed_ms > user.login_ms {
        let _ = session.flush().await;
        return Ok(None);
    }
    if now.saturating_sub(user.seen_ms) > SEEN_REFRESH_MS {
        user.seen_ms = now;
        // Saving pushes the idle expiry forward; a failure only shortens the session.
        let _ = session.insert(USER_KEY, &user).await;
    }
    Ok(Some(Principal {
        name: row.username,
        role: row.role.0,
        via: Via::Session,
    }))
}

/// True when a state-changing request made with a session cookie comes from our own pages:
/// `Sec-Fetch-Site: same-origin`, or else an `Origin` equal to the request's host. Scripts
/// use bearer tokens, which a cross-site page cannot send.
pub fn same_origin(method: &Method, headers: &HeaderMap) -> bool {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return true;
    }
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return matches!(site, "same-origin" | "none");
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match (origin, host) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host)),
        _ => false,
    }
}

/// The client's address: the peer, or what a trusted reverse proxy says (see `web.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::IpAddr);

/// Where the request came from, for the audit log and the throttle.
pub fn source(extensions: &axum::http::Extensions) -> String {
    extensions
        .get::<ClientAddr>()
        .map(|addr| addr.0)
        .or_else(|| {
            extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0.ip())
        })
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The client behind `peer`: the last `X-Forwarded-For` entry when `peer` is a trusted
/// proxy (the one address that proxy saw), else `peer` itself.
pub fn client_addr(
    peer: std::net::IpAddr,
    headers: &HeaderMap,
    trusted_proxies: &[std::net::IpAddr],
) -> std::net::IpAddr {
    if !trusted_proxies.contains(&peer) {
        return peer;
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .last()
        .and_then(|ip| ip.trim().parse().ok())
        .unwrap_or(peer)
}

/// Whether a request's `Host` is one the server answers to: `public_host` (from
/// `PUBLIC_URL`) or a loopback name; any host when `PUBLIC_URL` is unset. A page served to
/// another name (DNS rebinding) would otherwise talk to us with the victim's network access.
pub fn host_allowed(host: Option<&str>, public_host: Option<&str>) -> bool {
    let Some(public) = public_host else {
        return true;
    };
    let Some(host) = host.map(str::to_ascii_lowercase) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default().to_owned(),
        None => host.split(':').next().unwrap_or_default().to_owned(),
    };
    host == public
        || public.split(':').next() == Some(name.as_str()) && !public.contains(':')
        || matches!(name.as_str(), "localhost" | "127.0.0.1" | "::1")
}

/// Why a sign-in did not happen.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("wrong user name or password")]
    /// Wrong name or password (never says which).
    Invalid,
    /// Too many failures for this account or address; retry after this many ms.
    #[error("too many failed attempts")]
    Throttled(i64),
    #[error("storage unavailable")]
    Unavailable,
}

fn login_unavailable(err: impl std::fmt::Display) -> LoginError {
    tracing::warn!(error = %err, "sign-in failed on our side");
    LoginError::Unavailable
}

fn setup_unavailable(err: impl std::fmt::Display) -> SetupError {
    tracing::warn!(error = %err, "setup failed on our side");
    SetupError::Unavailable
}

/// A user name as the audit log keeps it: anyone can send any name, so at most 64
/// characters, and only if it could be a user name at all.
fn loggable(username: &str) -> String {
    if check_username(username).is_ok() {
        username.to_owned()
    } else {
        "(not a user name)".to_owned()
    }
}

/// One audit entry per window for a throttled name: a guessing run must not fill the log.
async fn audit_throttled(state: &AppState, username: &str, from: &str) {
    if state
        .login_throttle
        .first_refusal(&format!("audit:{from}:{username}"), crate::now_ms())
    {
        audit_quietly(
            state,
            &loggable(username),
            "login",
            None,
            from,
            "throttled",
            None,
        )
        .await;
    }
}

/// Checks a name and password and, when right, signs the session in (with a new id).
pub async fn login(
    state: &AppState,
    session: &Session,
    username: &str,
    password: &str,
    from: &str,
) -> Result<Principal, LoginError> {
    let now = crate::now_ms();
    let account_key = format!("user:{}", username.to_ascii_lowercase());
    let address_key = format!("addr:{from}");
    if let Err(wait) = state
        .login_throttle
        .begin(&[&account_key, &address_key], now)
    {
        audit_throttled(state, username, from).await;
        return Err(LoginError::Throttled(wait));
    }
    let row = {
        let mut conn = state.db.conn().await.map_err(login_unavailable)?;
        people::user_by_name(&mut conn, username)
            .await
            .map_err(login_unavailable)?
    };
    let ok = match &row {
        Some(row) => verify_password(password, &row.password_hash).await,
        None => {
            let _ = verify_password(password, dummy_hash().await).await;
            false
        }
    };
    let Some(row) = row.filter(|_| ok) else {
        audit_quietly(
            state,
            &loggable(username),
            "login",
            None,
            from,
            "failure",
            None,
        )
        .await;
        return Err(LoginError::Invalid);
    };
    state.login_throttle.succeeded(&account_key, &address_key);
    // Sign-ins are rare: a good moment to drop sessions that expired.
    if let Ok(mut conn) = state.db.conn().await
        && let Err(err) = people::delete_expired_sessions(&mut conn, now).await
    {
        tracing::warn!(error = %err, "could not delete expired sessions");
    }
    sign_in(session, &row, now).await?;
    audit_quietly(state, &row.username, "login", None, from, "success", None).await;
    Ok(Principal {
        name: row.username,
        role: row.role.0,
        via: Via::Session,
    })
}

async fn sign_in(session: &Session, row: &UserRow, now: i64) -> Result<(), LoginError> {
    // A new id at sign-in: a session id planted before it is worth nothing after.
    session.cycle_id().await.map_err(login_unavailable)?;
    session
        .insert(
            USER_KEY,
            SessionUser {
                user_id: row.id,
                login_ms: now,
                seen_ms: now,
            },
        )
        .await
        .map_err(login_unavailable)
}

/// Ends the session everywhere (its row is deleted; every replica reads the table).
pub async fn logout(state: &AppState, session: &Session, from: &str) {
    let name = match session_principal(state, session).await {
        Ok(Some(p)) => Some(p.name),
        _ => None,
    };
    let _ = session.flush().await;
    if let Some(name) = name {
        audit_quietly(state, &name, "logout", None, from, "success", None).await;
    }
}

/// Writes an audit entry; a failure is logged and does not fail the request it records.
pub async fn audit_quietly(
    state: &AppState,
    actor: &str,
    action: &str,
    target: Option<&str>,
    from: &str,
    outcome: &str,
    detail: Option<&str>,
) {
    let entry = AuditEntry {
        actor,
        action,
        target,
        source: Some(from),
        outcome,
        detail,
    };
    let result = match state.db.conn().await {
        Ok(mut conn) => people::audit(&mut conn, &entry, crate::now_ms()).await,
        Err(err) => Err(err),
    };
    if let Err(err) = result {
        tracing::error!(error = %err, action, outcome, "could not write the audit log");
    }
}

/// First start: with no user, `ADMIN_USERNAME`/`ADMIN_PASSWORD` create the first admin;
/// otherwise a one-time setup code is printed and written to `data/setup-code` (0600).
pub async fn bootstrap(db: &Db, config: &crate::config::Config) -> anyhow::Result<()> {
    let mut conn = db.conn().await?;
    if people::count_users(&mut conn).await? > 0 {
        return Ok(());
    }
    if let (Some(name), Some(password)) = (&config.admin_username, &config.admin_password) {
        check_username(name).map_err(|e| anyhow::anyhow!("ADMIN_USERNAME: {e}"))?;
        check_password(password.expose()).map_err(|e| anyhow::anyhow!("ADMIN_PASSWORD: {e}"))?;
        let hash = hash_password(password.expose()).await?;
        if people::create_user(&mut conn, name, &hash, UserRole::Admin, crate::now_ms())
            .await?
            .is_some()
        {
            tracing::info!(username = %name, "created the first admin from ADMIN_USERNAME");
        }
        return Ok(());
    }
    let code = crate::auth::generate_secret("")
        .expose()
        .chars()
        .take(20)
        .collect::<String>();
    let path = setup_code_file(&config.data_dir);
    crate::auth::write_private(&path, &code)?;
    let in_force = store::insert_credential_if_absent(
        &mut conn,
        SETUP_CREDENTIAL,
        &hash_token(&code),
        crate::now_ms(),
    )
    .await?;
    if in_force == hash_token(&code) {
        // One-time and worthless once the first admin exists, so it may be shown where the
        // person installing the server looks first.
        tracing::warn!(
            setup_code = %code,
            path = %path.display(),
            "no user yet: open the dashboard and create the first admin with this setup code"
        );
    } else {
        // Another replica's code is in force; its data directory holds it.
        let _ = std::fs::remove_file(&path);
        tracing::warn!(
            "no user yet: the setup code is in the data directory of the replica that started first"
        );
    }
    Ok(())
}

pub fn setup_code_file(data_dir: &Path) -> PathBuf {
    data_dir.join("setup-code")
}

/// Ends the first-start setup once a user exists (the web page's setup or the command
/// line's first `user add`): the code could do nothing more, so it is kept nowhere.
pub async fn forget_setup_code(conn: &mut Conn, data_dir: &Path) -> anyhow::Result<()> {
    store::delete_credential(conn, SETUP_CREDENTIAL).await?;
    let path = setup_code_file(data_dir);
    match std::fs::remove_file(&path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow::anyhow!("{}: {err}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Why the first admin could not be created.
#[derive(Debug, PartialEq, Eq)]
pub enum SetupError {
    /// Setup is over: a user exists.
    Done,
    WrongCode,
    /// The named input is refused, for the reason given.
    Invalid(&'static str, String),
    Unavailable,
}

/// Creates the first admin with the setup code and signs them in.
pub async fn setup(
    state: &AppState,
    session: &Session,
    code: &Secret,
    username: &str,
    password: &Secret,
    from: &str,
) -> Result<Principal, SetupError> {
    check_username(username).map_err(|e| SetupError::Invalid("username", e))?;
    check_password(password.expose()).map_err(|e| SetupError::Invalid("password", e))?;
    let now = crate::now_ms();
    let address_key = format!("addr:{from}");
    if state.login_throttle.begin(&[&address_key], now).is_err() {
        return Err(SetupError::WrongCode);
    }
    let mut conn = state.db.conn().await.map_err(setup_unavailable)?;
    if people::count_users(&mut conn)
        .await
        .map_err(setup_unavailable)?
        > 0
    {
        return Err(SetupError::Done);
    }
    let expected = store::credential_hash(&mut conn, SETUP_CREDENTIAL)
        .await
        .map_err(setup_unavailable)?;
    let given = hash_token(code.expose().trim());
    if !expected.is_some_and(|h| crate::auth::constant_time_eq(h.as_bytes(), given.as_bytes())) {
        drop(conn);
        audit_quietly(state, username, "setup", None, from, "failure", None).await;
        return Err(SetupError::WrongCode);
    }
    let hash = hash_password(password.expose())
        .await
        .map_err(setup_unavailable)?;
    let row = people::create_user(&mut conn, username, &hash, UserRole::Admin, now)
        .await
        .map_err(setup_unavailable)?
        .ok_or(SetupError::Done)?;
    let _ = forget_setup_code(&mut conn, &state.config.data_dir).await;
    drop(conn);
    sign_in(session, &row, now)
        .await
        .map_err(setup_unavailable)?;
    audit_quietly(
        state,
        &row.username,
        "setup",
        None,
        from,
        "success",
        Some("first admin created"),
    )
    .await;
    Ok(Principal {
        name: row.username,
        role: UserRole::Admin,
        via: Via::Session,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn cookie_writes_must_come_from_our_own_pages() {
        let post = Method::POST;
        assert!(same_origin(&Method::GET, &headers(&[])));
        assert!(same_origin(
            &post,
            &headers(&[("sec-fetch-site", "same-origin")])
        ));
        assert!(!same_origin(
            &post,
            &headers(&[("sec-fetch-site", "cross-site")])
        ));
        assert!(!same_origin(
            &post,
            &headers(&[("sec-fetch-site", "same-site")])
        ));
        assert!(same_origin(
            &post,
            &headers(&[("origin", "https://mon:3000"), ("host", "mon:3000")])
        ));
        assert!(!same_origin(
            &post,
            &headers(&[("origin", "https://evil.example"), ("host", "mon:3000")])
        ));
        assert!(!same_origin(&post, &headers(&[("host", "mon:3000")])));
    }

    #[test]
    fn only_a_trusted_proxy_names_the_client() {
        let proxy: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 192.0.2.7")]);
        assert_eq!(client_addr(proxy, &h, &[proxy]).to_string(), "192.0.2.7");
        let stranger: std::net::IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(client_addr(stranger, &h, &[proxy]), stranger);
        assert_eq!(client_addr(proxy, &headers(&[]), &[proxy]), proxy);
    }

    #[test]
    fn hosts_outside_public_url_are_refused() {
        assert!(host_allowed(Some("anything"), None));
        let public = Some("mon.example:3000");
        assert!(host_allowed(Some("MON.example:3000"), public));
        assert!(host_allowed(Some("localhost:3000"), public));
        assert!(host_allowed(Some("[::1]:3000"), public));
        assert!(!host_allowed(Some("evil.example:3000"), public));
        assert!(!host_allowed(Some("mon.example:4000"), public));
        assert!(!host_allowed(None, public));
        assert!(host_allowed(Some("mon.example"), Some("mon.example")));
        assert!(host_allowed(Some("mon.example:443"), Some("mon.example")));
    }

    #[test]
    fn names_and_passwords_are_checked() {
        assert!(check_username("alice.ops").is_ok());
        assert!(check_username("").is_err());
        assert!(check_username("a b").is_err());
        assert!(check_password("short").is_err());
        assert!(check_password("long enough pass").is_ok());
    }

    #[tokio::test]
    async fn passwords_hash_with_argon2id_and_verify() {
        let hash = hash_password("correct horse battery").await.unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password("correct horse battery", &hash).await);
        assert!(!verify_password("correct horse battery!", &hash).await);
        assert!(!verify_password("x", "not a hash").await);
    }
}
