//! The reverse-dictionary benchmark (SPEC §4): find the Webster 1913 entry of the word a
//! WordNet gloss defines.
//!
//! Sources (Debian packages, unpacked by `scripts/fetch-revdict-data.sh`):
//! `dict-gcide`'s `gcide.dict.dz` (dictzip, i.e. gzip) with `gcide.index`
//! (`headword \t offset \t length`, numbers in dictd's base64), and `wordnet-base`'s `data.noun`.
//!
//! **Corpus.** One document per distinct dictionary entry: the index lists about 203k keys
//! (headwords, inflections, sub-entries, "called also" names) that point to about 126k distinct
//! `(offset, length)` entries; keys sharing an entry share one document. The entry's headwords are
//! read from its head line (`Color \Col"or\, Colour \Col"our\, n. ...`; for the few entries
//! without one, the index keys). The text is cut into *source units*: runs of lines that end with
//! a source marker such as `[1913 Webster]`, `[PJC]`, `[Webster 1913 Suppl.]`,
//! `[WordNet 1.5 +PJC]` or `[WordNet sense 2]` (also the few hundred untidy ones: broken over
//! lines, or missing a bracket). Every unit whose marker names WordNet is removed
//! (definition and `Syn:` paragraph together), so queries cannot match their answer verbatim;
//! entries left without text are dropped. What remains is unwrapped (one line per paragraph,
//! paragraphs separated by a blank line), the markers and `{}` cross-reference braces removed,
//! and the pronunciation (`\Ap"ple\`) removed from the head line. Document id: the lower-cased
//! first headword with spaces as `_` (`apple`, then `apple~2`, ... for repeats); title: the
//! headwords, comma-separated.
//!
//! **Queries.** WordNet noun synsets whose gloss has a definition part (the text before the
//! first quoted example, which follows a `;` or `:`), and at least one lemma (underscores as
//! spaces, compared case-insensitively) that is a headword of a kept Webster entry. One query
//! per distinct definition text (compared case- and whitespace-insensitively; synonyms of one
//! synset and the rare repeated glosses merge into one query): id `n<synset offset>`, relevant
//! documents (grade 1) all Webster entries of all its matched lemmas, answers those lemmas.
//! A query whose definition occurs verbatim (as a token sequence, case- and
//! punctuation-insensitively) anywhere in the full corpus is dropped.
//!
//! **Splits.** train/dev/test by headword. Lemmas that share a relevant entry (an entry with
//! several headwords, `Color, Colour`) form a headword group; each group goes to one split,
//! chosen by a hash of its smallest lemma and the seed (splitmix64; no `rand`), so a lemma keeps
//! its split when `max_docs` changes. A query goes to the split of its primary lemma (the first
//! of its synset with a Webster entry); synonyms whose group is in another split are removed from
//! its answers and their entries from its qrels (counted in
//! [`RevdictStats::answers_removed_other_split`]). So no answer lemma and no relevant entry
//! appears in two splits, and no definition appears twice.
//!
//! **Sampling** (`max_docs`): the groups of primary lemmas are taken in a seeded random order,
//! whole (all their entries), while their entries fit in the share of `max_docs` that such
//! entries have in the full corpus; the rest is filled with seeded-random other entries (never
//! the entries of a kept query's left-out synonyms, which would be relevant but unjudged).
//! Queries whose primary group was not taken are dropped.
//!
//! **Output** (BEIR layout in `out_dir`): `corpus.jsonl`, `queries.jsonl` (all splits),
//! `qrels/{train,dev,test}.tsv`, `answers.jsonl` (`{"_id", "question", "answers", "split"}`, the
//! format of `zrag eval qa`) and `stats.json` ([`RevdictStats`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::beir::{self, CorpusDoc, QaItem, Qrels, Query};
use crate::EvalError;

/// Names of the splits, in output order.
pub const SPLITS: [&str; 3] = ["train", "dev", "test"];

/// Settings of [`build`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevdictConfig {
    pub gcide_dict: PathBuf,
    pub gcide_index: PathBuf,
    pub wordnet_noun: PathBuf,
    pub out_dir: PathBuf,
    /// Keep at most this many documents (see the module doc); `None` keeps the full corpus.
    pub max_docs: Option<usize>,
    pub seed: u64,
    /// Expected fraction of headword groups in dev (and test); the rest is train.
    pub dev_fraction: f64,
    pub test_fraction: f64,
}

/// `$ZRAG_HOME`, or `~/.cache/zrag`.
pub fn zrag_home() -> PathBuf {
    if let Some(h) = std::env::var_os("ZRAG_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("zrag")
}

impl RevdictConfig {
    /// The default source locations under [`zrag_home`] (`data/debian/usr/share/...`, where
    /// `scripts/fetch-revdict-data.sh` unpacks them), the full corpus, seed 42 and 10% / 10%
    /// dev / test.
    pub fn from_zrag_home(out_dir: impl Into<PathBuf>) -> Self {
        let share = zrag_home().join("data/debian/usr/share");
        RevdictConfig {
            gcide_dict: share.join("dictd/gcide.dict.dz"),
            gcide_index: share.join("dictd/gcide.index"),
            wordnet_noun: share.join("wordnet/data.noun"),
            out_dir: out_dir.into(),
            max_docs: None,
            seed: 42,
            dev_fraction: 0.1,
            test_fraction: 0.1,
        }
    }

    /// The source files that do not exist.
    pub fn missing_sources(&self) -> Vec<&Path> {
        [&self.gcide_dict, &self.gcide_index, &self.wordnet_noun]
            .into_iter()
            .map(PathBuf::as_path)
            .filter(|p| !p.is_file())
            .collect()
    }
}

/// Sizes of one split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitStats {
    pub queries: usize,
    /// Distinct matched lemmas (answers) of the split's queries.
    pub lemmas: usize,
    /// Distinct documents judged relevant to the split's queries.
    pub relevant_docs: usize,
}

/// What [`build`] produced (also written to `stats.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevdictStats {
    /// Documents written to `corpus.jsonl`.
    pub docs: usize,
    /// Documents of the full corpus (before `max_docs` sampling).
    pub full_corpus_docs: usize,
    /// Keys of `gcide.index` (without the `00-database-*` metadata keys).
    pub index_keys: usize,
    /// Distinct entries those keys point to.
    pub dict_entries: usize,
    /// Entries dropped because nothing was left after removing WordNet paragraphs.
    pub entries_dropped_empty: usize,
    /// Source units (paragraph groups) removed because WordNet is their source.
    pub wordnet_units_removed: usize,
    /// Noun synsets read from `data.noun`.
    pub synsets: usize,
    /// Synsets with a definition and at least one lemma that has a Webster entry.
    pub synsets_matched: usize,
    /// Synsets merged into another query because their definition text was identical.
    pub duplicate_glosses_merged: usize,
    /// Queries dropped because their definition occurs verbatim in the corpus.
    pub queries_dropped_verbatim: usize,
    /// Queries dropped by `max_docs` sampling.
    pub queries_dropped_sampling: usize,
    /// Synonym lemmas removed from a query's answers (and their entries from its qrels) because
    /// their headword group belongs to another split than the query's primary lemma.
    pub answers_removed_other_split: usize,
    /// Synonym lemmas removed from a query's answers because `max_docs` sampling left out their
    /// headword group (their entries are then left out of the corpus too).
    pub answers_removed_sampling: usize,
    /// Queries written, all splits.
    pub queries: usize,
    /// Per split: `train`, `dev`, `test`.
    pub splits: BTreeMap<String, SplitStats>,
    pub seed: u64,
    pub dev_fraction: f64,
    pub test_fraction: f64,
    pub max_docs: Option<usize>,
    pub build_seconds: f64,
}

