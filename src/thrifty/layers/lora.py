"""LoRA (with rsLoRA and DoRA) on our decoder, numerically the same as PEFT.

A LoraLinear wraps a frozen base layer (nn.Linear, NF4Linear or Int8Linear) and adds
`scaling * lora_B(lora_A(dropout(x)))`, where scaling = lora_alpha / r (or
lora_alpha / sqrt(r) with rsLoRA). Sub-module names are PEFT's (`base_layer`,
`lora_A`, `lora_B`, `lora_magnitude_vector`) minus PEFT's adapter-name level, so our
state-dict keys are PEFT's on-disk keys without the "base_model.model." prefix.

Precision: lora_A / lora_B (and DoRA's magnitude) are float32 master weights even
when the base is bf16, but the LoRA branch is computed in the activation dtype: the
weights are cast to it each forward (r*(in+out) values, negligible) and gradients flow
back into the fp32 masters. That is exactly what torch.autocast does for PEFT on a GPU
(bf16 matmuls with fp32 accumulation, fp32 optimizer state), and it is much cheaper on
CPU: for a 576->1536 layer, 1024 tokens, r=16, forward+backward took 3.7 ms for the
bf16 base alone, +2.5 ms with a bf16 branch, +6.8 ms with an fp32 branch (the
[tokens, out] fp32 temporaries and dtype casts cost more than the matmuls). The
branch's result has bf16's *relative* precision of the delta itself, so small early
updates are not lost against the base activations. With an fp32 base everything is
fp32 and matches PEFT to float rounding.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.layers.gguf_quant import GGUFEmbedding
from thrifty.layers.quant import QUANTIZED_LINEAR_TYPES, is_quantized

LINEAR_TYPES = (nn.Linear, *QUANTIZED_LINEAR_TYPES)
BIAS_OPTIONS = ("none",)  # PEFT also has "all" and "lora_only"; not supported yet


@dataclass
class LoraConfig:
    """PEFT's LoraConfig fields (the subset Thrifty implements), same names and defaults.

    target_modules: module-name suffixes (["q_proj", "v_proj"]; a full dotted name also
    works), "all-linear" for every linear layer of the decoder layers (not lm_head, as
    in PEFT), or any other string as a regular expression that must match a whole
    module name (PEFT's rule).
    rank_pattern / alpha_pattern: per-module r / lora_alpha overrides keyed by a
    regex matched against the end of the module name (PEFT's rule), mostly met when
    loading adapters trained elsewhere.
    """

    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ThriftyError(f"LoraConfig.r must be a positive integer (the adapter rank), got {self.r!r}.")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ThriftyError(f"LoraConfig.lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ThriftyError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in BIAS_OPTIONS:
            raise ThriftyError(f"LoraConfig.bias={self.bias!r} is not supported yet: use bias='none' "
                               f"(train only the LoRA matrices).")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                try:
                    re.compile(self.target_modules)
                except re.error as e:
                    raise ThriftyError(f"LoraConfig.target_modules={self.target_modules!r} is neither "
                                       f"'all-linear' nor a valid regular expression ({e}).") from e
        elif not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ThriftyError(f"LoraConfig.target_modules must be 'all-linear' or a non-empty list of "
                               f"module names such as ['q_proj', 'v_proj'], got {self.target_modules!r}.")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in pattern.items():
                if not isinstance(value, (int, float)) or value <= 0:
                    raise ThriftyError(f"LoraConfig.{name}[{key!r}] must be a positive number, got {value!r}.")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """r and lora_alpha for one module, after rank_pattern / alpha_pattern."""
        r, alpha = self.r, self.lora_alpha
        for key, value in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module_name):
                r = int(value)
                break
        for key, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module_name):
                alpha = value
                break
        return r, alpha


class LoraLinear(nn.Module):
    """y = base(x) + scaling * lora_B(lora_A(dropout(x))), or DoRA's rescaled version.

    The base layer is frozen; only lora_A, lora_B (and lora_magnitude_vector with
    DoRA) are trainable. `disabled = True` (or thrifty.layers.lora.disable_lora(model))
    gives the base layer's output, e.g. for GRPO's reference log-probs.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise ThriftyError(f"LoRA can wrap nn.Linear, NF4Linear or Int8Linear, not {type(base_layer).__name__}.")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        device = _device_of(base_layer)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        # PEFT's init: A as nn.Linear's default (kaiming-uniform, a=sqrt(5)), B zero, so
        # the wrapped model starts out exactly equal to the base model.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector: nn.Parameter | None = None
        if use_dora:
            # DoRA starts with m = ||W + scaling*B@A|| row-wise = ||W|| (B is zero).
            self.lora_magnitude_vector = nn.Parameter(self._weight_norm(self.delta_weight()))
        self.disabled = False
        self.merged = False
        self._merged_weight_norm: torch.Tensor | None = None  # DoRA: needed to unmerge

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    @property
    def plain_base(self) -> nn.Linear | None:
        """The base nn.Linear when this layer's output is its matmul plus the low-rank
        branch (unmerged, no DoRA, not quantized): what fused paths may compute directly."""
        if type(self.base_layer) is nn.Linear and not self.merged and not self.use_dora:
            return self.base_layer
        return None

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base layer's weight [out, in] in `dtype` (dequantized if quantized)."""
        if is_quantized(self.base_layer):
            return self.base_layer.dequantize(dtype)
        return self.base_layer.weight.to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float32: what merging adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _weight_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """Row norms of W + delta in fp32, detached (DoRA paper sec. 4.3, as PEFT)."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self.base_weight(torch.float32) + delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)  # 2-D matmuls only (DESIGN.md: 3-D bf16 trap)
        result = self.base_layer(x2d)
        if self.disabled or self.merged:
            if self.disabled and self.merged:
                raise ThriftyError("A LoRA layer is disabled while merged into its base weights, which "
                                   "would still apply the adapter: unmerge() it first (disable_lora(model) "
                                   "does this for you).")
            if self.merged and self.training and torch.is_grad_enabled():
                raise ThriftyError("A LoRA layer is merged into its base weights, so its adapters get no "
                                   "gradient: call unmerge() (or unmerge_adapters(model)) before training.")
            return result.view(*shape[:-1], self.out_features)
        dtype = result.dtype
        lora_x = self.lora_dropout(x2d)
        # Scale the [tokens, r] intermediate rather than the [tokens, out] result: same
        # value, r/out of the work.
        lora_a = F.linear(lora_x.to(dtype), self.lora_A.weight.to(dtype)) * self.scaling
        if self.lora_magnitude_vector is not None:
            lora_out = F.linear(lora_a, self.lora_B.weight.to(dtype))
            result = self._dora(lora_x, result, lora_out)
        else:
            # addmm adds the branch into the base output without a [tokens, out] temporary.
            result = torch.addmm(result, lora_a, self.lora_B.weight.to(dtype).t())
        return result.view(*shape[:-1], self.out_features)

    def _dora(self, lora_x: torch.Tensor, result: torch.Tensor, lora_out: torch.Tensor) -> torch.Tensor:
        """DoRA as PEFT computes it: m / ||W + sBA||_row * (W x + s B A x) + bias.

        The norm uses lora weights detached and gets no gradient (DoRA sec. 4.3).
        With dropout active PEFT multiplies W(dropout(x)) by (m/||.|| - 1), so the base
        term uses the same dropped-out input as the LoRA term; we do the same.
        """
        dtype = result.dtype
        delta = (self.lora_B.weight.detach() @ self.lora_A.weight.detach()) * self.scaling
        weight_norm = self._weight_norm(delta)
        mag_scale = (self.lora_magnitude_vector / weight_norm).to(dtype).view(1, -1)
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_no_bias = result if bias is None else result - bias.to(dtype)
        else:
            base_no_bias = F.linear(lora_x.to(dtype), self.base_weight(dtype))
        return result + (mag_scale - 1) * base_no_bias + mag_scale * lora_out

    # -- merging --------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the adapter into the base weight, so forward costs one matmul. Only for
        an nn.Linear base: a quantized weight cannot absorb an fp32 update (use
        merge_lora(model, dequantize=True))."""
        if self.merged:
            return
        if not isinstance(self.base_layer, nn.Linear):
            raise ThriftyError(f"Cannot merge LoRA into a quantized {type(self.base_layer).__name__}: "
                               f"use merge_lora(model, dequantize=True) to dequantize the base first.")
        weight = self.base_layer.weight
        with torch.no_grad():
            delta = self.delta_weight()
            w32 = weight.to(torch.float32)
            if self.lora_magnitude_vector is not None:
                norm = torch.linalg.vector_norm(w32 + delta, dim=1)
                self._merged_weight_norm = norm
                merged = (self.lora_magnitude_vector / norm).unsqueeze(1) * (w32 + delta)
            else:
                merged = w32 + delta
            weight.copy_(merged.to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Undo merge(). Exact in fp32; in bf16 the base weight comes back rounded
        (as in PEFT): merge for generation, unmerge, but do not do it every step."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            delta = self.delta_weight()
            w32 = weight.to(torch.float32)
            if self.lora_magnitude_vector is not None:
                factor = (self.lora_magnitude_vector / self._merged_weight_norm).unsqueeze(1)
                original = w32 / factor - delta
                self._merged_weight_norm = None
            else:
                original = w32 - delta
            weight.copy_(original.to(weight.dtype))
        self.merged = False

    def merged_linear(self, dequantize: bool = False, dtype: torch.dtype | None = None) -> nn.Linear:
        """A new plain nn.Linear with the adapter folded in (this module is left as is)."""
        base = self.base_layer
        if is_quantized(base):
            if not dequantize:
                raise ThriftyError(
                    f"Cannot merge LoRA into a quantized {type(base).__name__} without dequantizing: "
                    f"call merge_lora(model, dequantize=True); the merged weights are then in "
                    f"{base.compute_dtype} (the dtype the base had before quantization).")
            dtype = dtype or base.compute_dtype
        else:
            dtype = dtype or base.weight.dtype
        with torch.no_grad():
            w32 = self.base_weight(torch.float32)
            if not self.merged:
                delta = self.delta_weight()
                if self.lora_magnitude_vector is not None:
                    norm = torch.linalg.vector_norm(w32 + delta, dim=1)
                    w32 = (self.lora_magnitude_vector / norm).unsqueeze(1) * (w32 + delta)
                else:
                    w32 = w32 + delta
            bias = getattr(base, "bias", None)
            linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                               device=w32.device, dtype=dtype)
            linear.weight.copy_(w32)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        return f"{kind}: r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}"


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_layers(model))


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of the layers LoRA can wrap (not inside an existing LoRA layer)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LINEAR_TYPES) and ".lora_" not in f".{name}" and not name.endswith(".base_layer"):
            names.append(name)
    return names


