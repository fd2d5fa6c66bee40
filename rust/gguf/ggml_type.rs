//! The ggml tensor types a GGUF file can hold: their ids, names and block layouts (every type is
//! stored as blocks of `block_len` elements in `block_bytes` bytes; plain floats are blocks of one).

/// A ggml tensor type (`enum ggml_type` in ggml.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    pub block_len: usize,
    pub block_bytes: usize,
    /// Whether [`crate::gguf::decode`] can turn it into floats.
    pub decodable: bool,
}

const fn t(id: u32, name: &'static str, block_len: usize, block_bytes: usize, decodable: bool) -> GgmlType {
    GgmlType { id, name, block_len, block_bytes, decodable }
}

/// Every type id the gguf package (0.19) knows; ids 4 and 5 were removed from ggml long ago.
const TYPES: [GgmlType; 34] = [
    t(0, "F32", 1, 4, true),
    t(1, "F16", 1, 2, true),
    t(2, "Q4_0", 32, 18, true),
    t(3, "Q4_1", 32, 20, true),
    t(6, "Q5_0", 32, 22, true),
    t(7, "Q5_1", 32, 24, true),
    t(8, "Q8_0", 32, 34, true),
    t(9, "Q8_1", 32, 40, false),
    t(10, "Q2_K", 256, 84, true),
    t(11, "Q3_K", 256, 110, true),
    t(12, "Q4_K", 256, 144, true),
    t(13, "Q5_K", 256, 176, true),
    t(14, "Q6_K", 256, 210, true),
    t(15, "Q8_K", 256, 292, false),
    t(16, "IQ2_XXS", 256, 66, false),
    t(17, "IQ2_XS", 256, 74, false),
    t(18, "IQ3_XXS", 256, 98, false),
    t(19, "IQ1_S", 256, 50, false),
    t(20, "IQ4_NL", 32, 18, false),
    t(21, "IQ3_S", 256, 110, false),
    t(22, "IQ2_S", 256, 82, false),
    t(23, "IQ4_XS", 256, 136, false),
    t(24, "I8", 1, 1, false),
    t(25, "I16", 1, 2, false),
    t(26, "I32", 1, 4, false),
    t(27, "I64", 1, 8, false),
    t(28, "F64", 1, 8, false),
    t(29, "IQ1_M", 256, 56, false),
    t(30, "BF16", 1, 2, true),
    t(34, "TQ1_0", 256, 54, false),
    t(35, "TQ2_0", 256, 66, false),
    t(39, "MXFP4", 32, 17, false),
    t(40, "NVFP4", 64, 36, false),
    t(41, "Q1_0", 128, 18, false),
];

pub const F32: GgmlType = TYPES[0];
pub const F16: GgmlType = TYPES[1];
pub const BF16: GgmlType = TYPES[28];

impl GgmlType {
    /// The type with this id, or None for an id ggml does not define.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().copied().find(|t| t.id == id)
    }

    /// Bytes of one row of `row_len` elements, or None if `row_len` is not a whole number of blocks.
    pub fn row_bytes(self, row_len: u64) -> Option<u64> {
        row_len.is_multiple_of(self.block_len as u64).then(|| row_len / self.block_len as u64 * self.block_bytes as u64)
    }

    /// Bits per element as stored.
    pub fn bits_per_element(self) -> f64 {
        8.0 * self.block_bytes as f64 / self.block_len as f64
    }

    /// "Q4_0, Q4_1, ..." : the names of the types the decoders handle.
    pub fn decodable_names() -> String {
        TYPES.iter().filter(|t| t.decodable).map(|t| t.name).collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        assert_eq!(GgmlType::from_id(3).unwrap().name, "Q4_1");
        assert_eq!(GgmlType::from_id(30).unwrap(), BF16);
        assert!(GgmlType::from_id(4).is_none() && GgmlType::from_id(u32::MAX).is_none());
        assert_eq!(GgmlType::from_id(14).unwrap().row_bytes(512), Some(420));
        assert_eq!(GgmlType::from_id(2).unwrap().row_bytes(33), None);
        assert_eq!(GgmlType::decodable_names(), "F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16");
    }
}
