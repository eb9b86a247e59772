//! Evaluation reports: `metrics.json`, `per_query.jsonl`, `report.md` and hand-written SVG plots.
//!
//! [`write_retrieval_report`] writes, into one directory:
//!
//! - `metrics.json`: `{"title", "num_queries", "ks", "metrics": {...}, "extra": ...}`;
//! - `per_query.jsonl`: one line per evaluated query, `{"query_id", <metric>: value, ...}`;
//! - `recall_at_k.svg`: recall@k against k on a logarithmic axis, for the evaluated ks;
//! - `rank_histogram.svg`: a histogram of the rank of the first relevant document per query
//!   (bins 1, 2, 3, 4–5, 6–10, 11–20, 21–50, 51–100, >100 and "not retrieved");
//! - `report.md`: a table of the metrics, the `extra` information and the two plots as images.
//!
//! The SVG is written by hand (no plotting dependency): plain `<svg>`, `<line>`, `<rect>`,
//! `<polyline>`, `<circle>` and `<text>` elements, with text XML-escaped.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use crate::metrics::{RetrievalReport, FIRST_RELEVANT_RANK};
use crate::EvalError;

/// File name of the recall@k plot inside a report directory.
pub const RECALL_PLOT: &str = "recall_at_k.svg";
/// File name of the first-relevant-rank histogram inside a report directory.
pub const RANK_PLOT: &str = "rank_histogram.svg";

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

fn write_file(path: &Path, content: &str) -> Result<(), EvalError> {
    std::fs::write(path, content).map_err(|e| EvalError::io(path, e))
}

/// Writes the report files listed in the module documentation into `dir` (created if needed).
pub fn write_retrieval_report(
    dir: &Path,
    title: &str,
    report: &RetrievalReport,
    extra: &Value,
) -> Result<(), EvalError> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;

    let metrics = json!({
        "title": title,
        "num_queries": report.num_queries,
        "ks": report.ks,
        "metrics": report.metrics,
        "extra": extra,
    });
    let path = dir.join("metrics.json");
    let text = serde_json::to_string_pretty(&metrics)
        .map_err(|e| EvalError::data(&path, format!("cannot serialise: {e}")))?;
    write_file(&path, &(text + "\n"))?;

    let path = dir.join("per_query.jsonl");
    let mut lines = String::new();
    for (qid, m) in &report.per_query {
        let mut obj = serde_json::Map::new();
        obj.insert("query_id".into(), Value::String(qid.clone()));
        for (k, v) in m {
            obj.insert(k.clone(), json!(v));
        }
        lines.push_str(&Value::Object(obj).to_string());
        lines.push('\n');
    }
    write_file(&path, &lines)?;

    write_file(&dir.join(RECALL_PLOT), &recall_at_k_svg(title, report))?;
    write_file(&dir.join(RANK_PLOT), &rank_histogram_svg(title, report))?;
    write_file(&dir.join("report.md"), &markdown(title, report, extra))?;
    Ok(())
}

/// The metric keys in reading order: nDCG@10, MRR@10, recall@k by k, then anything else.
fn ordered_metrics(report: &RetrievalReport) -> Vec<(String, f64)> {
    let mut keys: Vec<String> = vec!["ndcg@10".into(), "mrr@10".into()];
    keys.extend(report.ks.iter().map(|k| format!("recall@{k}")));
    let mut out: Vec<(String, f64)> = keys
        .iter()
        .filter_map(|k| report.metrics.get(k).map(|v| (k.clone(), *v)))
        .collect();
    for (k, v) in &report.metrics {
        if !keys.contains(k) {
            out.push((k.clone(), *v));
        }
    }
    out
}

