//! Users, their browser sessions and API tokens, and the audit log.

use super::schema::{api_tokens, audit_log, sessions, users};
use super::stored::Stored;
use super::{Conn, DbError};
use crate::{with_conn, write_transaction};
use diesel::{
    EscapeExpressionMethods, ExpressionMethods, OptionalExtension, QueryDsl, SelectableHelper,
    TextExpressionMethods,
};
use diesel_async::RunQueryDsl;
use domain::UserRole;
use serde::Serialize;

/// A user as stored; the role is parsed on read and fails on unknown values.
#[derive(Clone, Debug, diesel::Queryable, diesel::Selectable)]
#[diesel(table_name = users)]
pub struct UserRow {
    pub id: i64,
    pub username: String,
    pub password_hash: String,
    pub role: Stored<UserRole>,
    pub created_ms: i64,
    pub password_changed_ms: i64,
}

/// A user as the API lists it (never the hash).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct UserView {
    pub id: i64,
    pub username: String,
    pub role: UserRole,
    pub created_ms: i64,
    pub password_changed_ms: i64,
}

impl From<UserRow> for UserView {
    fn from(row: UserRow) -> Self {
        UserView {
            id: row.id,
            username: row.username,
            role: row.role.0,
            created_ms: row.created_ms,
            password_changed_ms: row.password_changed_ms,
        }
    }
}

pub async fn count_users(conn: &mut Conn) -> Result<i64, DbError> {
    let n = with_conn!(conn, |c| users::table.count().get_result(c).await)?;
    Ok(n)
}

/// Creates a user; `None` when the name is taken.
pub async fn create_user(
    conn: &mut Conn,
    username: &str,
    password_hash: &str,
    role: UserRole,
    now_ms: i64,
) -> Result<Option<UserRow>, DbError> {
    let row = with_conn!(conn, |c| {
        diesel::insert_into(users::table)
            .values((
                users::username.eq(username),
                users::password_hash.eq(password_hash),
                users::role.eq(role.as_str()),
                users::created_ms.eq(now_ms),
                users::password_changed_ms.eq(now_ms),
            ))
            .on_conflict(users::username)
            .do_nothing()
            .returning(UserRow::as_returning())
            .get_result(c)
            .await
            .optional()
    })?;
    Ok(row)
}

pub async fn user_by_name(conn: &mut Conn, username: &str) -> Result<Option<UserRow>, DbError> {
    let row = with_conn!(conn, |c| {
        users::table
            .filter(users::username.eq(username))
            .select(UserRow::as_select())
            .first(c)
            .await
            .optional()
    })?;
    Ok(row)
}

pub async fn user_by_id(conn: &mut Conn, id: i64) -> Result<Option<UserRow>, DbError> {
    let row = with_conn!(conn, |c| {
        users::table
            .find(id)
            .select(UserRow::as_select())
            .first(c)
            .await
            .optional()
    })?;
    Ok(row)
}

pub async fn list_users(conn: &mut Conn) -> Result<Vec<UserView>, DbError> {
    let rows: Vec<UserRow> = with_conn!(conn, |c| {
        users::table
            .order(users::id.asc())
            .select(UserRow::as_select())
            .load(c)
            .await
    })?;
    Ok(rows.into_iter().map(UserView::from).collect())
}

/// A new password ends every session of the user, on every replica.
pub async fn set_password(
    conn: &mut Conn,
    id: i64,
    password_hash: &str,
    now_ms: i64,
) -> Result<bool, DbError> {
    let n = with_conn!(conn, |c| {
        diesel::update(users::table.find(id))
            .set((
                users::password_hash.eq(password_hash),
                users::password_changed_ms.eq(now_ms),
            ))
            .execute(c)
            .await
    })?;
    end_sessions_of(conn, id).await?;
    Ok(n == 1)
}

