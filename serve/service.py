"""Between the HTTP layer and the scheduler: API requests become scheduler Requests, token events come
back to the event loop, results become OpenAI-shaped answers."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass

from ardeploy.runtime.errors import UserError
from ardeploy.runtime.sampling import SamplingConfig
from ardeploy.runtime.scheduling import Handle, QueueFull, Request

from .grammar import GrammarCompiler, SchemaError
from .protocol import ChatCompletionRequest, CompletionRequest

FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "constraint": "stop", "max_new_tokens": "length",
                  "max_seq": "length", "cancelled": "cancelled"}


class ApiError(Exception):
    """An answer other than 200: HTTP status, OpenAI error type, message, and the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


@dataclass
class Job:
    """One admitted request: the scheduler's handle and what the answer needs."""
    id: str
    handle: Handle
    prompt_tokens: int
    received: float
    first_token_at: float | None = None


class ModelService:
    """One model behind the API: its generator (tokenizer, chat template), scheduler and metrics."""

    def __init__(self, generator, scheduler, model_name: str):
        self.generator, self.scheduler, self.model_name = generator, scheduler, model_name
        self.created = int(time.time())
        self._grammar: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self.draining = False
        if generator.tokenizer is not None:         # llguidance's view of the vocabulary: built before it is needed
            threading.Thread(target=self._prepare_grammar, daemon=True, name="ardeploy-grammar").start()

    def _prepare_grammar(self) -> None:
        try:
            self.grammar()
        except Exception as e:                       # noqa: BLE001 - reported again to the first request that needs it
            from ardeploy.runtime.log import log
            log.debug(f"structured output unavailable: {e}")

    @property
    def max_seq(self) -> int:
        return self.generator.arena.max_seq           # a KV budget may have shortened it

    # -- request -> scheduler ---------------------------------------------------------------------
    def admit(self, body, received: float) -> Job:
        """Validate what pydantic cannot (model, prompt length, schema), then submit to the scheduler."""
        if body.model != self.model_name:
            raise ApiError(404, f"The model '{body.model}' does not exist (this server has '{self.model_name}')",
                           "model", code="model_not_found")
        prompt_ids, where = self._prompt_ids(body)
        sampling = self._sampling(body, len(prompt_ids))
        constraint = self._constraint(body.response_format)
        try:
            handle = self.scheduler.submit(Request(prompt_ids, sampling, constraint))
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry later", kind="rate_limit_error",
                           code="queue_full") from None
        except UserError as e:
            raise ApiError(400, f"{where}: {e}", where) from None
        prefix = "chatcmpl" if isinstance(body, ChatCompletionRequest) else "cmpl"
        return Job(f"{prefix}-{uuid.uuid4().hex[:24]}", handle, len(prompt_ids), received)

    def _prompt_ids(self, body) -> tuple[list[int], str]:
        gen = self.generator
        try:
            if isinstance(body, ChatCompletionRequest):
                if not gen.bundle.manifest.get("chat_template") or gen.tokenizer is None:
                    raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
                messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                            for m in body.messages]
                ids, where = gen.encode_messages(messages), "messages"
            else:
                prompt, where = body.prompt_value(), "prompt"
                if isinstance(prompt, str) and gen.tokenizer is None:
                    raise ApiError(400, "this model has no tokenizer: give the prompt as token ids", "prompt")
                ids = gen.to_ids(prompt)
        except UserError as e:
            where = "prompt" if isinstance(body, CompletionRequest) else "messages"
            raise ApiError(400, f"{where}: {e}", where) from None
        except Exception as e:                         # the chat template refused the conversation
            if type(e).__module__.startswith("jinja2"):
                raise ApiError(400, f"the chat template refused these messages: {e}", "messages") from None
            raise
        if not ids:
            raise ApiError(400, f"{where}: the prompt is empty", where)
        if len(ids) >= self.max_seq:
            raise ApiError(400, f"{where}: this model's maximum context length is {self.max_seq} tokens and the "
                                f"prompt has {len(ids)}", where, code="context_length_exceeded")
        return ids, where

    def _sampling(self, body, n_prompt: int) -> SamplingConfig:
        budget = body.token_budget()
        room = self.max_seq - n_prompt
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        if budget is not None and budget > room:
            raise ApiError(400, f"{param} {budget}: this model's maximum context length is {self.max_seq} tokens and "
                                f"the prompt has {n_prompt}, leaving room for {room}", param,
                           code="context_length_exceeded")
        return SamplingConfig(max_new_tokens=budget if budget is not None else room,
                              greedy=body.temperature == 0, temperature=body.temperature, top_p=body.top_p,
                              seed=body.seed, stop=body.stops())

    def _constraint(self, response_format):
        kind = getattr(response_format, "type", "text")
        if kind == "text":
            return None
        try:
            grammar = self.grammar()
            if kind == "json_object":
                return grammar.json(None, "response_format")
            return grammar.json(response_format.json_schema.schema_, "response_format.json_schema.schema")
        except SchemaError as e:
            raise ApiError(400, str(e), e.param) from None
        except UserError as e:
            raise ApiError(400, f"response_format: {e}", "response_format") from None

    def grammar(self) -> GrammarCompiler:
        with self._grammar_lock:
            if self._grammar is None:
                bundle = self.generator.bundle
                self._grammar = GrammarCompiler(self.generator.tokenizer, bundle.vocab_size, bundle.eos_ids)
            return self._grammar

    # -- scheduler -> event loop ------------------------------------------------------------------
    async def events(self, job: Job):
        """The job's TokenEvents on the event loop, in lists: every event that has arrived since the last
        list, at least one (a stream that falls behind the scheduler catches up in one write). Leaving early
        (a client gone) cancels the request."""
        loop, handle = asyncio.get_running_loop(), job.handle
        inbox: asyncio.Queue = asyncio.Queue()

        def deliver(item) -> None:                     # on the scheduler's thread
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, item)
            except RuntimeError:                       # the loop has closed: nobody is listening
                handle.cancel()
        handle.listen(deliver)
        try:
            while True:
                batch = [await inbox.get()]
                while batch[-1] is not None and not inbox.empty():
                    batch.append(inbox.get_nowait())
                events = batch[:-1] if batch[-1] is None else batch
                if events:
                    if job.first_token_at is None:
                        job.first_token_at = time.perf_counter()
                    yield events
                if batch[-1] is None:
                    if handle.error is not None:
                        raise handle.error
                    return
        finally:
            if not handle.wait(0):
                handle.cancel()


def result_of(job: Job):
    """The job's GenerationResult; a request cancelled before it started may finish without one."""
    from ardeploy.runtime.generator import GenerationResult
    result = job.handle.result
    if result is None:
        result = GenerationResult(prompt_ids=list(job.handle.request.prompt_ids), token_ids=[], text="",
                                  stop_reason="cancelled", ttft_s=0.0, decode_tokens_per_s=0.0)
    return result

