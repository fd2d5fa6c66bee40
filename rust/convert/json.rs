//! JSON written byte for byte as Python's `json.dumps` writes it (float reprs, separators, key
//! order), for the quantization state and config.json that bitsandbytes and transformers read.

use serde_json::{Map, Value};

use crate::blockwise8::NESTED_BLOCKSIZE;
use crate::dtype::DType;
use crate::quant4::QuantType;

use super::*;

// ---------------------------------------------------------------------------------------------
// JSON as Python writes it

/// `json.dumps` of a Python float that holds an f64: the shortest repr that round-trips,
/// fixed notation for decimal exponents in [-4, 16), else `1.5e-05` / `1e+16`;
/// NaN and infinities as `NaN`, `Infinity`, `-Infinity`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if x == 0.0 {
        return format!("{sign}0.0");
    }
    // Python prints the shortest digit string that round-trips and, of two such strings equally near
    // x, the even one. Rust's `{:e}` finds the shortest length but may take the other one of a tie;
    // the exact rounding to that many digits (half to even) is the nearest, and wins if it round-trips
    // (next to a power of two it may not: the gap below x is half the gap above).
    let shortest = format!("{:e}", x.abs());
    let significant = shortest.split('e').next().unwrap_or("").chars().filter(|c| c.is_ascii_digit()).count();
    let nearest = format!("{:.*e}", significant.saturating_sub(1), x.abs());
    let e = if nearest.parse::<f64>() == Ok(x.abs()) { nearest } else { shortest };
    let (mantissa, exp) = e.split_once('e').expect("LowerExp has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let decpt = exp + 1; // value = 0.DIGITS x 10^decpt
    let body = if -4 < decpt && decpt <= 16 {
        let n = digits.len() as i32;
        if decpt <= 0 {
            format!("0.{}{digits}", "0".repeat((-decpt) as usize))
        } else if decpt >= n {
            format!("{digits}{}.0", "0".repeat((decpt - n) as usize))
        } else {
            format!("{}.{}", &digits[..decpt as usize], &digits[decpt as usize..])
        }
    } else {
        let m = if digits.len() == 1 { digits.clone() } else { format!("{}.{}", &digits[..1], &digits[1..]) };
        let e = decpt - 1;
        format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    };
    format!("{sign}{body}")
}

/// bitsandbytes' JSON quantization state, byte for byte as `json.dumps` writes it.
pub fn quant_state_json(
    quant_type: QuantType,
    blocksize: usize,
    dtype: DType,
    shape: &[usize],
    nested_offset: Option<f32>,
) -> String {
    let dims = shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {blocksize}, \"dtype\": \"{}\", \"shape\": [{dims}]",
        quant_type.name(),
        dtype.name()
    );
    if let Some(offset) = nested_offset {
        s.push_str(&format!(
            ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            python_float_repr(offset as f64)
        ));
    }
    s.push('}');
    s
}

/// `json.dumps(value, indent=2, sort_keys=True)` (ensure_ascii on), as transformers writes
/// config.json and the shard index.
pub fn python_json_dumps(value: &Value) -> String {
    let mut out = String::new();
    dump_value(value, 0, &mut out);
    out
}

pub(crate) fn dump_value(v: &Value, level: usize, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                out.push_str(&python_float_repr(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => dump_string(s, out),
        Value::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                out.push_str(&"  ".repeat(level + 1));
                dump_value(item, level + 1, out);
            }
            out.push('\n');
            out.push_str(&"  ".repeat(level));
            out.push(']');
        }
        Value::Object(m) => {
            if m.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                out.push_str(&"  ".repeat(level + 1));
                dump_string(k, out);
                out.push_str(": ");
                dump_value(&m[k], level + 1, out);
            }
            out.push('\n');
            out.push_str(&"  ".repeat(level));
            out.push('}');
        }
    }
}

pub(crate) fn dump_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// The `quantization_config` transformers writes for bitsandbytes 4-bit.
pub(crate) fn quantization_config(opts: &ConvertOptions, skip_modules: &Option<Vec<String>>) -> Value {
    let mut q = Map::new();
    q.insert("_load_in_4bit".into(), Value::Bool(true));
    q.insert("_load_in_8bit".into(), Value::Bool(false));
    q.insert("bnb_4bit_compute_dtype".into(), Value::String(opts.compute_dtype.name().into()));
    q.insert("bnb_4bit_quant_storage".into(), Value::String("uint8".into()));
    q.insert("bnb_4bit_quant_type".into(), Value::String(opts.quant_type.name().into()));
    q.insert("bnb_4bit_use_double_quant".into(), Value::Bool(opts.double_quant));
    q.insert("llm_int8_enable_fp32_cpu_offload".into(), Value::Bool(false));
    q.insert("llm_int8_has_fp16_weight".into(), Value::Bool(false));
    q.insert(
        "llm_int8_skip_modules".into(),
        match skip_modules {
            None => Value::Null,
            Some(m) => Value::Array(m.iter().map(|s| Value::String(s.clone())).collect()),
        },
    );
    q.insert("llm_int8_threshold".into(), Value::from(6.0f64));
    q.insert("load_in_4bit".into(), Value::Bool(true));
    q.insert("load_in_8bit".into(), Value::Bool(false));
    q.insert("quant_method".into(), Value::String("bitsandbytes".into()));
    Value::Object(q)
}