// ---------------------------------------------------------------------------------------------
// Small deterministic hashing (no `rand`).

/// splitmix64's output function.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A uniform number in [0, 1) from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Streams of randomness derived from the seed, so that split assignment and sampling are
/// independent.
const STREAM_SPLIT: u64 = 0x5350_4c49_5400_0001;
const STREAM_GROUPS: u64 = 0x4752_4f55_5000_0002;
const STREAM_FILL: u64 = 0x4649_4c4c_0000_0003;

fn keyed(seed: u64, stream: u64, key: u64) -> u64 {
    splitmix64(splitmix64(seed ^ stream) ^ key)
}

// ---------------------------------------------------------------------------------------------
// dictd files.

/// Decodes dictd's base64 numbers (alphabet `A-Z a-z 0-9 + /`, most significant digit first).
pub fn dictd_b64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 10 {
        return None;
    }
    let mut v: u64 = 0;
    for c in s.bytes() {
        let d = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        v = v * 64 + d as u64;
    }
    Some(v)
}

/// Decodes bytes as UTF-8, reading the rare invalid bytes as Windows-1252 (gcide has three).
fn decode_text(mut bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(e) => {
                let (good, bad) = bytes.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).unwrap_or_default());
                out.push(match bad[0] {
                    0x91 => '\u{2018}',
                    0x92 => '\u{2019}',
                    0x93 => '\u{201c}',
                    0x94 => '\u{201d}',
                    0x96 => '\u{2013}',
                    0x97 => '\u{2014}',
                    b => b as char,
                });
                bytes = &bad[1..];
            }
        }
    }
}

struct IndexKey {
    key: String,
    offset: u64,
    length: u64,
    line: usize,
}

fn read_index(path: &Path) -> Result<Vec<IndexKey>, EvalError> {
    let bytes = std::fs::read(path).map_err(|e| EvalError::io(path, e))?;
    let text = decode_text(&bytes);
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let mut f = line.split('\t');
        let (Some(key), Some(off), Some(len), None) = (f.next(), f.next(), f.next(), f.next())
        else {
            return Err(EvalError::parse(
                path,
                lineno,
                "expected `headword<TAB>offset<TAB>length`",
            ));
        };
        let (Some(offset), Some(length)) = (dictd_b64(off.trim()), dictd_b64(len.trim())) else {
            return Err(EvalError::parse(
                path,
                lineno,
                format!("bad base64 offset/length {off:?} {len:?}"),
            ));
        };
        if key.starts_with("00-") {
            continue; // 00-database-info and friends: metadata, not headwords
        }
        out.push(IndexKey {
            key: key.to_string(),
            offset,
            length,
            line: lineno,
        });
    }
    if out.is_empty() {
        return Err(EvalError::data(path, "no headwords in the index"));
    }
    Ok(out)
}

fn read_dict(path: &Path) -> Result<Vec<u8>, EvalError> {
    let file = std::fs::File::open(path).map_err(|e| EvalError::io(path, e))?;
    let mut data = Vec::with_capacity(64 << 20);
    flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file))
        .read_to_end(&mut data)
        .map_err(|e| {
            EvalError::data(
                path,
                format!("cannot decompress (dictzip/gzip expected): {e}"),
            )
        })?;
    Ok(data)
}

// ---------------------------------------------------------------------------------------------
// Entry parsing.

