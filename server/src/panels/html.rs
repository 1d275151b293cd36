//! Draws a [`Panel`] as HTML for the dashboard to show as is. Every text and attribute is
//! escaped here: hostnames, labels and audit details come from guests and users.

use domain::panel::{CodeBlock, Field, FieldKind, Form, Outcome, Panel, Section, Table};
use std::fmt::Write;

/// The answer to the latest submission, drawn where it was made: under its form or table.
pub struct Answer<'a> {
    pub action: &'a str,
    pub outcome: &'a Outcome,
    /// What was typed, put back into the form after a refusal (never passwords).
    pub typed: Option<&'a super::Fields>,
}

/// `text` safe in element content and in double-quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub fn page(panel: &Panel, answer: Option<&Answer<'_>>) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<h2 class=\"panel-title\">{}</h2>",
        escape(&panel.title)
    );
    // An answer whose form is gone from the page (an unlink removes its own form) is shown
    // on top instead of being lost.
    if let Some(answer) = answer
        && !placed(panel, answer.action)
    {
        outcome(&mut out, answer.outcome);
    }
    for (i, section) in panel.sections.iter().enumerate() {
        self::section(&mut out, i, section, answer);
    }
    out
}

/// Whether the page still has the form or table an answer belongs under.
fn placed(panel: &Panel, action: &str) -> bool {
    panel.sections.iter().any(|s| {
        s.form.as_ref().is_some_and(|f| f.action == action)
            || s.table
                .as_ref()
                .is_some_and(|t| t.actions.iter().any(|a| a.action == action))
    })
}

fn section(out: &mut String, index: usize, section: &Section, answer: Option<&Answer<'_>>) {
    // Live sections are swapped in place when the fleet changes; the rest keep what the
    // user is typing.
    let live = if section.live {
        format!(" data-live=\"s{index}\"")
    } else {
        String::new()
    };
    let _ = write!(
        out,
        "<section class=\"panel-section\"{live}><h3>{}</h3>",
        escape(&section.heading)
    );
    for paragraph in &section.text {
        let _ = write!(out, "<p class=\"hint\">{}</p>", escape(paragraph));
    }
    for block in &section.code {
        code(out, block);
    }
    if let Some(f) = &section.form {
        let mine = answer.filter(|a| a.action == f.action);
        form(out, f, mine);
    }
    if let Some(t) = &section.table {
        let mine = answer.filter(|a| t.actions.iter().any(|x| x.action == a.action));
        table(out, t, mine);
    }
    out.push_str("</section>");
}

fn code(out: &mut String, block: &CodeBlock) {
    let text = escape(&block.text);
    let _ = write!(
        out,
        "<div class=\"code-block\"><div class=\"code-head\"><span>{}</span>\
         <button type=\"button\" class=\"copy\" data-copy=\"{text}\">Copy</button></div>\
         <pre class=\"code\">{text}</pre></div>",
        escape(&block.label)
    );
}

fn form(out: &mut String, form: &Form, answer: Option<&Answer<'_>>) {
    let kind = if form.filter { "filter" } else { "action" };
    let _ = write!(
        out,
        "<form class=\"panel-form\" data-kind=\"{kind}\" data-action=\"{}\">",
        escape(&form.action)
    );
    for f in &form.fields {
        let typed = answer.and_then(|a| a.typed).map(|t| t.get(&f.name));
        let error = answer.and_then(|a| {
            a.outcome
                .errors
                .iter()
                .find(|e| e.field == f.name)
                .map(|e| e.message.as_str())
        });
        field(out, f, typed, error);
    }
    let _ = write!(
        out,
        "<div class=\"form-foot\"><button type=\"submit\">{}</button>",
        escape(&form.submit)
    );
    if let Some(answer) = answer {
        outcome(out, answer.outcome);
    }
    out.push_str("</div></form>");
}

fn field(out: &mut String, f: &Field, typed: Option<&str>, error: Option<&str>) {
    let id = format!("f-{}", escape(&f.name));
    let name = escape(&f.name);
    if f.kind == FieldKind::Hidden {
        let _ = write!(
            out,
            "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
            escape(&f.value)
        );
        return;
    }
    let _ = write!(
        out,
        "<div class=\"field\" data-field=\"{name}\"><label for=\"{id}\">{}</label>",
        escape(&f.label)
    );
    // A password is never sent back, not even after a refusal.
    let value = match (&f.kind, typed) {
        (FieldKind::Password, _) => "",
        (_, Some(typed)) => typed,
        (_, None) => f.value.as_str(),
    };
    let invalid = if error.is_some() {
        " aria-invalid=\"true\""
    } else {
        ""
    };
    match &f.kind {
        FieldKind::Choice(options) => {
            let _ = write!(out, "<select id=\"{id}\" name=\"{name}\"{invalid}>");
            for option in options {
                let selected = if option == value { " selected" } else { "" };
                let option = escape(option);
                let _ = write!(
                    out,
                    "<option value=\"{option}\"{selected}>{option}</option>"
                );
            }
            out.push_str("</select>");
        }
        kind => {
            let (input, mode) = match kind {
                FieldKind::Password => ("password", "text"),
                FieldKind::Number => ("text", "decimal"),
                _ => ("text", "text"),
            };
            let _ = write!(
                out,
                "<input id=\"{id}\" name=\"{name}\" type=\"{input}\" inputmode=\"{mode}\" \
                 value=\"{}\"{invalid}>",
                escape(value)
            );
        }
    }
    if !f.help.is_empty() {
        let _ = write!(out, "<small class=\"help\">{}</small>", escape(&f.help));
    }
    if let Some(error) = error {
        let _ = write!(
            out,
            "<small class=\"field-error\" role=\"alert\" data-error-for=\"{name}\">{}</small>",
            escape(error)
        );
    }
    out.push_str("</div>");
}

