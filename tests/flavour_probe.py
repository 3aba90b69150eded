"""What an install flavour of immagent must do, run by that flavour's own interpreter.

    python tests/flavour_probe.py WORKDIR [--extras llm,langgraph,...] [--simulate]

``--extras`` names the extras of immagent-core the flavour installed (the ``immagent``
distribution is ``llm``). The probe checks, and exits non-zero on the first miss:

* every module of the ``immagent`` package imports, except an integration whose extra is
  not installed, which raises ``ExtraNotInstalledError`` naming ``pip install
  'immagent-core[<extra>]'`` (never a raw ImportError); ``from immagent import *`` works;
* the store: create an agent, advance it with the offline model (whole and streamed), read
  it back from a new connection, verify, export and verify the bundle;
* LiteLLM is there exactly with ``llm``, and is not a known-bad release; without it a
  provider model, an offline one routed through LiteLLM and ``immagent chat --model
  <provider>`` fail with ``ExtraNotInstalledError`` naming ``pip install immagent`` (the
  command line says it on one line, no traceback), and the offline models still work;
* ``MCPManager()`` opens where the MCP SDK is installed, else says ``pip install immagent``;
* signing (``cryptography``: the ``sign`` extra, or brought by a framework or ``llm``): where
  it is installed, a key made, a bundle exported signed and verified under a trust policy
  (library and ``immagent verify-bundle --trusted-key``); where it is not, ``generate_key``
  and ``immagent keygen`` say ``pip install 'immagent-core[sign]'`` and write no file.

``--simulate`` runs it in an environment that has every extra (the repository's own):
imports of distributions outside the flavour's dependency closure then fail as if they were
not installed, so ``make test`` checks each flavour in seconds; ``make test-install``
(scripts/install_flavours.py) runs the probe in real virtualenvs built from the wheels.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import pkgutil
import re
import sys
import sysconfig
import types
from collections.abc import Sequence
from pathlib import Path

#: LiteLLM releases that were compromised (a credential stealer in a .pth file).
BAD_LITELLM = {"1.82.7", "1.82.8"}
CORE = "immagent-core"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--extras", default="", help="comma-separated extras installed")
    parser.add_argument("--simulate", action="store_true",
                        help="hide every distribution outside the flavour's closure")
    args = parser.parse_args(argv)
    extras = {e for e in args.extras.split(",") if e}
    unknown = extras - extras_of(CORE)
    if unknown:
        parser.error(f"not extras of {CORE}: {sorted(unknown)}")
    if args.simulate:
        sys.meta_path.insert(0, Hide(allowed_modules(extras)))
    args.workdir.mkdir(parents=True, exist_ok=True)
    for leftover in [*args.workdir.glob("*.db*"), *args.workdir.glob("*.bundle")]:
        leftover.unlink()  # a rerun starts from empty stores
    check_modules(extras)
    asyncio.run(check_store(args.workdir))
    # No integration brings LiteLLM: only the llm extra (the immagent distribution) does.
    assert available("litellm") == ("llm" in extras), "LiteLLM installed without 'llm'"
    if "llm" in extras:
        check_litellm_release()
    else:
        asyncio.run(check_litellm_missing(args.workdir))
    # The MCP SDK comes with llm, and with the Agents SDK (which has MCP tools of its own).
    asyncio.run(check_mcp(present=available("mcp_types")))
    # cryptography comes with sign, and through llm's and the Agents SDK's own dependencies.
    signing = available("cryptography")
    assert signing or "sign" not in extras, "the sign extra without cryptography"
    check_signing(args.workdir, present=signing)
    print(f"flavour {sorted(extras) or ['core']}: ok")
    return 0


# -- the flavour's modules ---------------------------------------------------------------


def check_modules(extras: set[str]) -> None:
    import immagent
    from immagent.exceptions import ExtraNotInstalledError

    names = [m.name for m in pkgutil.walk_packages(immagent.__path__, "immagent.")
             if not m.name.endswith(".__main__")]  # importing it runs the command line
    assert len(names) > 50, names  # the walk found the package, not an empty directory
    for name in names:
        try:
            importlib.import_module(name)
        except ExtraNotInstalledError as e:
            # Only an adapter may need a framework, and only one that is not installed.
            assert name.startswith("immagent.integrations."), (name, e)
            assert e.extra not in extras, (name, e)
            assert f"pip install 'immagent-core[{e.extra}]'" in str(e), (name, e)
            assert e.extra in extras_of(CORE), (name, e.extra)
        # Any other exception (a raw ImportError included) escapes: the probe fails.
    namespace: dict[str, object] = {}
    exec("from immagent import *", namespace)
    assert "Store" in namespace and "MCPManager" in namespace


# -- the store -----------------------------------------------------------------------------


async def check_store(workdir: Path) -> None:
    import immagent
    from immagent import Model, Store, TextDelta

    db = workdir / "flavour.db"
    async with await Store.connect(str(db)) as store:
        await store.init_schema()
        agent = await store.create_agent("probe", "You are helpful.", Model.ECHO)
        first = await agent.advance("Hello!")
        pieces: list[str] = []
        async with first.stream("Streamed, word by word") as s:
            async for event in s:
                if isinstance(event, TextDelta):
                    pieces.append(event.text)
        second = s.agent
        assert "".join(pieces) == "Echo: Streamed, word by word", pieces
        assert second.parent_id == first.id and first.parent_id == agent.id
    async with await Store.connect(str(db)) as store:
        again = await store.load_agent(second.id)
        texts = [m.content for m in await again.get_messages()]
        assert texts == ["Hello!", "Echo: Hello!", "Streamed, word by word",
                         "Echo: Streamed, word by word"], texts
        assert again.digest == second.digest
        report = await store.verify()
        assert report.ok and report.agents_checked == 3, report.lines()
        bundle = workdir / "probe.bundle"
        await store.export(again, bundle)
    assert len(immagent.verify_bundle(bundle).agents) == 3
    simple = await immagent.SimpleAgent("s", "sys", Model.ECHO).advance("hi")
    assert simple.last_response() == "Echo: hi"


# -- the model and tool layer --------------------------------------------------------------


async def check_litellm_missing(workdir: Path) -> None:
    from immagent import SimpleAgent
    from immagent.cli import main as cli
    from immagent.exceptions import ExtraNotInstalledError
    from immagent.testing import route_through_litellm

    agent = SimpleAgent("a", "sys", "openai/gpt-4o-mini")
    for attempt in (agent.advance("hi"), agent.stream("hi").finish()):
        try:
            await attempt
        except ExtraNotInstalledError as e:
            says_install_immagent(e, "LiteLLM")
        else:
            raise AssertionError("a provider model ran without LiteLLM")
    route_through_litellm(True)
    try:
        await SimpleAgent("a", "sys", "immagent/echo").advance("hi")
    except ExtraNotInstalledError as e:
        says_install_immagent(e, "LiteLLM")
    else:
        raise AssertionError("routed through LiteLLM without LiteLLM")
    finally:
        route_through_litellm(False)
    err = io.StringIO()
    db = str(workdir / "cli.db")
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = await asyncio.to_thread(cli, ["--db", db, "chat", "--model",
                                               "openai/gpt-4o-mini", "Hello"])
    lines = err.getvalue().strip().splitlines()
    assert status == 1 and len(lines) == 1, (status, err.getvalue())
    assert lines[0].startswith("immagent: error: ") and "pip install immagent" in lines[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert await asyncio.to_thread(cli, ["--db", db, "chat", "Hello"]) == 0
    assert out.getvalue().startswith("Echo: Hello\n"), out.getvalue()
    assert "litellm" not in sys.modules


def check_litellm_release() -> None:
    version = importlib.metadata.version("litellm")
    assert version not in BAD_LITELLM, f"litellm {version} is a compromised release"


async def check_mcp(*, present: bool) -> None:
    from immagent import MCPManager
    from immagent.exceptions import ExtraNotInstalledError

    try:
        async with MCPManager() as mcp:
            assert mcp.servers == ()
    except ExtraNotInstalledError as e:
        assert not present, e
        says_install_immagent(e, "the MCP SDK")
    else:
        assert present, "MCPManager() without the MCP SDK"


def check_signing(workdir: Path, *, present: bool) -> None:
    from immagent import Model, Store, TrustPolicy, generate_key, verify_bundle
    from immagent.cli import main as cli
    from immagent.exceptions import ExtraNotInstalledError

    key_file = workdir / "alice"
    for leftover in (key_file, workdir / "alice.pub", workdir / "cli-key",
                     workdir / "cli-key.pub"):
        leftover.unlink(missing_ok=True)
    if not present:
        try:
            generate_key(key_file)
        except ExtraNotInstalledError as e:
            assert e.extra == "sign", e
            assert str(e).endswith(": pip install 'immagent-core[sign]'"), e
        else:
            raise AssertionError("generate_key without cryptography")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = cli(["keygen", str(workdir / "cli-key")])
        lines = err.getvalue().strip().splitlines()
        assert status != 0 and len(lines) == 1, (status, err.getvalue())
        assert lines[0].startswith("immagent: error: "), lines
        assert lines[0].endswith("pip install 'immagent-core[sign]'"), lines
        assert not [*workdir.glob("alice*"), *workdir.glob("cli-key*")]
        return
    key = generate_key(key_file)
    bundle = workdir / "signed.bundle"

    async def export_signed() -> None:
        async with await Store.connect(str(workdir / "signed.db")) as store:
            await store.init_schema()
            agent = await (await store.create_agent("s", "sys", Model.ECHO)).advance("Sign me")
            await store.export(agent, bundle, sign=[key])

    asyncio.run(export_signed())
    trust = TrustPolicy.from_files([workdir / "alice.pub"])
    assert verify_bundle(bundle, trust=trust).trusted_by == (key.public.id,)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli(["verify-bundle", str(bundle), "--trusted-key",
                      str(workdir / "alice.pub")])
    assert status == 0 and f"vouch for it (1 needed): {key.public.id}" in out.getvalue(), (
        status, out.getvalue())


def says_install_immagent(e: BaseException, needs: str) -> None:
    from immagent.exceptions import ExtraNotInstalledError, ImmAgentError

    assert isinstance(e, ExtraNotInstalledError) and isinstance(e, ImmAgentError), type(e)
    assert isinstance(e, ImportError) and e.extra == "llm" and needs in str(e), e
    assert str(e).endswith(": pip install immagent"), e


def available(module: str) -> bool:
    """Whether ``module`` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # hidden (--simulate)
        return False


