"""Model-side pieces every stage must share exactly: the scalar reward model, forward and generate
wrappers, the first-EOS rule, dropout removal, masked statistics."""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

# ----------------------------------------------------------------------------------------------
# Detail 7: no dropout anywhere
# ----------------------------------------------------------------------------------------------
DROPOUT_CONFIG_KEYS = (
    "attention_dropout", "hidden_dropout", "classifier_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop",
    "summary_first_dropout", "dropout", "activation_dropout",
)


def dropout_free_config(config: PretrainedConfig) -> PretrainedConfig:
    """Detail 7: set every dropout probability of `config` to 0 (log-probs must be reproducible)."""
    for key in DROPOUT_CONFIG_KEYS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    return config


def disable_dropout(model: nn.Module) -> nn.Module:
    """Detail 7: set p = 0 on every `nn.Dropout` of `model` (also catches modules the config misses)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


# ----------------------------------------------------------------------------------------------
# Dtypes: decided here once; the loaders (training.load_causal_lm, ScalarModel.from_backbone /
# from_pretrained) take them as `dtype`, never the checkpoint's own `torch_dtype`.
# ----------------------------------------------------------------------------------------------
TRAINED_DTYPE = torch.float32
"""Trainable models (policy, critic, reward model, SFT and DPO policies) hold fp32 master weights whatever the
checkpoint says: Pythia's hub configs say float16, which transformers 5 would load as such, and AdamW would then
update fp16 weights with no fp32 copy. bf16 comes only from accelerate's mixed precision (autocast) or DeepSpeed,
both of which keep fp32 master weights. The released code (transformers 4.33) loaded every model in fp32."""

FROZEN_DTYPE = torch.float32
"""Frozen models (PPO's reference policy and reward model, DPO's reference, the reward model that scores
evaluation samples, the judge's and the token view's models) load in fp32 too: the released DPO reference ran in
fp32. The released PPO ran its reference policy and reward model as bf16 DeepSpeed inference engines under
--deepspeed; here that is `--frozen_models_config` with a bf16 accelerate yaml (DeepSpeed casts them on GPU)."""


# ----------------------------------------------------------------------------------------------
# Forward / generate on padded sequences (Detail 3.2: pad ids become 0 and are masked)
# ----------------------------------------------------------------------------------------------
def model_inputs(tokens: torch.Tensor, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Detail 3.2: inputs with pad ids replaced by 0 and `attention_mask = tokens != pad`.
    G-3: position ids are left to the model (not re-based for left padding, as the authors did)."""
    attention_mask = tokens != pad_token_id  # Detail G-3: no position_ids, so no re-basing for left pads
    return {"input_ids": tokens.masked_fill(~attention_mask, 0), "attention_mask": attention_mask}


