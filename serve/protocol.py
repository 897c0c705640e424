"""The request bodies of the OpenAI-compatible API, validated by pydantic, and how errors are worded.

Types are strict (a string where a number belongs is an error, not a conversion) and unknown fields are
refused, as OpenAI's API does; fields clients commonly send with their neutral value (`n: 1`,
`presence_penalty: 0`, `logprobs: false`, `user`) are accepted.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

Count = Annotated[int, Field(ge=1)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class JsonSchemaFormat(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = None
    strict: bool | None = None

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class TextFormat(Strict):
    type: Literal["text"]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaResponseFormat], Field(discriminator="type")]


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """The fields both endpoints share."""
    model: str
    max_tokens: Count | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: Union[str, Annotated[list[str], Field(max_length=4)], None] = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    logprobs: Literal[False] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if any(stop == "" for stop in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Count | None = None
    response_format: ResponseFormat | None = None

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: Union[str, Annotated[list[int], Field(min_length=1)], Annotated[list[str], Field(min_length=1, max_length=1)],
                  Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=1)]]
    max_tokens: Count | None = 16
    echo: Literal[False] = False
    response_format: ResponseFormat | None = None

    def token_budget(self) -> int | None:
        return self.max_tokens

    def prompt_value(self) -> str | list[int]:
        """One prompt: text or token ids (a list of one prompt is unwrapped)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        return prompt


# -- errors -----------------------------------------------------------------------------------------
UNION_FIELDS = {"stop", "content", "prompt", "response_format"}   # pydantic puts a member's tag after these


def param_name(loc) -> str | None:
    """pydantic's error location ('body', 'messages', 0, 'content') as a field path: messages[0].content
    (the tags pydantic adds for the members of a union are left out)."""
    name, previous = "", None
    for part in loc:
        if part == "body" and not name:
            continue
        if isinstance(part, int):
            name += f"[{part}]"
        elif previous not in UNION_FIELDS:
            name += ("." if name else "") + str(part)
        previous = part
    return name or None


TYPE_ERRORS = {"string_type", "int_type", "float_type", "bool_type", "list_type", "dict_type", "model_type",
               "literal_error", "union_tag_invalid", "is_instance_of", "model_attributes_type"}


def pick_error(errors: list[dict]) -> dict:
    """The error to report: for a union (`stop`: a string or a list), one that says more than 'not a string'."""
    first = errors[0]
    root = param_name(first.get("loc", ()))
    same = [e for e in errors if param_name(e.get("loc", ())) and
            param_name(e.get("loc", ())).split("[")[0] == (root or "").split("[")[0]]
    telling = [e for e in same if e.get("type") not in TYPE_ERRORS]
    return telling[0] if telling else first


def describe_validation_error(error: dict) -> tuple[str, str | None]:
    """(message, param) for a pydantic error of a request body (see pick_error)."""
    kind, loc = error.get("type", ""), tuple(error.get("loc", ()))
    if kind == "json_invalid":
        detail = error.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({detail})", None
    if kind in ("model_type", "model_attributes_type") and not [part for part in loc if part != "body"]:
        return "the request body must be a JSON object", None
    param = param_name(loc)
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        return f"'{param}' is a required property", param
    message = error.get("msg", "invalid value")
    return f"{param}: {message}" if param else message, param


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
