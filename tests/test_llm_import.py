"""When LiteLLM is imported, and what its import and the model calls leave behind: the
offline models never import it; the import respects and restores the environment; a
production call registers no test double."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from immagent import lazy_litellm
from immagent.assets import Message
from immagent.exceptions import LLMError
from immagent.llm import complete


def run_python(code: str, *, env: dict[str, str] | None = None,
               path: Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet); its stdout."""
    full_env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    full_env.update(env or {})
    if path is not None:
        full_env["PYTHONPATH"] = os.pathsep.join([str(path), full_env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_offline_models_and_the_chat_command_never_import_litellm(tmp_path: Path) -> None:
    out = run_python(f"""
        import asyncio, sys
        from immagent import Model, SimpleAgent
        from immagent.cli import main
        from immagent.llm import complete
        from immagent.testing import Reply, ScriptedModel

        async def turns():
            agent = SimpleAgent("a", "sys", Model.ECHO)
            await agent.advance("hi")
            await agent.stream("hi").finish()
            scripted = ScriptedModel([Reply.call("add", a=1), "done", "again"])
            await SimpleAgent("b", "sys", scripted.model).stream("add").finish()
            await complete(scripted.model, "sys", [])

        asyncio.run(turns())
        assert main(["--db", {str(tmp_path / "c.db")!r}, "chat", "Hello"]) == 0
        print("litellm" in sys.modules)
    """)
    reply, saved, imported = out.splitlines()
    assert (reply, saved.startswith("agent "), imported) == ("Echo: Hello", True, "False")


def test_the_import_sets_the_local_cost_map_only_while_importing(tmp_path: Path) -> None:
    # A stand-in package named litellm records what its import saw (the real import takes
    # seconds and would be made at most once per process).
    fake = tmp_path / "litellm"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os\nseen = os.environ.get('LITELLM_LOCAL_MODEL_COST_MAP')\n")
    code = """
        import os
        from immagent import lazy_litellm
        module = lazy_litellm.load()
        print(module.seen, os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP"),
              module.suppress_debug_info, lazy_litellm.load() is module)
    """
    assert run_python(code, path=tmp_path).split() == ["True", "None", "True", "True"]
    user_set = run_python(code, path=tmp_path, env={"LITELLM_LOCAL_MODEL_COST_MAP": "False"})
    assert user_set.split() == ["False", "False", "True", "True"]  # the user's value stays


async def test_a_production_call_registers_no_offline_provider(
        monkeypatch: pytest.MonkeyPatch) -> None:
    litellm = lazy_litellm.load()
    monkeypatch.setattr(litellm, "custom_provider_map", [])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    monkeypatch.setenv("OPENAI_API_BASE", "http://127.0.0.1:9/v1")
    before = dict(os.environ)
    with pytest.raises(LLMError):
        await complete("openai/gpt-4o-mini", "sys", [Message(role="user", content="hi")],
                       max_retries=0, timeout=10)
    assert litellm.custom_provider_map == []
    assert dict(os.environ) == before
