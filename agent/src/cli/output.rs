//! `-o table|wide|json|yaml`: the one place where every read command's answer is rendered.
//!
//! A command's answer implements [`Render`] (a table, optionally a wider one; JSON and YAML
//! come from its `Serialize`); a list of rows implements [`Row`] and is rendered by
//! [`render_rows`] (columns fitted to the widest cell) or, as it streams (`--follow`), by
//! [`Stream`]: table rows in fixed columns, JSON lines, or one YAML document per item.
use std::io::Write;

use clap::ValueEnum;
use serde::Serialize;

/// `-o`, `--output`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable.
    #[default]
    Table,
    /// The table with more columns (addresses, ids, every peer), where there are any.
    Wide,
    /// JSON (`--follow`: one object per line).
    Json,
    /// YAML (`--follow`: one document per item).
    Yaml,
}

/// Rendering failed (a value that does not serialize, or a closed stdout).
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("encoding YAML: {0}")]
    Yaml(#[from] serde_saphyr::ser::Error),
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
}

/// A read command's answer.
pub trait Render: Serialize {
    /// The human-readable form.
    fn table(&self) -> String;
    /// The table with more detail; the table itself where there is nothing more to show.
    fn wide(&self) -> String {
        self.table()
    }
}

/// `value` as `output` asks, ending with a newline.
pub fn render<T: Render>(value: &T, output: Output) -> Result<String, RenderError> {
    Ok(match output {
        Output::Table => value.table(),
        Output::Wide => value.wide(),
        Output::Json => serde_json::to_string_pretty(value)? + "\n",
        Output::Yaml => yaml(value)?,
    })
}

fn yaml<T: Serialize>(value: &T) -> Result<String, RenderError> {
    let mut s = serde_saphyr::to_string(value)?;
    if !s.ends_with('\n') {
        s.push('\n');
    }
    Ok(s)
}