pub async fn delete_user(conn: &mut Conn, id: i64) -> Result<bool, DbError> {
    end_sessions_of(conn, id).await?;
    let n = with_conn!(conn, |c| {
        diesel::delete(users::table.find(id)).execute(c).await
    })?;
    Ok(n == 1)
}

pub async fn end_sessions_of(conn: &mut Conn, user_id: i64) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel::delete(sessions::table.filter(sessions::user_id.eq(user_id)))
            .execute(c)
            .await
    })?;
    Ok(())
}

/// Stores a new session.
pub async fn insert_session(
    conn: &mut Conn,
    id_hash: &str,
    user_id: Option<i64>,
    data: &str,
    expires_ms: i64,
) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel::insert_into(sessions::table)
            .values((
                sessions::id_hash.eq(id_hash),
                sessions::user_id.eq(user_id),
                sessions::data.eq(data),
                sessions::expires_ms.eq(expires_ms),
            ))
            .execute(c)
            .await
    })?;
    Ok(())
}

/// Updates a session that still exists. A session ended meanwhile (logout, new password)
/// stays ended: a request that was in flight cannot write it back.
pub async fn update_session(
    conn: &mut Conn,
    id_hash: &str,
    user_id: Option<i64>,
    data: &str,
    expires_ms: i64,
) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel::update(sessions::table.find(id_hash))
            .set((
                sessions::user_id.eq(user_id),
                sessions::data.eq(data),
                sessions::expires_ms.eq(expires_ms),
            ))
            .execute(c)
            .await
    })?;
    Ok(())
}

/// A session's data while it has not expired.
pub async fn load_session(
    conn: &mut Conn,
    id_hash: &str,
    now_ms: i64,
) -> Result<Option<(String, i64)>, DbError> {
    let row = with_conn!(conn, |c| {
        sessions::table
            .find(id_hash)
            .filter(sessions::expires_ms.gt(now_ms))
            .select((sessions::data, sessions::expires_ms))
            .first(c)
            .await
            .optional()
    })?;
    Ok(row)
}

pub async fn session_exists(conn: &mut Conn, id_hash: &str) -> Result<bool, DbError> {
    let n: i64 = with_conn!(conn, |c| {
        sessions::table
            .filter(sessions::id_hash.eq(id_hash))
            .count()
            .get_result(c)
            .await
    })?;
    Ok(n > 0)
}

pub async fn delete_session(conn: &mut Conn, id_hash: &str) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel::delete(sessions::table.find(id_hash))
            .execute(c)
            .await
    })?;
    Ok(())
}

pub async fn delete_expired_sessions(conn: &mut Conn, now_ms: i64) -> Result<usize, DbError> {
    let n = with_conn!(conn, |c| {
        diesel::delete(sessions::table.filter(sessions::expires_ms.le(now_ms)))
            .execute(c)
            .await
    })?;
    Ok(n)
}

/// An API token in force with its owner.
#[derive(Clone, Debug)]
pub struct TokenOwner {
    pub token_id: i64,
    pub role: UserRole,
    pub username: String,
    pub owner_role: UserRole,
    pub last_used_ms: Option<i64>,
}

pub async fn create_api_token(
    conn: &mut Conn,
    user_id: i64,
    token_hash: &str,
    label: &str,
    role: UserRole,
    now_ms: i64,
) -> Result<i64, DbError> {
    let id = with_conn!(conn, |c| {
        diesel::insert_into(api_tokens::table)
            .values((
                api_tokens::user_id.eq(user_id),
                api_tokens::token_hash.eq(token_hash),
                api_tokens::label.eq(label),
                api_tokens::role.eq(role.as_str()),
                api_tokens::created_ms.eq(now_ms),
            ))
            .returning(api_tokens::id)
            .get_result(c)
            .await
    })?;
    Ok(id)
}

#[derive(diesel::Queryable)]
struct TokenOwnerRow {
    token_id: i64,
    role: Stored<UserRole>,
    username: String,
    owner_role: Stored<UserRole>,
    last_used_ms: Option<i64>,
}

