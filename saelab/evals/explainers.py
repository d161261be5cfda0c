"""The language models that explain latents and judge explanations in the auto-interpretation eval.

An `LLM` is any callable `(messages, max_tokens) -> str`, where `messages` is a chat in the OpenAI format
(`[{"role": "system" | "user" | "assistant", "content": str}, ...]`). A chat may end with an assistant message: the
start of the answer. A local model continues it (and its answer includes it); an endpoint is not sent it, since the
chat-completions API has no standard way to continue a message (the instructions should ask for the same start).
Two are built in:
- `ChatCompletionsLLM`: any server speaking the OpenAI chat-completions API (OpenAI, vLLM, llama.cpp's server,
  Ollama, LM Studio, ...), through the standard library's `urllib` (no client package needed);
- `TransformersLLM`: a local `transformers` causal LM, prompted through its tokenizer's chat template and decoded
  greedily (the default is saelab's embedded SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from saelab.core.errors import ConfigError, SaelabError

Message = dict[str, str]


class LLMError(SaelabError, OSError):
    """The LLM could not be asked (unreachable server, HTTP error, an answer that is not chat-completions JSON)."""


class LLM(Protocol):
    def __call__(self, messages: Sequence[Message], max_tokens: int) -> str:
        """The assistant's answer to `messages`, at most `max_tokens` tokens long."""
        ...


class ChatCompletionsLLM:
    """An OpenAI-compatible chat-completions endpoint: POST `{base_url}/chat/completions`.

    `base_url` is what OpenAI's clients call the base URL (`https://api.openai.com/v1`, `http://localhost:8000/v1`).
    Rate limits (HTTP 429), server errors (5xx) and timeouts are retried `retries` times, waiting 1, 2, 4 ... s."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        temperature: float = 0.0,
        timeout: float = 60.0,
        retries: int = 2,
        api_key_env: str | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"the LLM's base URL must start with http:// or https://, got '{base_url}'")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.temperature = model, api_key, temperature
        self.timeout, self.retries, self.api_key_env = timeout, retries, api_key_env

    def __repr__(self) -> str:
        return f"ChatCompletionsLLM({self.url}, model={self.model})"

    def __call__(self, messages: Sequence[Message], max_tokens: int) -> str:
        body = {
            "model": self.model,
            "messages": list(messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages),
            "max_tokens": max_tokens,
            "temperature": self.temperature,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as error:
                if error.code in (429, 500, 502, 503, 504) and attempt < self.retries:
                    time.sleep(2**attempt)
                    continue
                raise LLMError(self._http_error(error)) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if attempt < self.retries and isinstance(getattr(error, "reason", error), TimeoutError):
                    time.sleep(2**attempt)
                    continue
                reason = getattr(error, "reason", error)
                raise LLMError(f"cannot reach the LLM at {self.url}: {reason}") from None
        raise AssertionError("unreachable")  # the loop returns or raises

    def _http_error(self, error: urllib.error.HTTPError) -> str:
        detail = " ".join(error.read().decode(errors="replace").split())[:200]
        message = f"the LLM at {self.url} answered HTTP {error.code} {error.reason}: {detail}"
        if error.code in (401, 403) and not self.api_key and self.api_key_env:
            message += f" (no API key sent: environment variable {self.api_key_env} is not set)"
        return message

    def _content(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            text = " ".join(raw.decode(errors="replace").split())[:200]
            raise LLMError(f"the LLM at {self.url} did not answer in the chat-completions format: {text}") from None
        return content if isinstance(content, str) else ""  # null content (e.g. a refusal) is an empty answer


class TransformersLLM:
    """A local `transformers` causal LM: the messages go through the tokenizer's chat template (a plain
    `role: content` transcript when it has none) and the answer is decoded greedily, so it is deterministic."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "local"):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name

    def __repr__(self) -> str:
        return f"TransformersLLM({self.name})"

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The token ids the model is given for `messages` (ending where the assistant's answer starts, or with the
        start of the answer that a final assistant message holds)."""
        start = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
        chat = list(messages[:-1] if start else messages)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n\n" for m in chat) + "assistant: "
        return list(self.tokenizer(text + start, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def __call__(self, messages: Sequence[Message], max_tokens: int) -> str:
        start = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
        ids = torch.tensor([self.prompt_ids(messages)], device=next(self.model.parameters()).device)
        pad = self.tokenizer.pad_token_id
        output = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=pad if pad is not None else self.tokenizer.eos_token_id,
        )
        return start + self.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def open_llm(config: Any, subject: Any = None, subject_name: str | None = None) -> LLM:
    """The LLM a config names (`llm_base_url`, `llm_model`, `llm_api_key_env`, `llm_temperature`, `llm_timeout`,
    `llm_retries`, `llm_dtype`, as in AutoInterpConfig): a chat-completions endpoint when `llm_base_url` is set,
    its API key read from the environment variable `llm_api_key_env` if that is set; else the local model
    `llm_model` (a saelab model name or folder; default: the embedded SmolLM2-135M-Instruct) in `llm_dtype`.
    `subject`, an open HookedModel named `subject_name`, is reused when it is that model in that dtype."""
    if config.llm_base_url:
        if not config.llm_model:
            raise ConfigError("set llm_model: the name of the model the endpoint at llm_base_url serves")
        key = os.environ.get(config.llm_api_key_env) if config.llm_api_key_env else None
        return ChatCompletionsLLM(
            config.llm_base_url,
            config.llm_model,
            key,
            config.llm_temperature,
            config.llm_timeout,
            config.llm_retries,
            config.llm_api_key_env,
        )
    from saelab.models.loading import DEFAULT_MODEL, load_model, resolve_dtype

    name, dtype = config.llm_model or DEFAULT_MODEL, config.llm_dtype
    reuse = subject is not None and name == subject_name
    reuse = reuse and next(subject.model.parameters()).dtype == resolve_dtype(dtype)
    hooked = subject if reuse else load_model(name, dtype=dtype)
    if not hasattr(hooked.model, "generate"):
        raise ConfigError(f"model '{name}' cannot generate text (a TransformerLens model?); name a transformers one")
    return TransformersLLM(hooked.model, hooked.tokenizer, name)
