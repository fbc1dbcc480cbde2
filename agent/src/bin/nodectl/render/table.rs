//! Output for people: aligned tables, and one `key value` line per field.

use serde_json::Value;

/// Widest a table cell is shown; longer values (labels, errors) are cut
/// with an ellipsis, and `--json` shows them whole.
const MAX_CELL_CHARS: usize = 60;

/// `cell` cut to `MAX_CELL_CHARS` characters, an ellipsis marking the cut.
fn fit_cell(cell: &str) -> String {
    if cell.chars().count() <= MAX_CELL_CHARS {
        return cell.to_string();
    }
    let mut cut: String = cell.chars().take(MAX_CELL_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// Prints `rows` (the first is the header) in columns as wide as their
/// widest cell, counted in characters.
pub fn print_table(rows: Vec<Vec<String>>) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| fit_cell(c)).collect())
        .collect();
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// Prints each field of a JSON object on a line of its own, the key padded
/// to `key_width`, strings without their quotes.
pub fn print_fields(object: &Value, key_width: usize) {
    for (key, value) in object.as_object().unwrap() {
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("{key:<key_width$} {text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_cells_are_cut_with_an_ellipsis() {
        assert_eq!(fit_cell("short"), "short");
        let long = "é".repeat(100_000);
        let cut = fit_cell(&long);
        assert_eq!(cut.chars().count(), MAX_CELL_CHARS);
        assert!(cut.ends_with('…'));
        let exact = "x".repeat(MAX_CELL_CHARS);
        assert_eq!(fit_cell(&exact), exact);
    }
}