# -- what the flavour installs -------------------------------------------------------------


def extras_of(dist: str) -> set[str]:
    return set(importlib.metadata.metadata(dist).get_all("Provides-Extra") or ())


def allowed_modules(extras: set[str]) -> set[str]:
    """Top-level modules a flavour holds: the standard library and the modules of every
    distribution in immagent-core's dependency closure with ``extras``."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [(CORE, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        key = f"{canonical(name)}[{','.join(sorted(wanted))}]"
        if key in seen:
            continue
        seen.add(key)
        for line in importlib.metadata.requires(name) or ():
            req = Requirement(line)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    dists = {k.split("[")[0] for k in seen}
    modules = set(sys.stdlib_module_names) | {"immagent"}
    for module, owners in importlib.metadata.packages_distributions().items():
        if any(canonical(d) in dists for d in owners):
            modules.add(module)
    return modules


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class Hide(importlib.abc.MetaPathFinder):
    """Make imports of every top-level module outside ``allowed`` and the standard
    library's directories fail as if it were not installed."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = set(allowed)
        paths = sysconfig.get_paths()
        stdlib = {paths["stdlib"], paths["platstdlib"]}
        self.stdlib = [*stdlib, *(str(Path(d) / "lib-dynload") for d in stdlib)]

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        top = fullname.partition(".")[0]
        if top in self.allowed:
            return None
        if importlib.machinery.PathFinder.find_spec(top, self.stdlib) is not None:
            self.allowed.add(top)  # e.g. _sysconfigdata_*, which stdlib_module_names omits
            return None
        raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)


if __name__ == "__main__":
    sys.exit(main())
