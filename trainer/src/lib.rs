//! `trainer`: the BitNet b1.58 model in candle, trained on memory-mapped token shards.
pub mod instrument;
