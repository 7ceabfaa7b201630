"""The built-in rollout engine: transformers ``generate`` (or a compacting decode loop) on the live policy."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# eos_token_ids / split_completions are plugin API: every engine stops and cuts at EOS the same way.
from core.interfaces import (
    Completion,
    PromptInput,
    RolloutEngine,
    SamplingParams,
    eos_token_ids,
    split_completions,
)


class TransformersRollout(RolloutEngine):
    """Samples with ``model.generate``; prompts are batched ``prompt_batch_size`` at a time.

    Each prompt is processed once. With ``shared_prefill`` (the default, where the family has
    opted in) each unique prompt is also prefilled once and its KV cache repeated for the
    ``n`` samples (:mod:`core.plugins.builtin.prefill`); otherwise ``num_return_sequences`` repeats the
    prompt rows before the prefill. With ``compact_decode`` (the default, where the family has
    opted in) a decode loop that drops finished rows replaces ``generate``
    (:mod:`core.plugins.builtin.decode`).
    """

    name = "transformers"
    description = "transformers generate on the policy (built in)"
    samples_from_policy = True

    class Options(BaseModel):
        """``prompt_batch_size`` bounds memory: prompts per generate call (x n rows).

        ``seed_per_prompt`` generates each prompt in its own call after seeding torch with the
        prompt's ``seed``: sampling then no longer depends on how prompts are batched or split
        over processes (at the cost of batching), which makes runs comparable across world sizes.

        ``shared_prefill`` prefills each unique prompt (and its images) once and repeats its KV
        cache for the ``n`` samples, instead of prefilling ``n`` copies of it: same tokens for the
        same seed, same logits up to float rounding (the family's ``shared_prefill`` conformance
        check). It applies where the model family opted in (``ModelFamily.shared_prefill``) and
        when sampling ``n > 1``; elsewhere (greedy, ``n == 1``, other families) the plain path
        runs. ``false`` always takes the plain path.

        ``compact_decode`` samples with a decode loop that drops finished rows (EOS sampled) from
        the batch instead of ``generate``, which computes every row until the longest completion
        ends (:mod:`core.plugins.builtin.decode`). Greedy: generate's tokens; sampling: generate's
        tokens until the first rows are dropped, then a different random stream over the same
        per-token distributions (the family's ``compact_decode`` conformance check). It applies where
        the model family opted in (``ModelFamily.compact_decode``), for ``n > 1`` only together with
        the shared prefill, and where the only logits processing is suppressed ids, temperature,
        top-k and top-p: ``choices``, ``repetition_penalty != 1`` and ZeRO-3/FSDP across processes keep
        ``generate``. ``false``
        always runs ``generate``.

        ``return_logprobs`` fills ``Completion.logprobs`` with each sampled token's log-probability
        under the distribution generate sampled it from: the logits after generate's processors
        (repetition penalty, suppressed ids, ``choices``), divided by the temperature, cut by top-k
        then top-p, renormalised (:class:`SampledLogprobs`). Greedy decoding: the same without
        temperature/top-k/top-p. The trainer's log-probs (temperature only) differ from these by the
        cut mass and the constraints, which ``rollout/logprob_diff_*`` then shows.
        """

        model_config = ConfigDict(extra="forbid")
        prompt_batch_size: int = Field(64, ge=1)
        seed_per_prompt: bool = False
        shared_prefill: bool = True
        compact_decode: bool = True
        return_logprobs: bool = Field(True, description="fill Completion.logprobs with the sampler's log-probs")
        choices: list[str] | None = Field(
            None, min_length=1,
            description="guided choice: every completion is one of these strings then EOS (vLLM's guided_choice); "
                        "null = free text")

    def _choice_trie(self, tok: Any, eos: set[int]) -> dict[tuple[int, ...], list[int]] | None:
        """Allowed next tokens after each generated prefix, for the ``choices`` option.

        Written here (transformers has no choice-constrained decoding; vLLM's lives in vLLM):
        each choice is tokenised as the completion would be, then one EOS closes it.
        """
        if not self.options.choices:
            return None
        if getattr(self, "_trie", None) is None:
            trie: dict[tuple[int, ...], set[int]] = {}
            stop = min(eos)
            self._longest = (0, "")
            for choice in self.options.choices:
                ids = list(tok.encode(choice, add_special_tokens=False)) + [stop]
                self._longest = max(self._longest, (len(ids), choice))
                for i in range(len(ids)):
                    trie.setdefault(tuple(ids[:i]), set()).add(ids[i])
            self._trie = {k: sorted(v) for k, v in trie.items()}
        return self._trie

    def generate(self, prompts: list[PromptInput], sampling: SamplingParams) -> list[list[Completion]]:
        """``sampling.n`` completions per prompt."""
        import torch

        ctx = self.ctx
        model, processor, family = ctx.model, ctx.processor, ctx.family
        tok = getattr(processor, "tokenizer", processor)
        eos = eos_token_ids(model, processor)
        trie = self._choice_trie(tok, eos)
        if trie is not None and self._longest[0] > sampling.max_new_tokens:
            n, choice = self._longest
            raise ValueError(f"rollout.options.choices: {choice!r} is {n} tokens with its EOS, more than the "
                             f"{sampling.max_new_tokens} new tokens allowed (grpo.max_completion_length / "
                             "eval.max_new_tokens); raise that limit or shorten the choice")
        results: list[list[Completion]] = []
        bs = 1 if self.options.seed_per_prompt else self.options.prompt_batch_size
        for start in range(0, len(prompts), bs):
            chunk = prompts[start:start + bs]
            if self.options.seed_per_prompt and chunk[0].seed is not None:
                torch.manual_seed(chunk[0].seed)
            inputs = family.process(processor, [p.text for p in chunk], [p.images for p in chunk])
            inputs = inputs.to(ctx.device)
            # Greedy decoding gives n identical rows, and transformers refuses num_return_sequences > 1
            # without sampling: generate one row per prompt and repeat it.
            n_gen = sampling.n if sampling.do_sample else 1
            gen_kwargs = generate_kwargs(sampling, tok.pad_token_id, eos, ctx.suppressed_token_ids)
            if trie is not None:
                # The completion starts after the whole prompt on both paths: generate's input_ids
                # start with the full prompt also when continuing from a shared prefill's cache.
                start_len = inputs["input_ids"].shape[1]
                done = [tok.pad_token_id if tok.pad_token_id is not None else min(eos)]

                def allowed(_batch_id: int, ids: Any, _t=trie, _s=start_len, _d=done) -> list[int]:
                    return _t.get(tuple(ids[_s:].tolist()), _d)

                gen_kwargs["prefix_allowed_tokens_fn"] = allowed
            was_training = model.training
            model.eval()
            with torch.no_grad():
                gen, lps = self._decode(_unwrap(model), inputs, n_gen, sampling, gen_kwargs)
            if was_training:
                model.train()
            if n_gen != sampling.n:
                gen = gen.repeat_interleave(sampling.n, dim=0)
                lps = lps.repeat_interleave(sampling.n, dim=0) if lps is not None else None
            rows = split_completions(gen, eos, tok.pad_token_id)
            texts = tok.batch_decode([r[0] for r in rows], skip_special_tokens=True)
            for p in range(len(chunk)):
                group = []
                for j in range(sampling.n):
                    r = p * sampling.n + j
                    ids, trunc = rows[r]
                    lp = lps[r, :len(ids)].tolist() if lps is not None else None
                    group.append(Completion(ids=ids, text=texts[r], truncated=trunc, logprobs=lp))
                results.append(group)
        return results

    def _decode(self, model: Any, inputs: Any, n: int, sampling: SamplingParams,
                gen_kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """``(new tokens [B*n, steps], their log-probs or None)``: the one place that picks the decoding path.

        Compact decoding where it applies (:mod:`core.plugins.builtin.decode`), else ``generate``,
        from a shared prefill where that applies (:mod:`core.plugins.builtin.prefill`).
        """
        from core.plugins.builtin.decode import can_compact_decode, compact_decode
        from core.plugins.builtin.prefill import can_share_prefill, shared_prefill_generate

        family = self.ctx.family
        # Only n > 1 rows per prompt have a prefill to share.
        share = self.options.shared_prefill and n > 1 and can_share_prefill(family, model, gen_kwargs, inputs)
        # With n > 1 the loop continues from the shared prefill's cache: with that off, generate runs.
        if (self.options.compact_decode and (share or n == 1)
                and can_compact_decode(family, model, gen_kwargs, inputs, n)):
            res = compact_decode(model, family, inputs, n, **gen_kwargs)
            return res.tokens, res.logprobs if self.options.return_logprobs else None
        recorder = SampledLogprobs.for_sampling(sampling) if self.options.return_logprobs else None
        if recorder is not None:
            from transformers import LogitsProcessorList

            gen_kwargs = {**gen_kwargs, "logits_processor": LogitsProcessorList([recorder])}
        if share:
            out = shared_prefill_generate(model, family, inputs, n, **gen_kwargs)
        else:
            out = model.generate(**inputs, num_return_sequences=n, **gen_kwargs)
        gen = out[:, inputs["input_ids"].shape[1]:]
        return gen, recorder.result(gen) if recorder is not None else None


def generate_kwargs(
    sampling: SamplingParams, pad_token_id: int | None, eos: set[int], suppressed: list[int] | None = None
) -> dict[str, Any]:
    """``model.generate`` keyword arguments for ``sampling`` (one row per prompt: no ``num_return_sequences``)."""
    kw: dict[str, Any] = dict(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sampling.do_sample,
        pad_token_id=pad_token_id,
        eos_token_id=sorted(eos),
        repetition_penalty=sampling.repetition_penalty,
    )
    if sampling.do_sample:
        kw.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k else 0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    if suppressed:
        kw["suppress_tokens"] = list(suppressed)
    return kw


class SampledLogprobs:
    """Records, step by step, the log-probability of the token generate samples, under its sampling distribution.

    Passed as generate's ``logits_processor``, it runs after generate's own processors
    (repetition penalty, suppressed ids, prefix constraints) and before its warpers
    (transformers merges custom processors first, warpers last): so it applies the same
    warpers, in generate's order (temperature, top-k, top-p), to a copy, and keeps the
    log-softmax of the result. The token sampled from it is known at the next call (the last
    column of ``input_ids``) or, for the last step, from the output: only one ``[rows, vocab]``
    distribution is held at a time, unlike ``output_scores``.
    """

    def __init__(self, warpers: list[Any]) -> None:
        self.warpers = warpers
        self._dist: Any = None
        self._steps: list[Any] = []

    @classmethod
    def for_sampling(cls, sampling: SamplingParams) -> SampledLogprobs:
        """The recorder for these settings (greedy: no warpers, the processed logits' own distribution)."""
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        warpers: list[Any] = []
        if sampling.do_sample:
            if sampling.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k:
                warpers.append(TopKLogitsWarper(top_k=sampling.top_k, min_tokens_to_keep=1))
            if sampling.top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p=sampling.top_p, min_tokens_to_keep=1))
        return cls(warpers)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self._dist is not None:
            self._steps.append(self._dist.gather(1, input_ids[:, -1:]).squeeze(1))
        warped = scores.float().clone()
        for w in self.warpers:
            warped = w(input_ids, warped)
        self._dist = torch.log_softmax(warped, dim=-1)
        return scores  # sampling itself is untouched

    def result(self, generated: Any) -> Any:
        """``[rows, steps]`` log-probs of ``generated`` (the new tokens generate returned); resets the recorder."""
        import torch

        steps = list(self._steps)
        if self._dist is not None and generated.shape[1] > len(steps):
            steps.append(self._dist.gather(1, generated[:, len(steps):len(steps) + 1].to(self._dist.device))
                         .squeeze(1))
        self._dist, self._steps = None, []
        if not steps:
            return torch.zeros((generated.shape[0], 0))
        return torch.stack(steps, dim=1).cpu()


def _unwrap(model: Any) -> Any:
    """The underlying model of a DDP/accelerate wrapper (generate lives there)."""
    return getattr(model, "module", model)
