//! BEIR-format files: readers and writers.
//!
//! - `corpus.jsonl`: one document per line, `{"_id", "title", "text", ...}`.
//! - `queries.jsonl`: one query per line, `{"_id", "text", ...}`; ids may be JSON numbers.
//! - `qrels/*.tsv`: `query-id \t corpus-id \t score` with a header line (a missing header is
//!   tolerated, and so is the four-column TREC layout `qid iter docid rel`).
//! - the question/answer jsonl of `zrag eval qa` (SPEC §5): `{"_id", "question", "answers": [..]}`,
//!   with an optional `"split"`.
//!
//! Readers skip blank lines and report the file and line of anything malformed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::EvalError;

/// A query of a BEIR `queries.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    pub id: String,
    pub text: String,
}

/// A document of a BEIR `corpus.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusDoc {
    pub id: String,
    pub title: String,
    pub text: String,
}

/// One line of the question/answer file of `zrag eval qa`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QaItem {
    pub id: String,
    pub question: String,
    pub answers: Vec<String>,
    /// `train`, `dev` or `test` when the file carries splits.
    pub split: Option<String>,
}

/// Relevance judgements: query id → document id → relevance grade (> 0 means relevant).
pub type Qrels = BTreeMap<String, BTreeMap<String, i32>>;

fn open(path: &Path) -> Result<BufReader<File>, EvalError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| EvalError::io(path, e))
}

fn create(path: &Path) -> Result<BufWriter<File>, EvalError> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|e| EvalError::io(parent, e))?;
        }
    }
    File::create(path)
        .map(BufWriter::new)
        .map_err(|e| EvalError::io(path, e))
}

/// Calls `f(line_number, line)` for every non-blank line (1-based numbers; a UTF-8 BOM is
/// dropped; invalid UTF-8 is an error naming the line).
fn for_each_line(
    path: &Path,
    mut f: impl FnMut(usize, &str) -> Result<(), EvalError>,
) -> Result<(), EvalError> {
    let mut reader = open(path)?;
    let mut buf = Vec::new();
    let mut lineno = 0;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| EvalError::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        lineno += 1;
        let line = std::str::from_utf8(&buf)
            .map_err(|e| EvalError::parse(path, lineno, format!("invalid UTF-8 ({e})")))?;
        let line = if lineno == 1 {
            line.trim_start_matches('\u{feff}')
        } else {
            line
        };
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        f(lineno, line)?;
    }
}

fn parse_json_object(
    path: &Path,
    lineno: usize,
    line: &str,
) -> Result<serde_json::Map<String, Value>, EvalError> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(EvalError::parse(path, lineno, "expected a JSON object")),
        Err(e) => Err(EvalError::parse(path, lineno, format!("invalid JSON: {e}"))),
    }
}

/// An id field: a string or a number (BEIR files use both).
fn id_field(
    map: &serde_json::Map<String, Value>,
    key: &str,
    path: &Path,
    lineno: usize,
) -> Result<String, EvalError> {
    match map.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(_) => Err(EvalError::parse(
            path,
            lineno,
            format!("\"{key}\" must be a string or a number"),
        )),
        None => Err(EvalError::parse(path, lineno, format!("missing \"{key}\""))),
    }
}

fn string_field(
    map: &serde_json::Map<String, Value>,
    key: &str,
    path: &Path,
    lineno: usize,
) -> Result<String, EvalError> {
    match map.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(EvalError::parse(
            path,
            lineno,
            format!("\"{key}\" must be a string"),
        )),
        None => Err(EvalError::parse(path, lineno, format!("missing \"{key}\""))),
    }
}

