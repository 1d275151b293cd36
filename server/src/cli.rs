//! The admin command line: migrate, user add, token rotate, check-proxmox, backup, healthcheck.

use crate::accounts;
use crate::auth;
use crate::config::{Config, Secret, TlsMode, redact_url};
use crate::db::people::{self, AuditEntry, Rotation};
use crate::db::{Db, sqlite_path};
use domain::UserRole;
use proxmox::{ProxmoxApi, PveClient};
use std::ffi::OsString;
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

pub const USAGE: &str = "usage: vm-healthcheck [COMMAND]
Settings come from the environment and .env, as the server reads them (see .env.example).

  (no command)                  run the server
  healthcheck                   exit 0 when the server on this machine answers /api/health with 200
  migrate                       apply the database migrations still pending and name them
  user add NAME --role ROLE     add a user: viewer, operator or admin (the first user must be an
                                admin); the password is read from standard input, one line
  token rotate LABEL [--user NAME]
                                revoke the API token with this label and make a new one with the
                                same user and role; only the new token is printed on standard output
  check-proxmox                 check the Proxmox connection, its TLS trust and the token's privileges
  backup FILE                   SQLite: write a consistent copy of the database to FILE (a new file);
                                PostgreSQL: print the pg_dump command to run
  help                          show this text

Exit status: 0 done; 1 refused, failed, or a check that failed; 2 a wrong command line.";

/// How the audit log names whoever used the command line: someone with the server's
/// settings (and so its database), on a machine that holds them.
const CLI_ACTOR: &str = "command line";
const CLI_SOURCE: &str = "local";
/// Longest password line read; `check_password` refuses anything near it anyway.
const MAX_PASSWORD_LINE_BYTES: u64 = 8 * 1024;

/// One command, as parsed from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Command {
    Help,
    Healthcheck,
    Migrate,
    UserAdd {
        name: String,
        role: UserRole,
    },
    TokenRotate {
        label: String,
        owner: Option<String>,
    },
    CheckProxmox,
    Backup {
        file: PathBuf,
    },
}

