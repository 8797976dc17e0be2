"""Score a model on a task's held-out problems with the task's own exact checker.

    result = evaluate_task(model, tokenizer, get_task("arithmetic"), num_samples=100, k=4)
    result.accuracy      # greedy: the fraction of problems solved
    result.pass_at_k     # sampled: unbiased pass@k (Chen et al. 2021), if k > 0

The GRPO trainer uses the same function before and after training, so the numbers it
reports are the ones `thrifty eval` prints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from thrifty.generation.engine import generate_tokens, render_prompt
from thrifty.generation.sampling import SamplingParams
from thrifty.grpo.tasks.common import Row, Task
from thrifty.model.decoder import CausalLM
from thrifty.model.inference_plan import InferencePlan
from thrifty.model.tokenizer import Tokenizer

# Prompts per generate_tokens call: bounds the KV cache, keeps decode batches efficient.
EVAL_BATCH_PROMPTS = 32


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}.")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class EvalResult:
    num_problems: int
    accuracy: float  # greedy
    mean_length: float  # greedy completion tokens
    k: int = 0
    num_samples_per_problem: int = 0
    pass_at_k: float | None = None
    format_rate: float | None = None  # greedy completions in the task's format, where it has one
    seconds: float = 0.0
    examples: list[dict[str, Any]] = field(default_factory=list)  # a few (prompt, completion, correct)

    def summary(self) -> str:
        text = f"accuracy {self.accuracy:.1%} (greedy, {self.num_problems} problems)"
        if self.format_rate is not None:
            text += f", format {self.format_rate:.0%}"
        if self.pass_at_k is not None:
            text += f", pass@{self.k} {self.pass_at_k:.1%} ({self.num_samples_per_problem} samples each)"
        return text + f", mean length {self.mean_length:.1f} tokens, {self.seconds:.1f}s"


def complete(model: CausalLM, tokenizer: Tokenizer, prompts: Sequence[Any], *, max_new_tokens: int,
             sampling: SamplingParams, num_return_sequences: int = 1, seed: int = 0,
             system_prompt: str | None = None, max_prompt_length: int | None = None,
             plan: InferencePlan | None = None) -> list[tuple[str, list[int]]]:
    """(text, token ids) of each completion, prompt-major, generated in batches. Prompts
    longer than max_prompt_length keep their last tokens, as in training. plan: the
    model's current InferencePlan (None: one is built for these batches)."""
    chat = tokenizer.chat_template is not None
    plan = plan or InferencePlan.build(model)
    out: list[tuple[str, list[int]]] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), EVAL_BATCH_PROMPTS):
        batch = prompts[start:start + EVAL_BATCH_PROMPTS]
        ids = [render_prompt(tokenizer, p, chat, system_prompt, max_prompt_length) for p in batch]
        tokens, _ = generate_tokens(model, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                    num_return_sequences=num_return_sequences, seed=seed + start,
                                    stop_token_ids=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id,
                                    plan=plan)
        out += [(tokenizer.decode(t, skip_special_tokens=True), t) for t in tokens]
    model.train(was_training)
    return out


def evaluate_rows(model: CausalLM, tokenizer: Tokenizer, task: Task, rows: Sequence[Row], *,
                  max_new_tokens: int = 64, k: int = 0, num_samples_per_problem: int | None = None,
                  temperature: float = 0.7, top_p: float = 1.0, seed: int = 0,
                  system_prompt: str | None = None, num_examples: int = 3,
                  max_prompt_length: int | None = None, plan: InferencePlan | None = None) -> EvalResult:
    """Greedy accuracy on `rows`, plus pass@k from sampled completions when k > 0."""
    started = time.perf_counter()
    plan = plan or InferencePlan.build(model)
    prompts = [row["prompt"] for row in rows]
    greedy = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens, sampling=SamplingParams(),
                      seed=seed, system_prompt=system_prompt, max_prompt_length=max_prompt_length, plan=plan)
    correct = [task.check(text, row) for (text, _), row in zip(greedy, rows)]
    result = EvalResult(num_problems=len(rows), accuracy=sum(correct) / max(len(rows), 1),
                        mean_length=sum(len(ids) for _, ids in greedy) / max(len(rows), 1))
    follows_format = getattr(task, "follows_format", None)
    if follows_format is not None:
        result.format_rate = sum(follows_format(text) for text, _ in greedy) / max(len(rows), 1)
    result.examples = [{"prompt": p, "completion": text, "correct": ok}
                       for p, (text, _), ok in zip(prompts[:num_examples], greedy, correct)]
    if k > 0:
        n = num_samples_per_problem or k
        sampled = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                           sampling=SamplingParams(temperature=temperature, top_p=top_p),
                           num_return_sequences=n, seed=seed + 1, system_prompt=system_prompt,
                           max_prompt_length=max_prompt_length, plan=plan)
        scores = []
        for i, row in enumerate(rows):
            c = sum(task.check(text, row) for text, _ in sampled[i * n:(i + 1) * n])
            scores.append(pass_at_k(n, c, k))
        result.k, result.num_samples_per_problem = k, n
        result.pass_at_k = sum(scores) / max(len(scores), 1)
    result.seconds = time.perf_counter() - started
    return result


def merge_eval_results(parts: Sequence[EvalResult]) -> EvalResult:
    """One result from results on disjoint shares of the problems (torchrun's ranks, in
    order): rates weighted by each share's problems, the slowest share's time."""
    n = sum(p.num_problems for p in parts)
    if len(parts) == 1:
        return parts[0]

    def mean(values: list[float | None]) -> float | None:
        if any(v is None for v in values):
            return None
        return sum(v * p.num_problems for v, p in zip(values, parts)) / max(n, 1)  # type: ignore[operator]

    first = parts[0]
    return EvalResult(num_problems=n, accuracy=mean([p.accuracy for p in parts]) or 0.0,
                      mean_length=mean([p.mean_length for p in parts]) or 0.0, k=first.k,
                      num_samples_per_problem=first.num_samples_per_problem,
                      pass_at_k=mean([p.pass_at_k for p in parts]), format_rate=mean([p.format_rate for p in parts]),
                      seconds=max(p.seconds for p in parts),
                      examples=[e for p in parts for e in p.examples][:len(first.examples)])


def evaluate_task(model: CausalLM, tokenizer: Tokenizer, task: Task, *, num_samples: int = 100,
                  data_seed: int = 0, **kwargs: Any) -> EvalResult:
    """evaluate_rows on the first `num_samples` problems of the task's held-out split."""
    return evaluate_rows(model, tokenizer, task, task.rows("eval", num_samples, seed=data_seed), **kwargs)