fn outcome(out: &mut String, outcome: &Outcome) {
    let class = if outcome.ok { "ok" } else { "refused" };
    let _ = write!(
        out,
        "<div class=\"outcome {class}\" role=\"status\" data-ok=\"{}\"><p>{}</p>",
        outcome.ok,
        escape(&outcome.message)
    );
    for block in &outcome.code {
        code(out, block);
    }
    out.push_str("</div>");
}

fn table(out: &mut String, table: &Table, answer: Option<&Answer<'_>>) {
    if table.rows.is_empty() {
        let _ = write!(out, "<p class=\"empty\">{}</p>", escape(&table.empty));
        if let Some(answer) = answer {
            outcome(out, answer.outcome);
        }
        return;
    }
    out.push_str("<form class=\"table-form\" data-kind=\"table\"><div class=\"table-wrap\"><table class=\"panel-table\"><thead><tr>");
    if table.bulk {
        out.push_str("<th class=\"pick\">Pick</th>");
    }
    for column in &table.columns {
        let _ = write!(out, "<th>{}</th>", escape(column));
    }
    let per_row = !table.bulk && !table.actions.is_empty();
    if per_row {
        out.push_str("<th>Actions</th>");
    }
    out.push_str("</tr></thead><tbody>");
    for row in &table.rows {
        let key = escape(&row.key);
        let _ = write!(out, "<tr data-key=\"{key}\">");
        if table.bulk {
            let _ = write!(
                out,
                "<td class=\"pick\"><input type=\"checkbox\" name=\"key\" value=\"{key}\" \
                 aria-label=\"Select {}\"></td>",
                escape(row.cells.first().map_or("", String::as_str))
            );
        }
        for (column, cell) in table.columns.iter().zip(&row.cells) {
            let _ = write!(
                out,
                "<td data-label=\"{}\">{}</td>",
                escape(column),
                escape(cell)
            );
        }
        if per_row {
            out.push_str("<td class=\"row-actions\">");
            for action in &table.actions {
                let first = row.cells.first().map_or(row.key.as_str(), String::as_str);
                let _ = write!(
                    out,
                    "<button type=\"submit\" class=\"row-action\" name=\"do\" value=\"{} {key}\" \
                     data-confirm=\"{}\">{}</button>",
                    escape(&action.action),
                    escape(&action.confirm.replace("{}", first)),
                    escape(&action.label)
                );
            }
            out.push_str("</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table></div><div class=\"form-foot\">");
    if table.bulk {
        for action in &table.actions {
            let _ = write!(
                out,
                "<button type=\"submit\" class=\"bulk\" name=\"do\" value=\"{}\" \
                 data-confirm=\"{}\">{} selected</button>",
                escape(&action.action),
                escape(&action.confirm),
                escape(&action.label)
            );
        }
    }
    if let Some(answer) = answer {
        outcome(out, answer.outcome);
    }
    out.push_str("</div></form>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::panel::{Row, RowAction};
    use domain::settings::FieldError;

    fn hostile() -> &'static str {
        "<img src=x onerror=alert(1)>\"'&"
    }

    #[test]
    fn escapes_every_special_character() {
        assert_eq!(
            escape(hostile()),
            "&lt;img src=x onerror=alert(1)&gt;&quot;&#39;&amp;"
        );
    }

    #[test]
    fn guest_text_never_becomes_markup() {
        let panel = Panel {
            title: hostile().into(),
            sections: vec![
                Section::new(hostile())
                    .text(hostile())
                    .code(hostile(), hostile())
                    .form(Form {
                        action: hostile().into(),
                        submit: hostile().into(),
                        filter: false,
                        fields: vec![
                            Field::new(hostile(), hostile(), FieldKind::Text, hostile())
                                .help(hostile()),
                            Field::new(
                                "c",
                                "c",
                                FieldKind::Choice(vec![hostile().into()]),
                                hostile(),
                            ),
                        ],
                    })
                    .table(Table {
                        columns: vec![hostile().into()],
                        rows: vec![Row {
                            key: hostile().into(),
                            cells: vec![hostile().into()],
                        }],
                        empty: String::new(),
                        actions: vec![RowAction::new(hostile(), hostile(), hostile())],
                        bulk: false,
                    }),
            ],
        };
        let html = page(&panel, None);
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("=\"x\""), "{html}");
        // Every quote inside a value is escaped, so no attribute can be closed early.
        assert_eq!(
            html.matches("onerror").count(),
            html.matches("&lt;img src=x onerror").count()
        );
    }

    #[test]
    fn a_refusal_shows_the_error_by_its_field_and_never_echoes_a_password() {
        let panel = Panel {
            title: "Users".into(),
            sections: vec![Section::new("Add").form(Form {
                action: "add".into(),
                submit: "Add".into(),
                filter: false,
                fields: vec![
                    Field::new("username", "Name", FieldKind::Text, ""),
                    Field::new("password", "Password", FieldKind::Password, ""),
                ],
            })],
        };
        let typed = super::super::Fields::parse("username=paula&password=secret-typed");
        let outcome = Outcome::invalid(FieldError {
            field: "password".into(),
            message: "too short".into(),
        });
        let html = page(
            &panel,
            Some(&Answer {
                action: "add",
                outcome: &outcome,
                typed: Some(&typed),
            }),
        );
        assert!(html.contains("value=\"paula\""), "{html}");
        assert!(!html.contains("secret-typed"), "{html}");
        assert!(
            html.contains("data-error-for=\"password\">too short<"),
            "{html}"
        );
        assert!(html.contains("data-ok=\"false\""), "{html}");
    }
}
