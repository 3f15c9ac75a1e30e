"""The pluggable LLM judge: a ``Judge`` protocol and an OpenAI-compatible ``/chat/completions`` client (stdlib only).

The benchmarks build their own judge prompts (copied from lmms-eval) and parse the replies themselves; a judge only
turns chat messages into reply text, or raises :class:`JudgeError`. Any server that speaks the OpenAI chat API works:
api.openai.com, Azure's OpenAI-compatible endpoint, vLLM, SGLang, llama.cpp's server.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class JudgeError(RuntimeError):
    """The judge could not produce a reply (network, HTTP status, malformed response). One line."""


@runtime_checkable
class Judge(Protocol):
    def complete(self, messages: Sequence[dict[str, str]], *, max_tokens: int, temperature: float) -> str:
        """The assistant's reply text to ``messages`` (``[{"role": ..., "content": ...}, ...]``)."""
        ...


# Worth retrying: rate limits and server-side failures. Other 4xx (bad key, bad model) fail at once.
_RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


def chat_completions_url(base_url: str) -> str:
    """``https://api.openai.com/v1`` -> ``.../v1/chat/completions``; a full ``.../chat/completions`` URL is kept."""
    url = base_url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


@dataclass(frozen=True, kw_only=True)
class OpenAIJudge:
    """POSTs to ``{base_url}/chat/completions`` (``base_url`` as in the OpenAI SDK, usually ending in ``/v1``).

    The API key is read from the environment variable ``api_key_env`` at each call; when it is unset no
    Authorization header is sent (local servers need none). Retries 429/5xx and connection errors with
    exponential backoff.
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    max_retries: int = 3
    retry_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base_url: expected an http(s) URL, got {self.base_url!r}")
        if not self.model:
            raise ValueError("judge model: expected a model name, got ''")
        if self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError(f"judge: expected max_retries >= 0 and timeout_s > 0, got {self.max_retries}, "
                             f"{self.timeout_s}")

    @property
    def url(self) -> str:
        return chat_completions_url(self.base_url)

    def complete(self, messages: Sequence[dict[str, str]], *, max_tokens: int, temperature: float) -> str:
        body = json.dumps({"model": self.model, "messages": list(messages), "max_tokens": max_tokens,
                           "temperature": temperature}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self.api_key_env, "")
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = response.read()
            except urllib.error.HTTPError as e:
                last_error = f"HTTP {e.code} {_error_text(e)}"
                if e.code not in _RETRYABLE_STATUS:
                    hint = f" (is ${self.api_key_env} set?)" if e.code in (401, 403) else ""
                    raise JudgeError(f"judge {self.url}: {last_error}{hint}") from None
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            return _reply_text(payload, self.url)
        raise JudgeError(f"judge {self.url}: gave up after {self.max_retries + 1} attempts ({last_error})")


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        text = error.read().decode("utf-8", errors="replace")
    except OSError:
        return error.reason or ""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text
    return " ".join(str(message).split())[:200]


def _reply_text(payload: bytes, url: str) -> str:
    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise JudgeError(f"judge {url}: response: expected choices[0].message.content, got "
                         f"{payload[:200]!r}") from None
    if not isinstance(content, str):
        raise JudgeError(f"judge {url}: response: expected string content, got {content!r}")
    return content.strip()
