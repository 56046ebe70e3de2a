//! Text operators on STRING tensors (held as in [`crate::strings`]): ONNX's
//! `StringNormalizer`, `StringConcat`, `StringSplit`, `RegexFullMatch` and `TfIdfVectorizer`,
//! and onnxruntime's `com.microsoft.Tokenizer` — together the preprocessing that
//! scikit-learn text pipelines (`TfidfVectorizer`, `CountVectorizer`) export to. Each
//! follows onnxruntime's kernel where it and ONNX's reference differ, since that is what
//! Triton runs.
use std::collections::{HashMap, HashSet};

use candle_core::{bail, DType, Result, Tensor};
use candle_onnx::onnx::NodeProto;
use regex::Regex;

use crate::attrs;
use crate::strings::StringTable;

/// The default-domain text operators.
pub const OPS: &[&str] = &[
    "StringNormalizer",
    "StringConcat",
    "StringSplit",
    "RegexFullMatch",
    "TfIdfVectorizer",
];
/// onnxruntime's tokenizer (`com.microsoft` domain).
pub const TOKENIZER: &str = "Tokenizer";

/// Whether `node` is one of the operators of this module.
pub fn handles(node: &NodeProto) -> bool {
    match node.domain.as_str() {
        "" | "ai.onnx" => OPS.contains(&node.op_type.as_str()),
        crate::contrib::DOMAIN => node.op_type == TOKENIZER,
        _ => false,
    }
}

/// Which inputs of a text operator may be STRING and whether its first output then is.
pub fn string_io(op: &str) -> Option<(&'static [usize], bool)> {
    Some(match op {
        "StringNormalizer" | TOKENIZER => (&[0], true),
        "StringConcat" => (&[0, 1], true),
        // Only the first output (the parts); the second counts them.
        "StringSplit" => (&[0], true),
        "RegexFullMatch" | "TfIdfVectorizer" => (&[0], false),
        _ => return None,
    })
}

/// Runs one text operator.
pub fn run(node: &NodeProto, ins: &[Option<Tensor>], table: &StringTable) -> Result<Vec<Tensor>> {
    let input = |i: usize| match ins.get(i) {
        Some(Some(t)) => Ok(t),
        _ => bail!("{} node '{}' is missing input {i}", node.op_type, node.name),
    };
    let x = input(0)?;
    Ok(match node.op_type.as_str() {
        "StringNormalizer" => vec![normalize(node, x, table)?],
        "StringConcat" => vec![concat(x, input(1)?, table)?],
        "StringSplit" => split(node, x, table)?,
        "RegexFullMatch" => vec![full_match(node, x, table)?],
        "TfIdfVectorizer" => vec![tfidf(node, x, table)?],
        TOKENIZER => vec![tokenize(node, x, table)?],
        op => bail!("{op} is not a text operator"),
    })
}

/// A string attribute list as UTF-8 text.
fn texts(node: &NodeProto, name: &str) -> Result<Vec<String>> {
    attrs::find(node, name)
        .map_or(&[][..], |a| &a.strings[..])
        .iter()
        .map(|s| {
            String::from_utf8(s.clone()).map_err(|_| {
                candle_core::Error::Msg(format!("attribute '{name}' holds invalid UTF-8"))
            })
        })
        .collect()
}

/// `s` as UTF-8, or an error naming the operator.
fn utf8<'a>(op: &str, s: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(s)
        .map_err(|_| candle_core::Error::Msg(format!("{op}: input string is not valid UTF-8")))
}

/// Case change one character at a time, as C's `towlower`/`towupper` (a character whose
/// case form is several characters, like `ß` upper-cased, stays as it is).
fn change_case(s: &str, upper: bool) -> String {
    s.chars()
        .map(|c| {
            let mut m: Vec<char> = if upper {
                c.to_uppercase().collect()
            } else {
                c.to_lowercase().collect()
            };
            if m.len() == 1 {
                m.pop().unwrap_or(c)
            } else {
                c
            }
        })
        .collect()
}

