"""The ``judge`` reward: an OpenAI-compatible chat-completions endpoint grades each answer.

Reference: om-ai-lab/VLM-R1 ``grpo_jsonl.py`` ``llm_reward`` / ``evaluate_answer_similarity``
(method ``llm``), which used the ``openai`` SDK with a fixed model and prompt and fell back
to exact string equality on any error. Here everything is configurable, plain ``httpx`` is
used (no SDK), and failures follow ``on_failure`` instead of silently changing the metric.
"""

from __future__ import annotations

import logging
import os
import re
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.interfaces import Reward, RewardBatch, RewardContext, RewardItem

logger = logging.getLogger(__name__)

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

#: VLM-R1's grading instruction (``evaluate_answer_similarity``).
DEFAULT_SYSTEM_PROMPT = (
    "You are an evaluation expert. First, analyze the student's response to identify and extract their final "
    "answer. Then, compare the extracted answer with the correct solution. Output ONLY '1.0' if the extracted "
    "answer matches the correct solution in meaning, or '0.0' if the student's response does not contain a clear "
    "or correct answer. No other output is allowed."
)
DEFAULT_PROMPT_TEMPLATE = "Student's response: {answer}\nCorrect solution: {solution}\nOutput only 1.0 or 0.0:"
TEMPLATE_FIELDS = frozenset({"question", "response", "answer", "solution"})


class JudgeError(RuntimeError):
    """The endpoint could not grade a completion (message never contains the API key)."""


def _answer(text: str) -> str:
    m = _ANSWER_RE.findall(text)
    return (m[-1] if m else text).strip()


