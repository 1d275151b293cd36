//! Building blocks of the set-based statements (ingest's batch, the stale check's verdicts).

use super::schema::status_changes;

/// How a statement's bind parameters are written.
#[derive(Clone, Copy)]
pub(super) enum Placeholders {
    /// `$1, $2...`: PostgreSQL's only form.
    Numbered,
    /// `?`: SQLite looks a `$N` up by name among those already seen, which over thousands
    /// of them made preparing one statement quadratic (13 % of the ingest path's samples).
    Anonymous,
}

/// Appends `rows` tuples of `columns` parameters each, `(.., ..), (.., ..)`: the body of a
/// `VALUES` list.
pub(super) fn push_values(
    sql: &mut String,
    rows: usize,
    columns: usize,
    placeholders: Placeholders,
) {
    let mut n = 0;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns {
            n += 1;
            if column > 0 {
                sql.push_str(", ");
            }
            match placeholders {
                Placeholders::Numbered => sql.push_str(&format!("${n}")),
                Placeholders::Anonymous => sql.push('?'),
            }
        }
        sql.push(')');
    }
}

/// Status changes as rows, owned so a statement can cross into the SQLite connection's
/// blocking thread.
#[derive(Clone, diesel::Insertable)]
#[diesel(table_name = status_changes)]
pub(super) struct OwnedStatusChange {
    pub(super) vm_id: i64,
    pub(super) from_status: &'static str,
    pub(super) to_status: &'static str,
    pub(super) at_ms: i64,
    pub(super) reason: String,
}
