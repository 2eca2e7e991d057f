"""Every command in README.md's ```bash blocks runs as written, or at least parses.

* ``pip install ...`` and ``python -m pytest``: skipped (CI installs the project and runs the suite).
* ``lightning|semconv fit|test|validate|predict ...``: all parsed with ``--print_config`` (config files and flags must
  be valid, the input data and tokenizer they name must exist); the cheap ones in :data:`RUN` also run for real,
  shrunk, in a scratch checkout. The others are listed in :data:`PARSE_ONLY` with the reason.
* ``semconv pipeline ...``: run with ``--dry_run`` (skipped while the checkout has no ``pipeline`` subcommand).
* ``semconv serve ...`` and the ``curl`` beside it: the serve flags are parsed by the service's parser, ``serve --help``
  runs, and the curl URL is answered by the app that serve starts on the same store URL, over a published version.
* ``python experiments/...``: their ``--help`` runs; ``bash experiments/...``: syntax-checked (``bash -n``). These two
  are also taken from the prose's inline code, where the README names its scripts.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lightning_modules.cli import main
from tests.conftest import REPO

README = REPO / "README.md"
SHARED = REPO.parent / "shared"
CLI_ENTRY_POINT = "lightning_modules.cli:main"
LIGHTNING_SUBCOMMANDS = ("fit", "test", "validate", "predict")
PLACEHOLDER = re.compile(r"<[^<>]+>")  # <ckpt>, <best>, <user id>: what an earlier stage or the reader supplies

# README commands that run for real: the command as written -> flags that shrink it, and the file it must leave
# (relative to the checkout it runs in).
RUN = {
    "lightning fit --config configs/synthetic/sasrec.yaml": (
        [
            "--trainer.max_epochs=1",
            "--data.init_args.synthetic.num_users=300",
            "--data.init_args.synthetic.num_items=120",
        ],
        "runs/synthetic/sasrec/csv/version_0/test_metrics.json",
    ),
}
# Why the other CLI commands are only parsed: the first rule whose text occurs in the command gives the reason.
PARSE_ONLY = [
    ("configs/trainer/gpu.yaml", "needs a GPU (bf16-mixed)"),
    ("configs/strategy/", "a multi-GPU / multi-node strategy"),
    ("redis://", "needs a Redis server"),
    ("slurm", "needs SLURM"),
    ("<", "needs an artifact (a checkpoint) that an earlier stage writes"),
    ("configs/games/", "real Games data in ../shared: tens of minutes on 2 CPU cores"),
    ("configs/industrial/", "real Industrial_and_Scientific data in ../shared: tens of minutes on 2 CPU cores"),
    ("configs/llm/", "a 7B LLM: GPUs and downloaded weights"),
]
# What the scripts named in the README need, which is why only their --help (python) or syntax (bash) is checked.
SCRIPT_REASONS = {
    "experiments/gpu_smoke.sh": "needs a GPU",
}


@dataclass(frozen=True)
class Command:
    line: int  # README line where the command starts
    text: str  # continuations joined, comment dropped, one element of an && chain

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)

    def __str__(self) -> str:
        return f"README.md:{self.line}: `{self.text}`"


def shell_parts(line: str) -> list[str]:
    """``line`` without its comment (``#`` starting a word, outside quotes), split at ``&&`` outside quotes."""
    parts, current, quote, i = [], "", None, 0
    while i < len(line):
        char = line[i]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            break
        elif line.startswith("&&", i):
            parts.append(current)
            current, i = "", i + 2
            continue
        current += char
        i += 1
    return [part.strip() for part in [*parts, current] if part.strip()]


def bash_block_commands(text: str) -> list[Command]:
    """Every command of the ```bash blocks of ``text`` (backslash continuations joined, && chains split)."""
    commands, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = line.strip()
        if fence.startswith("```"):
            in_block = not in_block and fence[3:].strip() in ("bash", "sh", "shell")
            continue
        if not in_block:
            continue
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands += [Command(start, part) for part in shell_parts(pending + line)]
        pending = ""
    return commands


def inline_script_commands(text: str) -> list[Command]:
    """``python experiments/...`` and ``bash experiments/...`` named in the prose's inline code (outside blocks; a
    span may wrap onto the next line)."""
    lines, in_block = text.splitlines(), False
    for number, line in enumerate(lines):
        fence = line.strip().startswith("```")
        lines[number] = "" if fence or in_block else line
        in_block = in_block != fence
    prose = "\n".join(lines)
    return [
        Command(prose.count("\n", 0, match.start()) + 1, " ".join(match.group(1).split()))
        for match in re.finditer(r"`((?:python|bash) experiments/[^`]+)`", prose)
    ]


README_TEXT = README.read_text()
COMMANDS = bash_block_commands(README_TEXT)


def kind(command: Command) -> str:
    argv = command.argv
    if argv[0] == "pip" or argv[:3] == ["python", "-m", "pytest"]:
        return "skip"
    if argv[0] in ("lightning", "semconv") and len(argv) > 1:
        if argv[1] in LIGHTNING_SUBCOMMANDS:
            return "cli"
        if argv[1] in ("pipeline", "serve"):
            return argv[1]
    if argv[0] in ("python", "bash") and len(argv) > 1 and argv[1].startswith("experiments/"):
        return "script"
    if argv[0] == "curl":
        return "curl"
    return "unknown"


def of_kind(name: str, commands: list[Command] = COMMANDS) -> list[Command]:
    return [command for command in commands if kind(command) == name]


def ids(commands: list[Command]) -> list[str]:
    return [f"L{command.line}:{command.text[:60]}" for command in commands]


def project_command(argv: list[str]) -> list[str]:
    """``lightning ...``/``semconv ...`` as this checkout runs it: the console scripts are this project's CLI (the
    one on PATH may be another checkout's)."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get(argv[0]) == CLI_ENTRY_POINT, f"{argv[0]} is not a console script of {CLI_ENTRY_POINT}"
    return [sys.executable, "-m", "lightning_modules.cli", *argv[1:]]


def without_placeholders(argv: list[str]) -> list[str]:
    return [PLACEHOLDER.sub("PLACEHOLDER", arg) for arg in argv]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A scratch directory that looks like the checkout to a command (configs/ and experiments/, ../shared beside it),
    so what a command writes (runs/, data/) stays out of the repository."""
    root = tmp_path_factory.mktemp("readme")
    (root / "checkout").mkdir()
    for name in ("configs", "experiments", "pyproject.toml"):
        (root / "checkout" / name).symlink_to(REPO / name)
    if SHARED.is_dir():
        (root / "shared").symlink_to(SHARED)
    return root / "checkout"


def run_in(checkout: Path, argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    return subprocess.run(argv, cwd=checkout, env=environment, capture_output=True, text=True, timeout=timeout)


def failure(command: Command, what: str, result: subprocess.CompletedProcess | str) -> str:
    output = result if isinstance(result, str) else f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return f"{command} {what}:\n{output}"


def require(ok: bool, command: Command, what: str, result: subprocess.CompletedProcess) -> None:
    """Fail naming the README line, with the command's output (rather than an assert's repr of the process)."""
    if not ok:
        pytest.fail(failure(command, what, result), pytrace=False)


def test_readme_commands_are_found_and_classified():
    assert "lightning fit --config configs/synthetic/sasrec.yaml" in [command.text for command in COMMANDS]
    unknown = [str(command) for command in COMMANDS if kind(command) == "unknown"]
    assert not unknown, f"README commands this test does not know how to check (add a rule): {unknown}"
    for text in RUN:
        assert text in [command.text for command in COMMANDS], f"RUN names `{text}`, which README.md no longer has"


@pytest.mark.parametrize("command", of_kind("skip"), ids=ids(of_kind("skip")))
def test_install_and_test_suite_commands_are_skipped(command):
    reason = "CI installs the project" if command.argv[0] == "pip" else "the test suite this test belongs to"
    pytest.skip(f"{command}: {reason}")


def test_extraction_joins_continuations_splits_chains_and_drops_comments():
    text = "```bash\npip install x && lightning fit --config a.yaml \\\n   --config b.yaml  # comment\n```\n"
    text += "```python\nlightning fit not-a-command\n```\n```bash\ncurl 'http://h/a#b'  # c\n```\n"
    assert [(command.line, command.text) for command in bash_block_commands(text)] == [
        (2, "pip install x"),
        (2, "lightning fit --config a.yaml     --config b.yaml"),
        (9, "curl 'http://h/a#b'"),
    ]


@pytest.mark.parametrize("command", of_kind("cli"), ids=ids(of_kind("cli")))
def test_cli_command_parses(command, monkeypatch, capsys):
    argv = without_placeholders(command.argv)
    reasons = [reason for pattern, reason in PARSE_ONLY if pattern in command.text]
    assert command.text in RUN or reasons, f"{command} is neither run (RUN) nor given a reason to be only parsed"
    project_command(argv)  # the console script is this project's CLI
    monkeypatch.chdir(REPO)  # README commands run from the checkout's root
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[1:], "--print_config"])
    output = capsys.readouterr()
    if exit_info.value.code not in (0, None):
        pytest.fail(failure(command, "does not parse", output.err[-4000:]), pytrace=False)
    config = yaml.safe_load(output.out)

    # the inputs the config reads must be there (artifacts of earlier stages are only named)
    data = config["data"]["init_args"]
    inputs = [] if data.get("source") == "synthetic" else [data["data_dir"]]
    inputs += [value for key, value in config["model"]["init_args"].items() if key == "tokenizer_path" and value]
    for path in map(Path, inputs):
        if path.parts[:1] == ("artifacts",):
            continue  # written by an earlier stage (e.g. the synthetic pipeline's tokenizer)
        if not path.exists():
            if path.resolve().is_relative_to(SHARED.resolve()) and not SHARED.is_dir():
                pytest.skip(f"{command} parses; its input {path} is in ../shared, absent here")
            pytest.fail(f"{command} reads {path}, which does not exist")