class JudgeReward(Reward):
    """Ask a chat-completions endpoint to grade each completion; its reply is parsed as a number.

    Request: ``POST {base_url}/chat/completions`` with ``model``, ``temperature``,
    ``max_tokens``, ``extra_body`` and the messages ``[system_prompt?, user]``, where the
    user message is ``prompt_template`` filled with ``{question}`` (the prompt shown to the
    policy), ``{response}`` (the whole completion), ``{answer}`` (its last ``<answer>`` block,
    or all of it) and ``{solution}`` (the ground truth without ``<answer>`` tags). Literal
    braces in a template are written ``{{`` / ``}}``.

    Score: the first match of ``score_regex`` in the reply, as a float, clamped to
    ``[score_min, score_max]``. Requests run concurrently (``max_concurrency``); 429, 5xx
    and transport errors are retried ``max_retries`` times with exponential backoff.

    Failure (no parsable number, a non-retryable status, retries exhausted):
    ``on_failure: raise`` (default; the engine's reward runner then applies the reward's
    ``on_error`` policy to the batch and counts it), ``none`` (that completion is not
    applicable) or ``zero``.

    The API key is read from the environment variable named by ``api_key_env`` (sent as
    ``Authorization: Bearer …``); it is never logged and is masked in every error message.
    """

    name = "judge"
    description = "LLM judge via an OpenAI-compatible /chat/completions endpoint (httpx)"
    methods: ClassVar[tuple[str, ...]] = ("llm",)

    class Options(BaseModel):
        """Endpoint, prompt and score parsing."""

        model_config = ConfigDict(extra="forbid")
        base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1 (the part before /chat/completions)")
        model: str
        api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the API key; "
                                                                       "null = send no key")
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE
        temperature: float = Field(0.0, ge=0.0)
        max_tokens: int = Field(16, ge=1)
        extra_body: dict[str, Any] = Field(default_factory=dict, description="extra request fields")
        score_regex: str = r"[-+]?\d*\.?\d+"
        score_min: float = 0.0
        score_max: float = 1.0
        request_timeout_s: float = Field(30.0, gt=0)
        max_retries: int = Field(2, ge=0)
        retry_backoff_s: float = Field(0.5, ge=0)
        max_concurrency: int = Field(8, ge=1)
        on_failure: Literal["raise", "none", "zero"] = "raise"

        @field_validator("base_url")
        @classmethod
        def _url(cls, v: str) -> str:
            if not re.match(r"https?://", v):
                raise ValueError(f"base_url {v!r} must start with http:// or https://")
            return v.rstrip("/")

        @field_validator("prompt_template")
        @classmethod
        def _template(cls, v: str) -> str:
            try:
                names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
            except ValueError as e:
                raise ValueError(f"prompt_template is not a valid format string ({e}); write literal braces as "
                                 "{{ and }}") from None
            unknown = names - TEMPLATE_FIELDS
            if unknown:
                raise ValueError(f"prompt_template uses unknown field(s) {sorted(unknown)}; "
                                 f"available: {sorted(TEMPLATE_FIELDS)}")
            return v

        @field_validator("score_regex")
        @classmethod
        def _regex(cls, v: str) -> str:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"score_regex is not a valid regular expression: {e}") from None
            return v

        @model_validator(mode="after")
        def _range(self) -> JudgeReward.Options:
            if self.score_min > self.score_max:
                raise ValueError("score_min must be <= score_max")
            return self

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self._client: Any = None
        self._key: str | None = None
        self._lock = threading.Lock()
        self._score_re = re.compile(self.options.score_regex)

    # ---- lifecycle ---------------------------------------------------------------------
    def setup(self, ctx: RewardContext) -> None:
        """Check that the API key variable is set (fails before any step)."""
        self._api_key()

    def close(self) -> None:
        """Close the HTTP client."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _api_key(self) -> str | None:
        env = self.options.api_key_env
        if not env:
            return None
        key = os.environ.get(env)
        if not key:
            raise JudgeError(f"judge: environment variable {env} (options.api_key_env) is not set")
        self._key = key
        return key

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                import httpx

                key = self._api_key()
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                self._client = httpx.Client(headers=headers, timeout=self.options.request_timeout_s)
            return self._client

    # ---- scoring -----------------------------------------------------------------------
    def score(self, batch: RewardBatch) -> list[float | None]:
        """Grade every completion (concurrently)."""
        if len(batch) == 0:
            return []
        client = self._get_client()
        workers = min(self.options.max_concurrency, len(batch))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlmr1-judge") as pool:
            return list(pool.map(lambda it: self.score_item(it, client), batch.items))

    def score_item(self, item: RewardItem, client: Any | None = None) -> float | None:
        """Grade one completion, applying ``on_failure``."""
        try:
            return self._grade(item, client or self._get_client())
        except JudgeError as e:
            if self.options.on_failure == "raise":
                raise
            logger.debug("%s", e)
            return None if self.options.on_failure == "none" else 0.0

    def messages(self, item: RewardItem) -> list[dict[str, str]]:
        """The chat messages sent for ``item``."""
        sol = item.solution if isinstance(item.solution, str) else str(item.solution)
        user = self.options.prompt_template.format(question=item.prompt, response=item.completion,
                                                   answer=_answer(item.completion), solution=_answer(sol))
        msgs = [{"role": "system", "content": self.options.system_prompt}] if self.options.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    def _grade(self, item: RewardItem, client: Any) -> float:
        import httpx

        o = self.options
        body = {"model": o.model, "messages": self.messages(item), "temperature": o.temperature,
                "max_tokens": o.max_tokens, **o.extra_body}
        url = f"{o.base_url}/chat/completions"
        last = ""
        for attempt in range(o.max_retries + 1):
            if attempt:
                time.sleep(o.retry_backoff_s * 2 ** (attempt - 1))
            try:
                resp = client.post(url, json=body)
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code != 200:
                raise JudgeError(self._mask(f"judge: {url} answered HTTP {resp.status_code}: {resp.text[:200]}"))
            return self._parse(resp, url)
        raise JudgeError(self._mask(f"judge: {url} failed after {o.max_retries + 1} attempt(s); last: {last}"))

    def _parse(self, resp: Any, url: str) -> float:
        try:
            content = resp.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(self._mask(f"judge: {url} sent no chat completion: {resp.text[:200]}")) from None
        m = self._score_re.search(content)
        if m is None:
            raise JudgeError(self._mask(f"judge: no score matching {self.options.score_regex!r} in the reply "
                                        f"{content[:200]!r}"))
        try:
            value = float(m.group(1) if m.groups() else m.group(0))
        except ValueError:
            raise JudgeError(self._mask(f"judge: cannot read a number from {m.group(0)[:50]!r}")) from None
        return min(self.options.score_max, max(self.options.score_min, value))

    def _mask(self, text: str) -> str:
        """Remove the API key from ``text`` (a server may echo request headers back)."""
        return text.replace(self._key, "***") if self._key else text