/// Reads a BEIR `queries.jsonl` (`{"_id", "text", ...}` per line; other fields are ignored).
///
/// Duplicate ids are an error, since metrics are keyed by query id.
pub fn load_queries(path: &Path) -> Result<Vec<Query>, EvalError> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for_each_line(path, |lineno, line| {
        let map = parse_json_object(path, lineno, line)?;
        let id = id_field(&map, "_id", path, lineno)?;
        let text = string_field(&map, "text", path, lineno)?;
        if !seen.insert(id.clone()) {
            return Err(EvalError::parse(
                path,
                lineno,
                format!("duplicate query id {id:?}"),
            ));
        }
        out.push(Query { id, text });
        Ok(())
    })?;
    Ok(out)
}

/// Reads a BEIR `corpus.jsonl` (`{"_id", "title", "text"}`; a missing title is empty).
pub fn load_corpus(path: &Path) -> Result<Vec<CorpusDoc>, EvalError> {
    let mut out = Vec::new();
    for_each_line(path, |lineno, line| {
        let map = parse_json_object(path, lineno, line)?;
        let id = id_field(&map, "_id", path, lineno)?;
        let title = match map.get("title") {
            None | Some(Value::Null) => String::new(),
            Some(_) => string_field(&map, "title", path, lineno)?,
        };
        let text = string_field(&map, "text", path, lineno)?;
        out.push(CorpusDoc { id, title, text });
        Ok(())
    })?;
    Ok(out)
}

fn parse_grade(s: &str) -> Option<i32> {
    if let Ok(v) = s.parse::<i32>() {
        return Some(v);
    }
    // Some qrels write grades as floats ("1.0").
    let v = s.parse::<f64>().ok()?;
    (v.is_finite() && v.fract() == 0.0 && v.abs() < 1e9).then_some(v as i32)
}

/// Reads a qrels file: BEIR tsv `query-id \t corpus-id \t score` (header optional), or the
/// TREC layout `qid iter docid rel` (whitespace-separated, four columns).
///
/// A pair judged twice keeps the last grade.
pub fn load_qrels(path: &Path) -> Result<Qrels, EvalError> {
    let mut qrels = Qrels::new();
    let mut first = true;
    for_each_line(path, |lineno, line| {
        let is_first = std::mem::replace(&mut first, false);
        let fields: Vec<&str> = if line.contains('\t') {
            line.split('\t').map(str::trim).collect()
        } else {
            line.split_whitespace().collect()
        };
        let (qid, did, grade) = match fields.as_slice() {
            [q, d, g] => (*q, *d, *g),
            [q, _, d, g] => (*q, *d, *g),
            _ => {
                return Err(EvalError::parse(
                    path,
                    lineno,
                    format!(
                        "expected 3 columns (query-id, corpus-id, score) or 4 (TREC), found {}",
                        fields.len()
                    ),
                ))
            }
        };
        let Some(grade) = parse_grade(grade) else {
            if is_first {
                return Ok(()); // the header line
            }
            return Err(EvalError::parse(
                path,
                lineno,
                format!("relevance {grade:?} is not an integer"),
            ));
        };
        if qid.is_empty() || did.is_empty() {
            return Err(EvalError::parse(path, lineno, "empty query or corpus id"));
        }
        qrels
            .entry(qid.to_string())
            .or_default()
            .insert(did.to_string(), grade);
        Ok(())
    })?;
    Ok(qrels)
}

/// Reads the question/answer jsonl of `zrag eval qa`: `{"_id", "question", "answers": [..]}`
/// (a string `"answers"` is taken as one answer; `"split"` is optional).
pub fn load_qa(path: &Path) -> Result<Vec<QaItem>, EvalError> {
    let mut out = Vec::new();
    for_each_line(path, |lineno, line| {
        let map = parse_json_object(path, lineno, line)?;
        let id = id_field(&map, "_id", path, lineno)?;
        let question = string_field(&map, "question", path, lineno)?;
        let answers = match map.get("answers") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    _ => Err(EvalError::parse(
                        path,
                        lineno,
                        "\"answers\" must hold strings",
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(EvalError::parse(
                    path,
                    lineno,
                    "\"answers\" must be a list of strings",
                ))
            }
            None => return Err(EvalError::parse(path, lineno, "missing \"answers\"")),
        };
        let split = match map.get("split") {
            None | Some(Value::Null) => None,
            Some(_) => Some(string_field(&map, "split", path, lineno)?),
        };
        out.push(QaItem {
            id,
            question,
            answers,
            split,
        });
        Ok(())
    })?;
    Ok(out)
}