def first_true_indices(bools: torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Index of the first True in each row of `bools` (B, T); T where a row has none."""
    row_len = bools.size(-1)
    positions = torch.arange(row_len, dtype=dtype, device=bools.device)
    return torch.where(bools, positions, row_len).min(-1).values


def truncate_after_eos(responses: torch.Tensor, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Detail 23.2: every token after the first EOS becomes the pad token (the EOS itself stays)."""
    eos = first_true_indices(responses == eos_token_id)  # Detail 23.2
    positions = torch.arange(responses.size(1), device=responses.device)
    return responses.masked_fill(positions[None, :] > eos[:, None], pad_token_id)


@torch.no_grad()
def generate(model: Any, queries: torch.Tensor, pad_token_id: int, response_length: int, temperature: float) -> torch.Tensor:
    """Sample exactly `response_length` tokens after left-padded `queries`; returns (B, response_length).

    Detail 23.1: EOS does not stop generation (no logits processor suppresses or stops at EOS: HF
    `generate` with `min_new_tokens` would forbid EOS until the last token under transformers 5).
    G-3: positions continue the training forward's (0..T-1 counting the left pads, never re-based), so
    the sampler and the training forward see the same positions. Uses the KV cache; a test checks the
    cached logits equal a full forward.
    """
    return sample(model, queries, pad_token_id, response_length, temperature)[0]


def sample(
    model: Any, queries: torch.Tensor, pad_token_id: int, response_length: int, temperature: float,
    generator: torch.Generator | None = None, sampler: Literal["multinomial", "inverse_cdf"] = "multinomial",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-length sampling from softmax(logits / temperature); returns (responses (B, L), their log-probs
    (B, L)). P-1: the rollout's log-probs come from the temperature-scaled scores that produced the tokens;
    only the sampled token's log-prob is kept (logit - logsumexp), never a full log-softmax.

    `sampler="inverse_cdf"` draws the same distribution from ONE uniform per row (`draw_tokens`) instead of
    `torch.multinomial`'s exponential noise over the whole vocabulary (the slowest step of sampling on CPU);
    it consumes the random stream differently, so the same seed gives other samples."""
    inputs = model_inputs(queries, pad_token_id)
    attention_mask = inputs["attention_mask"]
    batch, context = queries.shape
    positions = torch.arange(context, device=queries.device).expand(batch, -1)
    out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
    tokens, logprobs = [], []
    for step in range(response_length):  # Detail 23.1: a fixed number of tokens, EOS does not stop
        logits = out.logits[:, -1].float() / temperature  # P-1: the sampling scores
        token = draw_tokens(torch.softmax(logits, dim=-1), generator, sampler)
        tokens.append(token)
        logprobs.append(gather_logprobs(logits, token[:, 0]))
        if step == response_length - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        position = torch.full((batch, 1), context + step, device=queries.device)
        out = model(input_ids=token, attention_mask=attention_mask, position_ids=position,
                    past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, dim=1), torch.stack(logprobs, dim=1)


CPU_CHUNK_ELEMENTS = 1 << 18
"""vocabulary-sized rows per chunk on CPU: ~1 MiB of fp32, so every pass over a chunk stays in cache"""


def draw_tokens(probs: torch.Tensor, generator: torch.Generator | None = None, sampler: str = "multinomial") -> torch.Tensor:
    """One token per row of `probs` (B, V) -> (B, 1). "multinomial": `torch.multinomial`; "inverse_cdf": the
    first index whose cumulative probability (float64) exceeds u x total, u ~ U[0, 1) (a zero-probability
    token is never drawn)."""
    if sampler == "multinomial":
        return torch.multinomial(probs, 1, generator=generator)
    if sampler != "inverse_cdf":
        raise ValueError(f"sampler must be 'multinomial' or 'inverse_cdf', got {sampler!r}")
    cdf = probs.cumsum(-1, dtype=torch.float64)
    u = torch.rand(probs.size(0), 1, generator=generator, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.size(-1) - 1)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens] as `logit[token] - logsumexp(logits)`: the full log-softmax tensor is
    never materialised (a test proves it equal to the plain computation). On CPU the rows go through in
    cache-sized chunks, forward and backward (`_ChunkedLogprobs`; a test proves it equal, with gradients)."""
    logits = logits.float()
    if logits.device.type == "cpu" and logits.dim() >= 2 and logits.numel() > CPU_CHUNK_ELEMENTS:
        return _ChunkedLogprobs.apply(logits, tokens)
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _row_chunks(shape: torch.Size) -> list[tuple[Any, ...]]:
    """Indices of cache-sized chunks of rows of a (..., T, V) tensor; each is a contiguous slice even of a
    view such as `logits[:, :-1]`, so no copy is made."""
    rows = max(1, CPU_CHUNK_ELEMENTS // shape[-1])
    return [(*lead, slice(start, start + rows)) for lead in itertools.product(*map(range, shape[:-2])) for start in range(0, shape[-2], rows)]


class _ChunkedLogprobs(torch.autograd.Function):
    """`logits.gather(tokens) - logsumexp(logits)` and its gradient `onehot(tokens) - softmax(logits)`
    (times the incoming gradient), one cache-sized chunk of rows at a time: the plain autograd graph makes
    several full (B, L, V) passes and temporaries (subtract the max, exp, scatter into zeros, add)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        lse = logits.new_empty(logits.shape[:-1])
        picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        for index in _row_chunks(logits.shape):
            lse[index] = torch.logsumexp(logits[index], dim=-1)
        ctx.save_for_backward(logits, tokens, lse)
        return picked - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, tokens, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for index in _row_chunks(logits.shape):
            g = grad_logits[index]
            torch.sub(logits[index], lse[index].unsqueeze(-1), out=g)
            g.exp_().mul_(-grad[index].unsqueeze(-1))
            g.scatter_add_(-1, tokens[index].unsqueeze(-1), grad[index].unsqueeze(-1))
        return grad_logits, None


def response_logits(
    model: Any, query_responses: torch.Tensor, pad_token_id: int, context_length: int, temperature: float | None,
    skip_left_padding: bool = False,
) -> torch.Tensor:
    """The logits that predict the response tokens `query_responses[:, context_length:]` (B, L, V), divided
    by `temperature` (P-1; None leaves them unscaled). Vocabulary logits are computed only for those L
    positions (`logits_to_keep`), never for the query (a test proves it equal to a full forward).
    `skip_left_padding`: the backbone runs row by row without the query's left pads (`hidden_without_left_padding`)."""
    # The L positions before each response token, by index: no extra last row to slice off (and copy).
    keep = torch.arange(context_length - 1, query_responses.size(1) - 1, device=query_responses.device)
    if skip_left_padding:
        rows = hidden_without_left_padding(model.base_model, query_responses, pad_token_id, context_length,
                                           [context_length - 1] * len(query_responses), [query_responses.size(1) - 2] * len(query_responses))
        logits = model.get_output_embeddings()(torch.cat([hidden[:, keep - offset] for offset, hidden in rows]))
    else:
        logits = model(**model_inputs(query_responses, pad_token_id), logits_to_keep=keep).logits
    logits = logits if logits.dtype == torch.float32 else logits.float()
    # In place: the head's output is a fresh tensor its backward does not need (one vocabulary-sized temporary less).
    return logits.div_(temperature) if temperature is not None else logits


def hidden_without_left_padding(
    backbone: Any, tokens: torch.Tensor, pad_token_id: int, context_length: int, first_needed: list[int], last_needed: list[int],
) -> list[tuple[int, torch.Tensor]]:
    """Per row of `tokens` (B, T): the backbone's last hidden states (1, n, d) of the padded positions `offset ..
    last_needed[row]`, computed on the row without its query's left pads, and `offset` (<= `first_needed[row]`).

    The same numbers as the padded batch (a test proves it, with gradients): a pad is masked out of every
    real token's attention, positions after `last_needed` cannot change earlier ones (causal attention), and the
    position ids keep the padded positions (G-3: the first real token of a row with p pads sits at position p;
    rotary models such as Pythia see only relative positions, models with learned absolute positions need this).
    What it saves: the padded batch computes its left pads through every layer, ~30% of the positions of TL;DR
    queries; for a GPT-NeoX backbone (Pythia) and a row without pads inside it, the last layer also runs only for
    the positions from `first_needed` on (`_gpt_neox_last_layer_from`: ~1/num_layers of the work of the query
    positions; `offset` is then `first_needed`, else the row's start). The cost is B backbone calls of one row (a
    win on CPU, where the matmuls are the work; a loss where per-call overhead dominates, as for small batches on
    a GPU, hence a flag). The input embeddings are looked up once for the batch, so the backward builds one
    embedding gradient, not B. At most `context_length - 1` pads are skipped, so a row keeps its last query position."""
    from transformers import GPTNeoXModel

    inputs = model_inputs(tokens, pad_token_id)
    embeddings = backbone.get_input_embeddings()(inputs["input_ids"])
    starts = first_true_indices(tokens[:, :context_length] != pad_token_id).clamp(max=context_length - 1).tolist()
    rows = []
    for row, (start, first, last) in enumerate(zip(starts, first_needed, last_needed, strict=True)):
        if not start <= first <= last < tokens.size(1):
            raise ValueError(f"row {row}: needed positions {first}..{last} are not inside {start}..{tokens.size(1) - 1}")
        positions = torch.arange(start, last + 1, device=tokens.device)[None]  # G-3: the padded positions
        row_embeddings = embeddings[row : row + 1, start : last + 1]
        attention_mask = inputs["attention_mask"][row : row + 1, start : last + 1]
        if isinstance(backbone, GPTNeoXModel) and not backbone.gradient_checkpointing and bool(attention_mask.all()):
            rows.append((first, _gpt_neox_last_layer_from(backbone, row_embeddings, positions, first - start)))
        else:
            out = backbone(inputs_embeds=row_embeddings, attention_mask=attention_mask, position_ids=positions)
            rows.append((start, out.last_hidden_state))
    return rows


def _gpt_neox_last_layer_from(backbone: Any, embeddings: torch.Tensor, positions: torch.Tensor, first: int) -> torch.Tensor:
    """`GPTNeoXModel.forward` of one row without padding (so causal attention, no mask) whose caller needs the
    last hidden states of positions `first ..` only: every layer but the last runs as the model runs it; the last
    one computes its keys and values everywhere but its attention, dense, MLP and the final norm only for those
    positions (the same operations as `GPTNeoXLayer` / `GPTNeoXAttention`; a test proves the result equal)."""
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    hidden = backbone.emb_dropout(embeddings)
    rotary = backbone.rotary_emb(hidden, position_ids=positions)
    *layers, last = backbone.layers
    for layer in layers:
        hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
    attention = last.attention
    batch, length, _ = hidden.shape
    qkv = attention.query_key_value(last.input_layernorm(hidden)).view(batch, length, -1, 3 * attention.head_size).transpose(1, 2)
    query, key, value = qkv.chunk(3, dim=-1)
    query, key = apply_rotary_pos_emb(query, key, *rotary)
    # Query i of the kept ones sits at position first + i: it sees keys 0 .. first + i (causal, aligned bottom-right).
    allowed = torch.ones(length - first, length, dtype=torch.bool, device=hidden.device).tril(first)
    attended = torch.nn.functional.scaled_dot_product_attention(
        query[:, :, first:], key, value, attn_mask=allowed, dropout_p=attention.attention_dropout if attention.training else 0.0,
        scale=attention.scaling)
    attended = last.post_attention_dropout(attention.dense(attended.transpose(1, 2).reshape(batch, length - first, -1)))
    residual = hidden[:, first:]
    if last.use_parallel_residual:
        hidden = last.post_mlp_dropout(last.mlp(last.post_attention_layernorm(residual))) + attended + residual
    else:
        attended = attended + residual
        hidden = last.post_mlp_dropout(last.mlp(last.post_attention_layernorm(attended))) + attended
    return backbone.final_layer_norm(hidden)


def sequence_logprobs(model: Any, tokens: torch.Tensor, labels: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Sum of log p(token) over the positions where `labels` is not the pad id (the response tokens of a
    right-padded `query + response` whose `_response_label` column hides the query). Returns (B,)."""
    logits = model(**model_inputs(tokens, pad_token_id)).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != pad_token_id
    logprobs = gather_logprobs(logits, targets.masked_fill(~mask, 0))
    return (logprobs * mask).sum(1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: logsumexp(l) - sum(p * l). Without gradients on CPU it is
    computed as -sum(p * log p) in cache-sized chunks of rows (a test proves it equal to the plain formula)."""
    if logits.device.type != "cpu" or logits.dim() < 2 or logits.numel() <= CPU_CHUNK_ELEMENTS or (torch.is_grad_enabled() and logits.requires_grad):
        return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    entropy = logits.new_empty(logits.shape[:-1], dtype=torch.promote_types(logits.dtype, torch.float32))
    for index in _row_chunks(logits.shape):
        logp = torch.log_softmax(logits[index].float(), dim=-1)
        entropy[index] = -(logp.exp() * logp).sum(-1)
    return entropy


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of `values` over `mask`; biased (divided by the count) unless `unbiased` (Bessel's correction).

    The authors' `masked_var` defaults to unbiased, but their `masked_whiten` calls it with `unbiased=False`,
    so whitening (Details 24, 25) uses the biased variance: at 9 valid tokens the two scales differ by 5.7%."""
    count = mask.sum()
    if count < (2 if unbiased else 1):
        raise ValueError(f"the masked variance needs at least {2 if unbiased else 1} valid entries, got {int(count)}; "
                         "use a larger (mini)batch")
    centered = values - masked_mean(values, mask)
    variance = masked_mean(centered**2, mask)
    return variance * count / (count - 1) if unbiased else variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) over `mask` with the biased variance, as the released code's
    `masked_whiten` (Details 24, 25); `shift_mean=False` adds the mean back (the authors' reward whitening
    keeps the mean, only the scale changes)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask, unbiased=False)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


# ----------------------------------------------------------------------------------------------
# The scalar reward model (Details 11, 12, 15), defined once: reward.py trains it, ppo.py loads it.
# ----------------------------------------------------------------------------------------------
class ScalarModelConfig(PretrainedConfig):
    model_type = "sffd_scalar_model"

    def __init__(
        self, base_config: dict | None = None, base_model: str | None = None, bias: float = 0.0,
        normalization_stats: dict[str, float] | None = None, **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.base_config = base_config or {}
        """the backbone's config as a dict (its model_type picks the architecture)"""
        self.base_model = base_model
        """where the backbone came from (informational)"""
        self.bias = float(bias)
        """Detail 15: subtracted from every output so SFT references score 0 on average"""
        self.normalization_stats = dict(normalization_stats) if normalization_stats is not None else None
        """Detail 15: mean / std / min / max / count of the SFT references' scores under this model (after the
        bias, so the mean is ~0), as reward.py measured them; None when it did not normalise"""

    @property
    def backbone_config(self) -> PretrainedConfig:
        """The backbone's config without a dtype of its own: the backbone is built in the dtype the loader asked
        for (`ScalarModel.from_pretrained(dtype=...)`), never in the one the SFT checkpoint recorded."""
        base = {k: v for k, v in self.base_config.items() if k not in ("dtype", "torch_dtype")}
        return AutoConfig.for_model(base.pop("model_type"), **base)

    @property
    def hidden_size(self) -> int:
        return int(self.backbone_config.hidden_size)  # through the config class: GPT-2 names it n_embd


class ScalarModel(PreTrainedModel):
    """A transformers backbone + `Linear(d, 1)` head; `forward` returns the per-token scores minus `bias`.

    transformers 5 rule: the backbone is built from its config here and its weights come through the
    outer `from_pretrained` (never `from_pretrained` inside `__init__`), or checkpoints will not reload.
    """

    config_class = ScalarModelConfig
    base_model_prefix = "backbone"
    _no_split_modules: list[str] = []

    def __init__(self, config: ScalarModelConfig):
        super().__init__(config)
        self.backbone = AutoModel.from_config(dropout_free_config(config.backbone_config))
        self.scalar_head = nn.Linear(config.hidden_size, 1)
        self.post_init()
        self.reset_head()

    def reset_head(self) -> None:
        """Detail 11: head weight ~ N(0, 1/sqrt(d_model + 1)), bias 0."""
        with torch.no_grad():  # Detail 11
            self.scalar_head.weight.normal_(0.0, 1.0 / math.sqrt(self.config.hidden_size + 1))
            self.scalar_head.bias.zero_()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.scalar_head:
            self.reset_head()
        elif hasattr(self.backbone, "_init_weights"):
            self.backbone._init_weights(module)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return self.head(self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The scores of the backbone's last hidden states (..., d) -> (...)."""
        return self.scalar_head(hidden).squeeze(-1) - self.config.bias  # Detail 15

    @classmethod
    def from_pretrained(cls, *args: Any, dtype: torch.dtype = TRAINED_DTYPE, **kwargs: Any) -> ScalarModel:
        """transformers' `from_pretrained` in `dtype` (fp32 unless a frozen model asks for FROZEN_DTYPE), never the
        dtype the checkpoint's config records. A LoRA reward run's model/ (adapters, `lora.py`): its SFT backbone
        with the adapters merged in, the trained head, the saved bias and normalisation (Detail 15)."""
        from summarize_from_feedback_details import lora

        if args and lora.is_adapter_folder(args[0]):
            saved = cls.config_class.from_pretrained(args[0])
            model = cls.from_backbone(lora.adapter_base(args[0]), dtype)
            model.config.bias, model.config.normalization_stats = saved.bias, saved.normalization_stats
            return lora.merge_adapters(model, args[0])
        return super().from_pretrained(*args, dtype=dtype, **kwargs)

    @classmethod
    def from_backbone(cls, name_or_path: str, dtype: torch.dtype = TRAINED_DTYPE) -> ScalarModel:
        """Detail 10: a new reward model whose backbone is the (SFT) causal LM at `name_or_path`, in `dtype` (a LoRA
        SFT run's adapters: merged into their base first, `lora.py`)."""
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        from summarize_from_feedback_details import lora

        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the causal LM's output head is expectedly unused here
        try:
            if lora.is_adapter_folder(name_or_path):
                backbone = lora.load_merged(name_or_path, lambda base: AutoModelForCausalLM.from_pretrained(base, dtype=dtype)).base_model
            else:
                backbone = AutoModel.from_pretrained(name_or_path, dtype=dtype)
        finally:
            logging.set_verbosity(verbosity)
        config = ScalarModelConfig(base_config=backbone.config.to_dict(), base_model=name_or_path)
        model = cls(config).to(dtype)
        missing, unexpected = model.backbone.load_state_dict(backbone.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"backbone weights of {name_or_path} do not fit: missing {missing}, unexpected {unexpected}")
        return model


def sequence_scores(
    model: ScalarModel, tokens: torch.Tensor, pad_token_id: int, context_length: int = 0, skip_left_padding: bool = False,
) -> torch.Tensor:
    """Detail 12: the reward of each sequence is the head's output at its last non-pad token after
    `context_length` (the EOS for well-formed, right-padded responses). Returns (B,).
    `skip_left_padding` (needs `context_length`): one forward per row without its query's left pads."""
    # Detail 12: the last non-pad position of the response (right padding after EOS).
    last = first_true_indices(tokens[:, context_length:] == pad_token_id) - 1 + context_length
    if skip_left_padding and context_length > 0:
        needed = last.tolist()  # one position per row: the row is cut after it
        rows = hidden_without_left_padding(model.backbone, tokens, pad_token_id, context_length, needed, needed)
        return model.head(torch.cat([hidden[:, index - offset] for (offset, hidden), index in zip(rows, needed, strict=True)]))
    per_token = model(**model_inputs(tokens, pad_token_id))
    return per_token[torch.arange(tokens.size(0), device=tokens.device), last]


AutoConfig.register(ScalarModelConfig.model_type, ScalarModelConfig)
AutoModel.register(ScalarModelConfig, ScalarModel)
