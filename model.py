"""The phi-1 model: a GPT with parallel attention and MLP blocks and partial rotary.

One block, as in phi-1 (and Hugging Face's `PhiForCausalLM`):

    h = LayerNorm(x)
    x = x + Attention(h) + MLP(h)          # both branches read the same h

Attention uses rotary position embeddings on the first 32 of each head's 64
dims ("rotate-half" form, base 10000); the other 32 dims carry no position. The
MLP is fc1 -> gelu (tanh approximation) -> fc2 with 4x width. Every linear has a
bias, including the untied lm_head, and a final LayerNorm precedes it.

Because both branches read the same h, one GEMM computes [q | k | v | fc1] and
one GEMM computes [attn_out | gelu(fc1)] @ [W_dense; W_fc2]: `in_proj` and
`out_proj` below. Hugging Face's separate q/k/v/dense/fc1/fc2 weights are split
and joined in `to_hf_state_dict` / `from_hf_state_dict`, so phi-1 checkpoints
load one-to-one and ours export back to the same names. One difference in
training: residual dropout falls on the summed output of the joined GEMM, one
mask for both branches, where Hugging Face draws one mask per branch (the same
expectation, somewhat different noise).

Attention goes through one function, `attend`: the Triton FlashAttention kernel
of flash_attn_triton.py on CUDA, PyTorch's scaled_dot_product_attention
otherwise (CPU, padding masks, single-token decoding steps, or anything the
kernel rejects).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import numbers
import os
import pickle
import re
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tokenizer
from config import UserError, cache_dir, is_number

log = logging.getLogger("phi1")


@dataclass
class GPTConfig:
    n_layer: int = 24
    n_head: int = 32
    n_embd: int = 2048
    block_size: int = 2048  # context length
    vocab_size: int = 51200  # 50295 real tokens, padded to a multiple of 64
    rotary_dim: int = 32  # rotary on the first rotary_dim dims of each head
    rope_base: float = 10000.0
    dropout: float = 0.0  # attention and residual dropout while training
    layer_norm_eps: float = 1e-5
    attention: str = "auto"  # auto (Triton kernel on CUDA), sdpa, or triton

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


PRESETS = {
    # the paper's models (DESIGN.md); 1.42B and 357M parameters in all, as on the hub
    "phi-1": GPTConfig(n_layer=24, n_head=32, n_embd=2048, dropout=0.1),
    "phi-1-small": GPTConfig(n_layer=20, n_head=16, n_embd=1024, dropout=0.1),
    # small presets: one GPU for minutes, a CPU for minutes, tests for seconds
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=1024),
    "tiny": GPTConfig(n_layer=4, n_head=2, n_embd=128, block_size=256),
    "nano": GPTConfig(n_layer=2, n_head=1, n_embd=64, block_size=64),
}


# ---------------------------------------------------------------- attention

SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
_flash = None  # the flash_attn_triton module once imported, False if unavailable
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _flash_kernel():
    global _flash
    if _flash is None:
        try:
            import flash_attn_triton
            _flash = flash_attn_triton
        except ImportError as e:  # no triton installed
            _flash = False
            _warn_once(f"Triton FlashAttention unavailable ({e}); using PyTorch SDPA")
    return _flash


def attend(q, k, v, causal: bool, dropout_p: float = 0.0, mask=None, impl: str = "auto"):
    """Softmax attention over (batch, heads, seq, head_dim) tensors.

    With causal=True and fewer queries than keys (decoding with a KV cache), the
    queries are the last ones: query i sees keys j <= i + Tk - Tq. `mask`, a
    boolean (B, 1, Tq, Tk) tensor of allowed positions, replaces causal (padding).
    """
    # A single-token decoding step is too little work for the kernel: its launch
    # costs more host time than SDPA's, so "auto" leaves those steps to SDPA.
    if q.is_cuda and mask is None and (impl == "triton" or (impl == "auto" and q.shape[-2] > 1)):
        kernel = _flash_kernel()
        if kernel:
            reason = ("TRITON_INTERPRET is set: the interpreter, for the kernel's tests, would copy every call "
                      "to the host" if kernel.INTERPRET else kernel.unsupported_reason(q, k, v, dropout_p))
            if reason is None:
                return kernel.flash_attn_func(q, k, v, causal=causal, dropout_p=dropout_p)
            _warn_once(f"FlashAttention kernel rejected this call ({reason}); using PyTorch SDPA")
    elif impl == "triton" and not q.is_cuda:  # the interpreter is for the kernel's own tests
        _warn_once("the model runs the Triton FlashAttention kernel on CUDA only (not under TRITON_INTERPRET); "
                   "using PyTorch SDPA")
    elif impl == "triton":
        _warn_once("the Triton FlashAttention kernel takes no key mask (the decoding steps of generation, and "
                   "prompts of different lengths): using PyTorch SDPA for those calls")
    Tq, Tk = q.shape[-2], k.shape[-2]
    if causal and Tq != Tk and mask is None:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    if mask is not None:
        causal = False
    if q.is_cuda and mask is None:
        # PyTorch tries its FlashAttention-2 backend first; cuDNN's is faster on
        # Hopper (python flash_attn_triton.py). Each takes what the other rejects.
        with sdpa_kernel(SDPA_PRIORITY, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


def rotary_table(config: GPTConfig) -> torch.Tensor:
    """cos and sin of the rotary angles at every position: (block_size, 2, rotary_dim).

    Computed once: under torch.compile, angles computed in the forward were
    recomputed (pow, sin, cos) for every element of q and k."""
    r = config.rotary_dim
    half = torch.arange(0, r, 2, dtype=torch.float32)
    angles = torch.arange(config.block_size, dtype=torch.float32)[:, None] / config.rope_base ** (half / r)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of x (B, T, H, D) in "rotate-half" form:
    [x1 | x2] -> [x1 cos - x2 sin | x2 cos + x1 sin]; the other dims pass.

    Written with slices and concatenations: under torch.compile this trained
    faster on an H200 than one elementwise expression over the whole head with
    torch.roll (README, Speed)."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


# ---------------------------------------------------------------- the model

class KVCache:
    """Keys and values of every layer for a batch being decoded, preallocated.

    Two ways to fill it. A forward with `slot` None (the prompt) writes its T
    positions after the `length` filled so far and attends over those. A forward
    with `slot`, a one-element tensor holding a position, writes that position
    and attends over the whole cache under the caller's mask: every shape is then
    fixed, so one decoding step can be captured in a CUDA graph and replayed.
    """

    def __init__(self, config: GPTConfig, batch: int, length: int, device, dtype):
        shape = (config.n_layer, batch, config.n_head, length, config.head_dim)
        # zeros, not empty: masked-out slots still meet V in the attention matmul
        # (with weight 0), and 0 * NaN from uninitialised memory would be NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far by forwards without a slot
        self.slot: torch.Tensor | None = None


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        d = config.n_embd
        self.config = config
        self.ln = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.in_proj = nn.Linear(d, 7 * d)  # [q | k | v | fc1]
        self.out_proj = nn.Linear(5 * d, d, bias=False)  # [attn_out | gelu(fc1)] -> d
        self.attn_out_bias = nn.Parameter(torch.zeros(d))  # Hugging Face's dense.bias
        self.mlp_out_bias = nn.Parameter(torch.zeros(d))  # Hugging Face's fc2.bias

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, mask=None):
        B, T, d = x.shape
        cfg = self.config
        qkv, h = self.in_proj(self.ln(x)).split([3 * d, 4 * d], dim=-1)
        q, k, v = qkv.view(B, T, 3, cfg.n_head, cfg.head_dim).unbind(2)  # (B, T, H, D) views
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D) views
        if cache is not None and cache.slot is not None:  # one decoding step, fixed shapes
            cache.k[layer].index_copy_(2, cache.slot, k.to(cache.k.dtype))
            cache.v[layer].index_copy_(2, cache.slot, v.to(cache.v.dtype))
            k, v = cache.k[layer], cache.v[layer]
        elif cache is not None:
            start = cache.length
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k, v = cache.k[layer, :, :, :start + T], cache.v[layer, :, :, :start + T]
        dropout_p = cfg.dropout if self.training else 0.0
        y = attend(q, k, v, causal=True, dropout_p=dropout_p, mask=mask, impl=cfg.attention)
        y = y.transpose(1, 2).reshape(B, T, d)
        mixed = torch.cat([y, F.gelu(h, approximate="tanh")], dim=-1)
        out = F.linear(mixed, self.out_proj.weight, self.attn_out_bias + self.mlp_out_bias)
        return x + F.dropout(out, dropout_p, self.training)


# Hugging Face PhiForCausalLM's tensors of a layer: the first four are joined into in_proj
_HF_IN_PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"]
_HF_LAYER_TENSORS = [f"{module}.{kind}" for module in [*_HF_IN_PROJ, "self_attn.dense", "mlp.fc2", "input_layernorm"]
                     for kind in ("weight", "bias")]


def _in_eval_mode(method):
    """method with dropout off, the model given back in the mode it was in: train.py and
    finetune.py sample mid-training, and greedy output must not depend on the mode."""
    @functools.wraps(method)
    def in_eval_mode(self, *args, **kwargs):
        training = self.training
        self.eval()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.train(training)
    return in_eval_mode


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config = runnable(replace(config), "GPTConfig")  # the model's own copy, shared by its blocks, may be changed
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.register_buffer("rotary", rotary_table(config), persistent=False)
        self.apply(self._init_weights)
        for block in self.layers:  # GPT-2's scaled init of the projections into the residual
            nn.init.normal_(block.out_proj.weight, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_context(self, block_size: int) -> None:
        """Train or sample at another context length: rotary positions learn no table."""
        self.config.block_size = block_size
        self.rotary = rotary_table(self.config).to(self.rotary.device)

    def num_params(self, embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embedding else n - self.embed_tokens.weight.numel()

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per weight that multiplies (all but the
        embedding lookup) plus attention's 12 * layers * width * context, counted
        whole although causal attention skips half (nanoGPT's and PaLM's MFU, which
        DESIGN.md's reference figures use)."""
        c = self.config
        return 6 * self.num_params(embedding=False) + 12 * c.n_layer * c.n_embd * c.block_size

    def hidden_states(self, idx, positions, cache=None, mask=None):
        """The last layer's normalised outputs (..., T, n_embd) before lm_head:
        what generation feeds lm_head and what filter.py embeds code with."""
        cos, sin = self.rotary[positions].unsqueeze(-3).unbind(-2)  # (..., T, 1, rotary_dim): any head
        x = self.embed_tokens(idx)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i, mask)
        if cache is not None and cache.slot is None:
            cache.length += idx.shape[1]
        return self.final_layernorm(x)

    def forward(self, idx, targets=None):
        """Logits (B, T, vocab) for token ids idx (B, T); with targets (B, T), also
        the mean cross-entropy over the positions whose target is not -1 (0 if none is:
        a finetuning window can hold prompt tokens only)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.block_size})")
        x = self.hidden_states(idx, torch.arange(T, device=idx.device))
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            targets = targets.reshape(-1)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets, ignore_index=-1,
                                   reduction="sum") / (targets != -1).sum().clamp(min=1)
        return logits, loss

    # ------------------------------------------------------------ generation

    @_in_eval_mode
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int], temperature: float = 0.0,
                 top_p: float = 1.0, stop: str | list[str] | None = None, seed: int | None = None,
                 on_token: Callable[[int, int | None], None] | None = None) -> list[list[int]]:
        """Continue each prompt; returns the new tokens of each.

        Prompts of different lengths are left-padded into one batch, with
        positions counted from each prompt's first real token and the padding
        masked out of attention. Each layer's keys and values are cached, so
        every step feeds one token per row. A row ends at <|endoftext|> (not
        returned), when its new text contains a stop string (`stop`: one string
        or a list; the tokens that completed it are returned: cut the text with
        tokenizer.cut_at_stop), or after max_new_tokens (one number for every
        row, or a list of one per row); the batch ends when all rows have.
        temperature 0 is greedy; otherwise nucleus sampling.
        on_token(row, token), if given, sees each new token as it is kept, then
        on_token(row, None) as the row ends (a server streams the tokens and
        answers each row as soon as it is complete). Logits gone NaN or infinite
        (float16 overflowing) raise FloatingPointError. Dropout is off, whatever the mode.
        """
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, (list, tuple)) and p for p in prompts)):
            raise ValueError("generate needs a list of prompts, each a list of at least one token id")
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
        if not (isinstance(budgets, list) and len(budgets) == len(prompts)  # True is an int, not a budget
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in budgets)):
            raise ValueError(f"max_new_tokens must be an integer >= 0 or a list of one per prompt, "
                             f"not {max_new_tokens!r}")
        if not (0 <= temperature < math.inf and 0 <= top_p <= 1):  # nan fails both
            raise ValueError(f"temperature must be finite and >= 0, top_p in [0, 1]; not {temperature}, {top_p}")
        if not all(isinstance(t, numbers.Integral) and 0 <= t < self.config.vocab_size for p in prompts for t in p):
            raise ValueError(f"prompt token ids must be integers in [0, {self.config.vocab_size})")
        if not (seed is None or isinstance(seed, numbers.Integral)):
            raise ValueError(f"seed must be an integer or None, not {seed!r}")
        B, device = len(prompts), self.lm_head.weight.device
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        T0, most = int(lengths.max()), max(budgets)
        total = T0 + max(most - 1, 0)  # positions fed to the model: the last new token never is
        if total > self.config.block_size:
            what = (f"prompt ({T0} tokens) + max_new_tokens ({most})" if isinstance(max_new_tokens, int) else
                    f"the longest prompt ({T0} tokens) + the largest max_new_tokens ({most}), both of which "
                    f"the rows' one cache must hold,")
            raise ValueError(f"{what} exceeds the context of {self.config.block_size} by "
                             f"{total - self.config.block_size}")
        new_tokens: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B

        def end(row: int) -> None:
            done[row] = True
            if on_token is not None:
                on_token(row, None)

        for row in range(B):  # a row with no budget ends before any work
            if budgets[row] == 0:
                end(row)
        idx = torch.zeros(B, T0, dtype=torch.long, device=device)
        for row, p in enumerate(prompts):
            idx[row, T0 - len(p):] = torch.tensor(p, dtype=torch.long)
        pad = T0 - lengths
        positions = (torch.arange(total, device=device)[None] - pad[:, None]).clamp(min=0)
        padded = bool((pad > 0).any())
        real_key = torch.arange(total, device=device)[None] >= pad[:, None]  # (B, total)

        prompt_mask = None
        if padded:
            qi = torch.arange(T0, device=device)[:, None]
            kj = torch.arange(T0, device=device)[None]
            allowed = (kj <= qi) & (real_key[:, None, :T0] | (kj == qi))
            prompt_mask = allowed[:, None]  # (B, 1, T0, T0); a pad query sees itself only

        generator = torch.Generator(device=device)  # without a seed, one drawn from torch's RNG
        generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed % 2**64)  # any int
        # under autocast (train.py samples its float32 model in bf16) q is in the
        # autocast dtype: a cache in the same dtype keeps k and v in it too
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else next(self.parameters()).dtype)
        cache = KVCache(self.config, B, total, device, dtype)
        x = self.hidden_states(idx, positions[:, :T0], cache, prompt_mask)
        logits = self.lm_head(x[:, -1])

        # Decoding feeds one token per row at a position held in a tensor, so every
        # step has the same shapes. On a GPU the step is captured once in a CUDA
        # graph and replayed: one launch instead of hundreds of small kernels whose
        # host-side cost would otherwise dominate a step.
        ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        cache.slot = torch.full((1,), T0, dtype=torch.long, device=device)
        key_index = torch.arange(total, device=device)

        def decode_step():
            mask = (real_key & (key_index <= cache.slot))[:, None, None]  # (B, 1, 1, total)
            x = self.hidden_states(ids, positions.index_select(1, cache.slot), cache, mask)
            return self.lm_head(x[:, -1])

        if device.type == "cuda" and most > 2 and not torch.is_autocast_enabled("cuda"):
            try:
                decode_step = _cuda_graph(decode_step, device)
            except RuntimeError as e:  # an op this torch or GPU cannot capture: still correct, slower
                _warn_once(f"CUDA graph capture failed ({str(e)[:200]}); decoding step by step")

        stop = tokenizer.stop_strings(stop)
        window = max((len(s.encode(errors="surrogatepass")) for s in stop), default=0) + 1  # tokens to decode for a check
        for t in range(most):
            # activations past float16's range: found in the one sync a step has (tolist), not another
            finite = logits.isfinite().all(dim=-1)
            logits[:, tokenizer.VOCAB_SIZE:] = -float("inf")  # padding rows of the vocabulary
            next_ids = sample(logits.float().where(finite[:, None], 0.0), temperature, top_p, generator)
            for row, token in enumerate(next_ids.where(finite, -1).tolist()):
                if done[row]:
                    continue
                if token < 0:
                    name = str(dtype).removeprefix("torch.")
                    raise FloatingPointError(f"the logits went NaN or infinite in {name} (activations beyond its "
                                             f"range): run the model in float32 or bfloat16 (--dtype=float32)")
                if token == tokenizer.EOT:
                    end(row)
                    continue
                new_tokens[row].append(token)
                if on_token is not None:
                    on_token(row, token)
                if (len(new_tokens[row]) == budgets[row]
                        or stop and any(s in tokenizer.decode(new_tokens[row][-window:]) for s in stop)):
                    end(row)
            if all(done):  # at the latest once the longest budget is spent
                break
            ids.copy_(next_ids[:, None])
            cache.slot.fill_(T0 + t)
            logits = decode_step()
        return new_tokens

    # ------------------------------------------------------------ checkpoints

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "GPT":
        """A model from a checkpoint written by train.py or finetune.py."""
        ckpt = load_checkpoint(path)
        try:
            model = cls.from_state_dict(config_from_dict(ckpt["config"], path), ckpt["model"])
        except ValueError as e:  # the weights of another architecture
            raise ValueError(f"{path} does not hold a phi-1 model of this code ({e})") from None
        return model.to(device).eval()

    @classmethod
    def from_state_dict(cls, config: GPTConfig, state_dict: dict) -> "GPT":
        """A model of config holding state_dict (ours, as a checkpoint keeps it) in float32, as
        the model it came from trained, on the CPU; built without the random init it would
        overwrite (20 s for phi-1). A ValueError names the first tensor that does not fit."""
        with torch.device("meta"):
            model = cls(config)
        weights = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                   for k, v in state_dict.items()}
        try:
            model.load_state_dict(weights, assign=True)
        except RuntimeError as e:  # missing, unexpected or misshapen tensors
            raise ValueError(_first_problem(e)) from None
        model.rotary = rotary_table(config)  # not a weight: still on meta
        return model

    # ------------------------------------------------------------ Hugging Face

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under Hugging Face PhiForCausalLM's names."""
        d = self.config.n_embd
        sd = {"model.embed_tokens.weight": self.embed_tokens.weight,
              "model.final_layernorm.weight": self.final_layernorm.weight,
              "model.final_layernorm.bias": self.final_layernorm.bias,
              "lm_head.weight": self.lm_head.weight, "lm_head.bias": self.lm_head.bias}
        for i, block in enumerate(self.layers):
            p = f"model.layers.{i}."
            sd[p + "input_layernorm.weight"] = block.ln.weight
            sd[p + "input_layernorm.bias"] = block.ln.bias
            for name, w, b in zip(_HF_IN_PROJ, block.in_proj.weight.split([d, d, d, 4 * d]),
                                  block.in_proj.bias.split([d, d, d, 4 * d])):
                sd[p + name + ".weight"], sd[p + name + ".bias"] = w, b
            dense, fc2 = block.out_proj.weight.split([d, 4 * d], dim=1)
            sd[p + "self_attn.dense.weight"], sd[p + "self_attn.dense.bias"] = dense, block.attn_out_bias
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = fc2, block.mlp_out_bias
        return {k: v.detach().contiguous() for k, v in sd.items()}

    @classmethod
    def from_hf_state_dict(cls, state_dict: dict, config: GPTConfig | None = None) -> "GPT":
        """A model holding a PhiForCausalLM state dict. Without a config, it is read
        from the tensors' shapes, with phi-1's head size of 64 and rotary on 32 dims.
        Tensors that need no joining are taken as they are (load_state_dict's assign):
        the model shares their memory. A tensor with no place here is an error."""
        sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
        integer = next((k for k, v in sd.items() if not v.is_floating_point()), None)
        if integer:  # cast to floats, its values would be garbage weights
            raise ValueError(f"{integer} holds {sd[integer].dtype} values: phi-1's weights are floating point "
                             f"(a quantized checkpoint?)")
        if config is None:
            if "model.embed_tokens.weight" not in sd:
                raise ValueError("not a PhiForCausalLM state dict: model.embed_tokens.weight is missing")
            vocab, d = sd["model.embed_tokens.weight"].shape
            n_layer = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")), default=-1)
            if n_layer == 0:
                raise ValueError("not a PhiForCausalLM state dict: it has no model.layers")
            config = runnable(GPTConfig(n_layer=n_layer, n_head=d // 64, n_embd=d, vocab_size=vocab),
                              "the shapes of the state dict")
        try:
            ours = {"embed_tokens.weight": sd["model.embed_tokens.weight"],
                    "final_layernorm.weight": sd["model.final_layernorm.weight"],
                    "final_layernorm.bias": sd["model.final_layernorm.bias"],
                    "lm_head.weight": sd["lm_head.weight"], "lm_head.bias": sd["lm_head.bias"]}
            for i in range(config.n_layer):
                p, o = f"model.layers.{i}.", f"layers.{i}."
                ours[o + "ln.weight"] = sd[p + "input_layernorm.weight"]
                ours[o + "ln.bias"] = sd[p + "input_layernorm.bias"]
                ours[o + "in_proj.weight"] = torch.cat([sd[p + n + ".weight"] for n in _HF_IN_PROJ])
                ours[o + "in_proj.bias"] = torch.cat([sd[p + n + ".bias"] for n in _HF_IN_PROJ])
                ours[o + "out_proj.weight"] = torch.cat([sd[p + "self_attn.dense.weight"],
                                                         sd[p + "mlp.fc2.weight"]], dim=1)
                ours[o + "attn_out_bias"] = sd[p + "self_attn.dense.bias"]
                ours[o + "mlp_out_bias"] = sd[p + "mlp.fc2.bias"]
        except KeyError as e:
            raise ValueError(f"not a PhiForCausalLM state dict: {e.args[0]} is missing") from None
        except RuntimeError as e:  # tensors of one layer that torch.cat cannot join
            raise ValueError(f"the tensors of model.layers.{i} do not fit together ({_first_problem(e)})") from None
        placed = {f"model.layers.{i}.{n}" for i in range(config.n_layer) for n in _HF_LAYER_TENSORS}
        placed |= {"model.embed_tokens.weight", "model.final_layernorm.weight", "model.final_layernorm.bias",
                   "lm_head.weight", "lm_head.bias"}
        extra = sorted(k for k in sd if k not in placed and "rotary_emb" not in k)
        if extra:  # q/k layernorms, another layer count, another model's weights
            raise ValueError(f"{extra[0]} (and {len(extra) - 1} more) has no place in a phi-1 model")
        with torch.device("meta"):  # no time spent on a random init that is overwritten
            model = cls(config)
        dtype = sd["lm_head.weight"].dtype
        try:
            model.load_state_dict({k: v.to(dtype) for k, v in ours.items()}, assign=True)
        except RuntimeError as e:  # tensors of other sizes than the config's (config.json's)
            raise ValueError(f"the tensors do not fit the model their config describes ({_first_problem(e)})") from None
        model.rotary = rotary_table(config).to(sd["lm_head.weight"].device)  # not a weight: still on meta
        return model

    @classmethod
    def from_pretrained(cls, name_or_path: str, device="cpu") -> "GPT":
        """A model from Hugging Face phi weights: a hub id such as "microsoft/phi-1"
        (downloaded once, then cached), a local folder with config.json and
        *.safetensors, or a checkpoint of ours (a .pt file)."""
        if not str(name_or_path).strip():  # Path("") would be the current folder
            raise FileNotFoundError("no model named (an empty path)")
        path = Path(name_or_path).expanduser()  # --ckpt=~/x reaches us unexpanded
        if path.is_file() and path.suffix in (".safetensors", ".json"):
            if (path.parent / "config.json").exists():
                raise ValueError(f"{path} is one file of a Hugging Face model: pass its folder, {path.parent}")
            raise ValueError(f"{path} is not a model: give a checkpoint (.pt), or a Hugging Face model's folder "
                             f"(config.json and *.safetensors) or hub id")
        if path.suffix == ".pt" or path.is_file():
            return cls.from_checkpoint(path, device)
        if path.exists() and not path.is_dir():  # a device or a pipe (/dev/null)
            raise ValueError(f"{name_or_path} is neither a checkpoint file nor a model's folder")
        if not path.is_dir() and not looks_like_hub_id(str(name_or_path)):
            raise FileNotFoundError(f"no such checkpoint or folder: {name_or_path}")
        if path.is_dir() and not (path / "config.json").exists():
            if (path / "ckpt.pt").exists():
                raise FileNotFoundError(f"a training folder (ckpt.pt, no config.json): pass {path / 'ckpt.pt'}")
            raise FileNotFoundError(f"{path} holds no config.json: not a Hugging Face model's folder (nor a "
                                    f"checkpoint, a .pt file)")
        folder = path if path.is_dir() else download_hf(name_or_path)
        config = config_from_hf(_read_json(folder / "config.json"), folder / "config.json")
        # transformers' order: model.safetensors, else the shards an index names (a sharded
        # checkpoint overwritten by one file may have left its index), else any weights
        single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
        files = ([single] if single.exists() else _shard_files(index) if index.exists()
                 else sorted(folder.glob("*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no .safetensors weights in {folder}")
        state_dict = {}
        for f in files:
            try:
                state_dict.update(read_safetensors(f))
            except ValueError as e:
                if path.is_dir() or whole_safetensors(f):  # a whole file of a dtype we lack: fetched alike again
                    raise
                raise ValueError(f"{e}; remove {folder} to download it again") from None  # damaged in the cache
        return cls.from_hf_state_dict(state_dict, config).to(device).eval()

    def save_pretrained(self, folder) -> None:
        """Write config.json and model.safetensors that transformers' PhiForCausalLM loads.
        A sharded checkpoint saved there before (its index and the shards it names) is
        removed, so that no loader can take its weights for these."""
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        # read first: a damaged index stops the export before anything is written
        stale = [f for f in _shard_files(index) if f.name != "model.safetensors"] if index.exists() else []
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / "model.safetensors", self.to_hf_state_dict())
        dtype = str(self.lm_head.weight.dtype).removeprefix("torch.")
        (folder / "config.json").write_text(json.dumps({**hf_config_from(self.config), "torch_dtype": dtype}, indent=2))
        for f in stale:
            f.unlink(missing_ok=True)
        index.unlink(missing_ok=True)


# ---------------------------------------------------------------- helpers

def _first_problem(e: RuntimeError) -> str:
    """The first problem load_state_dict's many-line error lists."""
    lines = str(e).strip().splitlines()
    return (lines[1] if len(lines) > 1 else lines[0]).strip().rstrip(".")[:200]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # UnicodeDecodeError too
        raise ValueError(f"{path} is not JSON ({e})") from None


def weight_files(path: Path) -> list[Path]:
    """The local files whose contents a model named path stands for (to tell when it
    changed): the file itself, or of a folder what from_pretrained may read, its
    config.json, safetensors index and .safetensors files (others there, such as an
    output folder put inside it, are not the model). [] for what is not here (a hub id)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_file() and (
        p.suffix == ".safetensors" or p.name in ("config.json", "model.safetensors.index.json")))


def _shard_files(index: Path) -> list[Path]:
    """The shard files a model.safetensors.index.json names, each a file of its folder."""
    content = _read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(f, str) and f.endswith(".safetensors")
                                                 and f == Path(f).name for f in weight_map.values())):
        raise ValueError(f"{index} has no weight_map naming .safetensors files beside it: "
                         f"not a safetensors index, or a damaged one")
    return sorted({index.parent / f for f in weight_map.values()})


def _cuda_graph(fn, device: torch.device):
    """fn, which works on device, captured in a CUDA graph: the returned function
    replays it and returns fn's output tensor, which every replay overwrites in place."""
    with torch.cuda.device(device):  # the streams are the current device's, which may be another (cuda:1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm-up outside the graph: lazy initialisation, kernel choices
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # sample.py's server decodes off the main thread
            out = fn()

    def replay():
        graph.replay()
        return out
    return replay


GREEDY_BELOW = 1e-4  # lower temperatures are greedy: logits / T would overflow float32


def derived_seed(*parts) -> int:
    """A seed for generate() from a run's seed and what the draw is for (a batch, a problem's
    sample), below 2**31 (as some servers want a request's): a sum such as seed + batch would
    give seed 1338's first batch the draws of seed 1337's second."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """One token id per row of logits (B, V): argmax at temperature 0 (or below
    GREEDY_BELOW), else from the smallest set of most likely tokens whose probability
    reaches top_p."""
    if not temperature >= GREEDY_BELOW:  # NaN too
        return logits.argmax(dim=-1)
    # above float32's range T is inf, and the vocabulary's padding rows' -inf / inf is nan:
    # any T past 1e30 samples as that one does, uniformly over the tokens
    probs = torch.softmax(logits / min(temperature, 1e30), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        drop = before >= top_p
        drop[..., 0] = False  # the most likely token always stays (a top_p that rounds to 0 in float32)
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def config_from_dict(d: dict, source="the checkpoint") -> GPTConfig:
    """The config a checkpoint saved (asdict of ours), or a ValueError naming source."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: its config is a {type(d).__name__}, not a dict (not a phi1 checkpoint?)")
    known = {f.name for f in fields(GPTConfig)}
    return runnable(GPTConfig(**{k: v for k, v in d.items() if k in known}), source)


def runnable(c: GPTConfig, source) -> GPTConfig:
    """c, or a ValueError naming source and the first of its shapes this model cannot run
    (which would otherwise fail at the first forward, as a reshape error)."""
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "rotary_dim"):
        value = getattr(c, key)
        if not (type(value) is int and value > 0):
            raise ValueError(f"{source}: {key} is {value!r}, not a positive integer")
    problems = [(c.n_embd % c.n_head, f"a width of {c.n_embd} does not split into {c.n_head} heads"),
                (c.rotary_dim > c.head_dim or c.rotary_dim % 2,
                 f"rotary on {c.rotary_dim} dims of a head of {c.head_dim}: it takes an even number, at most "
                 f"the head's"),
                (not (is_number(c.dropout) and 0 <= c.dropout < 1), f"dropout {c.dropout!r} is not in [0, 1)"),
                (c.attention not in ("auto", "sdpa", "triton"),
                 f"attention {c.attention!r} is not auto, sdpa or triton"),
                (not (is_number(c.rope_base) and is_number(c.layer_norm_eps) and c.rope_base > 0 and c.layer_norm_eps > 0),
                 f"rope_base {c.rope_base!r} and layer_norm_eps {c.layer_norm_eps!r} must be positive numbers")]
    for bad, what in problems:
        if bad:
            raise ValueError(f"{source}: {what}")
    return c