fn write_jsonl<T: Serialize>(
    path: &Path,
    items: impl IntoIterator<Item = T>,
) -> Result<(), EvalError> {
    let mut w = create(path)?;
    for item in items {
        serde_json::to_writer(&mut w, &item)
            .map_err(|e| EvalError::data(path, format!("cannot serialise: {e}")))?;
        w.write_all(b"\n").map_err(|e| EvalError::io(path, e))?;
    }
    w.flush().map_err(|e| EvalError::io(path, e))
}

#[derive(Serialize)]
struct CorpusLine<'a> {
    #[serde(rename = "_id")]
    id: &'a str,
    title: &'a str,
    text: &'a str,
}

#[derive(Serialize)]
struct QueryLine<'a> {
    #[serde(rename = "_id")]
    id: &'a str,
    text: &'a str,
}

#[derive(Serialize)]
struct QaLine<'a> {
    #[serde(rename = "_id")]
    id: &'a str,
    question: &'a str,
    answers: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    split: Option<&'a str>,
}

/// Writes a BEIR `corpus.jsonl` (parent directories are created).
pub fn write_corpus<'a>(
    path: &Path,
    docs: impl IntoIterator<Item = &'a CorpusDoc>,
) -> Result<(), EvalError> {
    write_jsonl(
        path,
        docs.into_iter().map(|d| CorpusLine {
            id: &d.id,
            title: &d.title,
            text: &d.text,
        }),
    )
}

/// Writes a BEIR `queries.jsonl` (parent directories are created).
pub fn write_queries<'a>(
    path: &Path,
    queries: impl IntoIterator<Item = &'a Query>,
) -> Result<(), EvalError> {
    write_jsonl(
        path,
        queries.into_iter().map(|q| QueryLine {
            id: &q.id,
            text: &q.text,
        }),
    )
}

/// Writes the question/answer jsonl of `zrag eval qa` (parent directories are created).
pub fn write_qa<'a>(
    path: &Path,
    items: impl IntoIterator<Item = &'a QaItem>,
) -> Result<(), EvalError> {
    write_jsonl(
        path,
        items.into_iter().map(|q| QaLine {
            id: &q.id,
            question: &q.question,
            answers: &q.answers,
            split: q.split.as_deref(),
        }),
    )
}

