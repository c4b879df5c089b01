"""Pre-LayerNorm transformers: a DeiT-tiny-sized ViT and a decoder-only byte-level language model.

Both stack ``depth`` identical blocks ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` (GELU MLP),
followed by a final LayerNorm. Attention uses one fused ``Dense(3 * width)`` for q, k, v and a
``Dense(width)`` output projection, so every weight is an ordinary 2-D matrix (the learned
optimizers' factored features see the same shapes as in an MLP). The blocks are a Python loop,
not ``nn.scan``: each layer keeps its own, unstacked parameters, and compile time on CPU stays a
few seconds (see the package's tests). No dropout. Kernels use Flax's default LeCun-normal
initialiser and biases zero; token/position embeddings, the class token and the output head's
kernel are N(0, 0.02^2), so the initial loss is close to log(num_classes) (a LeCun-normal head on
LayerNormed features would give logits of variance 1 and about 0.5 nats more).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from optax_localsgd.tasks.models import standardize

_embed_init = nn.initializers.normal(stddev=0.02)


class SelfAttention(nn.Module):
  """Multi-head self-attention on ``(B, L, width)``; causal if ``causal``."""
  num_heads: int
  causal: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, name="qkv")(x).reshape(b, length, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(head_dim))
    if self.causal:
      mask = jnp.tril(jnp.ones((length, length), bool))
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, width)
    return nn.Dense(width, name="proj")(out)


class Block(nn.Module):
  """One pre-LN transformer block: attention then a ``mlp_dim`` GELU MLP, both residual."""
  num_heads: int
  mlp_dim: int
  causal: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = x + SelfAttention(self.num_heads, self.causal, name="attn")(nn.LayerNorm(name="ln1")(x))
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.Dense(self.mlp_dim, name="fc1")(y)
    y = nn.Dense(width, name="fc2")(nn.gelu(y))
    return x + y


class ViT(nn.Module):
  """Vision transformer with a class token and learned position embeddings.

  Defaults are DeiT-tiny: width 192, depth 12, 3 heads, MLP 768. Images ``(B, H, W, C)`` of raw
  pixels are standardised, cut into ``patch_size`` x ``patch_size`` patches by a strided conv,
  prepended with the class token and added to position embeddings ``(1 + num_patches, width)``.
  Output: float32 logits ``(B, num_classes)`` from the final-LayerNormed class token.
  """
  patch_size: int = 4
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
  num_classes: int = 1000
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = standardize(x, self.mean, self.std)
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), (p, p), padding="VALID", name="patch_embed")(x)
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    cls = self.param("cls_token", _embed_init, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)
    x = x + self.param("pos_embed", _embed_init, (x.shape[1], self.width))
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim, name=f"block{i}")(x)
    x = nn.LayerNorm(name="ln_final")(x[:, 0])
    return nn.Dense(self.num_classes, kernel_init=_embed_init, name="head")(x)


class DecoderLM(nn.Module):
  """Decoder-only (causal) transformer language model over bytes.

  Defaults follow the paper's LM: width 192, 12 heads, 12 layers, MLP 4 x width; vocabulary 256
  (one token per byte), learned position embeddings for up to ``max_len`` positions, untied
  output projection. Input: token ids ``(B, L)`` (any integer dtype, ``L <= max_len``); output:
  float32 next-token logits ``(B, L, vocab_size)``.
  """
  vocab_size: int = 256
  max_len: int = 128
  width: int = 192
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 768

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
    x = nn.Embed(self.vocab_size, self.width, embedding_init=_embed_init, name="embed")(
        tokens.astype(jnp.int32))
    x = x + self.param("pos_embed", _embed_init, (self.max_len, self.width))[:length]
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim, causal=True, name=f"block{i}")(x)
    x = nn.LayerNorm(name="ln_final")(x)
    return nn.Dense(self.vocab_size, kernel_init=_embed_init, name="head")(x)