/// Lower case, underscores as spaces, single spaces: how headwords and lemmas are compared.
pub fn normalize_term(s: &str) -> String {
    s.replace('_', " ")
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The headwords of an entry's head line: `Word \pron\, Other \pron\, n. ...`.
pub fn parse_headwords(entry: &str) -> Vec<String> {
    let first_para = entry
        .trim_start_matches(['\n', '\r'])
        .split("\n\n")
        .next()
        .unwrap_or("");
    let head = first_para.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out: Vec<String> = Vec::new();
    let mut rest = head.as_str();
    while let Some(p) = rest.find(" \\") {
        let cand = rest[..p].trim();
        let valid = !cand.is_empty()
            && cand.len() <= 80
            && cand.chars().any(char::is_alphanumeric)
            && !cand.contains([';', '[', ']', '(', ')', '{', '}', '\\', '"']);
        if !valid {
            break;
        }
        let after = &rest[p + 2..];
        let Some(e) = after.find('\\') else { break };
        if !out.iter().any(|h| h == cand) {
            out.push(cand.to_string());
        }
        rest = &after[e + 1..];
        if let Some(r) = rest
            .strip_prefix(", ")
            .or_else(|| rest.strip_prefix(" or "))
        {
            rest = r;
        } else {
            break;
        }
    }
    out
}

fn contains_ignore_ascii_case(hay: &str, needle: &str) -> bool {
    hay.as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Whether the content of a `[...]` group names a source (as opposed to a usage label such as
/// `[Obs.]` or an etymology).
fn is_source_marker(content: &str) -> bool {
    if ["webster", "wordnet", "pjc", "century dict"]
        .iter()
        .any(|k| contains_ignore_ascii_case(content, k))
    {
        return true;
    }
    // Contributors' initials: `[AS]`, `[RDH]`, `[RP + PJC]`, `[MW10]`.
    let toks: Vec<&str> = content
        .split(|c: char| c == '+' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .collect();
    !toks.is_empty()
        && toks.iter().all(|t| {
            let t = t.trim_end_matches('.');
            let letters = t.trim_end_matches(|c: char| c.is_ascii_digit());
            (2..=4).contains(&letters.len()) && letters.chars().all(|c| c.is_ascii_uppercase())
        })
}

/// A source marker found in an entry: the byte range to cut, and whether it names WordNet.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Marker {
    start: usize,
    end: usize,
    wordnet: bool,
}

/// Where a blank line starts right after the newline at `nl` (spaces, tabs and `\r` only).
fn blank_line_follows(bytes: &[u8], nl: usize) -> bool {
    bytes[nl + 1..]
        .iter()
        .take_while(|&&b| b != b'\n')
        .all(|&b| b == b' ' || b == b'\t' || b == b'\r')
}

/// Start of the first source keyword in `content` (for markers whose `[` is missing).
fn keyword_start(content: &str) -> usize {
    ["1913", "webster", "wordnet", "pjc", "century"]
        .iter()
        .filter_map(|k| {
            content
                .as_bytes()
                .windows(k.len())
                .position(|w| w.eq_ignore_ascii_case(k.as_bytes()))
        })
        .min()
        .unwrap_or(0)
}

/// The source markers of an entry. gcide's markers are not always tidy, so besides `[...]` on
/// one line this accepts a marker broken over lines (`[WordNet\n sense 1]`), one whose `]` is
/// missing before a blank line (`[WordNet 1.5\n\n`) and one whose `[` is missing
/// (`slavery. WordNet 1.5]`, `...] WordNet\n 1.5]`: the text since the previous bracket).
fn find_markers(entry: &str) -> Vec<Marker> {
    let bytes = entry.as_bytes();
    let mut out = Vec::new();
    let mut open: Option<usize> = None;
    let mut seg_start = 0;
    let push = |out: &mut Vec<Marker>, start: usize, end: usize, content: &str| {
        if is_source_marker(content) {
            out.push(Marker {
                start,
                end,
                wordnet: contains_ignore_ascii_case(content, "wordnet"),
            });
        }
    };
    let mut line_start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            if open.is_none() {
                if let Some(k) = bare_wordnet_marker(&entry[line_start.max(seg_start)..i]) {
                    let k = line_start.max(seg_start) + k;
                    out.push(Marker {
                        start: k,
                        end: i,
                        wordnet: true,
                    });
                }
            }
            line_start = i + 1;
        }
        match b {
            b'[' => {
                open = Some(i);
                seg_start = i + 1;
            }
            b']' => {
                match open.take() {
                    Some(o) => push(&mut out, o, i + 1, &entry[o + 1..i]),
                    None => {
                        let content = &entry[seg_start..i];
                        if contains_ignore_ascii_case(content, "wordnet")
                            || contains_ignore_ascii_case(content, "webster")
                        {
                            let k = seg_start + keyword_start(content);
                            push(&mut out, k, i + 1, &entry[k..i]);
                        }
                    }
                }
                seg_start = i + 1;
            }
            b'\n' if blank_line_follows(bytes, i) => {
                if let Some(o) = open.take() {
                    push(&mut out, o, i, &entry[o + 1..i]);
                }
                seg_start = i + 1;
            }
            _ => {}
        }
    }
    match open {
        Some(o) => push(&mut out, o, bytes.len(), &entry[o + 1..]),
        None => {
            let from = line_start.max(seg_start);
            if let Some(k) = bare_wordnet_marker(&entry[from..]) {
                out.push(Marker {
                    start: from + k,
                    end: bytes.len(),
                    wordnet: true,
                });
            }
        }
    }
    out
}

/// A WordNet marker without brackets at the end of a line (`... a clove hitch. WordNet 1.5`):
/// where it starts.
fn bare_wordnet_marker(line: &str) -> Option<usize> {
    let t = line.trim_end();
    let pos = t.rfind("WordNet")?;
    let tail = t[pos + "WordNet".len()..].trim();
    let tail = tail.strip_prefix("sense").unwrap_or(tail);
    let ok = !tail.is_empty()
        && tail.chars().any(|c| c.is_ascii_digit())
        && tail
            .chars()
            .all(|c| c.is_ascii_digit() || " .,+&".contains(c));
    ok.then_some(pos)
}

/// Removes the `\pro*nun"ci*a`tion\` groups (and the space before each) from a head paragraph.
fn strip_pronunciations(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut inside = false;
    for c in s.chars() {
        if c == '\\' {
            if !inside {
                let t = out.trim_end().len();
                out.truncate(t);
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    out
}

/// Removes the WordNet-sourced units of an entry and tidies the rest (see the module doc).
/// Returns the text (empty when nothing is left) and the number of units removed.
pub fn clean_entry(entry: &str) -> (String, usize) {
    let bytes = entry.as_bytes();
    let markers = find_markers(entry);
    // A unit ends at the end of the line on which a marker ends (markers come in order).
    let line_end = |end: usize| -> usize {
        let from = end - 1;
        bytes[from..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |p| from + p)
    };
    let mut units: Vec<(usize, usize, bool)> = Vec::new(); // (start, end, wordnet)
    let mut start = 0;
    for m in &markers {
        let end = line_end(m.end);
        if end <= start {
            // Another marker on the line that closed the previous unit.
            if let Some(u) = units.last_mut() {
                u.2 |= m.wordnet;
            }
            continue;
        }
        units.push((start, end, m.wordnet));
        start = end;
    }
    if start < bytes.len() {
        units.push((start, bytes.len(), false));
    }
    let removed = units.iter().filter(|u| u.2).count();
    let kept_head = units.first().is_some_and(|u| !u.2) && !entry.starts_with(char::is_whitespace);

    // The kept text, without its markers.
    let mut kept = String::with_capacity(entry.len());
    let mut cuts = markers.iter().filter(|m| !m.wordnet).peekable();
    for &(a, b, wordnet) in &units {
        if wordnet {
            continue;
        }
        let mut pos = a;
        while let Some(m) = cuts.peek() {
            if m.start >= b {
                break;
            }
            if m.start >= pos {
                kept.push_str(&entry[pos..m.start]);
            }
            pos = pos.max(m.end.min(b));
            cuts.next();
        }
        if pos < b {
            kept.push_str(&entry[pos..b]);
        }
    }

    let mut paragraphs: Vec<String> = Vec::new();
    let mut cur = String::new();
    let flush = |cur: &mut String, paragraphs: &mut Vec<String>| {
        let p = cur.split_whitespace().collect::<Vec<_>>().join(" ");
        if p.chars().any(char::is_alphanumeric) {
            paragraphs.push(p);
        }
        cur.clear();
    };
    for line in kept.lines() {
        if line.trim().is_empty() {
            flush(&mut cur, &mut paragraphs);
        } else {
            cur.push(' ');
            cur.extend(line.chars().filter(|&c| c != '{' && c != '}'));
        }
    }
    flush(&mut cur, &mut paragraphs);
    if kept_head {
        if let Some(first) = paragraphs.first_mut() {
            *first = strip_pronunciations(first)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
        }
        paragraphs.retain(|p| p.chars().any(char::is_alphanumeric));
    }
    (paragraphs.join("\n\n"), removed)
}

struct Entry {
    id: String,
    title: String,
    text: String,
    /// Normalised headwords.
    headwords: Vec<String>,
}

struct Corpus {
    entries: Vec<Entry>,
    index_keys: usize,
    dict_entries: usize,
    dropped_empty: usize,
    wordnet_units_removed: usize,
}

fn doc_id_base(headword: &str) -> String {
    let id: String = headword
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join("_");
    if id.is_empty() {
        "entry".to_string()
    } else {
        id
    }
}

fn load_corpus(cfg: &RevdictConfig) -> Result<Corpus, EvalError> {
    let keys = read_index(&cfg.gcide_index)?;
    let data = read_dict(&cfg.gcide_dict)?;
    let index_keys = keys.len();
    let mut blocks: BTreeMap<(u64, u64), Vec<&IndexKey>> = BTreeMap::new();
    for k in &keys {
        let end = k.offset.checked_add(k.length);
        if end.is_none_or(|e| e > data.len() as u64) {
            return Err(EvalError::parse(
                &cfg.gcide_index,
                k.line,
                format!(
                    "entry {:?} at {}+{} lies beyond the end of {} ({} bytes uncompressed)",
                    k.key,
                    k.offset,
                    k.length,
                    cfg.gcide_dict.display(),
                    data.len()
                ),
            ));
        }
        blocks.entry((k.offset, k.length)).or_default().push(k);
    }
    let dict_entries = blocks.len();
    let mut entries = Vec::new();
    let mut dropped_empty = 0;
    let mut wordnet_units_removed = 0;
    let mut used_ids: HashSet<String> = HashSet::new();
    let mut next_suffix: HashMap<String, usize> = HashMap::new();
    for ((off, len), ks) in &blocks {
        let raw = decode_text(&data[*off as usize..(*off + *len) as usize]);
        let mut heads = parse_headwords(&raw);
        if heads.is_empty() {
            for k in ks {
                if !heads.contains(&k.key) {
                    heads.push(k.key.clone());
                }
            }
        }
        let (text, removed) = clean_entry(&raw);
        wordnet_units_removed += removed;
        if text.is_empty() {
            dropped_empty += 1;
            continue;
        }
        let base = doc_id_base(&heads[0]);
        let n = next_suffix.entry(base.clone()).or_insert(1);
        let mut id = if *n == 1 {
            base.clone()
        } else {
            format!("{base}~{n}")
        };
        while used_ids.contains(&id) {
            *n += 1;
            id = format!("{base}~{n}");
        }
        *n += 1;
        used_ids.insert(id.clone());
        let mut headwords: Vec<String> = Vec::new();
        for h in &heads {
            let n = normalize_term(h);
            if !n.is_empty() && !headwords.contains(&n) {
                headwords.push(n);
            }
        }
        entries.push(Entry {
            id,
            title: heads.join(", "),
            text,
            headwords,
        });
    }
    Ok(Corpus {
        entries,
        index_keys,
        dict_entries,
        dropped_empty,
        wordnet_units_removed,
    })
}

// ---------------------------------------------------------------------------------------------
// WordNet.

struct Synset {
    offset: String,
    /// Lemmas as written (underscores as spaces).
    lemmas: Vec<String>,
    gloss: String,
}

fn parse_wordnet_line(path: &Path, lineno: usize, line: &str) -> Result<Synset, EvalError> {
    let bad = |what: &str| EvalError::parse(path, lineno, what.to_string());
    let (fields, gloss) = line
        .split_once(" | ")
        .or_else(|| line.split_once('|'))
        .ok_or_else(|| bad("no ` | gloss` part"))?;
    let f: Vec<&str> = fields.split_whitespace().collect();
    if f.len() < 6 {
        return Err(bad("too few fields"));
    }
    if f[0].len() != 8 || !f[0].bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("synset offset is not 8 digits"));
    }
    let w_cnt =
        usize::from_str_radix(f[3], 16).map_err(|_| bad("word count is not hexadecimal"))?;
    if w_cnt == 0 || f.len() < 4 + 2 * w_cnt {
        return Err(bad("fewer words than the word count says"));
    }
    let lemmas = (0..w_cnt).map(|i| f[4 + 2 * i].replace('_', " ")).collect();
    Ok(Synset {
        offset: f[0].to_string(),
        lemmas,
        gloss: gloss.trim().to_string(),
    })
}

fn read_wordnet(path: &Path) -> Result<Vec<Synset>, EvalError> {
    let bytes = std::fs::read(path).map_err(|e| EvalError::io(path, e))?;
    let text = decode_text(&bytes);
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("  ") || line.trim().is_empty() {
            continue; // licence header
        }
        out.push(parse_wordnet_line(path, i + 1, line)?);
    }
    if out.is_empty() {
        return Err(EvalError::data(path, "no synsets"));
    }
    Ok(out)
}

/// The definition part of a WordNet gloss: the text before the first quoted example (an example
/// starts with `"` at the beginning or after `;` or `:`), without trailing separators.
pub fn gloss_definition(gloss: &str) -> String {
    let mut cut = gloss.len();
    for (i, c) in gloss.char_indices() {
        if c == '"' {
            let before = gloss[..i].trim_end();
            if before.is_empty() || before.ends_with(';') || before.ends_with(':') {
                cut = i;
                break;
            }
        }
    }
    gloss[..cut]
        .trim_end_matches(|c: char| c.is_whitespace() || c == ';' || c == ':' || c == ',')
        .trim()
        .to_string()
}

/// Appends the tokens of `s` (maximal runs of alphanumeric characters, lower-cased) as 64-bit
/// hashes: the unit of the verbatim-leak check. Hashing avoids one allocation per token of the
/// 40 MB corpus; a false match needs a 64-bit collision.
fn token_hashes(s: &str, out: &mut Vec<u64>) {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h = OFFSET;
    let mut in_token = false;
    let feed = |h: &mut u64, b: u8| {
        *h ^= b as u64;
        *h = h.wrapping_mul(PRIME);
    };
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            feed(&mut h, c.to_ascii_lowercase() as u8);
            in_token = true;
        } else if !c.is_ascii() && c.is_alphanumeric() {
            let mut buf = [0u8; 4];
            for lc in c.to_lowercase() {
                for &b in lc.encode_utf8(&mut buf).as_bytes() {
                    feed(&mut h, b);
                }
            }
            in_token = true;
        } else if in_token {
            out.push(splitmix64(h));
            h = OFFSET;
            in_token = false;
        }
    }
    if in_token {
        out.push(splitmix64(h));
    }
}

