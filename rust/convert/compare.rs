//! Comparing a converted checkpoint with its source: SQNR, cosine and the largest error per tensor.

use std::collections::HashSet;
use std::path::Path;

use rayon::prelude::*;

use crate::blockwise8;
use crate::dtype::{Element, FloatSlice, FloatSliceMut};
use crate::error::{Error, Result};
use crate::quant4;

use super::*;

/// Fidelity of one tensor of a converted checkpoint against its source.
#[derive(Clone, Debug, Default)]
pub struct CompareRow {
    pub name: String,
    pub shape: Vec<usize>,
    pub quant_type: Option<String>,
    pub numel: u64,
    /// Sum of squares of the source values.
    pub signal: f64,
    /// Sum of squared errors (decoded - source).
    pub noise: f64,
    /// Sum of squares of the decoded values, and of products decoded x source (for the cosine).
    pub decoded: f64,
    pub dot: f64,
    pub max_abs: f64,
    /// "quantized", "identical", "changed", "missing from source", "missing from output",
    /// or a mismatch description.
    pub status: String,
}

#[derive(Clone, Copy, Default)]
pub(crate) struct Stats {
    pub(crate) signal: f64,
    pub(crate) noise: f64,
    pub(crate) decoded: f64,
    pub(crate) dot: f64,
    pub(crate) max_abs: f64,
}

impl Stats {
    pub(crate) fn merge(a: Stats, b: Stats) -> Stats {
        Stats {
            signal: a.signal + b.signal,
            noise: a.noise + b.noise,
            decoded: a.decoded + b.decoded,
            dot: a.dot + b.dot,
            max_abs: a.max_abs.max(b.max_abs),
        }
    }

    pub(crate) fn of<T: Element>(src: &[T], out: &[f32]) -> Stats {
        let mut s = Stats::default();
        for (x, &y) in src.iter().zip(out) {
            let x = x.to_f32() as f64;
            let y = y as f64;
            let e = y - x;
            s.signal += x * x;
            s.noise += e * e;
            s.decoded += y * y;
            s.dot += x * y;
            s.max_abs = s.max_abs.max(e.abs());
        }
        s
    }

    pub(crate) fn of_slice(src: FloatSlice<'_>, lo: usize, out: &[f32]) -> Stats {
        let hi = lo + out.len();
        match src {
            FloatSlice::F32(v) => Stats::of(&v[lo..hi], out),
            FloatSlice::F16(v) => Stats::of(&v[lo..hi], out),
            FloatSlice::BF16(v) => Stats::of(&v[lo..hi], out),
        }
    }
}

