//! Which tensors are quantized: the default rule (the linear weights transformers + bitsandbytes
//! convert) and `--include`/`--exclude` globs (matched with the `globset` crate).

use crate::error::{Error, Result};
use crate::safetensors::TensorInfo;

// ---------------------------------------------------------------------------------------------
// Selection

/// Compiled `--include`/`--exclude` patterns, matched against whole tensor names: `*` any run of
/// characters (dots included), `?` one character, `[abc]`, `[a-z]`, `[!abc]` one character of (not
/// of) a set; a `[` that opens no closed set is a literal, and so is `\\`.
#[derive(Clone, Debug, Default)]
pub struct Globs {
    patterns: Vec<(String, globset::GlobMatcher)>,
}

impl Globs {
    /// Compiles `patterns`; `what` ("--include") names them in the error of an invalid one.
    pub fn new(patterns: &[String], what: &str) -> Result<Self> {
        let patterns = patterns
            .iter()
            .map(|p| {
                let m = compile_glob(p)
                    .map_err(|e| Error::unsupported(format!("{what} {p:?} is not a valid glob pattern: {e}")))?;
                Ok((p.clone(), m))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Globs { patterns })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The first pattern that matches `name`.
    pub fn first_match(&self, name: &str) -> Option<&str> {
        self.patterns.iter().find(|(_, m)| m.is_match(name)).map(|(p, _)| p.as_str())
    }

    /// Each pattern with its matcher.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &globset::GlobMatcher)> {
        self.patterns.iter().map(|(p, m)| (p.as_str(), m))
    }
}

/// Whether `pattern` (see [`Globs`]) matches the whole of `name`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    compile_glob(pattern).is_ok_and(|m| m.is_match(name))
}

fn compile_glob(pattern: &str) -> std::result::Result<globset::GlobMatcher, globset::Error> {
    // Tensor names have no path separators: `*` crosses dots.
    Ok(globset::GlobBuilder::new(&literal_text(pattern))
        .literal_separator(false)
        .backslash_escape(false)
        .build()?
        .compile_matcher())
}

/// `pattern` with what the patterns always took literally written as one-character sets: a `[`
/// that opens no closed set (`[[]`), and `{`/`}` outside sets (globset would read alternatives).
fn literal_text(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '[' {
            // A set closes at the first `]` after its first member (a leading `]`, after an
            // optional `!`/`^`, is a member).
            let mut j = i + 1;
            if j < chars.len() && (chars[j] == '!' || chars[j] == '^') {
                j += 1;
            }
            j += 1;
            while j < chars.len() && chars[j] != ']' {
                j += 1;
            }
            if j < chars.len() {
                out.extend(&chars[i..=j]);
                i = j + 1;
                continue;
            }
            out.push_str("[[]");
            i += 1;
            continue;
        }
        match chars[i] {
            '{' => out.push_str("[{]"),
            '}' => out.push_str("[}]"),
            c => out.push(c),
        }
        i += 1;
    }
    out
}

/// Why the default selection keeps a rank-2 float `.weight` (None: it is a linear weight and is
/// quantized). Mirrors what transformers + bitsandbytes convert: `nn.Linear` layers except the
/// output head; embeddings and norms are other module types.
pub(crate) fn default_keep_reason(name: &str) -> Option<&'static str> {
    let module = name.strip_suffix(".weight")?;
    for part in module.split('.') {
        let p = part.to_ascii_lowercase();
        if p == "lm_head" {
            return Some("output head");
        }
        if p.contains("embed") || p == "wte" || p == "wpe" || p == "shared" || p.contains("relative_attention_bias") {
            return Some("embedding");
        }
        if p.contains("norm") || p == "ln_f" || p.starts_with("ln_") {
            return Some("norm");
        }
    }
    None
}

pub(crate) fn quantizable(t: &TensorInfo) -> std::result::Result<(), String> {
    if t.shape.len() != 2 {
        return Err(format!("rank {}", t.shape.len()));
    }
    if t.dtype.as_float().is_none() {
        return Err(format!("dtype {}", t.dtype.name()));
    }
    if t.numel() == 0 {
        return Err("empty".into());
    }
    Ok(())
}

/// (quantize?, reason) for one tensor.
pub(crate) fn decide(t: &TensorInfo, include: &Globs, exclude: &Globs) -> (bool, String) {
    if let Err(why) = quantizable(t) {
        return (false, why);
    }
    if let Some(p) = exclude.first_match(&t.name) {
        return (false, format!("--exclude {p}"));
    }
    if !include.is_empty() {
        return match include.first_match(&t.name) {
            Some(p) => (true, format!("--include {p}")),
            None => (false, "not in --include".into()),
        };
    }
    if !t.name.ends_with(".weight") {
        return (false, "not a .weight".into());
    }
    match default_keep_reason(&t.name) {
        Some(r) => (false, r.into()),
        None => (true, "linear weight".into()),
    }
}
