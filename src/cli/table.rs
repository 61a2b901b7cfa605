//! [`Table`]: plain-text output with a header row and columns padded to line up, and the cell
//! formats for JSON values (`text`, `yes_no`, `time`). Knows nothing about accounts or keys; the
//! commands choose the columns.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;

/// Space between two columns.
const GAP: &str = "  ";

/// Rows of cells under a header, printed with `{}`.
#[derive(Debug)]
pub(crate) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

// === impl Table ===

impl Table {
    /// An empty table with these column names.
    pub(crate) fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra cells are dropped.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.header.len(), String::new());
        self.rows.push(cells);
    }

    /// Each column's width in characters (not bytes: previews hold `…`).
    fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        widths
    }
}

impl fmt::Display for Table {
    /// One line per row; the last column is not padded, so no line ends in spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let widths = self.widths();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    let pad = width - cell.chars().count();
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(GAP);
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

// === functions ===

/// A JSON string or number as a cell; `-` when null or missing.
pub(crate) fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A JSON bool as `yes` or `no`; `-` otherwise.
pub(crate) fn yes_no(value: &Value) -> String {
    match value.as_bool() {
        Some(true) => "yes".to_owned(),
        Some(false) => "no".to_owned(),
        None => "-".to_owned(),
    }
}

/// An RFC 3339 time to the second (`2025-01-31T12:00:00Z`); `absent` when null or missing.
pub(crate) fn time(value: &Value, absent: &str) -> String {
    match value.as_str() {
        None => absent.to_owned(),
        Some(s) => s.parse::<DateTime<Utc>>().map_or_else(
            |_| s.to_owned(),
            |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_by_characters_and_lines_have_no_trailing_space() {
        let mut table = Table::new(&["ID", "PREVIEW", "ACTIVE"]);
        table.row(vec!["key_1".into(), "tgsk_Ab3x…9fQ2".into(), "yes".into()]);
        table.row(vec!["key_22".into(), "-".into(), String::new()]);
        let text = table.to_string();
        assert_eq!(
            text,
            "ID      PREVIEW         ACTIVE\n\
             key_1   tgsk_Ab3x…9fQ2  yes\n\
             key_22  -\n"
        );
    }

    #[test]
    fn cells_read_json_values() {
        assert_eq!(text(&Value::Null), "-");
        assert_eq!(yes_no(&Value::Bool(false)), "no");
        let t = Value::String("2025-01-31T12:00:00.123456789Z".to_owned());
        assert_eq!(time(&t, "never"), "2025-01-31T12:00:00Z");
        assert_eq!(time(&Value::Null, "never"), "never");
    }

    #[test]
    fn an_empty_table_is_its_header() {
        assert_eq!(Table::new(&["ID", "NAME"]).to_string(), "ID  NAME\n");
    }
}