/// StringNormalizer: drops the stopwords (whole elements; compared after changing both
/// to lower case, or to upper case when that is the requested change, unless
/// `is_case_sensitive`), then changes case. Input `[C]` or `[1, C]`; when every element is a
/// stopword the output is one empty string.
fn normalize(node: &NodeProto, x: &Tensor, table: &StringTable) -> Result<Tensor> {
    let action = attrs::string(node, "case_change_action", "NONE");
    let change = match action.as_str() {
        "NONE" => None,
        "LOWER" => Some(false),
        "UPPER" => Some(true),
        other => bail!("StringNormalizer: invalid case_change_action '{other}'"),
    };
    let sensitive = attrs::int(node, "is_case_sensitive", 0) != 0;
    let compare_upper = change == Some(true);
    let stops: HashSet<String> = texts(node, "stopwords")?
        .into_iter()
        .map(|s| {
            if sensitive {
                s
            } else {
                change_case(&s, compare_upper)
            }
        })
        .collect();
    let dims = x.dims();
    let one_row = match dims {
        [c] if *c > 0 => false,
        [1, c] if *c > 0 => true,
        _ => bail!(
            "StringNormalizer: input dimensions are either [C > 0] or [1, C > 0], got {dims:?}"
        ),
    };
    let mut kept = Vec::new();
    for s in table.strings(x)? {
        let s = utf8("StringNormalizer", &s)?.to_string();
        let key = if sensitive || stops.is_empty() {
            None
        } else {
            Some(change_case(&s, compare_upper))
        };
        if stops.contains(key.as_ref().unwrap_or(&s)) {
            continue;
        }
        kept.push(match change {
            Some(upper) => change_case(&s, upper),
            None => s,
        });
    }
    if kept.is_empty() {
        kept.push(String::new());
    }
    let n = kept.len();
    let dims: &[usize] = if one_row { &[1, n] } else { &[n] };
    table.tensor(kept.iter().map(|s| s.as_bytes()), dims, x.device())
}

/// StringConcat: `x + y` element-wise, with broadcasting.
fn concat(x: &Tensor, y: &Tensor, table: &StringTable) -> Result<Tensor> {
    let shape = x
        .shape()
        .broadcast_shape_binary_op(y.shape(), "StringConcat")?;
    let (x, y) = (x.broadcast_as(&shape)?, y.broadcast_as(&shape)?);
    let (a, b) = (
        table.strings(&x.contiguous()?)?,
        table.strings(&y.contiguous()?)?,
    );
    let joined: Vec<Vec<u8>> = a.into_iter().zip(b).map(|(a, b)| [a, b].concat()).collect();
    table.tensor(joined.iter().map(Vec::as_slice), shape.dims(), x.device())
}

/// Python's `str.split(sep, maxsplit)` (without `sep`, runs of white space separate and
/// leading and trailing white space gives no empty parts), but as onnxruntime's StringSplit
/// an empty string has no parts.
fn python_split(s: &str, sep: Option<&str>, max: Option<usize>) -> Vec<String> {
    let mut left = max.unwrap_or(usize::MAX);
    match sep {
        // onnxruntime gives an empty string no parts (Python gives one empty part).
        Some(_) if s.is_empty() => Vec::new(),
        Some(sep) => {
            let mut parts = Vec::new();
            let mut rest = s;
            while left > 0 {
                let Some(at) = rest.find(sep) else { break };
                parts.push(rest[..at].to_string());
                rest = &rest[at + sep.len()..];
                left -= 1;
            }
            parts.push(rest.to_string());
            parts
        }
        None => {
            let mut parts = Vec::new();
            let mut rest = s.trim_start();
            while left > 0 && !rest.is_empty() {
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                parts.push(rest[..end].to_string());
                rest = rest[end..].trim_start();
                left -= 1;
            }
            if !rest.is_empty() {
                parts.push(rest.to_string());
            }
            parts
        }
    }
}

/// StringSplit: each element split at `delimiter` (white space when empty), at most
/// `maxsplit` times; the parts padded with empty strings to the longest row
/// (`X.shape + [longest]`), and the number of parts of each (`X.shape`, INT64).
fn split(node: &NodeProto, x: &Tensor, table: &StringTable) -> Result<Vec<Tensor>> {
    let delimiter = attrs::string(node, "delimiter", "");
    let sep = (!delimiter.is_empty()).then_some(delimiter.as_str());
    let max = attrs::find(node, "maxsplit").map(|a| a.i.max(0) as usize);
    let rows: Vec<Vec<String>> = table
        .strings(x)?
        .iter()
        .map(|s| Ok(python_split(utf8("StringSplit", s)?, sep, max)))
        .collect::<Result<_>>()?;
    let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
    let counts: Vec<i64> = rows.iter().map(|r| r.len() as i64).collect();
    let padded: Vec<&[u8]> = rows
        .iter()
        .flat_map(|r| {
            let pad = longest - r.len();
            r.iter()
                .map(|s| s.as_bytes())
                .chain(std::iter::repeat_n(&b""[..], pad))
        })
        .collect();
    let mut dims = x.dims().to_vec();
    let counts = Tensor::from_vec(counts, x.dims(), x.device())?;
    dims.push(longest);
    Ok(vec![table.tensor(padded, &dims, x.device())?, counts])
}

