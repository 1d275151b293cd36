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

/// A batch's statement on SQLite, its binds added one by one.
pub(super) type SqliteBatchQuery = diesel::query_builder::BoxedSqlQuery<
    'static,
    diesel::sqlite::Sqlite,
    diesel::query_builder::SqlQuery,
>;
/// A batch's statement on PostgreSQL, its binds added one by one.
pub(super) type PgBatchQuery =
    diesel::query_builder::BoxedSqlQuery<'static, diesel::pg::Pg, diesel::query_builder::SqlQuery>;

/// Declares a batch's row type from one list of its columns, in the order the statements
/// name them, each with its SQL type and PostgreSQL's name for that type; and with it:
/// - `bind_values`: the row's binds for a `VALUES` list (SQLite), in that order;
/// - `$columns`, the rows as one vector a column for PostgreSQL's `UNNEST`: a batch bound
///   as one array a column, a bind per column instead of one per value, in a short
///   statement of the same text for every batch size (diesel still sends raw SQL to be
///   parsed each time, but a few dozen parameters instead of thousands).
macro_rules! batch_rows {
    (
        $(#[$meta:meta])*
        $vis:vis struct $row:ident / $columns:ident {
            $($field:ident: $rust:ty => $sql:ty as $pg:literal,)*
        }
    ) => {
        $(#[$meta])*
        $vis struct $row {
            $($field: $rust,)*
        }

        impl $row {
            /// Binds this row's values, in the order of the columns.
            #[allow(dead_code)]
            fn bind_values(
                self,
                query: $crate::db::batch::SqliteBatchQuery,
            ) -> $crate::db::batch::SqliteBatchQuery {
                query$(.bind::<$sql, _>(self.$field))*
            }
        }

        #[derive(Default)]
        struct $columns {
            $($field: Vec<$rust>,)*
        }

        impl $columns {
            /// The columns' names, in order: the target columns of an insert.
            const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];

            fn of(rows: impl IntoIterator<Item = $row>) -> Self {
                let mut columns = Self::default();
                for row in rows {
                    $(columns.$field.push(row.$field);)*
                }
                columns
            }

            /// `UNNEST($1::bigint[], ...)`, one parameter a column.
            fn unnest() -> String {
                let arrays: Vec<String> = [$($pg),*]
                    .iter()
                    .zip(1..)
                    .map(|(pg_type, n)| format!("${n}::{pg_type}[]"))
                    .collect();
                format!("UNNEST({})", arrays.join(", "))
            }

            /// Binds the columns in the order `unnest` names them.
            fn bind_to(
                self,
                query: $crate::db::batch::PgBatchQuery,
            ) -> $crate::db::batch::PgBatchQuery {
                query$(.bind::<::diesel::sql_types::Array<$sql>, _>(self.$field))*
            }
        }
    };
}
pub(super) use batch_rows;
