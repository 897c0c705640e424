"""Structured output: JSON (any object, or one that validates against a JSON schema) as a per-request
Constraint, through llguidance (a Rust grammar engine with Python bindings, numpy only).

The token masks come from the bundle's own `tokenizers` file: `GrammarCompiler` builds llguidance's view
of the vocabulary once (about half a second for SmolLM2's 49,152 tokens), and each request gets a matcher
of its own. JSON is written compactly (`", "` and `": "` between items, no other whitespace), so a
small model cannot wander off into endless blank lines inside an object.
"""
from __future__ import annotations

import numpy as np

from ardeploy.runtime.errors import UserError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class SchemaError(UserError):
    """A response_format the grammar engine cannot use; `param` names the request field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_schema(schema, param: str) -> None:
    """A JSON schema must be an object that is itself a valid schema (Draft 2020-12's meta-schema)."""
    if not isinstance(schema, dict):
        raise SchemaError(f"{param} must be a JSON object (got {type(schema).__name__})", param)
    from jsonschema import Draft202012Validator, SchemaError as JsonSchemaError
    try:
        Draft202012Validator.check_schema(schema)
    except JsonSchemaError as e:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in e.path)
        raise SchemaError(f"{param}{where} is not a valid JSON schema: {e.message}", param) from None


class GrammarCompiler:
    """Compiles response formats into Constraints for one tokenizer (thread-safe after construction)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        try:
            import llguidance
        except ImportError:
            raise UserError("structured output needs llguidance: pip install 'ardeploy[serve]'") from None
        if tokenizer is None:
            raise UserError("structured output needs the bundle's tokenizer (this bundle has none)")
        self._llg = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size,
                                                eos_token=list(eos_ids) or None)

    def json(self, schema: dict | None = None, param: str = "response_format") -> "GrammarConstraint":
        """Any JSON object (schema None), or JSON that validates against `schema`."""
        if schema is not None:
            check_schema(schema, param)
        grammar = self._llg.LLMatcher.grammar_from_json_schema(
            schema if schema is not None else {"type": "object"}, overrides=JSON_OPTIONS)
        problem = self._llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if problem:
            raise SchemaError(f"{param}: the grammar engine cannot use this schema: {' '.join(problem.split())}",
                              param)
        return GrammarConstraint(self._llg.LLMatcher(self.tokenizer, grammar, log_level=0), self.vocab_size)


class GrammarConstraint:
    """One request's grammar state (the `Constraint` protocol of ardeploy.runtime.scheduling)."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._check()

    def allowed(self) -> np.ndarray:
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        self._check()
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def advance(self, token: int) -> None:
        self.matcher.consume_token(int(token))
        self._check()

    def is_finished(self) -> bool:
        return self.matcher.is_stopped()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise RuntimeError(f"grammar engine: {self.matcher.get_error()}")