/// A pattern compiled for onnxruntime's RE2 use; `whole` anchors it at both ends.
fn compile(op: &str, pattern: &str, whole: bool) -> Result<Regex> {
    let p = if whole {
        format!(r"\A(?:{pattern})\z")
    } else {
        pattern.to_string()
    };
    Regex::new(&p)
        .map_err(|e| candle_core::Error::Msg(format!("{op}: invalid pattern '{pattern}': {e}")))
}

/// RegexFullMatch: whether each element matches `pattern` as a whole.
fn full_match(node: &NodeProto, x: &Tensor, table: &StringTable) -> Result<Tensor> {
    let re = compile("RegexFullMatch", &attrs::string(node, "pattern", ""), true)?;
    let hits: Vec<u8> = table.map(x, |s| Ok(re.is_match(utf8("RegexFullMatch", s)?) as u8))?;
    Tensor::from_vec(hits, x.dims(), x.device())
}

/// The number of UTF-8 characters of `s`.
fn chars(s: &str) -> usize {
    s.chars().count()
}

/// How the Tokenizer cuts a string.
enum Cut {
    /// Into characters (`separators: [""]` or `tokenexp: "."`).
    Chars,
    /// At the matches of each separator pattern in turn.
    Separators(Vec<Regex>),
    /// Into the matches of `tokenexp`.
    Pattern(Regex),
}

/// Tokenizer (onnxruntime, `com.microsoft`): each element of `[C]` or `[N, C]` cut into
/// tokens — by `separators` (patterns, applied one after another to every piece), by
/// matches of `tokenexp`, or into characters (`separators: [""]` or `tokenexp: "."`);
/// tokens shorter than `mincharnum` characters are dropped. Output: the input shape plus
/// one axis as long as the most tokens, each row `[start mark] tokens [end mark]` (`mark`:
/// characters 0x02 and 0x03) then `pad_value`s; no tokens anywhere gives that axis 0.
fn tokenize(node: &NodeProto, x: &Tensor, table: &StringTable) -> Result<Tensor> {
    let mark = attrs::int(node, "mark", 0) != 0;
    let pad = attrs::string(node, "pad_value", "");
    let min = attrs::int(node, "mincharnum", 1);
    if min < 1 {
        bail!("Tokenizer: mincharnum must be positive, got {min}")
    }
    let min = min as usize;
    let separators = texts(node, "separators")?;
    let tokenexp = attrs::string(node, "tokenexp", "");
    let cut = if attrs::has(node, "separators") {
        match &separators[..] {
            [] => bail!("Tokenizer: separators must not be empty"),
            [only] if only.is_empty() => Cut::Chars,
            seps => Cut::Separators(
                seps.iter()
                    .map(|s| compile("Tokenizer", s, false))
                    .collect::<Result<_>>()?,
            ),
        }
    } else if tokenexp.is_empty() {
        bail!("Tokenizer: needs either 'separators' or a non-empty 'tokenexp'")
    } else if tokenexp == "." {
        Cut::Chars
    } else {
        Cut::Pattern(compile("Tokenizer", &tokenexp, false)?)
    };
    if matches!(cut, Cut::Chars) && min > 1 {
        bail!("Tokenizer: mincharnum is too big for character tokenization")
    }
    let dims = x.dims().to_vec();
    if dims.len() != 1 && dims.len() != 2 {
        bail!("Tokenizer: input dimensions are either [C] or [N, C], got {dims:?}")
    }
    let rows: Vec<Vec<String>> = table
        .strings(x)?
        .iter()
        .map(|s| {
            let s = utf8("Tokenizer", s)?;
            Ok(match &cut {
                Cut::Chars => s.chars().map(String::from).collect(),
                Cut::Pattern(re) => match_tokens(s, re, min),
                Cut::Separators(seps) => separator_tokens(s, seps, min),
            })
        })
        .collect::<Result<_>>()?;
    let most = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut out_dims = dims.clone();
    if most == 0 {
        out_dims.push(0);
        return table.tensor(std::iter::empty(), &out_dims, x.device());
    }
    let width = most + if mark { 2 } else { 0 };
    out_dims.push(width);
    let (start, end) = (&[0x02u8][..], &[0x03u8][..]);
    let mut cells: Vec<&[u8]> = Vec::with_capacity(rows.len() * width);
    for row in &rows {
        if mark {
            cells.push(start);
        }
        cells.extend(row.iter().map(|t| t.as_bytes()));
        if mark {
            cells.push(end);
        }
        cells.extend(std::iter::repeat_n(pad.as_bytes(), most - row.len()));
    }
    table.tensor(cells, &out_dims, x.device())
}

