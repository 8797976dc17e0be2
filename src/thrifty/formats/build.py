"""Turn a config and a checkpoint's tensors into a CausalLM, checking that they fit."""

from __future__ import annotations

import torch

from thrifty.errors import ThriftyError
from thrifty.model.config import ModelConfig
from thrifty.model.decoder import CausalLM, rope_inverse_frequencies


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], source: str) -> CausalLM:
    """Instantiate without initialising (meta device), then adopt the checkpoint tensors."""
    with torch.device("meta"):
        model = CausalLM(config)
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ThriftyError(
            f"{source}: {len(missing)} weights are missing, e.g. {missing[:3]}; "
            "the checkpoint does not match its config."
        )
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise ThriftyError(
                f"{source}: weight {name} has shape {tuple(state[name].shape)}, "
                f"but the config implies {tuple(shape)}."
            )
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Tensors computed in __init__ were created on meta: recompute them for real.
    model.inv_freq = rope_inverse_frequencies(config)
    return model