/// A command line that names no command we have, or names one wrongly: nothing was tried.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// Runs the command in `args` (the program name left out) and says how it ended.
pub fn run(args: Vec<OsString>) -> ExitCode {
    let command = match parse(args) {
        Ok(command) => command,
        Err(err) => {
            eprintln!("vm-healthcheck: {err} (`vm-healthcheck help` lists the commands)");
            return ExitCode::from(2);
        }
    };
    if command == Command::Help {
        // Help cut short by its reader (`| head`) has said what was wanted.
        let _ = say(USAGE);
        return ExitCode::SUCCESS;
    }
    match execute(command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("vm-healthcheck: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: Vec<OsString>) -> Result<Command, UsageError> {
    let mut words = Vec::with_capacity(args.len());
    for arg in args {
        words.push(
            arg.into_string().map_err(|arg| {
                UsageError(format!("{} is not valid UTF-8", arg.to_string_lossy()))
            })?,
        );
    }
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["help" | "-h" | "--help"] => Ok(Command::Help),
        ["healthcheck"] => Ok(Command::Healthcheck),
        ["migrate"] => Ok(Command::Migrate),
        ["check-proxmox"] => Ok(Command::CheckProxmox),
        ["backup", file] if !file.starts_with('-') => Ok(Command::Backup {
            file: PathBuf::from(file),
        }),
        ["backup", ..] => Err(UsageError("backup needs one FILE".into())),
        ["user", "add", rest @ ..] => {
            let (name, options) = split_options(rest, &["--role"])?;
            let name = name.ok_or_else(|| UsageError("user add needs a NAME".into()))?;
            let role = options
                .get("--role")
                .ok_or_else(|| UsageError("user add needs --role viewer|operator|admin".into()))?;
            let role = role.parse().map_err(|e: domain::UnknownValue| {
                UsageError(format!("{e}: viewer, operator or admin"))
            })?;
            Ok(Command::UserAdd {
                name: name.to_owned(),
                role,
            })
        }
        ["token", "rotate", rest @ ..] => {
            let (label, options) = split_options(rest, &["--user"])?;
            let label = label
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .ok_or_else(|| UsageError("token rotate needs the token's LABEL".into()))?;
            Ok(Command::TokenRotate {
                label: label.to_owned(),
                owner: options.get("--user").map(|s| (*s).to_owned()),
            })
        }
        ["user" | "token", ..] => Err(UsageError(format!("unknown command {:?}", words.join(" ")))),
        [other, ..] => Err(UsageError(format!("unknown command {other:?}"))),
        [] => Err(UsageError("no command".into())),
    }
}

/// One positional argument and the `--name value` (or `--name=value`) options in `allowed`.
fn split_options<'a>(
    words: &[&'a str],
    allowed: &[&'static str],
) -> Result<
    (
        Option<&'a str>,
        std::collections::HashMap<&'static str, &'a str>,
    ),
    UsageError,
> {
    let mut positional = None;
    let mut options = std::collections::HashMap::new();
    let mut rest = words.iter();
    while let Some(word) = rest.next() {
        if !word.starts_with("--") {
            if positional.replace(*word).is_some() {
                return Err(UsageError(format!("unexpected argument {word:?}")));
            }
            continue;
        }
        let (name, inline) = match word.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (*word, None),
        };
        let Some(known) = allowed.iter().find(|a| **a == name) else {
            // A password must never be on a command line, where `ps` shows it to everyone.
            let hint = if name == "--password" {
                " (the password is read from standard input)"
            } else {
                ""
            };
            return Err(UsageError(format!("unknown option {name}{hint}")));
        };
        let value = match inline {
            Some(value) => value,
            None => rest
                .next()
                .copied()
                .ok_or_else(|| UsageError(format!("{name} needs a value")))?,
        };
        if options.insert(*known, value).is_some() {
            return Err(UsageError(format!("{name} given twice")));
        }
    }
    Ok((positional, options))
}

/// Runs a parsed command: `Ok(false)` when it ran and found a failure to report by the exit
/// status alone (the Proxmox check).
fn execute(command: Command) -> anyhow::Result<bool> {
    let config = Config::from_env().map_err(|e| anyhow::anyhow!("settings: {e}"))?;
    log_to_stderr();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match command {
        Command::Help => Ok(true),
        Command::Healthcheck => runtime.block_on(healthcheck(&config)).map(|()| true),
        Command::Migrate => runtime.block_on(migrate(&config)).map(|()| true),
        Command::UserAdd { name, role } => {
            // Everything that can be refused is checked before the database is touched.
            accounts::check_username(&name).map_err(|e| anyhow::anyhow!("user name: {e}"))?;
            let password = read_password()?;
            accounts::check_password(password.expose())
                .map_err(|e| anyhow::anyhow!("password: {e}"))?;
            runtime
                .block_on(add_user(&config, &name, role, &password))
                .map(|()| true)
        }
        Command::TokenRotate { label, owner } => runtime
            .block_on(rotate_token(&config, &label, owner.as_deref()))
            .map(|()| true),
        Command::CheckProxmox => runtime.block_on(check_proxmox(&config)),
        Command::Backup { file } => backup(&config, &file).map(|()| true),
    }
}

/// A line on standard output. A reader gone away (`| head`) is an error to return, where
/// `println!` would panic.
fn say(line: impl std::fmt::Display) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// Warnings from the server's code go to standard error, so standard output carries only
/// what a command prints (a rotated token can be captured).
fn log_to_stderr() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Only fails when a subscriber is already set, which then does the job.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// For container and service-manager health checks: the server on this machine, at the
/// address it listens on. The certificate is not checked (it is this machine's own server,
/// often self-signed); nothing secret is sent.
async fn healthcheck(config: &Config) -> anyhow::Result<()> {
    let scheme = match config.tls {
        TlsMode::Off => "http",
        TlsMode::Generated | TlsMode::Files { .. } => "https",
    };
    // The listening address itself, or loopback when the server listens on every address.
    let ip = config.listen_addr.ip();
    let target = if ip.is_unspecified() {
        std::net::SocketAddr::new(
            if ip.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            },
            config.listen_addr.port(),
        )
    } else {
        config.listen_addr
    };
    let url = format!("{scheme}://{target}/api/health");
    let answer = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .timeout(std::time::Duration::from_secs(5))
        .build()?
        .get(&url)
        .send()
        .await?;
    anyhow::ensure!(
        answer.status().is_success(),
        "{url} answered {}",
        answer.status()
    );
    Ok(())
}

