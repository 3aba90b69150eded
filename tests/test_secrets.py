"""Secrets: a DSN's password never appears in an error, a log line
or a repr, however malformed the DSN; credentials never reach a stored row or a bundle
(checked case-insensitively at any depth, headers included); a provider's error text that
echoes a key is redacted in LLMError."""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import immagent
from immagent import Message, SimpleAgent, Store
from immagent.cli.app import main
from immagent.store import dsn as dsns
from immagent.testing import Reply, ScriptedModel, litellm_error
from immagent.validate import check_config, is_credential_key, redact_secrets
from tests import crafted
from tests.conftest import count_rows, turn

MARK = "S3CRETPW"

# -- DSN passwords -------------------------------------------------------------------------

# Passwords hold the marker and characters that break parsers: percent signs, "@", ":",
# "/", "?", "#", brackets, quotes, backslashes, "=", "&" and spaces.
_PASSWORD_CHARS = st.sampled_from([*"aZ9%@:/?#[]'\"\\=& -_.~", "%zz", "%4", "é"])
passwords = st.builds(lambda a, b: "".join(a) + MARK + "".join(b),
                      st.lists(_PASSWORD_CHARS, max_size=6),
                      st.lists(_PASSWORD_CHARS, max_size=6))
hosts = st.sampled_from(["127.0.0.1:1", "[::1", "[::1]:1", "localhost:notaport", "",
                         "127.0.0.1:99999", "h@st:1"])


@st.composite
def dsns_with_password(draw: st.DrawFn) -> tuple[str, str]:
    """(a DSN, the password it holds as written in it)."""
    password = draw(passwords)
    shape = draw(st.sampled_from(["userinfo", "encoded", "query", "keyword", "quoted"]))
    host = draw(hosts)
    if shape == "userinfo":
        written = password
        return f"postgresql://u:{written}@{host}/db", written
    if shape == "encoded":  # as a careful user writes it; a driver may decode it back
        written = urllib.parse.quote(password, safe="")
        return f"postgres://u:{written}@{host}/db?connect_timeout=1", written
    if shape == "query":
        written = password.replace("&", "")
        return f"postgresql://{host}/db?sslmode=disable&password={written}", written
    if shape == "keyword":
        written = password.replace(" ", "").replace("'", "")
        return f"host=127.0.0.1 port=1 dbname=x password={written}", written
    written = "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"host=127.0.0.1 port=1 dbname=x password = {written} user=u", written


def _leaks(text: str, written: str) -> bool:
    return MARK in text or written in text or MARK.lower() in text.lower()


@given(case=dsns_with_password())
def test_a_dsn_password_never_shows_in_an_error_or_a_log(case: tuple[str, str]) -> None:
    dsn, written = case
    assert not _leaks(dsns.redact(dsn), written)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    try:
        with pytest.raises(immagent.ImmAgentError) as err:
            asyncio.run(Store.connect(dsn, min_size=0, max_size=1))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    for shown in (str(err.value), repr(err.value), *(r.getMessage() for r in records)):
        assert not _leaks(shown, written), shown


def test_the_reported_dsns_of_the_issue_never_leak(capsys: pytest.CaptureFixture[str]) -> None:
    for dsn in ("postgresql://u:Hunter2-S3CRETPW%zz@127.0.0.1:1/x",
                "postgresql://u:Hunter2-S3CRETPW@[::1/x",
                "postgresql://u:Hun@ter2-S3CRETPW@127.0.0.1:1/x"):
        with pytest.raises(immagent.StoreConnectionError) as err:
            asyncio.run(Store.connect(dsn))
        assert MARK not in str(err.value) and "Hunter2" not in str(err.value)
        assert main(["--db", dsn, "agents"]) != 0  # the command line says the same
        assert MARK not in capsys.readouterr().err


# -- credentials policy --------------------------------------------------------------------