@pytest.mark.parametrize("text", sorted(RUN))
def test_cheap_command_runs(text, checkout):
    (command,) = [command for command in COMMANDS if command.text == text]
    shrink, expected = RUN[text]
    result = run_in(checkout, project_command([*command.argv, *shrink]), timeout=600)
    require(result.returncode == 0, command, f"(with {shrink}) failed", result)
    require((checkout / expected).is_file(), command, f"did not write {expected}", result)


@pytest.mark.parametrize("command", of_kind("pipeline"), ids=ids(of_kind("pipeline")))
def test_pipeline_command_dry_runs(command, checkout):
    probe = run_in(checkout, project_command(["semconv", "pipeline", "--help"]), timeout=300)
    if probe.returncode != 0 and "invalid choice" in probe.stderr:
        pytest.skip(f"{command}: this checkout's CLI has no `pipeline` subcommand yet")
    require(probe.returncode == 0, command, "`pipeline --help` failed", probe)
    result = run_in(checkout, project_command([*command.argv, "--dry_run"]), timeout=300)
    require(result.returncode == 0, command, "failed with --dry_run", result)


@pytest.mark.parametrize("command", of_kind("serve"), ids=ids(of_kind("serve")))
def test_serve_command_parses(command, checkout, capsys):
    from lightning_modules.service import _parser

    try:
        _parser().parse_args(without_placeholders(command.argv[2:]))
    except SystemExit:
        pytest.fail(failure(command, "does not parse", capsys.readouterr().err), pytrace=False)
    result = run_in(checkout, project_command([*command.argv[:2], "--help"]), timeout=300)
    require(result.returncode == 0 and "--store" in result.stdout, command, "--help failed", result)