def rotary_fraction(rotary_dim: int, head_dim: int) -> float:
    """config.json's partial_rotary_factor for rotary_dim dims of a head: transformers
    takes int(factor * head_dim) dims, so the factor must not fall a hair short (30/44
    does: int(0.6818... * 44) is 29)."""
    factor = rotary_dim / head_dim
    while int(factor * head_dim) < rotary_dim:
        factor = math.nextafter(factor, math.inf)
    return factor


def config_from_hf(c: dict, source="config.json") -> GPTConfig:
    """Our config from a Hugging Face phi config.json, or a ValueError naming what in
    it this model is not (another activation, q/k LayerNorms, scaled rotary, GQA, ...)."""
    if not isinstance(c, dict):
        raise ValueError(f"{source} holds a JSON {type(c).__name__}, not the object of a Hugging Face config")
    try:
        n_embd, n_head = c["hidden_size"], c["num_attention_heads"]
        n_layer, vocab_size = c["num_hidden_layers"], c["vocab_size"]
    except KeyError as e:
        hint = " (phi-msft checkpoints need converting to PhiForCausalLM's)" if c.get("model_type") != "phi" else ""
        raise ValueError(f"{source} has no {e.args[0]}: not a Hugging Face phi config{hint}") from None
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if not (type(c[key]) is int and c[key] > 0):  # "64" would fail later, as something else
            raise ValueError(f"{source}: {key} is {c[key]!r}, not a positive integer")
    for key in ("rope_scaling", "rope_parameters"):
        if not isinstance(c.get(key) or {}, dict):
            raise ValueError(f"{source}: {key} is {c[key]!r}, not an object")
    rope = {**c, **(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}  # transformers 5 nests it
    numeric = [(rope, "partial_rotary_factor", 0.5), (rope, "rope_theta", 10000.0), (c, "layer_norm_eps", 1e-5)]
    for where, key, default in numeric:
        if not is_number(where.get(key, default)):  # null, "0.5" or true would fail later, as something else
            raise ValueError(f"{source}: {key} is {where[key]!r}, not a number")
    refused = [(c.get("model_type", "phi") != "phi", f"model_type {c.get('model_type')!r}"),
               (c.get("hidden_act", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"),
                f"hidden_act {c.get('hidden_act')!r}"),
               (bool(c.get("qk_layernorm")), "qk_layernorm"),
               (bool(c.get("tie_word_embeddings")), "tie_word_embeddings (lm_head sharing the embedding)"),
               (rope.get("rope_type", rope.get("type", "default")) != "default", "scaled rotary (rope_scaling)"),
               (c.get("num_key_value_heads") not in (None, n_head), "grouped-query attention"),
               (c.get("intermediate_size") not in (None, 4 * n_embd), "an MLP width other than 4x")]
    for bad, what in refused:
        if bad:
            raise ValueError(f"{source}: {what} is not phi-1's architecture, which this model implements")
    return runnable(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                              block_size=c.get("max_position_embeddings", 2048), vocab_size=vocab_size,
                              # as transformers reads it, whose model these weights are
                              rotary_dim=int(rope.get("partial_rotary_factor", 0.5) * (n_embd // n_head)),
                              rope_base=rope.get("rope_theta", 10000.0),
                              layer_norm_eps=c.get("layer_norm_eps", 1e-5),
                              dropout=float(c.get("resid_pdrop") or 0.0)),  # ours: attention's and the residual's
                    source)


def hf_config_from(c: GPTConfig) -> dict:
    return {"architectures": ["PhiForCausalLM"], "model_type": "phi",
            "hidden_size": c.n_embd, "intermediate_size": 4 * c.n_embd,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_head, "max_position_embeddings": c.block_size,
            "vocab_size": c.vocab_size, "partial_rotary_factor": rotary_fraction(c.rotary_dim, c.head_dim),
            "rope_theta": c.rope_base, "layer_norm_eps": c.layer_norm_eps,
            "hidden_act": "gelu_new", "tie_word_embeddings": False, "qk_layernorm": False,
            "resid_pdrop": c.dropout, "embd_pdrop": 0.0, "attention_dropout": c.dropout,
            "bos_token_id": tokenizer.EOT, "eos_token_id": tokenizer.EOT, "torch_dtype": "float32"}


def pick_device(name: str) -> torch.device:
    """--device: auto (the GPU if there is one), cpu, cuda, cuda:1, ...; one line for a bad name."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device={name} (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device={name}, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device={name}: only cpu and cuda devices are supported")
    return device


def load_for_tokens(name: str, what: str | None = None) -> GPT:
    """GPT.from_pretrained(name) for a script that feeds it the tokenizer's ids (sample,
    evaluate, filter through load_model; train and finetune), or one line naming `what`
    (default: name) and why not: unreadable or damaged weights, or a vocabulary without
    all of the tokenizer's ids."""
    what = what or name
    try:
        model = GPT.from_pretrained(name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # OSError holds FileNotFound, Connection
        raise UserError(f"cannot load {what}: {' '.join(str(e).split())[:300]}") from None
    if model.config.vocab_size < tokenizer.VOCAB_SIZE:
        raise UserError(f"cannot use {what}: its vocabulary of {model.config.vocab_size} ids is smaller than "
                        f"the tokenizer's {tokenizer.VOCAB_SIZE} (phi-1's; a model of another tokenizer?)")
    return model


def load_model(name: str, device: torch.device, dtype: torch.dtype, setting: str = "--ckpt") -> GPT:
    """Weights ready for inference (our .pt, a Hugging Face folder or hub id) on device in
    dtype, or one line, naming the setting that gave them, saying why not."""
    model = load_for_tokens(name, f"{setting}={name}").to(device=device, dtype=dtype).eval()
    model.config.attention = "auto"  # how the checkpoint trained (triton): here, what suits this device
    # Weights that went NaN in training, or that overflow float16, would only show as
    # garbage text and a pass@k of zero: say so here instead.
    broken = next((n for n, t in model.state_dict().items() if not torch.isfinite(t).all()), None)
    if broken is not None:
        raise UserError(f"cannot use {setting}={name}: {broken} holds NaN or infinite values in {dtype}")
    return model


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: auto (bfloat16 on GPUs that have it, else float16 on a GPU, float32
    on the CPU), float32, bfloat16 or float16."""
    if name == "auto":
        # (torch emulates bfloat16 on older GPUs, slowly: there float16 with a loss scale)
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if bf16 else torch.float16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, not {name!r}")
    return dtypes[name]


def load_checkpoint(path) -> dict:
    """A training checkpoint (a dict with "model" and "config"), with a clear error
    for a file that is missing, truncated or not one of ours."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (not a checkpoint)")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles before failing on them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's many-line message suggests an unsafe load instead
        raise ValueError(f"{path} is not a readable checkpoint (not a file of tensors that torch.save wrote)") from None
    except Exception as e:
        if not isinstance(e, OSError) and not zipfile.is_zipfile(path):  # torch.save's zip: its directory ends it
            raise ValueError(f"{path} is not a readable checkpoint (not a whole file that torch.save wrote: "
                             f"cut short, damaged, or another kind of file)") from None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a phi1 checkpoint (no model and config inside)")
    config_from_dict(ckpt["config"], path)  # a config this model can run
    return ckpt


# ---------------------------------------------------------------- safetensors

# The format: 8 bytes little-endian header length, a JSON header mapping each
# tensor name to {dtype, shape, data_offsets}, then the raw bytes.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, each in memory of its own, or a ValueError
    naming the file (truncated, a git-lfs pointer, a dtype torch lacks)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(b"version "):  # "version https://git-lfs.github.com/spec/v1"
            raise ValueError(f"{path} is a git-lfs pointer, not the weights (run: git lfs pull)")
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        if 8 + n > size:
            raise ValueError(f"{path} is not a safetensors file, or is truncated")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            header = None
        if not isinstance(header, dict):
            raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            # a damaged header would otherwise fail below as a bare KeyError, TypeError or reshape error
            info = info if isinstance(info, dict) else {}
            lacking = next((k for k in ("dtype", "shape", "data_offsets") if k not in info), None)
            if lacking:
                raise ValueError(f"{path}: the header entry of {name} has no {lacking} (a damaged file?)")
            if not isinstance(info["dtype"], str) or info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{path}: {name} has dtype {info['dtype']}, which this reader does not take")
            dtype, shape, offsets = _ST_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                    and isinstance(offsets, list) and len(offsets) == 2
                    and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
                raise ValueError(f"{path}: the header entry of {name} has a malformed shape {shape} "
                                 f"or data_offsets {offsets} (a damaged file?)")
            start, end = offsets
            if 8 + n + end > size:
                raise ValueError(f"{path} is truncated: {name} ends past the end of the file")
            nbytes = math.prod(shape) * dtype.itemsize
            if end - start != nbytes:
                raise ValueError(f"{path}: {name} has shape {shape} in {info['dtype']}, {nbytes} bytes, "
                                 f"but {end - start} bytes of data (a damaged file?)")
            data = bytearray(end - start)
            f.seek(8 + n + start)
            f.readinto(data)
            t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(shape)
    return out


def whole_safetensors(path: Path) -> bool:
    """Whether path is as long as its safetensors header says: 8 bytes, the header, and the
    data up to the last tensor's end (a download cut short, or a page that is no weights, is not)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if 8 + n > size:
                return False
            header = json.loads(f.read(n))
        end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
        return size == 8 + n + end
    except (struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError):  # no header, or a damaged one
        return False


def write_safetensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors one at a time (the header first, from shapes): no second copy of
    the model in memory."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    # transformers before 4.48 fails on a file without it (metadata.get on None)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        if t.dtype not in names:
            raise ValueError(f"{name}: safetensors has no {t.dtype}")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)


def looks_like_hub_id(name: str) -> bool:
    """"owner/name", neither part a folder here: a path with a typo is not sent to the hub."""
    parts = name.split("/")
    return (len(parts) == 2 and all(re.fullmatch(r"[\w][\w.-]*", p) for p in parts)
            and not Path(parts[0]).is_dir())


def download_hf(repo: str) -> Path:
    """Fetch a hub repo's config.json and safetensors weights over plain HTTPS,
    once; later calls read the cache ($PHI1_CACHE, default ~/.cache/phi1)."""
    import requests
    from tqdm import tqdm

    cache = cache_dir() / "hub" / repo
    base = f"https://huggingface.co/{repo}/resolve/main/"

    def fetch(name: str, required: bool = True) -> Path | None:
        target = cache / name
        if target.exists():
            return target
        try:
            # uncompressed, so that Content-Length is the file's size, to check it came whole
            r = requests.get(base + name, stream=True, timeout=30, headers={"Accept-Encoding": "identity"})
        except requests.RequestException as e:
            reason = e  # the innermost (no such host, refused): urllib3's wrappings of it run to 300 characters
            while reason.__cause__ or reason.__context__:
                reason = reason.__cause__ or reason.__context__
            raise ConnectionError(f"cannot download {repo} from the Hugging Face hub ({reason}); "
                                  f"pass a local folder with config.json and *.safetensors instead") from None
        with r:
            if r.status_code == 404 and not required:
                return None
            if r.status_code != 200:
                raise ConnectionError(f"{base + name}: HTTP {r.status_code}")
            cache.mkdir(parents=True, exist_ok=True)  # only for a repo that exists
            tmp = target.with_suffix(f"{target.suffix}.{os.getpid()}.part")  # processes may race
            size = int(r.headers.get("content-length", 0)) or None
            try:
                with open(tmp, "wb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=name) as bar:
                    for chunk in r.iter_content(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
                    if size and f.tell() < size:  # cached, it would fail for ever as truncated
                        raise ConnectionError(f"{base + name}: the download ended after {f.tell()} of its "
                                              f"{size} bytes; try again")
                if name.endswith(".safetensors") and not whole_safetensors(tmp):  # sent without a size
                    raise ConnectionError(f"{base + name}: the download is not a whole safetensors file "
                                          f"(cut short?); try again")
            except BaseException:  # Ctrl-C too: a partial file of gigabytes left in the cache for ever
                tmp.unlink(missing_ok=True)
                raise
        os.replace(tmp, target)
        return target

    fetch("config.json")
    if (cache / "model.safetensors").exists():  # one file, complete: nothing to ask the hub
        return cache
    index = fetch("model.safetensors.index.json", required=False)
    if index is None:
        fetch("model.safetensors")
    else:
        for shard in _shard_files(index):
            fetch(shard.name)
    return cache