/// The "Details" section of a report: a key/value table for an object, pretty JSON otherwise,
/// nothing for null or an empty object.
fn details_section(md: &mut String, extra: &Value) {
    match extra {
        Value::Null => {}
        Value::Object(map) if map.is_empty() => {}
        Value::Object(map) => {
            md.push_str("\n## Details\n\n| key | value |\n|---|---|\n");
            for (k, v) in map {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let _ = writeln!(md, "| {} | {} |", md_cell(k), md_cell(&v));
            }
        }
        other => {
            let pretty = serde_json::to_string_pretty(other).unwrap_or_default();
            let _ = write!(md, "\n## Details\n\n```json\n{pretty}\n```\n");
        }
    }
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn markdown(title: &str, report: &RetrievalReport, extra: &Value) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# {}\n", title.replace('\n', " "));
    let _ = writeln!(
        md,
        "{} queries evaluated (queries of the qrels with at least one relevant document).\n",
        report.num_queries
    );
    md.push_str("| metric | value |\n|---|---:|\n");
    for (k, v) in ordered_metrics(report) {
        let _ = writeln!(md, "| {k} | {v:.4} |");
    }
    details_section(&mut md, extra);
    let _ = write!(
        md,
        "\n## Plots\n\n![recall@k against k]({RECALL_PLOT})\n\n\
         ![rank of the first relevant document]({RANK_PLOT})\n"
    );
    md
}

/// Escapes text for XML content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn svg_open(out: &mut String, title: &str) {
    let _ = writeln!(
        out,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"white\"/>\n\
         <text x=\"{:.1}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>",
        WIDTH / 2.0,
        xml_escape(title)
    );
}

fn text(out: &mut String, x: f64, y: f64, anchor: &str, s: &str) {
    let _ = writeln!(
        out,
        "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"{anchor}\">{}</text>",
        xml_escape(s)
    );
}

fn line(out: &mut String, x1: f64, y1: f64, x2: f64, y2: f64, style: &str) {
    let _ = writeln!(
        out,
        "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" {style}/>"
    );
}

/// Axes box, horizontal grid and y labels for a plot whose y axis spans 0..=`y_max`.
fn axes(out: &mut String, y_max: f64, y_ticks: usize, y_label: &str, x_label: &str, pct: bool) {
    let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP);
    for i in 0..=y_ticks {
        let v = y_max * i as f64 / y_ticks as f64;
        let y = y0 - (y0 - y1) * i as f64 / y_ticks as f64;
        line(out, x0, y, x1, y, "stroke=\"#dddddd\"");
        let label = if pct {
            format!("{:.0}%", v * 100.0)
        } else if y_max <= 1.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.0}")
        };
        text(out, x0 - 8.0, y + 4.0, "end", &label);
    }
    line(out, x0, y0, x1, y0, "stroke=\"black\"");
    line(out, x0, y0, x0, y1, "stroke=\"black\"");
    text(out, (x0 + x1) / 2.0, HEIGHT - 15.0, "middle", x_label);
    let _ = writeln!(
        out,
        "<text x=\"18\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {:.1})\">{}</text>",
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0,
        xml_escape(y_label)
    );
}

/// The recall@k plot: recall against k on a log10 x axis, one point per evaluated k.
pub fn recall_at_k_svg(title: &str, report: &RetrievalReport) -> String {
    let points: Vec<(usize, f64)> = report
        .ks
        .iter()
        .filter_map(|&k| report.metrics.get(&format!("recall@{k}")).map(|&v| (k, v)))
        .collect();
    let mut out = String::new();
    svg_open(&mut out, &format!("{title}: recall@k"));
    axes(&mut out, 1.0, 5, "recall@k", "k (log scale)", false);
    let (x0, x1, y0, y1) = (LEFT + 20.0, WIDTH - RIGHT - 20.0, HEIGHT - BOTTOM, TOP);
    let lmin = points.first().map_or(0.0, |p| (p.0 as f64).log10());
    let lmax = points.last().map_or(1.0, |p| (p.0 as f64).log10());
    let xpos = |k: usize| {
        if lmax > lmin {
            x0 + (x1 - x0) * ((k as f64).log10() - lmin) / (lmax - lmin)
        } else {
            (x0 + x1) / 2.0
        }
    };
    let ypos = |v: f64| y0 - (y0 - y1) * v.clamp(0.0, 1.0);
    let coords: Vec<String> = points
        .iter()
        .map(|&(k, v)| format!("{:.1},{:.1}", xpos(k), ypos(v)))
        .collect();
    if coords.len() > 1 {
        let _ = writeln!(
            out,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\"/>",
            coords.join(" ")
        );
    }
    for &(k, v) in &points {
        let (x, y) = (xpos(k), ypos(v));
        line(&mut out, x, y0, x, y0 + 5.0, "stroke=\"black\"");
        text(&mut out, x, y0 + 18.0, "middle", &k.to_string());
        let _ = writeln!(
            out,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"#1f77b4\"/>"
        );
        text(&mut out, x, y - 9.0, "middle", &format!("{v:.3}"));
    }
    out.push_str("</svg>\n");
    out
}