/// Prints `value` on stdout as `output` asks.
pub fn print<T: Render>(value: &T, output: Output) -> Result<(), RenderError> {
    let mut out = std::io::stdout().lock();
    out.write_all(render(value, output)?.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Prints a whole list on stdout as `output` asks ([`render_rows`]).
pub fn print_rows<T: Row>(items: &[T], output: Output) -> Result<(), RenderError> {
    let mut out = std::io::stdout().lock();
    out.write_all(render_rows(items, output)?.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// An item of a list shown one row per item (`verdicts`).
pub trait Row: Serialize {
    /// Column headers; `wide` adds columns.
    fn headers(wide: bool) -> Vec<&'static str>;
    /// The cells, one per header.
    fn cells(&self, wide: bool) -> Vec<String>;
    /// Column widths while streaming (rows are printed before the widest is known).
    fn stream_widths(wide: bool) -> Vec<usize> {
        Self::headers(wide).iter().map(|h| h.len()).collect()
    }
    /// The table's line when there is nothing to list.
    fn empty() -> &'static str {
        "(none)"
    }
}

/// A whole list: a table with fitted columns, a JSON array, a YAML sequence.
pub fn render_rows<T: Row>(items: &[T], output: Output) -> Result<String, RenderError> {
    let wide = match output {
        Output::Table => false,
        Output::Wide => true,
        Output::Json => return Ok(serde_json::to_string_pretty(items)? + "\n"),
        Output::Yaml => return yaml(&items),
    };
    let headers: Vec<String> = T::headers(wide).iter().map(|h| h.to_string()).collect();
    let cells: Vec<Vec<String>> = items.iter().map(|i| i.cells(wide)).collect();
    let mut widths: Vec<usize> = headers.iter().map(String::len).collect();
    for c in &cells {
        for (w, cell) in widths.iter_mut().zip(c) {
            *w = (*w).max(cell.len());
        }
    }
    let mut s = table_row(&headers, &widths);
    s.push('\n');
    for c in &cells {
        s.push_str(&table_row(c, &widths));
        s.push('\n');
    }
    if items.is_empty() {
        s.push_str(T::empty());
        s.push('\n');
    }
    Ok(s)
}

/// A list printed item by item as it comes (`--follow`): table or wide rows under one header
/// in fixed columns, JSON lines, or YAML documents (`---` before each).
pub struct Stream<W: Write> {
    out: W,
    output: Output,
    header_done: bool,
}

impl<W: Write> Stream<W> {
    pub fn new(out: W, output: Output) -> Self {
        Stream {
            out,
            output,
            header_done: false,
        }
    }

    /// Writes `item` and flushes.
    pub fn item<T: Row>(&mut self, item: &T) -> Result<(), RenderError> {
        let line = match self.output {
            Output::Json => serde_json::to_string(item)? + "\n",
            Output::Yaml => format!("---\n{}", yaml(item)?),
            Output::Table | Output::Wide => {
                let wide = self.output == Output::Wide;
                let widths = T::stream_widths(wide);
                let mut s = String::new();
                if !self.header_done {
                    let headers: Vec<String> =
                        T::headers(wide).iter().map(|h| h.to_string()).collect();
                    s.push_str(&table_row(&headers, &widths));
                    s.push('\n');
                }
                s.push_str(&table_row(&item.cells(wide), &widths));
                s.push('\n');
                s
            }
        };
        self.header_done = true;
        self.out.write_all(line.as_bytes())?;
        self.out.flush()?;
        Ok(())
    }

    /// Before the first item: the table's header alone (so a quiet stream shows its columns).
    pub fn header<T: Row>(&mut self) -> Result<(), RenderError> {
        if matches!(self.output, Output::Table | Output::Wide) && !self.header_done {
            let wide = self.output == Output::Wide;
            let headers: Vec<String> = T::headers(wide).iter().map(|h| h.to_string()).collect();
            writeln!(self.out, "{}", table_row(&headers, &T::stream_widths(wide)))?;
            self.out.flush()?;
            self.header_done = true;
        }
        Ok(())
    }
}

/// One table row: every cell but the last padded to its column's width.
pub fn table_row(cells: &[String], widths: &[usize]) -> String {
    let mut s = String::new();
    for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
        if i + 1 == cells.len() {
            s.push_str(c);
        } else {
            s.push_str(&format!("{c:<w$}  ", w = *w));
        }
    }
    s.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Item {
        name: String,
        count: u32,
        tags: Vec<String>,
    }

    impl Row for Item {
        fn headers(wide: bool) -> Vec<&'static str> {
            if wide {
                vec!["NAME", "COUNT", "TAGS"]
            } else {
                vec!["NAME", "COUNT"]
            }
        }
        fn cells(&self, wide: bool) -> Vec<String> {
            let mut c = vec![self.name.clone(), self.count.to_string()];
            if wide {
                c.push(self.tags.join(","));
            }
            c
        }
    }

    fn items() -> Vec<Item> {
        vec![
            Item {
                name: "a-long-name".into(),
                count: 1,
                tags: vec!["x".into(), "y: z".into()],
            },
            Item {
                name: "b".into(),
                count: 22,
                tags: vec![],
            },
        ]
    }

    #[test]
    fn rows_round_trip_through_json_and_yaml() {
        let items = items();
        let json = render_rows(&items, Output::Json).unwrap();
        assert_eq!(serde_json::from_str::<Vec<Item>>(&json).unwrap(), items);
        let yaml = render_rows(&items, Output::Yaml).unwrap();
        assert_eq!(
            serde_saphyr::from_str::<Vec<Item>>(&yaml).unwrap(),
            items,
            "{yaml}"
        );
    }

    #[test]
    fn tables_fit_their_columns_and_wide_adds_some() {
        let items = items();
        let table = render_rows(&items, Output::Table).unwrap();
        assert_eq!(
            table,
            "NAME         COUNT\na-long-name  1\nb            22\n"
        );
        let wide = render_rows(&items, Output::Wide).unwrap();
        let lines: Vec<&str> = wide.lines().collect();
        assert_eq!(lines[0], "NAME         COUNT  TAGS");
        assert_eq!(lines[1], "a-long-name  1      x,y: z");
        assert_eq!(
            render_rows::<Item>(&[], Output::Table).unwrap(),
            "NAME  COUNT\n(none)\n"
        );
    }

    #[test]
    fn a_stream_is_json_lines_or_yaml_documents_or_rows_under_one_header() {
        let items = items();
        let mut buf = Vec::new();
        let mut s = Stream::new(&mut buf, Output::Json);
        for i in &items {
            s.item(i).unwrap();
        }
        let text = String::from_utf8(buf).unwrap();
        let back: Vec<Item> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, items, "one JSON object per line: {text}");

        let mut buf = Vec::new();
        let mut s = Stream::new(&mut buf, Output::Yaml);
        for i in &items {
            s.item(i).unwrap();
        }
        let text = String::from_utf8(buf).unwrap();
        let docs: Vec<Item> = text
            .split("---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| serde_saphyr::from_str(d).unwrap())
            .collect();
        assert_eq!(docs, items, "{text}");

        let mut buf = Vec::new();
        let mut s = Stream::new(&mut buf, Output::Table);
        s.header::<Item>().unwrap();
        for i in &items {
            s.item(i).unwrap();
        }
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            ["NAME  COUNT", "a-long-name  1", "b     22"],
            "one header, then fixed columns"
        );
    }
}
