//! Answer metrics of extractive/abstractive QA, as the SQuAD evaluation script defines them.
//!
//! [`normalize_answer`] lower-cases, removes ASCII punctuation (Python's `string.punctuation`),
//! removes the articles *a*, *an*, *the* (as whole words) and collapses whitespace.
//! [`exact_match`] and [`token_f1`] compare normalised strings and take the maximum over the gold
//! answers (0 when there is none). As in SQuAD v2, when the prediction or the gold answer
//! normalises to no tokens, F1 is 1 if both are empty and 0 otherwise.

use std::collections::HashMap;

/// SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    // Python's `re.sub(r'\b(a|an|the)\b', ' ', text)`: word characters are alphanumerics and `_`.
    let mut no_articles = String::with_capacity(no_punct.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if matches!(word.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in no_punct.chars() {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut no_articles);
            no_articles.push(c);
        }
    }
    flush(&mut word, &mut no_articles);
    no_articles.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// 1.0 when the normalised prediction equals some normalised gold answer, else 0.0.
pub fn exact_match<S: AsRef<str>>(prediction: &str, gold: &[S]) -> f64 {
    let p = normalize_answer(prediction);
    let hit = gold.iter().any(|g| normalize_answer(g.as_ref()) == p);
    if hit {
        1.0
    } else {
        0.0
    }
}

/// Token-level F1 between the normalised prediction and the best gold answer.
pub fn token_f1<S: AsRef<str>>(prediction: &str, gold: &[S]) -> f64 {
    let p = normalize_answer(prediction);
    let p_toks: Vec<&str> = p.split_whitespace().collect();
    gold.iter()
        .map(|g| {
            let g = normalize_answer(g.as_ref());
            let g_toks: Vec<&str> = g.split_whitespace().collect();
            f1_tokens(&p_toks, &g_toks)
        })
        .fold(0.0, f64::max)
}

fn f1_tokens(pred: &[&str], gold: &[&str]) -> f64 {
    if pred.is_empty() || gold.is_empty() {
        return if pred.is_empty() && gold.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in gold {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0usize;
    for t in pred {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pred.len() as f64;
    let recall = same as f64 / gold.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation() {
        assert_eq!(normalize_answer("The  Cat!"), "cat");
        assert_eq!(normalize_answer("  an Apple, a day "), "apple day");
        assert_eq!(normalize_answer("Theatre"), "theatre");
        assert_eq!(normalize_answer("don't"), "dont");
        assert_eq!(normalize_answer("A"), "");
        assert_eq!(normalize_answer("the-end"), "theend");
        assert_eq!(normalize_answer("Über  Straße."), "über straße");
        assert_eq!(normalize_answer("St. Bernard"), "st bernard");
    }

    #[test]
    fn exact_match_over_golds() {
        assert_eq!(exact_match("the dog", &["Dog", "hound"]), 1.0);
        assert_eq!(exact_match("dogs", &["dog"]), 0.0);
        assert_eq!(exact_match("x", &[] as &[&str]), 0.0);
        let gold = vec!["Paris".to_string()];
        assert_eq!(exact_match("paris.", &gold), 1.0);
    }

    #[test]
    fn f1_by_hand() {
        // pred tokens {big, red, dog}, gold {red, dog}: P = 2/3, R = 1 → F1 = 0.8.
        assert!((token_f1("a big red dog", &["the red dog"]) - 0.8).abs() < 1e-12);
        // Max over golds.
        assert!((token_f1("red dog", &["cat", "red dog"]) - 1.0).abs() < 1e-12);
        // Repeated tokens count with multiplicity: pred {x x y}, gold {x y y}:
        // common = min(2,1) + min(1,2) = 2;
        // P = 2/3, R = 2/3 → F1 = 2/3.
        assert!((token_f1("x x y", &["x y y"]) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(token_f1("cat", &["dog"]), 0.0);
        // Empty after normalisation.
        assert_eq!(token_f1("the", &["a"]), 1.0);
        assert_eq!(token_f1("the", &["dog"]), 0.0);
        assert_eq!(token_f1("dog", &[] as &[&str]), 0.0);
    }
}