/// Colours of successive series in line charts.
const SERIES_COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// A line chart of one or more series of (x, y) points (learning curves: loss or a metric
/// against the training step), linear axes from 0 (x) and from the data's minimum (y), with a
/// legend.
pub fn line_chart_svg(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> String {
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x_max, mut y_min, mut y_max) = (0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    if y_max - y_min < 1e-9 {
        y_max = y_min + 1.0;
    }
    let pad = (y_max - y_min) * 0.05;
    let (y_lo, y_hi) = (y_min - pad, y_max + pad);
    let x_max = if x_max > 0.0 { x_max } else { 1.0 };
    let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP);
    let xpos = |x: f64| x0 + (x1 - x0) * x / x_max;
    let ypos = |y: f64| y0 - (y0 - y1) * (y - y_lo) / (y_hi - y_lo);

    let mut out = String::new();
    svg_open(&mut out, title);
    const TICKS: usize = 5;
    for i in 0..=TICKS {
        let v = y_lo + (y_hi - y_lo) * i as f64 / TICKS as f64;
        let y = ypos(v);
        line(&mut out, x0, y, x1, y, "stroke=\"#dddddd\"");
        text(&mut out, x0 - 8.0, y + 4.0, "end", &format!("{v:.3}"));
        let xv = x_max * i as f64 / TICKS as f64;
        let x = xpos(xv);
        line(&mut out, x, y0, x, y0 + 5.0, "stroke=\"black\"");
        text(&mut out, x, y0 + 18.0, "middle", &format!("{xv:.0}"));
    }
    line(&mut out, x0, y0, x1, y0, "stroke=\"black\"");
    line(&mut out, x0, y0, x0, y1, "stroke=\"black\"");
    text(&mut out, (x0 + x1) / 2.0, HEIGHT - 15.0, "middle", x_label);
    let _ = writeln!(
        out,
        "<text x=\"18\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {:.1})\">{}</text>",
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0,
        xml_escape(y_label)
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = SERIES_COLOURS[i % SERIES_COLOURS.len()];
        let coords: Vec<String> = pts
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", xpos(x), ypos(y)))
            .collect();
        if coords.len() > 1 {
            let _ = writeln!(
                out,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\"/>",
                coords.join(" ")
            );
        }
        if coords.len() <= 30 {
            for c in &coords {
                let (cx, cy) = c.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    out,
                    "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"3\" fill=\"{colour}\"/>"
                );
            }
        }
        let ly = y1 + 14.0 + 16.0 * i as f64;
        line(
            &mut out,
            x1 - 150.0,
            ly - 4.0,
            x1 - 130.0,
            ly - 4.0,
            &format!("stroke=\"{colour}\" stroke-width=\"3\""),
        );
        text(&mut out, x1 - 125.0, ly, "start", name);
    }
    out.push_str("</svg>\n");
    out
}

/// Histogram bins of the first relevant rank: (label, lowest rank, highest rank); rank 0 means
/// "not retrieved".
const RANK_BINS: [(&str, usize, usize); 10] = [
    ("1", 1, 1),
    ("2", 2, 2),
    ("3", 3, 3),
    ("4-5", 4, 5),
    ("6-10", 6, 10),
    ("11-20", 11, 20),
    ("21-50", 21, 50),
    ("51-100", 51, 100),
    (">100", 101, usize::MAX),
    ("none", 0, 0),
];

