"""`diffusers_sr3.redaction`: every form a token takes in a command line, a config, JSON or a log line."""

import json
import logging

import pytest

from diffusers_sr3.redaction import REDACTED, RedactingFilter, redact, redact_argv, redact_value, register_secret
from diffusers_sr3.training import TrainingConfig
from diffusers_sr3.training.config import training_command

TOKEN = "hf_" + "a1B2c3D4e5" * 3 + "ZZZZ"  # 34 letters and digits after hf_, like a real Hub token


def test_command_lines_lose_every_secret_option_value():
    argv = ["train.py", "--hub_token", "plain-secret", "--wandb_api_key=k3y-value", "--seed", "3", TOKEN]
    assert redact_argv(argv) == [
        "train.py",
        "--hub_token",
        REDACTED,
        f"--wandb_api_key={REDACTED}",
        "--seed",
        "3",
        REDACTED,
    ]
    command = training_command(TrainingConfig(), argv=["examples/train_sr3.py", "--hub_token", "plain-secret"])
    assert "plain-secret" not in command and "--hub_token '<redacted>'" in command


def test_python_calls_configs_and_reprs_hide_the_token():
    config = TrainingConfig(hub_token="plain-secret-2", learning_rate=3e-4)
    command = training_command(config, argv=["python"])
    assert "plain-secret-2" not in command and "hub_token='<redacted>'" in command and "learning_rate=0.0003" in command
    assert "plain-secret-2" not in repr(config)


@pytest.mark.parametrize(
    "text",
    [
        "--hub_token=abcdefgh123",
        "hub_token='abcdefgh123'",
        '{"hub_token": "abcdefgh123"}',
        "token: abcdefgh123",
        f"pushing with {TOKEN} now",
    ],
)
def test_text_forms(text):
    assert "abcdefgh123" not in redact(text) and TOKEN not in redact(text) and REDACTED in redact(text)


def test_environment_and_registered_values_are_redacted_anywhere(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "env-value-42424242")
    assert redact("url https://x/?t=env-value-42424242 end") == f"url https://x/?t={REDACTED} end"
    register_secret("registered-secret-99")
    assert redact("a registered-secret-99 b") == f"a {REDACTED} b"
    # JSON stays JSON; secret-named keys lose their values, empty ones stay empty.
    value = redact_value({"hub_token": "x" * 12, "nested": ["env-value-42424242"], "hub_token_empty": None, "n": 3})
    assert json.loads(json.dumps(value)) == {
        "hub_token": REDACTED,
        "nested": [REDACTED],
        "hub_token_empty": None,
        "n": 3,
    }
    assert json.loads(redact(json.dumps({"hub_token": None}))) == {"hub_token": None}


def test_log_records_are_redacted_by_the_handler_filter():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "uploading with %s", (TOKEN,), None)
    assert RedactingFilter().filter(record) and record.getMessage() == f"uploading with {REDACTED}"
