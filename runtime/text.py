"""Text in and out: chat templates, incremental detokenization, stop strings, checks of text given."""
from __future__ import annotations

import functools

from .errors import UserError


class ChatTemplateError(UserError):
    """The bundle's chat template cannot render the conversation (it refused it, broke the sandbox, or
    is not a template)."""


def check_text(text: str, what: str) -> str:
    """`text`, refused in one line naming `what` when it holds something that is not UTF-8: bytes of
    another encoding reach Python as lone surrogates (a command-line argument, a line of input)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start].encode("utf-8", "surrogateescape") if "\udc80" <= text[e.start] <= "\udcff" else None
        shown = f"byte 0x{raw.hex()}" if raw else f"U+{ord(text[e.start]):04X}"
        raise UserError(f"{what}: not valid UTF-8 ({shown} at character {e.start}); give the text in UTF-8") from None
    return text


def render_chat(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "",
                where: str = "the bundle's chat template (manifest.json chat_template)") -> str:
    """Apply a Hugging Face style Jinja chat template (with the generation prompt added), in a sandbox.
    Whatever goes wrong inside the template is the template's: a ChatTemplateError naming `where`."""
    import jinja2

    if not isinstance(template, str):
        raise ChatTemplateError(f"{where}: not a template string (a {type(template).__name__})")
    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=True,
                                          bos_token=bos_token, eos_token=eos_token)
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"{where}: refused by the sandbox ({_one_line(e)})") from None
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{where}: not a valid template (line {e.lineno}: {_one_line(e)})") from None
    except jinja2.exceptions.TemplateError as e:       # raise_exception(...) and undefined names
        raise ChatTemplateError(f"{where}: {_one_line(e)}") from None
    except (TypeError, ValueError, LookupError, ArithmeticError, AttributeError, RecursionError) as e:
        raise ChatTemplateError(f"{where}: failed while rendering ({type(e).__name__}: {_one_line(e)})") from None


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """The template compiled once (about 1 ms for SmolLM2's; a server renders one per request)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


class Detokenizer:
    """Turns a growing list of token ids into text pieces that never split a UTF-8 character.

    It re-decodes a short window of recent tokens (so merges that depend on neighbours, like the
    SentencePiece leading space, come out right) and holds text back while it ends in U+FFFD,
    the mark of an incomplete multi-byte character.
    """

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None):
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids[-4:]) if prompt_ids else []
        self.prefix = 0                # window start
        self.read = len(self.ids)      # tokens already turned into text

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=False)
        full = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=False)
        if full.endswith("\ufffd") or len(full) <= len(prefix_text):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(prefix_text):]


class StopStrings:
    """Finds stop strings in streamed text, across token boundaries, and holds back text that
    might be the start of one so a stop string is never printed."""

    def __init__(self, stops: list[str]):
        self.stops = [stop for stop in stops if stop]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        if not self.stops:
            return piece, False
        self.pending += piece
        found = [self.pending.find(stop) for stop in self.stops if stop in self.pending]
        if found:
            out, self.pending = self.pending[:min(found)], ""
            return out, True
        hold = 0                       # the longest tail of `pending` that starts some stop string
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