pub async fn api_token_by_hash(
    conn: &mut Conn,
    token_hash: &str,
) -> Result<Option<TokenOwner>, DbError> {
    let row: Option<TokenOwnerRow> = with_conn!(conn, |c| {
        api_tokens::table
            .inner_join(users::table)
            .filter(api_tokens::token_hash.eq(token_hash))
            .filter(api_tokens::revoked_ms.is_null())
            .select((
                api_tokens::id,
                api_tokens::role,
                users::username,
                users::role,
                api_tokens::last_used_ms,
            ))
            .first(c)
            .await
            .optional()
    })?;
    Ok(row.map(|r| TokenOwner {
        token_id: r.token_id,
        role: r.role.0,
        username: r.username,
        owner_role: r.owner_role.0,
        last_used_ms: r.last_used_ms,
    }))
}

pub async fn touch_api_token(conn: &mut Conn, id: i64, now_ms: i64) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel::update(api_tokens::table.find(id))
            .set(api_tokens::last_used_ms.eq(now_ms))
            .execute(c)
            .await
    })?;
    Ok(())
}

/// An API token as listed (never its value or hash).
#[derive(Clone, Debug, Serialize, diesel::Queryable, utoipa::ToSchema)]
pub struct ApiTokenView {
    pub id: i64,
    pub username: String,
    pub label: String,
    #[schema(value_type = UserRole)]
    pub role: Stored<UserRole>,
    pub created_ms: i64,
    #[schema(required)]
    pub last_used_ms: Option<i64>,
    #[schema(required)]
    pub revoked_ms: Option<i64>,
}

pub async fn list_api_tokens(conn: &mut Conn) -> Result<Vec<ApiTokenView>, DbError> {
    let rows = with_conn!(conn, |c| {
        api_tokens::table
            .inner_join(users::table)
            .order(api_tokens::id.asc())
            .select((
                api_tokens::id,
                users::username,
                api_tokens::label,
                api_tokens::role,
                api_tokens::created_ms,
                api_tokens::last_used_ms,
                api_tokens::revoked_ms,
            ))
            .load(c)
            .await
    })?;
    Ok(rows)
}

pub async fn revoke_api_token(conn: &mut Conn, id: i64, now_ms: i64) -> Result<bool, DbError> {
    let n = with_conn!(conn, |c| {
        diesel::update(
            api_tokens::table
                .find(id)
                .filter(api_tokens::revoked_ms.is_null()),
        )
        .set(api_tokens::revoked_ms.eq(now_ms))
        .execute(c)
        .await
    })?;
    Ok(n == 1)
}

/// What a rotation of an API token found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rotation {
    /// The old token is revoked and the new one stored with its owner, label and role.
    Rotated {
        old_id: i64,
        new_id: i64,
        username: String,
        role: UserRole,
    },
    /// No token in force has that label.
    NotFound,
    /// Several tokens in force have that label; these users own them.
    Ambiguous(Vec<String>),
}

