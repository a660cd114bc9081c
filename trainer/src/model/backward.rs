//! The hand-written training pass of [`BitNet`] (llm.c's structure, on candle tensor ops, so the
//! same code runs on every candle backend): a forward that keeps only what the backward reads,
//! then the backward, block by block in reverse, each block's record dropped as soon as it is
//! used.
//!
//! Kept per block and token between the two passes, f32: the block input and the residual after
//! attention (hidden each), q, k and v after RoPE, the attention output and one log-sum-exp per
//! query head, and the fused gate/up output (2F). At the 95M config that is 9,996 floats, 40 KB
//! per token per block. Everything else is recomputed from those: the norms, the activation
//! quantization, SiLU, the attention probabilities (in query blocks). The quantized weights are
//! computed once per step and kept (the parameters' size, independent of the batch). The LM head
//! and the loss run in row chunks ([`super::loss::head_loss_and_gradients`]), so the full logits
//! never exist, and its gradient is computed in the same pass.
//!
//! Gradients are those of the autograd path: the straight-through estimator for both quantizers,
//! the same forward values up to rounding (the summation order of the blocked softmax and of the
//! chunked loss; on the CPU the fused passes of [`crate::cpu`] and the exact int8 BitLinear
//! forward of [`crate::cpu::int8`]).

use candle_core::{Result, Tensor};

use super::attention::AttentionTape;
use super::mlp::MlpTape;
use super::rope::Rope;
use super::{BitNet, Block, Gradients, loss};

/// What one block's backward reads.
struct BlockTape {
    /// The block input `[batch, seq, hidden]`.
    x: Tensor,
    /// The residual stream after attention.
    x_mid: Tensor,
    attention: AttentionTape,
    feedforward: MlpTape,
}

impl Block {
    fn forward_taped(&self, x: Tensor, rope: &Rope, mask: &Tensor) -> Result<(Tensor, BlockTape)> {
        let (attention_out, attention) =
            self.attention
                .forward_taped(&self.pre_attn_norm.forward_untracked(&x)?, rope, mask)?;
        let x_mid = (&x + attention_out)?;
        let (feedforward_out, feedforward) = self
            .feedforward
            .forward_taped(&self.pre_ffn_norm.forward_untracked(&x_mid)?)?;
        let y = (&x_mid + feedforward_out)?;
        Ok((
            y,
            BlockTape {
                x,
                x_mid,
                attention,
                feedforward,
            },
        ))
    }

    /// `dy` at the block output -> `dx` at its input; the parameter gradients go to `grads`.
    fn backward(
        &self,
        tape: BlockTape,
        dy: Tensor,
        rope: &Rope,
        mask: &Tensor,
        grads: &mut Gradients,
    ) -> Result<Tensor> {
        let BlockTape {
            x,
            x_mid,
            attention,
            feedforward,
        } = tape;
        let normed = self.pre_ffn_norm.forward_untracked(&x_mid)?;
        let d_normed = self
            .feedforward
            .backward(feedforward, &normed, &dy, grads)?;
        let d_mid = (dy + self.pre_ffn_norm.backward(&x_mid, &d_normed, grads)?)?;
        drop(x_mid);
        let normed = self.pre_attn_norm.forward_untracked(&x)?;
        let d_normed = self
            .attention
            .backward(attention, &normed, &d_mid, rope, mask, grads)?;
        d_mid + self.pre_attn_norm.backward(&x, &d_normed, grads)?
    }
}

/// A forward pass of [`BitNet::forward_taped`] whose backward has not run yet: the loss, and what
/// the backward reads.
pub struct TrainingPass<'m> {
    model: &'m BitNet,
    loss: Tensor,
    /// The input tokens, flattened, `[batch * seq]`.
    ids: Tensor,
    tapes: Vec<BlockTape>,
    /// The residual stream after the last block, `[batch, seq, hidden]`.
    x: Tensor,
    /// Gradient at the output of the final norm.
    d_final: Tensor,
    /// Gradient of the LM head's use of the tied embedding.
    d_embedding: Tensor,
    mask: Tensor,
}

impl BitNet {
    /// The forward of the hand-written training pass on `tokens: [batch, seq]` (u32) from
    /// position 0: the mean next-token loss (as [`BitNet::loss`]), the LM head's gradients of
    /// `grad_scale * loss`, and the per-block records [`TrainingPass::backward`] reads.
    pub fn forward_taped(&self, tokens: &Tensor, grad_scale: f64) -> Result<TrainingPass<'_>> {
        if self.lm_head_t.is_some() {
            candle_core::bail!("the inference form of the model (freeze) has no gradients");
        }
        let (b, t) = tokens.dims2()?;
        if t < 2 || t > self.cfg.max_seq_length {
            candle_core::bail!(
                "a training sequence needs 2..={} tokens, got {t}",
                self.cfg.max_seq_length
            );
        }
        let hidden = self.cfg.hidden_size;
        let embedding = self.token_embeddings.detach();
        let ids = tokens.flatten_all()?;
        let mut x = embedding.index_select(&ids, 0)?.reshape((b, t, hidden))?;
        let mask = self.mask.narrow(0, 0, t)?.narrow(1, 0, t)?;
        let mut tapes = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (y, tape) = block.forward_taped(x, &self.rope, &mask)?;
            tapes.push(tape);
            x = y;
        }
        let h = self
            .final_norm
            .forward_untracked(&x)?
            .narrow(1, 0, t - 1)?
            .reshape((b * (t - 1), hidden))?;
        let targets = tokens.narrow(1, 1, t - 1)?.flatten_all()?;
        let (loss, dh, d_embedding) =
            loss::head_loss_and_gradients(&h, &embedding, &targets, grad_scale, self.matmul_dtype)?;
        // The last position has no target: zero gradient there.
        let d_final = dh.reshape((b, t - 1, hidden))?.pad_with_zeros(1, 0, 1)?;
        Ok(TrainingPass {
            model: self,
            loss,
            ids,
            tapes,
            x,
            d_final,
            d_embedding,
            mask,
        })
    }
}

impl TrainingPass<'_> {
    /// The mean next-token loss (0-dim, f32).
    pub fn loss(&self) -> &Tensor {
        &self.loss
    }

    /// The gradient of `grad_scale * loss` for every parameter of the model.
    pub fn backward(self) -> Result<Gradients> {
        let TrainingPass {
            model,
            ids,
            tapes,
            x,
            d_final,
            d_embedding,
            mask,
            ..
        } = self;
        let mut grads = Gradients::default();
        let mut dx = model.final_norm.backward(&x, &d_final, &mut grads)?;
        drop((x, d_final));
        for (block, tape) in model.blocks.iter().zip(tapes).rev() {
            dx = block.backward(tape, dx, &model.rope, &mask, &mut grads)?;
        }
        let hidden = model.cfg.hidden_size;
        let d_embedding = d_embedding.index_add(&ids, &dx.reshape(((), hidden))?, 0)?;
        grads.add(&model.token_embeddings, d_embedding)?;
        Ok(grads)
    }
}