/// Counts of queries per first-relevant-rank bin (the labels of the histogram).
pub fn rank_histogram(report: &RetrievalReport) -> Vec<(&'static str, usize)> {
    let mut counts = vec![0usize; RANK_BINS.len()];
    for m in report.per_query.values() {
        let r = m.get(FIRST_RELEVANT_RANK).copied().unwrap_or(0.0).max(0.0) as usize;
        if let Some(i) = RANK_BINS.iter().position(|&(_, lo, hi)| r >= lo && r <= hi) {
            counts[i] += 1;
        }
    }
    RANK_BINS.iter().map(|b| b.0).zip(counts).collect()
}

/// The histogram of the rank of the first relevant document (fraction of queries per bin).
pub fn rank_histogram_svg(title: &str, report: &RetrievalReport) -> String {
    let bins = rank_histogram(report);
    let n = report.num_queries.max(1) as f64;
    let max_frac = bins.iter().map(|b| b.1 as f64 / n).fold(0.0, f64::max);
    // Round the axis up to the next 10%.
    let y_max = ((max_frac * 10.0).ceil() / 10.0).clamp(0.1, 1.0);
    let mut out = String::new();
    svg_open(
        &mut out,
        &format!(
            "{title}: rank of the first relevant document ({} queries)",
            report.num_queries
        ),
    );
    axes(
        &mut out,
        y_max,
        5,
        "fraction of queries",
        "rank of the first relevant document",
        true,
    );
    let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP);
    let slot = (x1 - x0) / bins.len() as f64;
    for (i, (label, count)) in bins.iter().enumerate() {
        let frac = *count as f64 / n;
        let h = (y0 - y1) * (frac / y_max).min(1.0);
        let x = x0 + slot * i as f64 + slot * 0.15;
        let color = if *label == "none" {
            "#aaaaaa"
        } else {
            "#ff7f0e"
        };
        let _ = writeln!(
            out,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{color}\"/>",
            y0 - h,
            slot * 0.7
        );
        let cx = x0 + slot * (i as f64 + 0.5);
        text(&mut out, cx, y0 + 18.0, "middle", label);
        text(&mut out, cx, y0 - h - 5.0, "middle", &count.to_string());
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::beir::Qrels;
    use crate::metrics::{evaluate_retrieval, Run};

    /// A small well-formedness check: tags balance, attributes are quoted, `&` only starts an
    /// entity, no stray `<` or `>` in text.
    fn check_xml(s: &str) -> Result<(), String> {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = s;
        let mut root_seen = false;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('<') {
                let end = after.find('>').ok_or("unterminated tag")?;
                let tag = &after[..end];
                rest = &after[end + 1..];
                if tag.starts_with('?') {
                    if !tag.ends_with('?') {
                        return Err(format!("bad processing instruction <{tag}>"));
                    }
                    continue;
                }
                if let Some(name) = tag.strip_prefix('/') {
                    let open = stack.pop().ok_or(format!("unmatched </{name}>"))?;
                    if open != name.trim() {
                        return Err(format!("<{open}> closed by </{name}>"));
                    }
                    continue;
                }
                let self_closing = tag.ends_with('/');
                let body = tag.trim_end_matches('/');
                let name: String = body
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '-' || *c == ':')
                    .collect();
                if name.is_empty() {
                    return Err(format!("bad tag <{tag}>"));
                }
                // Attributes: name="value" pairs.
                let mut attrs = body[name.len()..].trim();
                while !attrs.is_empty() {
                    let eq = attrs
                        .find('=')
                        .ok_or(format!("attribute without value in <{tag}>"))?;
                    let aname = attrs[..eq].trim();
                    if aname.is_empty() || aname.contains(char::is_whitespace) {
                        return Err(format!("bad attribute name in <{tag}>"));
                    }
                    let v = attrs[eq + 1..].trim_start();
                    let v = v
                        .strip_prefix('"')
                        .ok_or(format!("unquoted attribute in <{tag}>"))?;
                    let close = v
                        .find('"')
                        .ok_or(format!("unterminated attribute in <{tag}>"))?;
                    if v[..close].contains('<') {
                        return Err(format!("'<' in attribute of <{tag}>"));
                    }
                    attrs = v[close + 1..].trim_start();
                }
                if stack.is_empty() {
                    if root_seen {
                        return Err("two root elements".into());
                    }
                    root_seen = true;
                }
                if !self_closing {
                    stack.push(name);
                }
            } else {
                let end = rest.find('<').unwrap_or(rest.len());
                let t = &rest[..end];
                if t.contains('>') {
                    return Err(format!("stray '>' in text {t:?}"));
                }
                let mut amp = t;
                while let Some(i) = amp.find('&') {
                    let e = amp[i..].find(';').ok_or(format!("bare '&' in {t:?}"))?;
                    let ent = &amp[i + 1..i + e];
                    if !["amp", "lt", "gt", "quot", "apos"].contains(&ent) {
                        return Err(format!("unknown entity &{ent};"));
                    }
                    amp = &amp[i + e..];
                }
                if stack.is_empty() && !t.trim().is_empty() {
                    return Err("text outside the root element".into());
                }
                rest = &rest[end..];
            }
        }
        if !stack.is_empty() {
            return Err(format!("unclosed {stack:?}"));
        }
        if !root_seen {
            return Err("no root element".into());
        }
        Ok(())
    }

    fn sample_report() -> RetrievalReport {
        let mut run = Run::new();
        let mut qrels = Qrels::new();
        for q in 0..40 {
            let qid = format!("q{q}");
            let list: Vec<(String, f32)> = (0..150).map(|d| (format!("d{d}"), 0.0)).collect();
            run.insert(qid.clone(), list);
            // The relevant document sits at rank q * 4 + 1 (beyond the list for large q).
            qrels
                .entry(qid)
                .or_default()
                .insert(format!("d{}", q * 4), 1);
        }
        evaluate_retrieval(&run, &qrels, &[5, 20, 50])
    }

    #[test]
    fn checker_rejects_broken_xml() {
        assert!(check_xml("<svg><g></svg>").is_err());
        assert!(check_xml("<svg a=b/>").is_err());
        assert!(check_xml("<svg>a & b</svg>").is_err());
        assert!(check_xml("<svg>a &amp; b</svg><svg/>").is_err());
        assert!(check_xml("<?xml version=\"1.0\"?><svg x=\"1\"><t>&lt;</t></svg>").is_ok());
    }

    #[test]
    fn svgs_are_well_formed_and_escaped() {
        let r = sample_report();
        let title = "dense <k=10> & \"hybrid\"";
        let a = recall_at_k_svg(title, &r);
        let b = rank_histogram_svg(title, &r);
        check_xml(&a).unwrap();
        check_xml(&b).unwrap();
        assert!(a.contains("&lt;k=10&gt; &amp; &quot;hybrid&quot;"));
        // One point per k.
        assert_eq!(a.matches("<circle").count(), r.ks.len());
        assert_eq!(b.matches("<rect").count(), 1 + RANK_BINS.len());
        // Empty report: still valid.
        let empty = evaluate_retrieval(&Run::new(), &Qrels::new(), &[]);
        check_xml(&recall_at_k_svg("e", &empty)).unwrap();
        check_xml(&rank_histogram_svg("e", &empty)).unwrap();
    }

    #[test]
    fn histogram_counts() {
        let r = sample_report();
        let h = rank_histogram(&r);
        // Ranks are 1, 5, 9, 13, 17, ... → bins 1: 1, 4-5: 1, 6-10: 1, 11-20: 2 (13 and 17).
        let get = |l: &str| h.iter().find(|b| b.0 == l).unwrap().1;
        assert_eq!(get("1"), 1);
        assert_eq!(get("2"), 0);
        assert_eq!(get("4-5"), 1);
        assert_eq!(get("6-10"), 1);
        assert_eq!(get("11-20"), 2);
        // The lists hold d0..d149: q = 38, 39 (d152, d156) are not retrieved.
        assert_eq!(get("none"), 2);
        assert_eq!(h.iter().map(|b| b.1).sum::<usize>(), 40);
    }

    #[test]
    fn writes_all_files() {
        let dir = tempfile::tempdir().unwrap();
        let r = sample_report();
        let extra = json!({"mode": "bm25", "corpus": "revdict | full", "k": 100});
        write_retrieval_report(dir.path(), "BM25 run", &r, &extra).unwrap();
        let m: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("metrics.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(m["num_queries"], 40);
        assert_eq!(m["extra"]["mode"], "bm25");
        assert!((m["metrics"]["recall@100"].as_f64().unwrap() - 25.0 / 40.0).abs() < 1e-12);
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("| ndcg@10 |"));
        assert!(md.contains("| mode | bm25 |"));
        assert!(md.contains("revdict \\| full"));
        assert!(md.contains(&format!("]({RECALL_PLOT})")));
        assert!(md.contains(&format!("]({RANK_PLOT})")));
        let per_query = std::fs::read_to_string(dir.path().join("per_query.jsonl")).unwrap();
        assert_eq!(per_query.lines().count(), 40);
        for f in [RECALL_PLOT, RANK_PLOT] {
            check_xml(&std::fs::read_to_string(dir.path().join(f)).unwrap()).unwrap();
        }
    }
}