/// Decodes every 4-bit weight of `dst` and compares it with the same tensor of `src`; kept
/// tensors are compared byte for byte. `progress` is called after each tensor (false cancels).
pub fn compare(dst: &Path, src: &Path, progress: &mut dyn FnMut(&Progress<'_>) -> bool) -> Result<Vec<CompareRow>> {
    crate::threads::init();
    let out = Checkpoint::open(dst)?;
    let reference = Checkpoint::open(src)?;
    let rows = inspect_checkpoint(&out)?;
    let conv1d = conv1d_model(reference.config()?.as_ref());
    let bytes_total: u64 = rows.iter().map(|r| r.bytes).sum();
    let mut bytes_done = 0u64;
    let mut result = Vec::with_capacity(rows.len());
    let mut seen = HashSet::new();
    for (i, row) in rows.iter().enumerate() {
        seen.insert(row.name.clone());
        let r = compare_row(&out, &reference, row, conv1d)?;
        result.push(r);
        bytes_done += row.bytes;
        let p = Progress { bytes_done, bytes_total, tensors_done: i + 1, tensors_total: rows.len(), tensor: &row.name };
        if !progress(&p) {
            return Err(cancelled(dst));
        }
    }
    for (_, t) in reference.tensors() {
        if !seen.contains(&t.name) {
            result.push(CompareRow {
                name: t.name.clone(),
                shape: t.shape.clone(),
                numel: t.numel() as u64,
                status: "missing from output".into(),
                ..CompareRow::default()
            });
        }
    }
    Ok(result)
}

pub(crate) fn compare_row(out: &Checkpoint, reference: &Checkpoint, row: &InspectRow, conv1d: bool) -> Result<CompareRow> {
    let mut r = CompareRow {
        name: row.name.clone(),
        shape: row.shape.clone(),
        numel: row.numel,
        quant_type: row.quant.as_ref().map(|q| q.quant_type.name().to_string()),
        ..CompareRow::default()
    };
    let Some((sfile, st)) = reference.tensor(&row.name) else {
        r.status = "missing from source".into();
        return Ok(r);
    };
    let Some(q) = &row.quant else {
        let (ofile, ot) = out.tensor(&row.name).expect("row from this checkpoint");
        let same = ot.dtype == st.dtype && ot.shape == st.shape && ofile.bytes(ot, 0, ot.nbytes())? == sfile.bytes(st, 0, st.nbytes())?;
        r.status = if same { "identical".into() } else { "changed".into() };
        ofile.release(ot);
        sfile.release(st);
        return Ok(r);
    };
    let Some(sdtype) = st.dtype.as_float() else {
        r.status = format!("source dtype {} is not float", st.dtype.name());
        return Ok(r);
    };
    if st.numel() as u64 != row.numel {
        r.status = format!("source shape {:?} differs", st.shape);
        return Ok(r);
    }
    let get = |suffix: &str| out.tensor(&format!("{}{suffix}", row.name));
    let qt = q.quant_type.name();
    let (pfile, pt) = get("").expect("row from this checkpoint");
    let (mfile, mt) = get(".quant_map").ok_or_else(|| Error::format(pfile.path(), format!("{:?} has no quant_map", row.name)))?;
    if f32_from_le(&mfile.bytes(mt, 0, mt.nbytes())?) != q.quant_type.code().to_vec() {
        r.status = format!("custom {qt} quant_map (not supported)");
        return Ok(r);
    }
    let (afile, at) = get(".absmax").ok_or_else(|| Error::format(pfile.path(), format!("{:?} has no absmax", row.name)))?;
    let n = row.numel as usize;
    let blocks = quant4::num_blocks(n, q.blocksize);
    let absmax: Vec<f32> = match q.nested_offset {
        Some(offset) => {
            let (nfile, nt) = get(".nested_absmax")
                .ok_or_else(|| Error::format(pfile.path(), format!("{:?} has no nested_absmax", row.name)))?;
            let (cfile, ct) = get(".nested_quant_map")
                .ok_or_else(|| Error::format(pfile.path(), format!("{:?} has no nested_quant_map", row.name)))?;
            let map: [f32; 256] = f32_from_le(&cfile.bytes(ct, 0, ct.nbytes())?).try_into().map_err(|_| {
                Error::format(cfile.path(), format!("{:?}.nested_quant_map must hold 256 float32", row.name))
            })?;
            let codes = afile.bytes(at, 0, at.nbytes())?;
            let nested = f32_from_le(&nfile.bytes(nt, 0, nt.nbytes())?);
            if codes.len() != blocks || nested.len() != blockwise8::nested_blocks(blocks) {
                return Err(Error::format(afile.path(), format!("{:?}: absmax sizes do not match shape {:?}", row.name, q.shape)));
            }
            let mut a = vec![0f32; blocks];
            blockwise8::double_dequantize(&codes, &nested, offset, &map, &mut a)?;
            a
        }
        None => f32_from_le(&afile.bytes(at, 0, at.nbytes())?),
    };
    let packed = pfile.bytes(pt, 0, pt.nbytes())?;
    if packed.len() != quant4::packed_len(n) || absmax.len() != blocks {
        return Err(Error::format(pfile.path(), format!("{:?}: packed/absmax sizes do not match shape {:?}", row.name, q.shape)));
    }
    let mut src = sfile.floats(st, sdtype)?;
    if stored_transposed(conv1d, &row.name, &st.shape) {
        src = transpose(src.slice(), st.shape[0], st.shape[1]);
    }
    let src_slice = src.slice();
    let bs = q.blocksize;
    let chunks = n.div_ceil(COMPARE_CHUNK);
    let stats = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let lo = c * COMPARE_CHUNK;
            let hi = (lo + COMPARE_CHUNK).min(n);
            let mut buf = vec![0f32; hi - lo];
            let p = &packed[lo / 2..quant4::packed_len(hi)];
            let a = &absmax[lo / bs..hi.div_ceil(bs)];
            quant4::dequantize_4bit(p, a, q.quant_type, bs, FloatSliceMut::F32(&mut buf)).map(|_| Stats::of_slice(src_slice, lo, &buf))
        })
        .try_reduce(Stats::default, |a, b| Ok(Stats::merge(a, b)))?;
    drop(src);
    pfile.release(pt);
    sfile.release(st);
    r.signal = stats.signal;
    r.noise = stats.noise;
    r.decoded = stats.decoded;
    r.dot = stats.dot;
    r.max_abs = stats.max_abs;
    r.status = "quantized".into();
    Ok(r)
}
