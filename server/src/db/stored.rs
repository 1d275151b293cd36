//! Stored enums and ids: text columns read through `FromStr`, so an unknown value is an error.

use diesel::backend::Backend;
use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::sql_types::Text;
use std::str::FromStr;

/// A text column holding one of `T`'s spellings. Reading any other value fails the query
/// (logged by the caller) instead of turning into a default such as "no incident".
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromSqlRow)]
pub struct Stored<T>(pub T);

impl<T, DB> FromSql<Text, DB> for Stored<T>
where
    DB: Backend,
    String: FromSql<Text, DB>,
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
        let text = String::from_sql(bytes)?;
        Ok(Stored(text.parse::<T>()?))
    }
}

impl<T> Stored<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

/// Unwraps an optional stored value.
pub fn inner<T>(value: Option<Stored<T>>) -> Option<T> {
    value.map(Stored::into_inner)
}

/// Serialized as the value it holds.
impl<T: serde::Serialize> serde::Serialize for Stored<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}