/// One system's result in a QA evaluation (one `--marginalize` mode).
#[derive(Clone, Debug, serde::Serialize)]
pub struct QaResult {
    /// `closed-book`, `none` (retrieve-then-read), `sequence` or `token`.
    pub system: String,
    pub questions: usize,
    pub em: f64,
    pub f1: f64,
    pub seconds_per_question: f64,
}

/// File name of the EM/F1 bar chart inside a QA report directory.
pub const QA_PLOT: &str = "em_f1.svg";
/// File name of the seconds-per-question bar chart inside a QA report directory.
pub const QA_TIME_PLOT: &str = "seconds_per_question.svg";

/// Writes a QA report into `dir`: `metrics.json` (`{"title", "results", "extra"}`),
/// `predictions.jsonl` (the given per-question lines), `em_f1.svg`,
/// `seconds_per_question.svg` and `report.md`.
pub fn write_qa_report(
    dir: &Path,
    title: &str,
    results: &[QaResult],
    predictions: &[Value],
    extra: &Value,
) -> Result<(), EvalError> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    let path = dir.join("metrics.json");
    let metrics = json!({"title": title, "results": results, "extra": extra});
    let text = serde_json::to_string_pretty(&metrics)
        .map_err(|e| EvalError::data(&path, format!("cannot serialise: {e}")))?;
    write_file(&path, &(text + "\n"))?;
    let mut lines = String::new();
    for p in predictions {
        lines.push_str(&p.to_string());
        lines.push('\n');
    }
    write_file(&dir.join("predictions.jsonl"), &lines)?;

    let groups: Vec<(String, Vec<f64>)> = results
        .iter()
        .map(|r| (r.system.clone(), vec![r.em, r.f1]))
        .collect();
    write_file(
        &dir.join(QA_PLOT),
        &bar_chart_svg(title, &groups, &["EM", "F1"], "score", true),
    )?;
    let times: Vec<(String, Vec<f64>)> = results
        .iter()
        .map(|r| (r.system.clone(), vec![r.seconds_per_question]))
        .collect();
    write_file(
        &dir.join(QA_TIME_PLOT),
        &bar_chart_svg(
            "Seconds per question",
            &times,
            &["seconds"],
            "seconds",
            false,
        ),
    )?;

    let mut md = String::new();
    let _ = writeln!(md, "# {}\n", title.replace('\n', " "));
    md.push_str("| system | questions | EM | F1 | s/question |\n|---|---:|---:|---:|---:|\n");
    for r in results {
        let _ = writeln!(
            md,
            "| {} | {} | {:.4} | {:.4} | {:.2} |",
            md_cell(&r.system),
            r.questions,
            r.em,
            r.f1,
            r.seconds_per_question
        );
    }
    details_section(&mut md, extra);
    let _ = write!(
        md,
        "\n## Plots\n\n![EM and F1 per system]({QA_PLOT})\n\n![seconds per question]({QA_TIME_PLOT})\n\n\
         Per-question predictions: `predictions.jsonl`.\n"
    );
    write_file(&dir.join("report.md"), &md)
}