CREDENTIAL_CONFIGS: list[dict[str, Any]] = [
    {"azure_password": "pw"},
    {"client_secret": "cs"},
    {"gigachat_access_token": "tok"},
    {"provider_specific_header": {"custom_llm_provider": "x",
                                  "extra_headers": {"Authorization": "Bearer abc"}}},
    {"extra_body": {"api_key": "sk-1"}},
    {"API_KEY": "sk-2"},
    {"Api_Key": "sk-3"},
    {"extra_body": {"nested": [{"deeper": {"X-Api-Key": "k"}}]}},
    {"apiKey": "camel"},
    {"extra_body": {"headers": {"anything": "x"}}},
]


@pytest.mark.parametrize("config", CREDENTIAL_CONFIGS, ids=lambda c: next(iter(c)))
async def test_a_credential_never_reaches_a_stored_row(
        store: Store, store_dsn: str, config: dict[str, Any]) -> None:
    with pytest.raises(immagent.ValidationError) as err:
        await store.create_agent("bot", "p", "m", model_config=config)
    assert err.value.field == "model_config"
    assert "credential" in str(err.value) and "sk-" not in str(err.value)
    agent = await store.create_agent("bot", "p", "m")
    before = count_rows(store_dsn, "immagent_assets")
    with pytest.raises(immagent.ValidationError) as err:
        await store.append(agent, [Message(role="assistant", content="a",
                                           call_config=config)])
    assert err.value.field == "messages[0].call_config"
    assert count_rows(store_dsn, "immagent_assets") == before
    with pytest.raises(immagent.ValidationError):
        SimpleAgent("bot", "p", "immagent/echo", model_config=config)


def test_ordinary_model_parameters_are_not_credentials() -> None:
    config = {"temperature": 0.2, "max_tokens": 10, "max_completion_tokens": 5, "top_p": 1,
              "seed": 3, "response_format": {"type": "json_object"}, "user": "u1",
              "extra_body": {"thinking": {"budget_tokens": 100}}, "token_limit": 9,
              "reasoning_effort": "low", "stop": ["x"], "logit_bias": {"1": 2}}
    assert check_config(config) == config
    assert not any(is_credential_key(k) for k in ("tokens", "tokenizer", "sort_key", "n"))


async def test_a_bundle_with_a_credential_is_refused(
        store: Store, store_dsn: str, tmp_path: Path) -> None:
    path, _ = crafted.valid_agent(tmp_path / "cred.bundle",
                                  model_config={"extra_body": {"Api_Key": "sk-live"}})
    with pytest.raises(immagent.BundleError, match="credential"):
        await store.import_bundle(path)
    assert count_rows(store_dsn, "immagent_states") == 0


async def test_an_echoed_key_is_redacted_in_llm_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-0123456789abcdef")
    scripted = ScriptedModel([Reply.fail(litellm_error(
        "auth", "Incorrect API key provided: sk-env-0123456789abcdef. Also Bearer "
        "ya29.a0Af-token-value and api_key=plain-secret-42"))])
    agent = SimpleAgent("bot", "p", scripted.model)
    with pytest.raises(immagent.LLMError) as err:
        await agent.advance("hi", max_retries=0)
    shown = str(err.value)
    for secret in ("sk-env-0123456789abcdef", "ya29.a0Af-token-value", "plain-secret-42"):
        assert secret not in shown
        cause = err.value.__cause__
        assert cause is None or secret not in str(cause)  # tracebacks print the cause
    assert "Incorrect API key provided" in shown  # the useful part stays


def test_redaction_keeps_ordinary_text() -> None:
    text = "rate limit: 5000 tokens per minute; password authentication failed for user"
    assert redact_secrets(text, environ={}) == text


async def test_a_turn_with_ordinary_config_is_recorded(store: Store) -> None:
    agent = await store.append(await store.create_agent("bot", "p", "m"),
                               turn(1, call_config={"temperature": 0.5}))
    assert (await agent.get_messages())[1].call_config == {"temperature": 0.5}