/// The matches of `re` in `s` of at least `min` characters (a shorter match moves the
/// search on by one character, so a longer one starting inside it can still be found).
fn match_tokens(s: &str, re: &Regex, min: usize) -> Vec<String> {
    let mut tokens = Vec::new();
    if chars(s) < min {
        return tokens;
    }
    let mut at = 0;
    while at <= s.len() {
        let Some(m) = re.find_at(s, at) else { break };
        if chars(m.as_str()) >= min && !m.as_str().is_empty() {
            tokens.push(m.as_str().to_string());
            at = m.end();
        } else {
            at = m.start() + s[m.start()..].chars().next().map_or(1, char::len_utf8);
        }
    }
    tokens
}

/// `s` cut at the matches of each separator in turn (each applied to every piece the
/// previous ones left), keeping pieces of at least `min` characters; once a separator
/// leaves no piece, there are no tokens.
fn separator_tokens(s: &str, seps: &[Regex], min: usize) -> Vec<String> {
    let mut row = vec![s.to_string()];
    for sep in seps {
        let mut next = Vec::new();
        for text in &row {
            let mut at = 0;
            while at <= text.len() {
                match sep.find_at(text, at) {
                    Some(m) => {
                        let piece = &text[at..m.start()];
                        if chars(piece) >= min {
                            next.push(piece.to_string());
                        }
                        at = if m.end() > m.start() {
                            m.end()
                        } else {
                            m.start() + text[m.start()..].chars().next().map_or(1, char::len_utf8)
                        };
                    }
                    None => {
                        let piece = &text[at..];
                        if chars(piece) >= min {
                            next.push(piece.to_string());
                        }
                        break;
                    }
                }
            }
        }
        if next.is_empty() {
            return next;
        }
        row = next;
    }
    row
}

/// The n-grams of a TfIdfVectorizer pool as a trie: node 0 is the root; each node's
/// n-gram id (1-based; 0 for a prefix that is not itself counted).
#[derive(Default)]
struct Grams {
    children: HashMap<(usize, i64), usize>,
    ids: Vec<usize>,
}

impl Grams {
    fn child(&mut self, node: usize, key: i64) -> usize {
        let next = self.ids.len();
        let at = *self.children.entry((node, key)).or_insert(next);
        if at == next {
            self.ids.push(0);
        }
        at
    }
}