/// Revokes the API token in force labelled `label` (of `owner`, when given) and stores
/// `new_hash` in its place with the same owner, label and role, in one transaction: either
/// both happen or neither does.
pub async fn rotate_api_token(
    conn: &mut Conn,
    label: &str,
    owner: Option<&str>,
    new_hash: &str,
    now_ms: i64,
) -> Result<Rotation, DbError> {
    write_transaction!(conn, |c| {
        let mut query = api_tokens::table
            .inner_join(users::table)
            .filter(api_tokens::label.eq(label))
            .filter(api_tokens::revoked_ms.is_null())
            .into_boxed();
        if let Some(owner) = owner {
            query = query.filter(users::username.eq(owner));
        }
        let found: Vec<(i64, i64, Stored<UserRole>, String)> = query
            .order(api_tokens::id.asc())
            .select((
                api_tokens::id,
                api_tokens::user_id,
                api_tokens::role,
                users::username,
            ))
            .load(c)
            .await?;
        let (old_id, user_id, role, username) = match found.as_slice() {
            [] => return Ok(Rotation::NotFound),
            [one] => one.clone(),
            many => {
                return Ok(Rotation::Ambiguous(
                    many.iter().map(|(.., name)| name.clone()).collect(),
                ));
            }
        };
        let revoked = diesel::update(
            api_tokens::table
                .find(old_id)
                .filter(api_tokens::revoked_ms.is_null()),
        )
        .set(api_tokens::revoked_ms.eq(now_ms))
        .execute(c)
        .await?;
        // Revoked by someone else since it was read: nothing of ours to replace.
        if revoked != 1 {
            return Ok(Rotation::NotFound);
        }
        let new_id = diesel::insert_into(api_tokens::table)
            .values((
                api_tokens::user_id.eq(user_id),
                api_tokens::token_hash.eq(new_hash),
                api_tokens::label.eq(label),
                api_tokens::role.eq(role.0.as_str()),
                api_tokens::created_ms.eq(now_ms),
            ))
            .returning(api_tokens::id)
            .get_result(c)
            .await?;
        Ok(Rotation::Rotated {
            old_id,
            new_id,
            username,
            role: role.0,
        })
    })
}

/// One audit entry to write.
#[derive(Clone, Debug)]
pub struct AuditEntry<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub target: Option<&'a str>,
    pub source: Option<&'a str>,
    pub outcome: &'a str,
    pub detail: Option<&'a str>,
}

pub async fn audit(conn: &mut Conn, entry: &AuditEntry<'_>, now_ms: i64) -> Result<(), DbError> {
    with_conn!(conn, |c| {
        diesel::insert_into(audit_log::table)
            .values((
                audit_log::at_ms.eq(now_ms),
                audit_log::actor.eq(entry.actor),
                audit_log::action.eq(entry.action),
                audit_log::target.eq(entry.target),
                audit_log::source.eq(entry.source),
                audit_log::outcome.eq(entry.outcome),
                audit_log::detail.eq(entry.detail),
            ))
            .execute(c)
            .await
    })?;
    Ok(())
}

/// An audit entry as listed.
#[derive(Clone, Debug, Serialize, diesel::Queryable, utoipa::ToSchema)]
pub struct AuditView {
    pub id: i64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    #[schema(required)]
    pub target: Option<String>,
    #[schema(required)]
    pub source: Option<String>,
    pub outcome: String,
    #[schema(required)]
    pub detail: Option<String>,
}

/// Which audit entries to list.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    /// Only entries older than this id (paging back).
    pub before: Option<i64>,
    pub limit: i64,
    pub actor: Option<String>,
    pub action: Option<String>,
    /// Only entries whose target contains this text.
    pub target: Option<String>,
}

/// The newest entries first that pass `filter`.
pub async fn audit_entries(
    conn: &mut Conn,
    filter: &AuditFilter,
) -> Result<Vec<AuditView>, DbError> {
    // The target is matched literally: LIKE's wildcards in it are escaped.
    let target = filter.target.as_ref().map(|t| {
        let escaped = t
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        format!("%{escaped}%")
    });
    let rows = with_conn!(conn, |c| {
        let mut query = audit_log::table.into_boxed();
        if let Some(before) = filter.before {
            query = query.filter(audit_log::id.lt(before));
        }
        if let Some(actor) = &filter.actor {
            query = query.filter(audit_log::actor.eq(actor.as_str()));
        }
        if let Some(action) = &filter.action {
            query = query.filter(audit_log::action.eq(action.as_str()));
        }
        if let Some(target) = &target {
            query = query.filter(audit_log::target.like(target.as_str()).escape('\\'));
        }
        query
            .order(audit_log::id.desc())
            .limit(filter.limit)
            .select((
                audit_log::id,
                audit_log::at_ms,
                audit_log::actor,
                audit_log::action,
                audit_log::target,
                audit_log::source,
                audit_log::outcome,
                audit_log::detail,
            ))
            .load(c)
            .await
    })?;
    Ok(rows)
}
