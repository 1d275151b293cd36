//! The admin pages (settings, add a VM, users, tokens, audit, link approvals) described as
//! data: the server fills a [`Panel`] and draws it as HTML; the browser shows that HTML and
//! sends its forms back.
//!
//! Why: each hand-written page cost the browser bundle about 30 KB of view code, while
//! these pages are forms and tables that differ only in their contents.

use crate::settings::FieldError;
use serde::{Deserialize, Serialize};

/// One admin page as the server describes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Panel {
    pub title: String,
    pub sections: Vec<Section>,
}

/// A titled part of a page: paragraphs, copyable text, then a form and/or a table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Section {
    pub heading: String,
    pub text: Vec<String>,
    pub code: Vec<CodeBlock>,
    pub form: Option<Form>,
    pub table: Option<Table>,
    /// Redrawn in place when the fleet changes (VMs arriving); other sections keep what the
    /// user is typing.
    pub live: bool,
}

/// Text meant to be copied (a command line, a token shown once), with a copy button.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CodeBlock {
    pub label: String,
    pub text: String,
}

/// A form. Submitting it sends `action` and every field's value to the server, or, for a
/// filter, puts the values in the page's address so the view can be shared.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Form {
    pub action: String,
    pub submit: String,
    pub fields: Vec<Field>,
    pub filter: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Field {
    /// The name the server reads it by, and the name field errors come back with.
    pub name: String,
    pub label: String,
    pub kind: FieldKind,
    pub value: String,
    pub help: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FieldKind {
    Text,
    Number,
    Password,
    /// One of these values.
    Choice(Vec<String>),
    /// Sent back as given, not shown: what the page showed (a proposal being approved).
    Hidden,
}

/// Rows with a key each; actions apply to one row (a button on it) or, when `bulk`, to
/// every ticked row at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
    /// Shown instead of an empty table.
    pub empty: String,
    pub actions: Vec<RowAction>,
    pub bulk: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Row {
    /// Sent back as `key` when an action is taken on the row; names exactly what was shown.
    pub key: String,
    pub cells: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RowAction {
    pub action: String,
    pub label: String,
    /// Asked before acting ("Delete user alice?"); empty to act at once. `{}` is replaced
    /// by the row's first cell.
    pub confirm: String,
}

/// What a submission answered.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub ok: bool,
    pub message: String,
    /// Shown next to the fields they name; nothing was changed.
    pub errors: Vec<FieldError>,
    /// Shown once under the form (a new token, the filled-in install commands).
    pub code: Vec<CodeBlock>,
}

impl Outcome {
    pub fn done(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: message.into(),
            ..Self::default()
        }
    }

    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: message.into(),
            ..Self::default()
        }
    }

    pub fn invalid(error: FieldError) -> Self {
        Self {
            ok: false,
            message: format!("Nothing was changed: {error}"),
            errors: vec![error],
            code: Vec::new(),
        }
    }
}

impl Field {
    pub fn new(name: &str, label: &str, kind: FieldKind, value: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            label: label.to_owned(),
            kind,
            value: value.into(),
            help: String::new(),
        }
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = help.into();
        self
    }
}

impl Section {
    pub fn new(heading: impl Into<String>) -> Self {
        Self {
            heading: heading.into(),
            ..Self::default()
        }
    }

    pub fn text(mut self, paragraph: impl Into<String>) -> Self {
        self.text.push(paragraph.into());
        self
    }

    pub fn code(mut self, label: impl Into<String>, text: impl Into<String>) -> Self {
        self.code.push(CodeBlock {
            label: label.into(),
            text: text.into(),
        });
        self
    }

    pub fn form(mut self, form: Form) -> Self {
        self.form = Some(form);
        self
    }

    pub fn table(mut self, table: Table) -> Self {
        self.table = Some(table);
        self
    }

    pub fn live(mut self) -> Self {
        self.live = true;
        self
    }
}

impl RowAction {
    pub fn new(action: &str, label: &str, confirm: &str) -> Self {
        Self {
            action: action.to_owned(),
            label: label.to_owned(),
            confirm: confirm.to_owned(),
        }
    }
}