/// The server runs pending migrations at start; this runs them on their own (before a new
/// release's replicas start, or to see what a release changes).
async fn migrate(config: &Config) -> anyhow::Result<()> {
    let database = redact_url(&config.database_url);
    let (_db, applied) = Db::connect_migrated(&config.database_url, 1)
        .await
        .map_err(|e| anyhow::anyhow!("{database}: {e}"))?;
    for name in &applied {
        say(format_args!("applied {name}"))?;
    }
    match applied.len() {
        0 => say(format_args!(
            "{database} is up to date: no migration pending"
        ))?,
        n => say(format_args!(
            "{database} is up to date: {n} migrations applied"
        ))?,
    }
    Ok(())
}

/// One line of standard input, without its line end. On a terminal the typing is hidden.
fn read_password() -> anyhow::Result<Secret> {
    let stdin = std::io::stdin();
    let typed = stdin.is_terminal();
    let hidden = typed && stty("-echo");
    if typed {
        eprint!(
            "Password (at least {} characters{}): ",
            accounts::MIN_PASSWORD_CHARS,
            if hidden { ", not shown" } else { "" }
        );
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    let read = stdin
        .lock()
        .take(MAX_PASSWORD_LINE_BYTES)
        .read_line(&mut line);
    if hidden {
        stty("echo");
        eprintln!();
    }
    let read =
        read.map_err(|e| anyhow::anyhow!("reading the password from standard input: {e}"))?;
    anyhow::ensure!(
        read > 0,
        "no password on standard input: type it, or give it one line (user add NAME --role ROLE < FILE)"
    );
    let password = line
        .strip_suffix('\n')
        .map_or(line.as_str(), |l| l.strip_suffix('\r').unwrap_or(l));
    Ok(Secret::new(password.to_owned()))
}

/// Turns the terminal's echo off or on; false when that could not be done.
fn stty(setting: &str) -> bool {
    std::process::Command::new("stty")
        .arg(setting)
        .stdin(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Adds a user, as `POST /api/users` does. The first user must be an admin, and ends the
/// first-start setup: a fresh install needs no setup code when its admin is made here.
async fn add_user(
    config: &Config,
    name: &str,
    role: UserRole,
    password: &Secret,
) -> anyhow::Result<()> {
    let first_must_be_admin =
        "there is no user yet: the first must be an admin (--role admin), who then adds the others";
    // A refusal leaves a fresh install as it was: no database made for nothing.
    anyhow::ensure!(
        role == UserRole::Admin
            || config.is_postgres()
            || Path::new(&sqlite_path(&config.database_url)).exists(),
        first_must_be_admin
    );
    let db = Db::connect(&config.database_url, 1).await?;
    let mut conn = db.conn().await?;
    let first = people::count_users(&mut conn).await? == 0;
    anyhow::ensure!(!first || role == UserRole::Admin, first_must_be_admin);
    let hash = accounts::hash_password(password.expose()).await?;
    let now = crate::now_ms();
    let Some(row) = people::create_user(&mut conn, name, &hash, role, now).await? else {
        anyhow::bail!("a user named {name:?} exists already; nothing changed");
    };
    if first && let Err(err) = accounts::forget_setup_code(&mut conn, &config.data_dir).await {
        // The code is worthless already (setup refuses once a user exists); say so and go on.
        eprintln!("vm-healthcheck: warning: the setup code could not be removed: {err:#}");
    }
    audit(
        &mut conn,
        "create_user",
        Some(&row.username),
        Some(role.as_str()),
    )
    .await;
    say(format_args!("added {role} {}", row.username))?;
    Ok(())
}

/// Replaces an API token with a new one of the same user, label and role, as revoking it
/// and creating one through the API would, but in one step that either happens whole or
/// not at all. Only the new token goes to standard output.
async fn rotate_token(config: &Config, label: &str, owner: Option<&str>) -> anyhow::Result<()> {
    // Without a database there is no token to rotate, and nothing should be created.
    if !config.is_postgres() {
        let path = sqlite_path(&config.database_url);
        anyhow::ensure!(
            Path::new(&path).exists(),
            "no database at {path}: there is no token to rotate"
        );
    }
    let db = Db::connect(&config.database_url, 1).await?;
    let mut conn = db.conn().await?;
    let secret = auth::generate_secret(crate::http::people::API_TOKEN_PREFIX);
    let now = crate::now_ms();
    let rotation = people::rotate_api_token(
        &mut conn,
        label,
        owner,
        &auth::hash_token(secret.expose()),
        now,
    )
    .await?;
    let (old_id, new_id, username, role) = match rotation {
        Rotation::Rotated {
            old_id,
            new_id,
            username,
            role,
        } => (old_id, new_id, username, role),
        Rotation::NotFound => match owner {
            Some(owner) => anyhow::bail!(
                "{owner:?} has no API token in force labelled {label:?}; nothing changed"
            ),
            None => anyhow::bail!("no API token in force is labelled {label:?}; nothing changed"),
        },
        Rotation::Ambiguous(owners) => anyhow::bail!(
            "{} API tokens in force are labelled {label:?} (users: {}); pick one with --user NAME; nothing changed",
            owners.len(),
            owners.join(", ")
        ),
    };
    audit(
        &mut conn,
        "rotate_api_token",
        Some(&format!("token {old_id}")),
        Some(&format!(
            "{label} ({role}) of {username}: now token {new_id}"
        )),
    )
    .await;
    eprintln!(
        "token {old_id} ({label:?} of {username}, {role}) is revoked; its replacement, token {new_id}, follows once"
    );
    say(secret.expose()).map_err(|e| {
        anyhow::anyhow!("token {new_id} was made but could not be printed ({e}): rotate it again")
    })?;
    Ok(())
}

/// Writes an audit entry; a failure is reported and does not undo the change it records,
/// as in the API.
async fn audit(
    conn: &mut crate::db::Conn,
    action: &str,
    target: Option<&str>,
    detail: Option<&str>,
) {
    let entry = AuditEntry {
        actor: CLI_ACTOR,
        action,
        target,
        source: Some(CLI_SOURCE),
        outcome: "success",
        detail,
    };
    if let Err(err) = people::audit(conn, &entry, crate::now_ms()).await {
        eprintln!("vm-healthcheck: warning: could not write the audit log: {err}");
    }
}

/// `GET /api/proxmox/check`, with the configured connection: each line printed, true
/// when everything needed is there and the certificate is verified.
async fn check_proxmox(config: &Config) -> anyhow::Result<bool> {
    let client = match &config.proxmox {
        None => Err("PROXMOX_HOST is not set".to_owned()),
        Some(settings) => match PveClient::new(settings) {
            Ok(client) => {
                let client: Arc<dyn ProxmoxApi> = Arc::new(client);
                Ok(client)
            }
            Err(err) => Err(err.to_string()),
        },
    };
    let check = crate::configure::check_proxmox(config.proxmox.as_ref(), client).await;
    for line in &check.lines {
        say(line)?;
    }
    if !check.ok {
        eprintln!("vm-healthcheck: the Proxmox check failed (see above)");
    }
    Ok(check.ok)
}

/// A copy of the database to keep: a consistent snapshot of SQLite, taken while the server
/// runs; for PostgreSQL the command of its own tool. `file` is never overwritten.
fn backup(config: &Config, file: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !file.exists(),
        "{} exists already; a backup never overwrites a file",
        file.display()
    );
    if config.is_postgres() {
        say(pg_dump_hint(&config.database_url, file)?)?;
        return Ok(());
    }
    let source = sqlite_path(&config.database_url);
    anyhow::ensure!(
        Path::new(&source).exists(),
        "no database at {source}: nothing to back up"
    );
    let target = file
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not a UTF-8 path", file.display()))?;
    // SQLite reads a `file:` name as a URI: the copy would land elsewhere than the file
    // made (and protected) here.
    anyhow::ensure!(
        !target.starts_with("file:"),
        "{target}: give a plain path, not a file: URI"
    );
    // Made here, empty and readable by its owner only (it holds password and token hashes),
    // and atomically refused if someone made it meanwhile; VACUUM INTO fills an empty file.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(file)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let written = snapshot_sqlite(&source, target);
    if let Err(err) = written {
        let _ = std::fs::remove_file(file);
        return Err(err);
    }
    let bytes = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    say(format_args!(
        "wrote a consistent copy of {source} to {target} ({bytes} bytes)"
    ))?;
    Ok(())
}

/// `VACUUM INTO` reads one transaction's view of the database (the server may write
/// meanwhile; WAL lets it) into `target`, then the copy is flushed to disk.
fn snapshot_sqlite(source: &str, target: &str) -> anyhow::Result<()> {
    use diesel::{Connection, RunQueryDsl, connection::SimpleConnection};
    let mut conn = diesel::sqlite::SqliteConnection::establish(source)
        .map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    conn.batch_execute("PRAGMA busy_timeout = 5000;")?;
    diesel::sql_query("VACUUM INTO ?")
        .bind::<diesel::sql_types::Text, _>(target)
        .execute(&mut conn)
        .map_err(|e| anyhow::anyhow!("copying {source} to {target}: {e}"))?;
    std::fs::File::open(target)?.sync_all()?;
    Ok(())
}

/// The `pg_dump` command for `database_url` writing to `file`, without the password (it
/// would show in `ps` and shell history): pg_dump asks, or reads PGPASSWORD or ~/.pgpass.
fn pg_dump_hint(database_url: &str, file: &Path) -> anyhow::Result<String> {
    let mut url = url::Url::parse(database_url)
        .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a URL: {e}"))?;
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(key, _)| !key.to_ascii_lowercase().contains("password"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let had_password = url.password().is_some()
        || url
            .query_pairs()
            .any(|(key, _)| key.to_ascii_lowercase().contains("password"));
    url.set_password(None)
        .map_err(|()| anyhow::anyhow!("DATABASE_URL: cannot drop its password"))?;
    // libpq also reads `?password=` and `sslpassword=`: those are left out too.
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    let file = file
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not a UTF-8 path", file.display()))?;
    let password_note = if had_password {
        "# the password is left out: pg_dump asks for it, or reads PGPASSWORD or ~/.pgpass\n"
    } else {
        ""
    };
    Ok(format!(
        "# PostgreSQL is backed up with its own tool; run (pg_restore reads the file back):\n\
         {password_note}pg_dump --format=custom --file={} {}",
        shell_quote(file),
        shell_quote(url.as_str())
    ))
}

/// `text` as one shell word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(line: &str) -> Result<Command, String> {
        parse(line.split_whitespace().map(OsString::from).collect()).map_err(|e| e.0)
    }

    #[test]
    fn commands_parse_and_wrong_ones_are_named() {
        assert_eq!(parsed("migrate"), Ok(Command::Migrate));
        assert_eq!(
            parsed("user add alice --role operator"),
            Ok(Command::UserAdd {
                name: "alice".into(),
                role: UserRole::Operator
            })
        );
        assert_eq!(
            parsed("user add --role=admin root"),
            Ok(Command::UserAdd {
                name: "root".into(),
                role: UserRole::Admin
            })
        );
        assert_eq!(
            parsed("token rotate ci --user bob"),
            Ok(Command::TokenRotate {
                label: "ci".into(),
                owner: Some("bob".into())
            })
        );
        assert_eq!(
            parsed("backup /tmp/x.db"),
            Ok(Command::Backup {
                file: "/tmp/x.db".into()
            })
        );
        let refused = [
            ("user add alice --role root", "unknown role: \"root\""),
            ("user add alice", "--role"),
            (
                "user add alice --role admin --password hunter2hunter2",
                "standard input",
            ),
            ("user add alice bob --role admin", "unexpected argument"),
            ("user add alice --role admin --role viewer", "twice"),
            ("token rotate", "LABEL"),
            ("backup", "FILE"),
            ("backup a b", "FILE"),
            ("user remove alice", "unknown command"),
            ("frobnicate", "unknown command"),
        ];
        for (line, why) in refused {
            let err = parsed(line).expect_err(line);
            assert!(err.contains(why), "{line}: {err}");
        }
    }

    #[test]
    fn the_pg_dump_hint_carries_no_password() {
        let hint = pg_dump_hint(
            "postgres://vmhc:s3cr'et@db.example:5432/vmhc?sslmode=require",
            Path::new("/backups/it's.dump"),
        )
        .unwrap();
        assert!(!hint.contains("s3cr"), "{hint}");
        assert!(
            hint.ends_with(
                r"pg_dump --format=custom --file='/backups/it'\''s.dump' 'postgres://vmhc@db.example:5432/vmhc?sslmode=require'"
            ),
            "{hint}"
        );
        assert!(hint.contains("PGPASSWORD"), "{hint}");
        // libpq's query-string passwords are left out too, the rest kept.
        let hint = pg_dump_hint(
            "postgres://vmhc@db/vmhc?password=qs-secret&sslmode=require&sslpassword=key-secret",
            Path::new("/b.dump"),
        )
        .unwrap();
        assert!(!hint.contains("secret"), "{hint}");
        assert!(
            hint.contains("sslmode=require") && hint.contains("PGPASSWORD"),
            "{hint}"
        );
    }
}