/// A `Hasher` for keys that are already well-mixed 64-bit hashes.
#[derive(Default)]
struct PremixedHasher(u64);

impl std::hash::Hasher for PremixedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = splitmix64(self.0 ^ b as u64);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = x;
    }
}

type PremixedMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<PremixedHasher>>;

fn window_key(tokens: &[u64]) -> u64 {
    tokens.iter().fold(0, |h, &t| splitmix64(h ^ t))
}

/// For each needle (text), whether its token sequence occurs contiguously in some haystack.
fn find_verbatim<'a>(needles: &[&str], haystacks: impl Iterator<Item = &'a str>) -> Vec<bool> {
    const PREFIX: usize = 3;
    let needles: Vec<Vec<u64>> = needles
        .iter()
        .map(|n| {
            let mut v = Vec::new();
            token_hashes(n, &mut v);
            v
        })
        .collect();
    // By prefix length (1..=PREFIX): key of the first tokens → needles.
    let mut maps: Vec<PremixedMap<Vec<u32>>> =
        (0..=PREFIX).map(|_| PremixedMap::default()).collect();
    for (i, n) in needles.iter().enumerate() {
        if !n.is_empty() {
            let p = n.len().min(PREFIX);
            maps[p]
                .entry(window_key(&n[..p]))
                .or_default()
                .push(i as u32);
        }
    }
    let mut found = vec![false; needles.len()];
    let mut hay = Vec::new();
    for text in haystacks {
        hay.clear();
        token_hashes(text, &mut hay);
        for start in 0..hay.len() {
            let mut key = 0;
            for (p, map) in maps.iter().enumerate().skip(1) {
                if start + p > hay.len() {
                    break;
                }
                key = splitmix64(key ^ hay[start + p - 1]);
                if map.is_empty() {
                    continue;
                }
                if let Some(cands) = map.get(&key) {
                    for &c in cands {
                        let c = c as usize;
                        if !found[c] && hay[start..].starts_with(&needles[c]) {
                            found[c] = true;
                        }
                    }
                }
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Build.

/// A lemma of a query that has Webster entries.
struct Lemma {
    /// As WordNet writes it (underscores as spaces).
    written: String,
    /// Normalised ([`normalize_term`]).
    key: String,
    docs: Vec<usize>,
}

struct BenchQuery {
    id: String,
    text: String,
    /// The first is the primary lemma: it decides the query's split.
    lemmas: Vec<Lemma>,
}

struct UnionFind(Vec<usize>);

impl UnionFind {
    fn find(&mut self, mut x: usize) -> usize {
        while self.0[x] != x {
            self.0[x] = self.0[self.0[x]];
            x = self.0[x];
        }
        x
    }
    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.0[a.max(b)] = a.min(b);
        }
    }
}

fn check_config(cfg: &RevdictConfig) -> Result<(), EvalError> {
    let ok = |f: f64| f.is_finite() && (0.0..=1.0).contains(&f);
    if !ok(cfg.dev_fraction) || !ok(cfg.test_fraction) || cfg.dev_fraction + cfg.test_fraction > 1.0
    {
        return Err(EvalError::Config(format!(
            "dev_fraction ({}) and test_fraction ({}) must be in [0, 1] and sum to at most 1",
            cfg.dev_fraction, cfg.test_fraction
        )));
    }
    if cfg.max_docs == Some(0) {
        return Err(EvalError::Config("max_docs must be at least 1".into()));
    }
    if let Some(p) = cfg.missing_sources().first() {
        return Err(EvalError::MissingSource {
            path: p.to_path_buf(),
        });
    }
    Ok(())
}

/// Builds the benchmark into `cfg.out_dir` (see the module doc) and returns its statistics.
pub fn build(cfg: &RevdictConfig) -> Result<RevdictStats, EvalError> {
    let started = Instant::now();
    check_config(cfg)?;
    let corpus = load_corpus(cfg)?;
    let entries = &corpus.entries;
    let synsets = read_wordnet(&cfg.wordnet_noun)?;

    // Headword → documents.
    let mut by_headword: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        for h in &e.headwords {
            by_headword.entry(h.as_str()).or_default().push(i);
        }
    }

    // Queries: one per distinct definition.
    let mut queries: Vec<BenchQuery> = Vec::new();
    let mut by_definition: HashMap<String, usize> = HashMap::new();
    let mut synsets_matched = 0;
    let mut duplicate_glosses_merged = 0;
    for s in &synsets {
        let text = gloss_definition(&s.gloss);
        if text.is_empty() {
            continue;
        }
        let mut lemmas: Vec<Lemma> = Vec::new();
        for l in &s.lemmas {
            let key = normalize_term(l);
            if lemmas.iter().any(|m| m.key == key) {
                continue;
            }
            if let Some(docs) = by_headword.get(key.as_str()) {
                lemmas.push(Lemma {
                    written: l.clone(),
                    key,
                    docs: docs.clone(),
                });
            }
        }
        if lemmas.is_empty() {
            continue;
        }
        synsets_matched += 1;
        let def_key = normalize_term(&text);
        if let Some(&qi) = by_definition.get(&def_key) {
            duplicate_glosses_merged += 1;
            let q = &mut queries[qi];
            for l in lemmas {
                if !q.lemmas.iter().any(|m| m.key == l.key) {
                    q.lemmas.push(l);
                }
            }
            continue;
        }
        by_definition.insert(def_key, queries.len());
        queries.push(BenchQuery {
            id: format!("n{}", s.offset),
            text,
            lemmas,
        });
    }

    // Drop definitions that occur verbatim in the (full) corpus.
    let needles: Vec<&str> = queries.iter().map(|q| q.text.as_str()).collect();
    let leaked = find_verbatim(
        &needles,
        entries
            .iter()
            .flat_map(|e| [e.title.as_str(), e.text.as_str()]),
    );
    let queries_dropped_verbatim = leaked.iter().filter(|&&l| l).count();
    let queries: Vec<BenchQuery> = queries
        .into_iter()
        .zip(leaked)
        .filter(|(_, l)| !l)
        .map(|(q, _)| q)
        .collect();

    // Headword groups: lemmas linked through shared relevant documents (an entry with several
    // headwords, such as `Color, Colour`). Each group goes to one split.
    let mut lemma_ids: BTreeMap<&str, usize> = BTreeMap::new();
    for q in &queries {
        for l in &q.lemmas {
            let n = lemma_ids.len();
            lemma_ids.entry(l.key.as_str()).or_insert(n);
        }
    }
    let n_lemmas = lemma_ids.len();
    let mut uf = UnionFind((0..n_lemmas + entries.len()).collect());
    for q in &queries {
        for l in &q.lemmas {
            for &d in &l.docs {
                uf.union(lemma_ids[l.key.as_str()], n_lemmas + d);
            }
        }
    }
    let mut group_of: HashMap<&str, usize> = HashMap::new();
    let mut group_rep: HashMap<usize, &str> = HashMap::new();
    let mut group_docs: HashMap<usize, BTreeSet<usize>> = HashMap::new();
    for (&l, &i) in &lemma_ids {
        let g = uf.find(i);
        group_of.insert(l, g);
        // lemma_ids iterates in sorted order: the representative is the smallest lemma.
        group_rep.entry(g).or_insert(l);
    }
    for q in &queries {
        for l in &q.lemmas {
            group_docs
                .entry(group_of[l.key.as_str()])
                .or_default()
                .extend(l.docs.iter().copied());
        }
    }
    let split_of = |g: usize| -> usize {
        let u = unit(keyed(
            cfg.seed,
            STREAM_SPLIT,
            fnv1a(group_rep[&g].as_bytes()),
        ));
        if u < cfg.test_fraction {
            2
        } else if u < cfg.test_fraction + cfg.dev_fraction {
            1
        } else {
            0
        }
    };
    let primary_group: Vec<usize> = queries
        .iter()
        .map(|q| group_of[q.lemmas[0].key.as_str()])
        .collect();

    // Sampling: whole groups (of primary lemmas) first, then random other entries.
    let full_corpus_docs = entries.len();
    let (keep_doc, kept_groups): (Vec<bool>, Option<HashSet<usize>>) = match cfg.max_docs {
        Some(m) if m < entries.len() => {
            let query_groups: BTreeSet<usize> = primary_group.iter().copied().collect();
            let relevant: HashSet<usize> = query_groups
                .iter()
                .flat_map(|g| group_docs[g].iter().copied())
                .collect();
            let budget = (m as f64 * relevant.len() as f64 / entries.len() as f64).floor() as usize;
            let mut order: Vec<(u64, &str, usize)> = query_groups
                .iter()
                .map(|&g| {
                    let rep = group_rep[&g];
                    (
                        keyed(cfg.seed, STREAM_GROUPS, fnv1a(rep.as_bytes())),
                        rep,
                        g,
                    )
                })
                .collect();
            order.sort_unstable();
            let mut keep_doc = vec![false; entries.len()];
            let mut kept = HashSet::new();
            let mut used = 0;
            for (_, _, g) in order {
                let docs = &group_docs[&g];
                if used + docs.len() <= budget {
                    used += docs.len();
                    kept.insert(g);
                    for &d in docs {
                        keep_doc[d] = true;
                    }
                }
            }
            // Entries of the kept queries' other lemmas (whose groups were not sampled) would be
            // relevant but unjudged: they are not used as fillers.
            let mut forbidden = vec![false; entries.len()];
            for (q, g) in queries.iter().zip(&primary_group) {
                if kept.contains(g) {
                    for l in &q.lemmas {
                        if !kept.contains(&group_of[l.key.as_str()]) {
                            for &d in &l.docs {
                                forbidden[d] = true;
                            }
                        }
                    }
                }
            }
            let mut fillers: Vec<(u64, usize)> = (0..entries.len())
                .filter(|&d| !keep_doc[d] && !forbidden[d])
                .map(|d| {
                    (
                        keyed(cfg.seed, STREAM_FILL, fnv1a(entries[d].id.as_bytes())),
                        d,
                    )
                })
                .collect();
            fillers.sort_unstable();
            for (_, d) in fillers.into_iter().take(m - used) {
                keep_doc[d] = true;
            }
            (keep_doc, Some(kept))
        }
        _ => (vec![true; entries.len()], None),
    };
    let group_kept = |g: usize| kept_groups.as_ref().is_none_or(|k| k.contains(&g));

    // Final queries: the primary lemma's split; answers and relevant entries restricted to the
    // lemmas of that split (and of sampled groups).
    struct Final<'a> {
        q: &'a BenchQuery,
        lemmas: Vec<&'a Lemma>,
    }
    let mut per_split: [Vec<Final>; 3] = Default::default();
    let mut queries_dropped_sampling = 0;
    let mut answers_removed_other_split = 0;
    let mut answers_removed_sampling = 0;
    for (q, &pg) in queries.iter().zip(&primary_group) {
        if !group_kept(pg) {
            queries_dropped_sampling += 1;
            continue;
        }
        let split = split_of(pg);
        let mut lemmas = Vec::new();
        for l in &q.lemmas {
            let g = group_of[l.key.as_str()];
            if split_of(g) != split {
                answers_removed_other_split += 1;
            } else if !group_kept(g) {
                answers_removed_sampling += 1;
            } else {
                lemmas.push(l);
            }
        }
        per_split[split].push(Final { q, lemmas });
    }

    // Output.
    let out = &cfg.out_dir;
    std::fs::create_dir_all(out.join("qrels")).map_err(|e| EvalError::io(out, e))?;
    let docs: Vec<CorpusDoc> = entries
        .iter()
        .zip(&keep_doc)
        .filter(|(_, &k)| k)
        .map(|(e, _)| CorpusDoc {
            id: e.id.clone(),
            title: e.title.clone(),
            text: e.text.clone(),
        })
        .collect();
    beir::write_corpus(&out.join("corpus.jsonl"), &docs)?;

    let mut all_queries: Vec<Query> = Vec::new();
    let mut qa: Vec<QaItem> = Vec::new();
    let mut splits = BTreeMap::new();
    for (si, name) in SPLITS.iter().enumerate() {
        let finals = &mut per_split[si];
        finals.sort_by(|a, b| a.q.id.cmp(&b.q.id));
        let mut qrels = Qrels::new();
        let mut lemmas = BTreeSet::new();
        let mut rel_docs = BTreeSet::new();
        for f in finals.iter() {
            let judged = qrels.entry(f.q.id.clone()).or_default();
            for l in &f.lemmas {
                lemmas.insert(l.key.as_str());
                for &d in &l.docs {
                    debug_assert!(keep_doc[d]);
                    judged.insert(entries[d].id.clone(), 1);
                    rel_docs.insert(d);
                }
            }
            all_queries.push(Query {
                id: f.q.id.clone(),
                text: f.q.text.clone(),
            });
            qa.push(QaItem {
                id: f.q.id.clone(),
                question: f.q.text.clone(),
                answers: f.lemmas.iter().map(|l| l.written.clone()).collect(),
                split: Some(name.to_string()),
            });
        }
        beir::write_qrels(&out.join("qrels").join(format!("{name}.tsv")), &qrels)?;
        splits.insert(
            name.to_string(),
            SplitStats {
                queries: finals.len(),
                lemmas: lemmas.len(),
                relevant_docs: rel_docs.len(),
            },
        );
    }
    all_queries.sort_by(|a, b| a.id.cmp(&b.id));
    beir::write_queries(&out.join("queries.jsonl"), &all_queries)?;
    beir::write_qa(&out.join("answers.jsonl"), &qa)?;

    let stats = RevdictStats {
        docs: docs.len(),
        full_corpus_docs,
        index_keys: corpus.index_keys,
        dict_entries: corpus.dict_entries,
        entries_dropped_empty: corpus.dropped_empty,
        wordnet_units_removed: corpus.wordnet_units_removed,
        synsets: synsets.len(),
        synsets_matched,
        duplicate_glosses_merged,
        queries_dropped_verbatim,
        queries_dropped_sampling,
        answers_removed_other_split,
        answers_removed_sampling,
        queries: all_queries.len(),
        splits,
        seed: cfg.seed,
        dev_fraction: cfg.dev_fraction,
        test_fraction: cfg.test_fraction,
        max_docs: cfg.max_docs,
        build_seconds: started.elapsed().as_secs_f64(),
    };
    let path = out.join("stats.json");
    let json = serde_json::to_string_pretty(&stats)
        .map_err(|e| EvalError::data(&path, format!("cannot serialise: {e}")))?;
    std::fs::write(&path, json + "\n").map_err(|e| EvalError::io(&path, e))?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn dictd_base64() {
        assert_eq!(dictd_b64("A"), Some(0));
        assert_eq!(dictd_b64("Fz"), Some(5 * 64 + 51));
        assert_eq!(dictd_b64("+/"), Some(62 * 64 + 63));
        // `dog` in Debian's gcide.index.
        assert_eq!(dictd_b64("CDxmQ"), Some(34_544_016));
        assert_eq!(dictd_b64(""), None);
        assert_eq!(dictd_b64("A-"), None);
    }

    #[test]
    fn headwords_of_head_lines() {
        assert_eq!(
            parse_headwords("Color \\Col\"or\\, Colour \\Col\"our\\, n. [L. color.]\n   A hue."),
            vec!["Color", "Colour"]
        );
        assert_eq!(
            parse_headwords("Apple \\Ap\"ple\\ ([a^]p\"p'l), n. [OE. appel]"),
            vec!["Apple"]
        );
        assert_eq!(
            parse_headwords("Deuse \\Deuse\\ (d[=u]s), n.; Deused \\Deu\"sed\\ (d), a."),
            vec!["Deuse"]
        );
        assert_eq!(
            parse_headwords("Esthete \\Es\"thete\\, n.; Esthetic \\Es*thet\"ic\\, a."),
            vec!["Esthete"]
        );
        assert_eq!(
            parse_headwords(
                "Cretaceous-Tertiary boundary \\Cre*ta\"ceous-Tert\"i*ar*y\nboun\"da*ry\\ (kr), n."
            ),
            vec!["Cretaceous-Tertiary boundary"]
        );
        assert_eq!(
            parse_headwords("antidisestablishmentarianism\n\\an`ti*dis\\\n\n   (x) n."),
            vec!["antidisestablishmentarianism"]
        );
        assert!(parse_headwords("\n[1913 Webster]\n\n   3. The movable frame \\x\\").is_empty());
        assert!(
            parse_headwords("-- {Gre*ga\"ri*ous*ly}, adv. Grege\n\nGrege \\Grege\\").is_empty()
        );
    }

    #[test]
    fn source_markers() {
        for m in [
            "1913 Webster",
            "WordNet 1.5",
            "WordNet sense 2",
            "1913 Webster + WordNet 1.5 +PJC",
            "PJC",
            "Webster 1913 Suppl.",
            "Century Dict. 1906",
            "AS",
            "RP + PJC",
            "MW10",
        ] {
            assert!(is_source_marker(m), "{m}");
        }
        for m in [
            "Obs.",
            "U.S.",
            "L.",
            "Colloq.",
            "Written also {colour}.",
            "slang",
            "F.",
        ] {
            assert!(!is_source_marker(m), "{m}");
        }
    }

    const APPLE: &str =
        "Apple \\Ap\"ple\\ ([a^]p\"p'l), n. [OE. appel.]\n   1. The fleshy pome or \
        fruit of a rosaceous tree ({Pyrus\n      malus}).\n      [1913 Webster]\n\n   2. a round \
        fruit with firm white flesh\n\n   Syn: orchard apple\n        [WordNet 1.5]\n\n   3. \
        Anything round like an apple. [Obs.]\n      [PJC]\n\n   {Apple tree}, a tree bearing \
        apples.\n";

    #[test]
    fn clean_entry_removes_wordnet_units() {
        let (text, removed) = clean_entry(APPLE);
        assert_eq!(removed, 1);
        assert_eq!(
            text,
            "Apple ([a^]p\"p'l), n. [OE. appel.] 1. The fleshy pome or fruit of a rosaceous tree \
             (Pyrus malus).\n\n3. Anything round like an apple. [Obs.]\n\nApple tree, a tree \
             bearing apples."
        );
        // Entirely from WordNet: nothing left.
        let wn = "accumulated \\accumulated\\ adj.\n   1. brought together\n\n   Syn: assembled\n        [WordNet 1.5]\n";
        assert_eq!(clean_entry(wn), (String::new(), 1));
        // Inline markers, `[WordNet sense N]` and `[... + WordNet 1.5]` variants.
        let mixed = "Drama \\Dra\"ma\\, n.\n   1. A composition. [1913 Webster]\n   2. a dramatic \
            quality. [WordNet sense 1]\n   3. A play.\n   [1913 Webster + WordNet 1.5]\n   4. \
            Theatre in general.\n   [Webster 1913 Suppl.]\n";
        let (text, removed) = clean_entry(mixed);
        assert_eq!(removed, 2);
        assert_eq!(text, "Drama, n. 1. A composition. 4. Theatre in general.");
        assert!(!text.contains("WordNet"));
        // Untidy markers: broken over lines, `]` or `[` missing.
        let messy = "Foo \\Foo\\, n.\n   1. first sense.\n   [1913 Webster]\n\n   2. wordnet \
            sense. [WordNet\n   sense 1]\n\n   3. third sense. WordNet 1.5]\n\n   4. fourth.\n   \
            [PJC]\n\n   5. fifth [Narrower terms: {x}] WordNet\n   1.5]\n\n   6. sixth\n   \
            [WordNet 1.5\n\n   7. seventh [1913\n   Webster]\n\n   8. eighth. WordNet 1.5\n\n   \
            Note: WordNet lists narrower terms.\n";
        let (text, removed) = clean_entry(messy);
        assert_eq!(removed, 5);
        assert_eq!(
            text,
            "Foo, n. 1. first sense.\n\n4. fourth.\n\n7. seventh\n\nNote: WordNet lists narrower terms."
        );
    }

    #[test]
    fn gloss_definitions() {
        assert_eq!(
            gloss_definition("a member of the genus Canis; \"the dog barked all night\"  "),
            "a member of the genus Canis"
        );
        assert_eq!(
            gloss_definition("the act of swimming; \"it was the swimming\": \"they swam\""),
            "the act of swimming"
        );
        assert_eq!(
            gloss_definition("act of assembling: \"mobilization of the troops\""),
            "act of assembling"
        );
        assert_eq!(
            gloss_definition("a fruit; used as food; \"apples\"; \"more\""),
            "a fruit; used as food"
        );
        assert_eq!(
            gloss_definition("the letter \"a\" of the alphabet"),
            "the letter \"a\" of the alphabet"
        );
        assert_eq!(gloss_definition("\"only an example\""), "");
    }

    #[test]
    fn verbatim_finder() {
        let needles = ["a member of the genus Canis", "Dog", "grey wolf", "x y z w"];
        let hay = ["The Dog is a member of the genus, Canis!", "no X Y z"];
        assert_eq!(
            find_verbatim(&needles, hay.iter().copied()),
            vec![true, true, false, false]
        );
    }

    // -----------------------------------------------------------------------------------------
    // A miniature of the Debian sources.

    fn b64(mut v: u64) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        loop {
            out.push(A[(v % 64) as usize]);
            v /= 64;
            if v == 0 {
                break;
            }
        }
        out.reverse();
        String::from_utf8(out).unwrap()
    }

    fn web(head: &str, pron: &str, def: &str) -> String {
        format!("{head} \\{pron}\\, n.\n   {def}\n   [1913 Webster]\n\n")
    }

    /// Writes gcide.dict.dz, gcide.index and data.noun into `dir`; returns a config.
    fn mini_sources(dir: &Path, fillers: usize) -> RevdictConfig {
        // (index keys, entry text)
        let mut entries: Vec<(Vec<&str>, String)> = vec![
            (vec!["00-database-info"], "\n   This file was converted.\n\n".into()),
            (vec!["Apple"], APPLE.to_string() + "\n"),
            (
                vec!["Color", "Colour"],
                "Color \\Col\"or\\, Colour \\Col\"our\\, n.\n   A property of things seen, as red.\n   [1913 Webster]\n\n".into(),
            ),
            (
                vec!["accumulated"],
                "accumulated \\accumulated\\ adj.\n   1. brought together\n\n   Syn: assembled\n        [WordNet 1.5]\n\n".into(),
            ),
            (vec!["Dog", "dog"], web("Dog", "Dog", "A quadruped of the genus Canis, kept by man.")),
            (vec!["Dog"], web("Dog", "Dog", "An andiron.")),
            (vec!["Cur"], web("Cur", "Cur", "A mongrel dog.")),
            (vec!["Cat"], web("Cat", "Cat", "A feline animal kept as a pet (F\u{e9}lis).")),
            (
                vec!["Zebra"],
                "Zebra \\Ze\"bra\\, n.\n   An African animal with black and white stripes, resembling a horse.\n   [PJC]\n\n".into(),
            ),
        ];
        let names: Vec<String> = (0..fillers).map(|i| format!("Filler{i}")).collect();
        for n in &names {
            entries.push((vec![n.as_str()], web(n, n, "A word of no importance.")));
        }
        let mut text = Vec::new();
        let mut index = String::new();
        for (keys, body) in &entries {
            let off = text.len() as u64;
            text.extend_from_slice(body.as_bytes());
            for k in keys {
                index.push_str(&format!("{k}\t{}\t{}\n", b64(off), b64(body.len() as u64)));
            }
        }
        let dict = dir.join("gcide.dict.dz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&dict).unwrap(),
            Default::default(),
        );
        gz.write_all(&text).unwrap();
        gz.finish().unwrap();
        std::fs::write(dir.join("gcide.index"), index).unwrap();
        let noun = "  1 This software and database is being provided to you, the LICENSEE, by  \n\
            07739125 13 n 01 apple 0 001 @ 07705931 n 0000 | fruit with red or yellow or green skin and sweet to tart crisp whitish flesh  \n\
            04956594 07 n 02 color 0 colour 0 000 | a visual attribute of things that results from the light they emit; \"a white color\"  \n\
            02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 000 | a member of the genus Canis; \"the dog barked all night\"  \n\
            09999997 05 n 01 cur 0 000 | a member of the genus Canis  \n\
            02121620 05 n 02 cat 0 true_cat 0 000 | feline mammal usually having thick soft fur: \"cats purr\"  \n\
            02391049 05 n 01 zebra 0 000 | an African animal with black and white stripes resembling a horse  \n\
            09999999 05 n 01 unicorn 0 000 | a mythical horse  \n";
        std::fs::write(dir.join("data.noun"), noun).unwrap();
        RevdictConfig {
            gcide_dict: dict,
            gcide_index: dir.join("gcide.index"),
            wordnet_noun: dir.join("data.noun"),
            out_dir: dir.join("out"),
            max_docs: None,
            seed: 7,
            dev_fraction: 0.3,
            test_fraction: 0.3,
        }
    }

    fn read_qrels_all(out: &Path) -> Vec<(String, Qrels)> {
        SPLITS
            .iter()
            .map(|s| {
                let q = beir::load_qrels(&out.join("qrels").join(format!("{s}.tsv"))).unwrap();
                (s.to_string(), q)
            })
            .collect()
    }

    #[test]
    fn builds_the_miniature() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = mini_sources(dir.path(), 3);
        let stats = build(&cfg).unwrap();
        assert_eq!(stats.index_keys, 13);
        assert_eq!(stats.dict_entries, 11);
        assert_eq!(stats.entries_dropped_empty, 1); // accumulated
        assert_eq!(stats.docs, 10);
        assert_eq!(stats.synsets, 7);
        assert_eq!(stats.synsets_matched, 6); // not unicorn
        assert_eq!(stats.duplicate_glosses_merged, 1); // cur into dog
        assert_eq!(stats.queries_dropped_verbatim, 1); // zebra
        assert_eq!(stats.queries, 4);

        let corpus = beir::load_corpus(&cfg.out_dir.join("corpus.jsonl")).unwrap();
        let ids: Vec<&str> = corpus.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(
            ids,
            vec![
                "apple", "color", "dog", "dog~2", "cur", "cat", "zebra", "filler0", "filler1",
                "filler2"
            ]
        );
        assert_eq!(corpus[1].title, "Color, Colour");
        assert!(corpus[5].text.contains("F\u{e9}lis"));
        assert!(corpus
            .iter()
            .all(|d| !d.text.contains("WordNet") && !d.text.contains("1913 Webster")));
        assert!(!corpus[0].text.contains("firm white flesh"));

        let queries = beir::load_queries(&cfg.out_dir.join("queries.jsonl")).unwrap();
        let texts: BTreeMap<&str, &str> = queries
            .iter()
            .map(|q| (q.id.as_str(), q.text.as_str()))
            .collect();
        assert_eq!(texts["n02084071"], "a member of the genus Canis");
        assert_eq!(
            texts["n02121620"],
            "feline mammal usually having thick soft fur"
        );
        assert_eq!(
            texts["n04956594"],
            "a visual attribute of things that results from the light they emit"
        );

        let qa = beir::load_qa(&cfg.out_dir.join("answers.jsonl")).unwrap();
        assert_eq!(qa.len(), 4);
        let all = read_qrels_all(&cfg.out_dir);
        let mut seen_lemmas: BTreeMap<String, String> = BTreeMap::new();
        let mut seen_docs: BTreeMap<String, String> = BTreeMap::new();
        for item in &qa {
            let split = item.split.clone().unwrap();
            let qrels = &all.iter().find(|(s, _)| *s == split).unwrap().1;
            let judged = &qrels[&item.id];
            for a in &item.answers {
                let prev = seen_lemmas.insert(normalize_term(a), split.clone());
                assert!(prev.is_none_or(|p| p == split), "{a} in two splits");
            }
            for d in judged.keys() {
                assert!(ids.contains(&d.as_str()));
                let prev = seen_docs.insert(d.clone(), split.clone());
                assert!(prev.is_none_or(|p| p == split), "{d} in two splits");
            }
            match item.id.as_str() {
                "n02084071" => {
                    // dog (both Dog entries), cur merged in unless its group fell in another split.
                    assert_eq!(item.answers[0], "dog");
                    assert!(judged.contains_key("dog") && judged.contains_key("dog~2"));
                    assert_eq!(
                        judged.contains_key("cur"),
                        item.answers.contains(&"cur".to_string())
                    );
                }
                "n04956594" => {
                    assert_eq!(item.answers, vec!["color", "colour"]);
                    assert_eq!(judged.keys().collect::<Vec<_>>(), vec!["color"]);
                }
                "n02121620" => assert_eq!(item.answers, vec!["cat"]),
                "n07739125" => assert_eq!(judged.keys().collect::<Vec<_>>(), vec!["apple"]),
                other => panic!("unexpected query {other}"),
            }
        }
        let st: RevdictStats =
            serde_json::from_str(&std::fs::read_to_string(cfg.out_dir.join("stats.json")).unwrap())
                .unwrap();
        assert_eq!(st.queries, stats.queries);
        assert_eq!(st.splits.values().map(|s| s.queries).sum::<usize>(), 4);
    }

    #[test]
    fn deterministic_and_seeded() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = mini_sources(dir.path(), 40);
        cfg.max_docs = Some(20);
        let read = |out: &Path| -> Vec<String> {
            [
                "corpus.jsonl",
                "queries.jsonl",
                "answers.jsonl",
                "qrels/train.tsv",
                "qrels/dev.tsv",
                "qrels/test.tsv",
            ]
            .iter()
            .map(|f| std::fs::read_to_string(out.join(f)).unwrap())
            .collect()
        };
        let a = build(&cfg).unwrap();
        let first = read(&cfg.out_dir);
        cfg.out_dir = dir.path().join("out2");
        let b = build(&cfg).unwrap();
        assert_eq!(first, read(&cfg.out_dir));
        assert_eq!(a.splits, b.splits);
        assert_eq!(a.docs, 20);
        // Every judged document is in the sampled corpus.
        let corpus = beir::load_corpus(&cfg.out_dir.join("corpus.jsonl")).unwrap();
        let ids: BTreeSet<&str> = corpus.iter().map(|d| d.id.as_str()).collect();
        for (_, qrels) in read_qrels_all(&cfg.out_dir) {
            for docs in qrels.values() {
                assert!(docs.keys().all(|d| ids.contains(d.as_str())));
            }
        }
        assert_eq!(a.queries + a.queries_dropped_sampling, 4);
        // Another seed samples other fillers.
        cfg.seed = 8;
        cfg.out_dir = dir.path().join("out3");
        build(&cfg).unwrap();
        assert_ne!(first[0], read(&cfg.out_dir)[0]);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = mini_sources(dir.path(), 0);
        let mut missing = cfg.clone();
        missing.wordnet_noun = dir.path().join("nope/data.noun");
        let e = build(&missing).unwrap_err().to_string();
        assert!(
            e.contains("nope/data.noun") && e.contains("fetch-revdict-data.sh"),
            "{e}"
        );

        let mut bad = cfg.clone();
        bad.dev_fraction = 0.8;
        assert!(matches!(build(&bad), Err(EvalError::Config(_))));

        let idx = dir.path().join("bad.index");
        std::fs::write(&idx, "Apple\tA\tB\nDog\tA\n").unwrap();
        let mut bad = cfg.clone();
        bad.gcide_index = idx;
        let e = build(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.index:2:"), "{e}");

        let idx = dir.path().join("far.index");
        std::fs::write(&idx, "Apple\tAAAAB\tzz\n").unwrap();
        let mut bad = cfg.clone();
        bad.gcide_index = idx;
        let e = build(&bad).unwrap_err().to_string();
        assert!(
            e.contains("far.index:1:") && e.contains("beyond the end"),
            "{e}"
        );

        let noun = dir.path().join("bad.noun");
        std::fs::write(&noun, "  header\n0000 03 n 01 x 0 000 | gloss\n").unwrap();
        let mut bad = cfg.clone();
        bad.wordnet_noun = noun;
        let e = build(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.noun:2:"), "{e}");

        let mut bad = cfg;
        bad.gcide_dict = dir.path().join("gcide.index");
        let e = build(&bad).unwrap_err().to_string();
        assert!(e.contains("gcide.index") && e.contains("decompress"), "{e}");
    }
}
