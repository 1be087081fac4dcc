"""Keep secrets out of everything this package writes, prints, logs or uploads.

A training run records how it was made (the model card's training command, `training_summary.json`, tracker
hparams, logs) and may upload that record to a public Hub repo. Tokens reach a run three ways: an option
(`--hub_token hf_...`, `TrainingConfig(hub_token=...)`), the environment (`HF_TOKEN`), or a value that merely looks
like one. `redact` is the one function every writer passes its text through; it replaces

- the value of any option or field whose name says it is secret (`--hub_token X`, `--hub_token=X`,
  `hub_token='X'`, `"hub_token": "X"`, and the same for names containing token, password, secret or api_key);
- the values of the token environment variables (`HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, ...) and of secrets
  registered with `register_secret` (the trainer registers `hub_token`), wherever they appear;
- anything shaped like a Hugging Face access token (`hf_` followed by 30 or more letters and digits).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterable, List, Optional, Set

REDACTED = "<redacted>"

# Environment variables that hold Hub (or tracker) credentials.
TOKEN_ENVIRONMENT_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "WANDB_API_KEY")

# Option and field names whose values are secret: hub_token, token, api_key, password, client_secret, ...
_SECRET_NAME = r"[A-Za-z_-]*(?:token|password|passwd|secret|api_key|apikey)"
_SECRET_NAME_PATTERN = re.compile(rf"^{_SECRET_NAME}$", re.IGNORECASE)
# `--name VALUE`, `--name=VALUE`, `name='VALUE'`, `name="VALUE"`, `"name": "VALUE"`, `name: VALUE`.
_ASSIGNMENTS = [
    re.compile(rf"(--{_SECRET_NAME}(?:=|\s+))('[^']*'|\"[^\"]*\"|[^\s'\"]+)", re.IGNORECASE),
    re.compile(rf"(\b{_SECRET_NAME}[\"']?\s*[=:]\s*)('[^']*'|\"[^\"]*\"|[^\s,'\")}}]+)", re.IGNORECASE),
]
# Hugging Face user access tokens: "hf_" and 34 letters/digits (older ones "api_..."); 30+ leaves room for variants.
HUB_TOKEN_PATTERN = re.compile(r"\b(?:hf|api)_[A-Za-z0-9]{30,}\b")

_registered: Set[str] = set()


def register_secret(value: Optional[str]) -> None:
    """Treat `value` as a secret from now on (ignored when empty or too short to be a credential)."""
    if value and len(value) >= 8:
        _registered.add(value)


def secret_values() -> List[str]:
    """The literal secrets known now: registered ones and those in the token environment variables."""
    values = set(_registered)
    for name in TOKEN_ENVIRONMENT_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            values.add(value)
    return sorted(values, key=len, reverse=True)  # longest first: a secret containing another is replaced whole


def is_secret_name(name: str) -> bool:
    """Whether an option or field called `name` holds a secret (`hub_token`, `--api_key`, ...)."""
    return bool(_SECRET_NAME_PATTERN.match(name.lstrip("-")))


def redact(text: str) -> str:
    """`text` with every secret replaced by `<redacted>` (see the module docstring)."""
    if not isinstance(text, str) or not text:
        return text
    for value in secret_values():
        text = text.replace(value, REDACTED)
    for pattern in _ASSIGNMENTS:
        text = pattern.sub(lambda match: match.group(1) + _keep_quotes(match.group(2)), text)
    return HUB_TOKEN_PATTERN.sub(REDACTED, text)


def _keep_quotes(value: str) -> str:
    if value.strip("'\"") in (REDACTED, "", "None", "null"):  # nothing secret there (and JSON stays valid)
        return value
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[0] + REDACTED + value[0]
    return REDACTED


def redact_argv(argv: Iterable[str]) -> List[str]:
    """A command line with the value of every secret option (`--hub_token X` or `--hub_token=X`) redacted."""
    result: List[str] = []
    hide_next = False
    for argument in argv:
        if hide_next:
            result.append(REDACTED)
            hide_next = False
            continue
        if argument.startswith("--") and "=" in argument and is_secret_name(argument.split("=", 1)[0]):
            result.append(argument.split("=", 1)[0] + "=" + REDACTED)
            continue
        if argument.startswith("-") and is_secret_name(argument):
            hide_next = True
        result.append(redact(argument))
    return result


def redact_value(value: Any) -> Any:
    """A JSON-like value (dicts, lists, strings, numbers) with secrets redacted; secret-named keys lose their value."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {
            key: (REDACTED if isinstance(key, str) and is_secret_name(key) and item else redact_value(item))
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(item) for item in value)
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message (add it to handlers: it then covers every logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def install_log_redaction(logger: Optional[logging.Logger] = None) -> List[logging.Handler]:
    """Add a `RedactingFilter` to the handlers of `logger` (default: the root logger); return the handlers changed."""
    logger = logger or logging.getLogger()
    changed = []
    for handler in logger.handlers:
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(RedactingFilter())
            changed.append(handler)
    return changed