/// A grouped bar chart: one group per `(label, values)`, one bar per series.
pub fn bar_chart_svg(
    title: &str,
    groups: &[(String, Vec<f64>)],
    series: &[&str],
    y_label: &str,
    unit_interval: bool,
) -> String {
    const COLOURS: [&str; 4] = ["#4878d0", "#ee854a", "#6acc64", "#d65f5f"];
    let mut out = String::new();
    svg_open(&mut out, title);
    let data_max = groups
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let y_max = if unit_interval {
        1.0
    } else {
        nice_ceiling(data_max)
    };
    axes(&mut out, y_max, 5, y_label, "", unit_interval);
    let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP);
    let group_width = (x1 - x0) / groups.len().max(1) as f64;
    let bar_width = group_width * 0.7 / series.len().max(1) as f64;
    for (g, (label, values)) in groups.iter().enumerate() {
        let left = x0 + g as f64 * group_width + group_width * 0.15;
        for (s, value) in values.iter().enumerate() {
            let v = if value.is_finite() {
                value.max(0.0)
            } else {
                0.0
            };
            let height = (y0 - y1) * (v / y_max).min(1.0);
            let x = left + s as f64 * bar_width;
            let _ = writeln!(
                out,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{height:.1}\" fill=\"{}\"/>",
                y0 - height,
                bar_width * 0.95,
                COLOURS[s % COLOURS.len()]
            );
            let shown = if unit_interval {
                format!("{v:.3}")
            } else {
                format!("{v:.2}")
            };
            text(
                &mut out,
                x + bar_width / 2.0,
                y0 - height - 4.0,
                "middle",
                &shown,
            );
        }
        text(
            &mut out,
            left + bar_width * values.len() as f64 / 2.0,
            y0 + 18.0,
            "middle",
            label,
        );
    }
    for (s, name) in series.iter().enumerate() {
        let x = x1 - 90.0;
        let y = y1 + 4.0 + s as f64 * 16.0;
        let _ = writeln!(
            out,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/>",
            y - 9.0,
            COLOURS[s % COLOURS.len()]
        );
        text(&mut out, x + 16.0, y, "start", name);
    }
    out.push_str("</svg>\n");
    out
}

