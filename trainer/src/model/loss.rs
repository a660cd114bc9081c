//! Next-token cross-entropy: the composed form the autograd path differentiates
//! ([`cross_entropy`]), and the hand-written pass's tied LM head with its gradient in row chunks
//! ([`head_loss_and_gradients`]), which never holds the full logits.
//!
//! With `p = softmax(logits)` per row, the gradient of the mean loss over n rows is
//! `(p - onehot(target)) / n`; through `logits = h @ E^T` it gives `dh = dlogits @ E` and
//! `dE = dlogits^T @ h`.

use candle_core::{D, DType, Result, Tensor};

use super::matmul;
use crate::cpu::{self, RowMask};

/// Rows of the LM head computed at once by [`head_loss_and_gradients`]: a chunk's logits are
/// `1024 x vocab` f32 (131 MB at the LLaMA-2 vocabulary) whatever the batch.
const CHUNK_ROWS: usize = 1024;

/// `logits: [batch, seq, vocab]`, `tokens: [batch, seq]` -> mean cross-entropy of
/// `logits[:, :-1]` against `tokens[:, 1:]` over batch*(seq-1) positions.
pub fn next_token_loss(logits: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let logits = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    cross_entropy(&logits, &tokens.narrow(1, 1, t - 1)?.flatten_all()?)
}

/// `logits: [n, vocab]`, `targets: [n]` -> mean cross-entropy (0-dim). log-softmax is composed
/// from differentiable ops (the row max is a constant shift).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, D::Minus1)?;
    (log_sum_exp - picked)?.mean_all()
}

/// The tied LM head's mean cross-entropy without gradients (the inference form's loss, e.g. the
/// eval), `CHUNK_ROWS` rows at a time: `h: [n, hidden]`, `embedding: [vocab, hidden]`,
/// `targets: [n]` (u32) -> mean loss (0-dim). The same sums as [`head_loss_and_gradients`].
pub fn head_loss(h: &Tensor, embedding: &Tensor, targets: &Tensor, dtype: DType) -> Result<Tensor> {
    let n = h.dim(0)?;
    let mut loss_sum = Tensor::zeros((), DType::F32, h.device())?;
    for start in (0..n).step_by(CHUNK_ROWS) {
        let rows = CHUNK_ROWS.min(n - start);
        let logits = matmul(&h.narrow(0, start, rows)?, &embedding.t()?, dtype)?;
        let t_rows = targets.narrow(0, start, rows)?.unsqueeze(1)?;
        let picked = logits.gather(&t_rows, D::Minus1)?;
        loss_sum = (loss_sum + (log_sum_exp(&logits)? - picked)?.sum_all()?)?;
    }
    loss_sum / n as f64
}

/// The tied LM head's mean cross-entropy and its gradients, `CHUNK_ROWS` rows at a time:
/// `h: [n, hidden]` (final-normed hidden states), `embedding: [vocab, hidden]`, `targets: [n]`
/// (u32) -> (mean loss (0-dim), `dh: [n, hidden]`, `d_embedding: [vocab, hidden]`), the gradients
/// of `grad_scale * loss`.
pub fn head_loss_and_gradients(
    h: &Tensor,
    embedding: &Tensor,
    targets: &Tensor,
    grad_scale: f64,
    dtype: DType,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = h.dim(0)?;
    let per_row = grad_scale / n as f64;
    let mut loss_sum = Tensor::zeros((), DType::F32, h.device())?;
    let mut dh = Vec::with_capacity(n.div_ceil(CHUNK_ROWS));
    let mut d_embedding: Option<Tensor> = None;
    for start in (0..n).step_by(CHUNK_ROWS) {
        let rows = CHUNK_ROWS.min(n - start);
        let h_rows = h.narrow(0, start, rows)?;
        let t_rows = targets.narrow(0, start, rows)?.unsqueeze(1)?;
        let logits = matmul(&h_rows, &embedding.t()?, dtype)?;
        let lse = log_sum_exp(&logits)?;
        let picked = logits.gather(&t_rows, D::Minus1)?;
        loss_sum = (loss_sum + (&lse - picked)?.sum_all()?)?;
        let d_logits = loss_gradient(logits, &lse, &t_rows, per_row)?;
        dh.push(matmul(&d_logits, embedding, dtype)?);
        let g = matmul(&d_logits.t()?, &h_rows, dtype)?;
        d_embedding = Some(match d_embedding {
            Some(acc) => (acc + g)?,
            None => g,
        });
    }
    let d_embedding = match d_embedding {
        Some(d) => d,
        None => embedding.zeros_like()?,
    };
    Ok(((loss_sum / n as f64)?, Tensor::cat(&dh, 0)?, d_embedding))
}

/// `ln(sum(exp(x)))` of each row of `logits: [n, vocab]`, `[n, 1]`: `max + ln(sum(exp(x - max)))`
/// (one fused pass per row on the CPU, [`cpu::RowLogSumExp`]).
fn log_sum_exp(logits: &Tensor) -> Result<Tensor> {
    if cpu::fusable(logits) {
        return logits.contiguous()?.apply_op1_no_bwd(&cpu::RowLogSumExp {
            scale: 1.0,
            mask: RowMask::None,
        });
    }
    let max = logits.max_keepdim(D::Minus1)?;
    max.broadcast_add(
        &logits
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?,
    )
}

/// The gradient of `per_row * (lse - logit[target])` summed over the rows, at the logits:
/// `(softmax - onehot(target)) * per_row` (`logits` overwritten on the CPU).
fn loss_gradient(logits: Tensor, lse: &Tensor, targets: &Tensor, per_row: f64) -> Result<Tensor> {
    if cpu::fusable(&logits) && logits.is_contiguous() {
        logits.inplace_op3(
            lse,
            &targets.flatten_all()?.contiguous()?,
            &cpu::CrossEntropyBackward {
                per_row: per_row as f32,
            },
        )?;
        return Ok(logits);
    }
    let d = (logits.broadcast_sub(lse)?.exp()? * per_row)?;
    let rows = d.dim(0)?;
    d.scatter_add_set(
        targets,
        &Tensor::full(-per_row as f32, (rows, 1), d.device())?,
        D::Minus1,
    )?;
    Ok(d)
}
