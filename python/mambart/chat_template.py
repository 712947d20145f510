"""Chat templates (used by `mambart chat` and `mambart serve`): a model's Jinja2 chat template,
found next to the model and rendered as transformers' `apply_chat_template` renders it.

Where the template comes from, first found: an explicit file (`--chat-template`), else in the
model directory, then in the checkpoint directory it was converted from, `chat_template.jinja`
or tokenizer_config.json's `chat_template` (a string, or a list of named templates: "default").

Rendering matches transformers: a sandboxed environment (ImmutableSandboxedEnvironment, the
template is untrusted code) with trim_blocks and lstrip_blocks, the loopcontrols extension and the
`{% generation %}` tag (rendered as its body), `tojson` without HTML escaping, and the globals
`raise_exception` and `strftime_now`; the variables are `messages`, `add_generation_prompt`,
`tools` and the tokenizer's special tokens (`bos_token`, `eos_token`, ...) from
tokenizer_config.json. The rendered text is tokenized without adding special tokens (the
template writes them).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional

MAX_TEMPLATE_BYTES = 1 << 20
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                      "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A template that does not compile, or raised (raise_exception) while rendering."""


def _model_dirs(model_dir, config: dict) -> List[Path]:
    dirs = [Path(model_dir)]
    src = config.get("source") if isinstance(config.get("source"), dict) else {}
    if isinstance(src.get("path"), str):
        dirs.append(Path(src["path"]))
    return dirs


def _tokenizer_config(model_dir, config: dict) -> dict:
    from .convert import load_json

    for d in _model_dirs(model_dir, config):
        f = d / "tokenizer_config.json"
        if f.is_file():
            cfg = load_json(f)
            if isinstance(cfg, dict):
                return cfg
    return {}


def find_chat_template(model_dir, config: dict, path=None) -> Optional[str]:
    """The template text: `path` when given, else the model's (module docstring); None when
    there is none."""
    from ._files import read_bounded_text

    if path is not None:
        return read_bounded_text(path, MAX_TEMPLATE_BYTES, "chat template")
    for d in _model_dirs(model_dir, config):
        f = d / "chat_template.jinja"
        if f.is_file():
            return read_bounded_text(f, MAX_TEMPLATE_BYTES, "chat template")
        f = d / "tokenizer_config.json"
        if f.is_file():
            from .convert import load_json

            t = load_json(f).get("chat_template")
            if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
                t = next((x.get("template") for x in t
                          if isinstance(x, dict) and x.get("name") == "default"), None)
            if isinstance(t, str) and t.strip():
                return t
    return None


def special_tokens(model_dir, config: dict) -> Dict[str, str]:
    """tokenizer_config.json's special tokens (a string, or {"content": ...}) by name."""
    cfg = _tokenizer_config(model_dir, config)
    out = {}
    for k in SPECIAL_TOKEN_KEYS:
        v = cfg.get(k)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[k] = v
    return out


class ChatTemplate:
    """A compiled chat template. render(messages, add_generation_prompt) -> text."""

    def __init__(self, source: str, special: Optional[Dict[str, str]] = None):
        try:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ValueError("rendering a chat template needs jinja2 "
                             "(pip install jinja2)") from None

        class GenerationTag(jinja2.ext.Extension):
            # transformers' AssistantTracker: {% generation %}...{% endgeneration %} marks the
            # assistant's tokens for training masks; rendering keeps the body as it is.
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [],
                                              body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[GenerationTag, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._errors = (jinja2.exceptions.TemplateError,)
        try:
            self._template = env.from_string(source)
        except self._errors as e:
            raise ChatTemplateError(f"chat template: {e}") from None
        self.source = source
        self.special = dict(special or {})

    def render(self, messages: List[dict], add_generation_prompt: bool = True,
               **variables) -> str:
        kw = dict(self.special)
        kw.update(variables)
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt, **kw)
        except Exception as e:  # a template is a program: any failure of it is the template's
            raise ChatTemplateError(f"chat template: {type(e).__name__}: {e}"
                                    if not isinstance(e, self._errors) else f"chat template: {e}"
                                    ) from None