/// 1, 2 or 5 times a power of ten, at least `v` (and at least 1e-9).
fn nice_ceiling(v: f64) -> f64 {
    let v = v.max(1e-9);
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * magnitude)
}

#[cfg(test)]
mod qa_report_tests {
    use super::*;

    #[test]
    fn qa_report_writes_every_file_with_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let results = vec![
            QaResult {
                system: "closed-book".into(),
                questions: 3,
                em: 0.0,
                f1: 0.1,
                seconds_per_question: 0.4,
            },
            QaResult {
                system: "sequence".into(),
                questions: 3,
                em: 1.0 / 3.0,
                f1: 0.5,
                seconds_per_question: 2.5,
            },
        ];
        let predictions =
            vec![json!({"_id": "q1", "system": "sequence", "prediction": "paris", "em": 1.0})];
        write_qa_report(
            dir.path(),
            "QA <test>",
            &results,
            &predictions,
            &json!({"k": 5}),
        )
        .unwrap();
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(
            md.contains("| sequence | 3 | 0.3333 | 0.5000 | 2.50 |"),
            "{md}"
        );
        let svg = std::fs::read_to_string(dir.path().join(QA_PLOT)).unwrap();
        assert!(svg.contains("QA &lt;test&gt;") && svg.matches("<rect").count() >= 5);
        let metrics: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("metrics.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(metrics["results"][1]["em"], json!(1.0 / 3.0));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("predictions.jsonl"))
                .unwrap()
                .lines()
                .count(),
            1
        );
    }

    #[test]
    fn nice_ceiling_rounds_up_to_1_2_5() {
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.5), 2.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(42.0), 50.0);
    }
}
