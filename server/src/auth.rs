//! Agent and admin bearer tokens: generated on first start when unset, stored only as hashes.

use crate::config::{Config, Secret};
use crate::db::{Db, DbError, store};
use axum::http::{HeaderMap, header};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The two credentials the server checks.
#[derive(Clone)]
pub struct Credentials {
    agent_hash: String,
    admin_hash: String,
}

/// Which credential a request must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Agent,
    Admin,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }

    /// How history and logs name whoever holds this role's shared token.
    pub fn credential_name(self) -> &'static str {
        match self {
            Role::Agent => "agent token",
            Role::Admin => "admin token",
        }
    }
}

/// Who made an authenticated request: the role it proved and the credential that proved it.
/// With shared tokens the name is the token's; per-user logins will name the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    pub name: &'static str,
}

/// Tokens are 256 random bits, so one SHA-256 round is enough: a slow password hash
/// only helps against guessable inputs.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Credentials {
    /// Uses `AGENT_TOKEN`/`ADMIN_TOKEN` when set; otherwise the stored hashes, generating a
    /// token (written to a file only the server's user can read) the first time.
    pub async fn load(db: &Db, config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            agent_hash: resolve(db, config, Role::Agent, config.agent_token.as_ref()).await?,
            admin_hash: resolve(db, config, Role::Admin, config.admin_token.as_ref()).await?,
        })
    }

    /// The caller, when the request's `Authorization: Bearer` token is this role's token.
    pub fn authenticate(&self, role: Role, headers: &HeaderMap) -> Option<Caller> {
        self.allows(role, headers).then(|| Caller {
            role,
            name: role.credential_name(),
        })
    }

    /// True when the request's `Authorization: Bearer` token is this role's token.
    pub fn allows(&self, role: Role, headers: &HeaderMap) -> bool {
        let Some(token) = bearer_token(headers) else {
            return false;
        };
        let expected = match role {
            Role::Agent => &self.agent_hash,
            Role::Admin => &self.admin_hash,
        };
        constant_time_eq(hash_token(token).as_bytes(), expected.as_bytes())
    }
}

pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Where a generated token is written for the admin to read.
pub fn token_file(data_dir: &Path, role: Role) -> PathBuf {
    data_dir.join(format!("{}-token", role.name()))
}

async fn resolve(
    db: &Db,
    config: &Config,
    role: Role,
    from_env: Option<&Secret>,
) -> anyhow::Result<String> {
    if let Some(secret) = from_env {
        return Ok(hash_token(secret.expose()));
    }
    let mut conn = db.conn().await?;
    if let Some(hash) = store::credential_hash(&mut conn, role.name()).await? {
        return Ok(hash);
    }
    let token = generate_token(role);
    let path = token_file(&config.data_dir, role);
    write_private(&path, &token)?;
    let hash = hash_token(&token);
    let in_force =
        store::insert_credential_if_absent(&mut conn, role.name(), &hash, crate::now_ms())
            .await
            .map_err(|e: DbError| anyhow::anyhow!(e))?;
    if in_force == hash {
        tracing::warn!(
            role = role.name(),
            path = %path.display(),
            "generated a {} token; read it from this file (set {}_TOKEN to choose your own)",
            role.name(),
            role.name().to_uppercase()
        );
    } else {
        // Another replica generated it first; its file holds the token in force.
        let _ = std::fs::remove_file(&path);
    }
    Ok(in_force)
}

fn generate_token(role: Role) -> String {
    generate_secret(&format!("vmhc_{}_", role.name()))
        .expose()
        .to_owned()
}

/// 256 random bits as hex after `prefix`: credentials and tokens, shown once and stored
/// only as [`hash_token`].
pub fn generate_secret(prefix: &str) -> Secret {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    Secret::new(format!("{prefix}{}", hex::encode(bytes)))
}

pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    // `mode` applies only to a new file: an existing one is narrowed too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn bearer_checks() {
        let creds = Credentials {
            agent_hash: hash_token("agent-1"),
            admin_hash: hash_token("admin-1"),
        };
        assert!(creds.allows(Role::Agent, &headers("Bearer agent-1")));
        assert!(creds.allows(Role::Agent, &headers("bearer  agent-1 ")));
        assert!(!creds.allows(Role::Admin, &headers("Bearer agent-1")));
        assert!(!creds.allows(Role::Agent, &headers("Basic agent-1")));
        assert!(!creds.allows(Role::Agent, &headers("Bearer ")));
        assert!(!creds.allows(Role::Agent, &HeaderMap::new()));
        let admin = creds.authenticate(Role::Admin, &headers("Bearer admin-1"));
        assert_eq!(
            admin,
            Some(Caller {
                role: Role::Admin,
                name: "admin token"
            })
        );
        assert_eq!(
            creds.authenticate(Role::Admin, &headers("Bearer agent-1")),
            None
        );
    }

    #[test]
    fn generated_tokens_are_long_and_distinct() {
        let a = generate_token(Role::Agent);
        let b = generate_token(Role::Agent);
        assert_ne!(a, b);
        assert!(a.starts_with("vmhc_agent_") && a.len() == "vmhc_agent_".len() + 64);
    }
}