def find_target_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """The module names `config.target_modules` selects, with an error that lists the
    choices when an entry matches nothing."""
    candidates = linear_module_names(model)
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in candidates})
    target = config.target_modules
    if target == "all-linear":
        # PEFT's all-linear: every linear layer except the output head.
        chosen = [n for n in candidates if n.startswith("model.layers.")]
    elif isinstance(target, str):
        chosen = [n for n in candidates if re.fullmatch(target, n)]
        if not chosen:
            raise ThriftyError(f"LoraConfig.target_modules regex {target!r} matches no linear layer. "
                               f"Layer names look like {candidates[0]!r}; available module names: "
                               f"{', '.join(suffixes)}.")
    else:
        chosen = []
        for entry in target:
            hits = [n for n in candidates if n == entry or n.endswith("." + entry)]
            if not hits:
                raise ThriftyError(f"LoraConfig.target_modules: no linear layer named {entry!r} in this "
                                   f"model. Available: {', '.join(suffixes)} (or 'all-linear').")
            chosen += hits
        chosen = [n for n in candidates if n in set(chosen)]  # model order, no duplicates
    if not chosen:
        raise ThriftyError("LoraConfig.target_modules selects no layer: this model has no linear layers "
                           "under model.layers.")
    return chosen


def apply_lora(model: nn.Module, config: LoraConfig, targets: list[str] | None = None) -> nn.Module:
    """Freeze every base parameter and wrap the target layers in LoraLinear, in place.

    targets: explicit module names to wrap (load_adapter uses the names in the adapter
    file); default: what config.target_modules selects.
    """
    if any(True for _ in lora_layers(model)):
        raise ThriftyError("apply_lora: this model already has LoRA layers. Use merge_lora(model) first, "
                           "or load the base model again.")
    names = find_target_modules(model, config) if targets is None else targets
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        r, alpha = config.rank_and_alpha(name)
        wrapped = LoraLinear(base, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapped)
    model.lora_config = config  # type: ignore[assignment]  # what save_adapter writes out
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, keyed like `model.layers.0.self_attn.q_proj.lora_A.weight`
    (PEFT's file keys without the "base_model.model." prefix)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        state[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
        if layer.lora_magnitude_vector is not None:
            state[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    if not state:
        raise ThriftyError("lora_state_dict: the model has no LoRA layers (call apply_lora first).")
    return state


def merge_lora(model: nn.Module, dequantize: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoraLinear by a plain nn.Linear with the adapter folded in, in place.

    A quantized base (NF4/int8) must be dequantized to merge: pass dequantize=True, and
    the merged layers get the dtype the base had before quantization (or `dtype`).
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ThriftyError("merge_lora: the model has no LoRA layers to merge.")
    quantized = [name for name, layer in layers if is_quantized(layer.base_layer)]
    if quantized and not dequantize:
        raise ThriftyError(f"merge_lora: {len(quantized)} LoRA layers (e.g. {quantized[0]!r}) have a quantized "
                           f"base. Merging needs full-precision weights: call merge_lora(model, "
                           f"dequantize=True), or load the base unquantized and load_adapter() onto it.")
    for name, layer in layers:
        linear = layer.merged_linear(dequantize=dequantize, dtype=dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def merge_adapters(model: nn.Module) -> None:
    """merge() every LoRA layer in place (fast generation); undo with unmerge_adapters."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model with every adapter off, e.g. GRPO's reference log-probs:

        with disable_lora(model), torch.no_grad():
            ref_logps = ...

    Merged layers are unmerged for the duration (and merged again afterwards).
    """
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ThriftyError("disable_lora: the model has no LoRA layers.")
    previous = [(layer.disabled, layer.merged) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        yield model
    finally:
        for layer, (was_disabled, was_merged) in zip(layers, previous):
            layer.disabled = was_disabled
            if was_merged:
                layer.merge()


@dataclass
class TrainableSummary:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> TrainableSummary:
    """Trainable vs all parameters, PEFT's print_trainable_parameters numbers.

    Quantized weights count as the number of parameters they stand for (not bytes),
    and tied weights count once.
    """
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    stored: set[int] = set()  # a tied GGUF embedding and head share one set of blocks
    for module in model.modules():
        if not (is_quantized(module) or isinstance(module, GGUFEmbedding)):
            continue
        blocks = getattr(module, "blocks", None)
        if blocks is not None:
            if blocks.data_ptr() in stored:
                continue
            stored.add(blocks.data_ptr())
        total += (module.num_embeddings * module.embedding_dim if isinstance(module, GGUFEmbedding)
                  else module.in_features * module.out_features)
    return TrainableSummary(trainable, total)
