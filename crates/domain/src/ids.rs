//! Identifier newtypes, so two ids can never be swapped in a call.

use crate::enums::GuestKind;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// An identifier that failed to parse; the message says what a valid one looks like.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(pub &'static str);

macro_rules! row_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl $name {
            pub fn get(self) -> i64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;

            /// Path segments: a positive integer.
            fn from_str(raw: &str) -> Result<Self, InvalidId> {
                raw.parse::<i64>()
                    .ok()
                    .filter(|id| *id > 0)
                    .map($name)
                    .ok_or(InvalidId("must be a positive integer"))
            }
        }
    };
}

row_id!(
    /// A monitored VM's row id (the id of the REST API and the dashboard).
    VmId
);
row_id!(
    /// One entry of the reset history.
    AttemptId
);

/// A Proxmox guest number (100 to 999,999,999, as Proxmox allows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(try_from = "i64", into = "i64")]
pub struct Vmid(i64);

impl Vmid {
    pub const RANGE: std::ops::RangeInclusive<i64> = 100..=999_999_999;

    pub fn get(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for Vmid {
    type Error = InvalidId;

    fn try_from(value: i64) -> Result<Self, InvalidId> {
        if Self::RANGE.contains(&value) {
            Ok(Vmid(value))
        } else {
            Err(InvalidId("must be between 100 and 999999999"))
        }
    }
}

impl From<Vmid> for i64 {
    fn from(vmid: Vmid) -> i64 {
        vmid.0
    }
}

impl fmt::Display for Vmid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An operator's label on VMs ("db", "prod", "site:paris"): 1 to 64 characters, lower-case
/// letters, digits and `-_.:`; stored lower-cased, so `DB` and `db` are one tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(try_from = "String", into = "String")]
pub struct Tag(String);

impl Tag {
    pub const MAX_CHARS: usize = 64;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Tag {
    type Error = InvalidId;

    fn try_from(value: String) -> Result<Self, InvalidId> {
        let value = value.trim().to_lowercase();
        let valid = !value.is_empty()
            && value.chars().count() <= Self::MAX_CHARS
            && value.chars().all(|c| {
                c.is_alphabetic() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.' | ':')
            });
        if valid {
            Ok(Tag(value))
        } else {
            Err(InvalidId(
                "must be 1 to 64 letters, digits, '-', '_', '.' or ':'",
            ))
        }
    }
}

impl FromStr for Tag {
    type Err = InvalidId;

    fn from_str(value: &str) -> Result<Self, InvalidId> {
        Tag::try_from(value.to_owned())
    }
}

impl From<Tag> for String {
    fn from(tag: Tag) -> String {
        tag.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Proxmox node name: 1 to 63 ASCII letters, digits and hyphens.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeName(String);

impl NodeName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeName {
    type Error = InvalidId;

    fn try_from(value: String) -> Result<Self, InvalidId> {
        let valid = !value.is_empty()
            && value.len() <= 63
            && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if valid {
            Ok(NodeName(value))
        } else {
            Err(InvalidId("must be a Proxmox node name"))
        }
    }
}

impl FromStr for NodeName {
    type Err = InvalidId;

    fn from_str(value: &str) -> Result<Self, InvalidId> {
        NodeName::try_from(value.to_owned())
    }
}

impl From<NodeName> for String {
    fn from(node: NodeName) -> String {
        node.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a guest lives in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestRef {
    pub node: NodeName,
    pub vmid: Vmid,
    pub kind: GuestKind,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::get_unwrap)]
    use super::*;

    #[test]
    fn tags_are_lower_cased_and_bounded() {
        assert_eq!("DB".parse::<Tag>().unwrap().as_str(), "db");
        assert_eq!(
            " site:paris ".parse::<Tag>().unwrap().as_str(),
            "site:paris"
        );
        assert_eq!("сервер".parse::<Tag>().unwrap().as_str(), "сервер");
        let longest = "a".repeat(64);
        assert!(longest.parse::<Tag>().is_ok());
        for bad in [
            "",
            " ",
            "a b",
            "a,b",
            "<b>",
            "a\tb",
            &"a".repeat(65),
            "x\"y",
        ] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<Tag>("\"a/b\"").is_err());
    }

    #[test]
    fn ids_parse_strictly() {
        assert_eq!("42".parse::<VmId>().unwrap(), VmId(42));
        for bad in ["0", "-1", "abc", "", "1.5", "99999999999999999999"] {
            assert!(bad.parse::<VmId>().is_err(), "{bad}");
        }
        assert!(Vmid::try_from(99).is_err());
        assert!(Vmid::try_from(1_000_000_000).is_err());
        assert_eq!(Vmid::try_from(100).unwrap().get(), 100);
        assert!(serde_json::from_str::<Vmid>("5").is_err());
        assert!("pve-1".parse::<NodeName>().is_ok());
        for bad in ["", "pve 1", "pve/..", "<b>", &"a".repeat(64)] {
            assert!(bad.parse::<NodeName>().is_err(), "{bad}");
        }
    }
}