/// TfIdfVectorizer: counts, per row of `[C]` or `[N, C]` (INT32, INT64 or STRING), the
/// pool's n-grams (of `min_gram_length..=max_gram_length` items, items up to
/// `max_skip_count` apart; unigrams counted once), then weighs them (`TF`: counts, `IDF`:
/// weight where present, `TFIDF`: weight × count). Output FLOAT `[max(ngram_indexes) + 1]`
/// or `[N, that]`.
fn tfidf(node: &NodeProto, x: &Tensor, table: &StringTable) -> Result<Tensor> {
    let int = |n: &str| attrs::int(node, n, 0);
    let (min_n, max_n, max_skip) = (
        int("min_gram_length"),
        int("max_gram_length"),
        int("max_skip_count"),
    );
    if min_n < 1 || max_n < min_n || max_skip < 0 {
        bail!("TfIdfVectorizer: needs 1 <= min_gram_length <= max_gram_length and max_skip_count >= 0")
    }
    let (min_n, max_n, max_skip) = (min_n as usize, max_n as usize, max_skip as usize);
    let mode = attrs::string(node, "mode", "");
    let counts = attrs::ints(node, "ngram_counts").unwrap_or_default();
    let indexes = attrs::ints(node, "ngram_indexes").unwrap_or_default();
    let weights = attrs::find(node, "weights").map_or_else(Vec::new, |a| a.floats.clone());
    let strings = attrs::has(node, "pool_strings");
    let pool: Vec<i64> = if strings {
        attrs::find(node, "pool_strings")
            .map_or(&[][..], |a| &a.strings[..])
            .iter()
            .map(|s| table.intern(s))
            .collect()
    } else {
        attrs::ints(node, "pool_int64s").unwrap_or_default()
    };
    let width = indexes.iter().copied().max().map_or(0, |m| m.max(-1) + 1) as usize;
    if indexes.iter().any(|&i| i < 0) {
        bail!("TfIdfVectorizer: negative ngram_indexes")
    }
    // The trie, with ids assigned in pool order (sizes outside the range keep their ids).
    let mut grams = Grams {
        ids: vec![0],
        ..Default::default()
    };
    let mut id = 1;
    for (i, &start) in counts.iter().enumerate() {
        let size = i + 1;
        let end = counts.get(i + 1).map_or(pool.len() as i64, |&e| e);
        let (start, end) = (start.max(0) as usize, (end.max(0) as usize).min(pool.len()));
        if end <= start {
            continue;
        }
        let n = (end - start) / size;
        if size < min_n || size > max_n {
            id += n;
            continue;
        }
        for g in 0..n {
            let mut at = 0;
            for &key in &pool[start + g * size..start + (g + 1) * size] {
                at = grams.child(at, key);
            }
            grams.ids[at] = id;
            id += 1;
        }
    }
    if indexes.len() + 1 < id {
        bail!(
            "TfIdfVectorizer: ngram_indexes has {} entries for {} n-grams",
            indexes.len(),
            id - 1
        )
    }
    // The items, as numbers (strings by their table index).
    let items: Vec<i64> = match (x.dtype(), strings) {
        (DType::I64, true) => x.flatten_all()?.to_vec1()?,
        (DType::I64 | DType::I32, false) => x.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?,
        (dt, _) => bail!("TfIdfVectorizer: input of type {dt:?} does not match the pool"),
    };
    let (rows, row_len, out_dims) = match x.dims() {
        [] => (1, 1, vec![width]),
        [c] => (1, *c, vec![width]),
        [n, c] => (*n, *c, vec![*n, width]),
        d => bail!("TfIdfVectorizer: input must be [C] or [N, C], got {d:?}"),
    };
    let mut freq = vec![0u32; rows * width];
    for r in 0..rows {
        let row = &items[r * row_len..(r + 1) * row_len];
        let mut smallest = min_n;
        for skip in 1..=max_skip + 1 {
            for start in 0..row.len() {
                if start + skip * (smallest - 1) >= row.len() {
                    break;
                }
                let (mut at, mut size, mut item) = (0, 1, start);
                while size <= max_n && item < row.len() {
                    let Some(&next) = grams.children.get(&(at, row[item])) else {
                        break;
                    };
                    let gid = grams.ids[next];
                    if size >= smallest && gid != 0 {
                        freq[r * width + indexes[gid - 1] as usize] += 1;
                    }
                    at = next;
                    size += 1;
                    item += skip;
                }
            }
            // Unigrams do not depend on the skip: counted in the first pass only.
            if smallest == 1 {
                smallest = 2;
                if smallest > max_n {
                    break;
                }
            }
        }
    }
    let y: Vec<f32> = freq
        .iter()
        .enumerate()
        .map(|(i, &f)| {
            let w = weights.get(i % width.max(1)).copied();
            match mode.as_str() {
                "TF" => Ok(f as f32),
                "IDF" => Ok(if f > 0 { w.unwrap_or(1.0) } else { 0.0 }),
                "TFIDF" => Ok(w.unwrap_or(1.0) * f as f32),
                m => bail!("TfIdfVectorizer: unknown mode '{m}'"),
            }
        })
        .collect::<Result<_>>()?;
    Tensor::from_vec(y, out_dims, x.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_as_python_does() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(python_split("  a b\t c ", None, None), s(&["a", "b", "c"]));
        assert_eq!(python_split("  a b c ", None, Some(1)), s(&["a", "b c "]));
        assert_eq!(python_split("   ", None, None), Vec::<String>::new());
        assert_eq!(python_split("a,,b", Some(","), None), s(&["a", "", "b"]));
        assert_eq!(python_split("a,b,c", Some(","), Some(1)), s(&["a", "b,c"]));
        assert!(python_split("", Some(","), None).is_empty());
        assert_eq!(python_split("a--b", Some("--"), None), s(&["a", "b"]));
    }

    #[test]
    fn changes_case_one_character_at_a_time() {
        assert_eq!(change_case("Straße", true), "STRAßE");
        assert_eq!(change_case("ÉCOLE", false), "école");
    }

    #[test]
    fn tokens_by_expression_and_separators() {
        let word = Regex::new("[a-zA-Z0-9_]+").unwrap();
        assert_eq!(
            match_tokens("Hi, a big world!", &word, 2),
            ["Hi", "big", "world"]
        );
        let seps = [Regex::new(" ").unwrap(), Regex::new(",").unwrap()];
        assert_eq!(separator_tokens("a,b c,,d", &seps, 1), ["a", "b", "c", "d"]);
        assert!(separator_tokens(" , ", &seps, 1).is_empty());
    }
}