/// Writes a BEIR qrels tsv with its header `query-id \t corpus-id \t score`.
///
/// Ids containing tabs or newlines cannot be written and are an error.
pub fn write_qrels(path: &Path, qrels: &Qrels) -> Result<(), EvalError> {
    let mut w = create(path)?;
    let io = |e| EvalError::io(path, e);
    w.write_all(b"query-id\tcorpus-id\tscore\n").map_err(io)?;
    for (qid, docs) in qrels {
        for (did, grade) in docs {
            if [qid, did].iter().any(|s| s.contains(['\t', '\n', '\r'])) {
                return Err(EvalError::data(
                    path,
                    format!("id {qid:?} / {did:?} contains a tab or newline"),
                ));
            }
            writeln!(w, "{qid}\t{did}\t{grade}").map_err(io)?;
        }
    }
    w.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, content: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    #[test]
    fn queries_with_numeric_ids_and_extra_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "q.jsonl",
            "\u{feff}{\"_id\": 12, \"text\": \"what\", \"metadata\": {}}\n\n{\"_id\":\"a\",\"text\":\"b\"}\r\n",
        );
        let q = load_queries(&p).unwrap();
        assert_eq!(
            q,
            vec![
                Query {
                    id: "12".into(),
                    text: "what".into()
                },
                Query {
                    id: "a".into(),
                    text: "b".into()
                }
            ]
        );
    }

    #[test]
    fn query_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "bad.jsonl",
            "{\"_id\":\"1\",\"text\":\"x\"}\n{\"_id\":\"2\"}\n",
        );
        let e = load_queries(&p).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:2:") && e.contains("text"), "{e}");
        let p = write(dir.path(), "bad2.jsonl", "{\"_id\":\"1\",\"text\":\"x\"\n");
        let e = load_queries(&p).unwrap_err().to_string();
        assert!(e.contains("bad2.jsonl:1: invalid JSON"), "{e}");
        let p = write(
            dir.path(),
            "dup.jsonl",
            "{\"_id\":\"1\",\"text\":\"x\"}\n{\"_id\":1,\"text\":\"y\"}\n",
        );
        let e = load_queries(&p).unwrap_err().to_string();
        assert!(e.contains("dup.jsonl:2: duplicate"), "{e}");
        let e = load_queries(&dir.path().join("missing.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.jsonl"), "{e}");
    }

    #[test]
    fn qrels_with_and_without_header() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            dir.path(),
            "a.tsv",
            "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\nq2\td1\t0\n",
        );
        let b = write(dir.path(), "b.tsv", "q1\td1\t1\nq1\td2\t2.0\nq2\td1\t0\n");
        let c = write(dir.path(), "c.txt", "q1 0 d1 1\nq1 0 d2 2\nq2 0 d1 0\n");
        let qa = load_qrels(&a).unwrap();
        assert_eq!(qa, load_qrels(&b).unwrap());
        assert_eq!(qa, load_qrels(&c).unwrap());
        assert_eq!(qa["q1"]["d2"], 2);
        assert_eq!(qa["q2"]["d1"], 0);
        let bad = write(dir.path(), "bad.tsv", "q1\td1\t1\nq2\td2\tx\n");
        let e = load_qrels(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.tsv:2:"), "{e}");
        let bad = write(dir.path(), "bad2.tsv", "q1\td1\n");
        let e = load_qrels(&bad).unwrap_err().to_string();
        assert!(e.contains("bad2.tsv:1: expected 3 columns"), "{e}");
    }

    #[test]
    fn writers_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let docs = vec![CorpusDoc {
            id: "d\"1".into(),
            title: "T".into(),
            text: "line\nnext ünïcode".into(),
        }];
        let p = dir.path().join("sub/corpus.jsonl");
        write_corpus(&p, &docs).unwrap();
        assert_eq!(load_corpus(&p).unwrap(), docs);

        let queries = vec![Query {
            id: "1".into(),
            text: "q".into(),
        }];
        let p = dir.path().join("queries.jsonl");
        write_queries(&p, &queries).unwrap();
        assert_eq!(load_queries(&p).unwrap(), queries);

        let mut qrels = Qrels::new();
        qrels.entry("1".into()).or_default().insert("d1".into(), 1);
        qrels.entry("2".into()).or_default().insert("d2".into(), 3);
        let p = dir.path().join("qrels/test.tsv");
        write_qrels(&p, &qrels).unwrap();
        assert!(std::fs::read_to_string(&p)
            .unwrap()
            .starts_with("query-id\tcorpus-id\tscore\n"));
        assert_eq!(load_qrels(&p).unwrap(), qrels);

        let items = vec![
            QaItem {
                id: "1".into(),
                question: "q?".into(),
                answers: vec!["a".into(), "b".into()],
                split: Some("test".into()),
            },
            QaItem {
                id: "2".into(),
                question: "r?".into(),
                answers: vec![],
                split: None,
            },
        ];
        let p = dir.path().join("answers.jsonl");
        write_qa(&p, &items).unwrap();
        assert_eq!(load_qa(&p).unwrap(), items);
    }
}