def printed_config(argv: list[str], capsys) -> dict:
    with pytest.raises(SystemExit):
        main([*without_placeholders(argv[1:]), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.skipif(not of_kind("curl"), reason="README.md has no curl command")
def test_serving_commands_fit_together(tmp_path, monkeypatch, capsys):
    """The cache-building predict command writes the store that the serve command reads; that URL opens relative to
    the checkout, and the curl URL is one of the service's routes on serve's default address (a published version
    stands in for the cache build, which needs a stage-3 checkpoint)."""
    from urllib.parse import urlsplit

    from fastapi.testclient import TestClient

    from datamodules.recommendation_store import open_store
    from lightning_modules.service import _parser, create_app
    from tests.serving_fixtures import publish_version

    (serve,) = of_kind("serve")
    (curl,) = of_kind("curl")
    args = _parser().parse_args(serve.argv[2:])
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "offline")
    builds = [command for command in of_kind("cli") if "configs/serving/cache.yaml" in command.text]
    stores = [
        callback["init_args"]["store"]
        for build in builds
        for callback in printed_config(build.argv, capsys)["trainer"]["callbacks"]
        if callback["class_path"].endswith("RecommendationCacheWriter")
    ]
    assert args.store in stores, f"{serve} reads {args.store}; the cache builds {list(map(str, builds))} write {stores}"

    monkeypatch.chdir(tmp_path)
    store_file = Path(args.store.removeprefix("sqlite:///"))
    assert not store_file.is_absolute(), f"{serve}: the store is expected inside the checkout"
    store_file.parent.mkdir(parents=True)
    publish_version(open_store(args.store), [f"u{user}" for user in range(20)], offset=0, k=10)

    url = urlsplit(PLACEHOLDER.sub("u3", curl.argv[-1]))
    assert (url.hostname, url.port) == (args.host, args.port), f"{curl} does not call {serve}'s address"
    response = TestClient(create_app(open_store(args.store))).get(f"{url.path}?{url.query}")
    assert response.status_code == 200, f"{curl}: {response.status_code} {response.text}"
    body = response.json()
    assert body["user"] == "u3" and len(body["items"]) == 10 and not body["fallback"]


SCRIPTS = of_kind("script", COMMANDS + inline_script_commands(README_TEXT))


@pytest.mark.parametrize("command", SCRIPTS, ids=ids(SCRIPTS))
def test_experiment_script_help_or_syntax(command, checkout):
    interpreter, script = command.argv[:2]
    assert (REPO / script).is_file(), f"{command}: {script} does not exist"
    if interpreter == "bash":
        assert script in SCRIPT_REASONS, f"{command}: say in SCRIPT_REASONS why it is only syntax-checked"
        result = run_in(checkout, ["bash", "-n", script], timeout=60)
        require(result.returncode == 0, command, "has a syntax error", result)
        return
    result = run_in(checkout, [sys.executable, script, "--help"], timeout=300)
    require(result.returncode == 0 and "usage:" in result.stdout, command, "--help failed", result)
