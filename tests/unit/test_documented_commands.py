"""Every command line written in README.md and docs/*.md parses with its tool's own parser.

Commands are taken from code blocks (fenced, or indented by four spaces) and from inline code
that starts with a command and holds no placeholder (`...`, `{a,b}`, `[--x]`, `FILE`, `X.yaml`).
Lines ending in `\\` are joined; `&&`, `;` and `|` separate commands; environment assignments,
redirections and `nice`/`timeout` prefixes are dropped. Then, by the command's program:

- `python tools/X.py`, `python pretrain_harpe.py`, `python benchmarks/...`, `python scripts/...`,
  `python experiments/...`, `python -m megatron_harpe...`, and the same under `torchrun`: the
  script's own argparse parser runs on the arguments, exactly as the tool calls it (its
  `parse_args(argv)` function, else its `main(argv)`, stopped right after the parse), so an
  unknown flag or a bad choice fails. Arguments a tool leaves to the config
  (`--section.key value`) must be config keys with values of the right type, checked with
  `load_config` against the `--config` file when one is given (which must exist); training
  commands whose process count is known (`--world-size`, `torchrun --nproc-per-node`) are also
  validated as a launch would validate them.
- `bash scripts/X.sh` and `sbatch scripts/slurm/X.sbatch`: the script must exist;
  `gpu_check.sh` arguments go through its parser, and a config plus overrides given to
  `train.sbatch` or `demo_cpu.sh` through `load_config`.

A failure names the file and line of the command. Run from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import os
import re
import shlex
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON_DIRS = ("tools/", "benchmarks/", "scripts/", "experiments/", "tests/")
COMMAND_START = re.compile(
    r"^(\$ )?(python3? |torchrun |sbatch |bash scripts/|pip |nice |timeout |harpe-|[A-Z_][A-Z0-9_]*=\S* )"
)
INLINE_COMMAND = re.compile(
    r"^(python3? (tools/|pretrain_harpe\.py|-m megatron_harpe|benchmarks/|scripts/|experiments/)|torchrun |harpe-)"
)
PLACEHOLDER = re.compile(r"\.\.\.|[{}\[\]<>]|\b[A-Z][A-Z0-9_]{1,}\b|\bX\.(py|yaml)\b")
CONTROL = {"&&", "||", ";", "|"}


@dataclasses.dataclass(frozen=True)
class DocCommand:
    file: str
    line: int
    text: str
    inline: bool = False  # inline code in prose: without arguments it only names the tool

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


class CommandError(Exception):
    pass


# --- finding the commands -------------------------------------------------------------------


def documentation_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def extract_commands(text: str, name: str) -> list[DocCommand]:
    """Command lines of one markdown text (see the module docstring)."""
    commands: list[DocCommand] = []
    lines = text.splitlines()
    in_fence = False
    index = 0
    while index < len(lines):
        raw = lines[index]
        number = index + 1
        index += 1
        if raw.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        indented = raw.startswith("    ") or raw.startswith("\t")
        stripped = raw.strip()
        if (in_fence or indented) and COMMAND_START.match(stripped):
            joined = stripped
            while joined.endswith("\\") and index < len(lines):
                joined = joined[:-1].rstrip() + " " + lines[index].strip()
                index += 1
            commands.append(DocCommand(name, number, joined.removeprefix("$ ")))
        elif not in_fence:
            for span in re.findall(r"`([^`]+)`", raw):
                if INLINE_COMMAND.match(span) and not PLACEHOLDER.search(span):
                    commands.append(DocCommand(name, number, span, inline=True))
    return commands


def all_documented_commands() -> list[DocCommand]:
    found = []
    for path in documentation_files():
        found += extract_commands(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    return found


def split_commands(text: str) -> list[list[str]]:
    """Shell words of each simple command, without env assignments, redirections and wrappers."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError as error:
        raise CommandError(f"cannot split into shell words: {error}") from None
    commands, current = [], []
    for word in words:
        if word in CONTROL:
            commands.append(current)
            current = []
        else:
            current.append(word)
    commands.append(current)
    cleaned = []
    for words in commands:
        kept, skip_next = [], False
        for word in words:
            if skip_next:
                skip_next = False
            elif word in (">", ">>", "<", "2>", "2>>", "&>"):
                skip_next = True
            elif re.match(r"^\d*(>>?|<)\S|^\d*>&\d$|^&>\S", word):
                continue
            else:
                kept.append(word)
        while kept and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", kept[0]):
            kept.pop(0)
        while kept and kept[0] in ("nice", "timeout", "time"):
            kept.pop(0)
            while kept and re.match(r"^-|^\d", kept[0]):  # nice -n -5, timeout 600
                kept.pop(0)
        if kept:
            cleaned.append(kept)
    return cleaned


# --- running a tool's parser ----------------------------------------------------------------


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace, extras: list[str]):
        super().__init__()
        self.namespace, self.extras = namespace, extras


@contextlib.contextmanager
def _stop_after_parse():
    """The outermost parse_args / parse_known_args raises _Parsed with its result, so a tool's
    `main` stops right after parsing (inner calls, such as subparsers', run unchanged)."""
    original_known, original_args = argparse.ArgumentParser.parse_known_args, argparse.ArgumentParser.parse_args
    depth = [0]

    def wrap(original, strict: bool):
        def parse(self, args=None, namespace=None):
            depth[0] += 1
            try:
                result = original(self, args, namespace)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise _Parsed(result, []) if strict else _Parsed(*result)
            return result

        return parse

    argparse.ArgumentParser.parse_known_args = wrap(original_known, strict=False)
    argparse.ArgumentParser.parse_args = wrap(original_args, strict=True)
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args, argparse.ArgumentParser.parse_args = original_known, original_args


_MODULES: dict[str, ModuleType] = {}


def _load_script(relative: str) -> ModuleType:
    if relative not in _MODULES:
        path = REPO / relative
        name = "_documented_" + re.sub(r"\W", "_", relative)
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look their module up there
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
        _MODULES[relative] = module
    return _MODULES[relative]


def run_parser(
    module: ModuleType, program: str, argv: list[str], entry=None
) -> tuple[argparse.Namespace | None, list[str]]:
    """Parse `argv` the way `module` does (or its console-script function `entry`); returns
    (namespace, arguments left to the config), or (None, []) for --help. An argparse error
    raises CommandError with argparse's message."""
    own_parse = getattr(module, "parse_args", None)
    if entry is not None:
        pass
    elif inspect.isfunction(own_parse) and own_parse.__module__ == module.__name__:
        entry = own_parse
    elif inspect.isfunction(getattr(module, "main", None)):
        entry = module.main
    else:
        raise CommandError(f"{program} has neither parse_args(argv) nor main(): cannot find its parser")
    takes_argv = bool(inspect.signature(entry).parameters)
    source = inspect.getsource(sys.modules[entry.__module__])  # a thin wrapper's main lives elsewhere
    if not any(call in source for call in ("parse_args", "parse_known_args", "parse_with_overrides")):
        if argv:
            raise CommandError(f"{program} has no argparse parser, but the command gives it arguments")
        return None, []  # nothing to parse (and its main must not run)
    stderr, stdout = io.StringIO(), io.StringIO()
    saved_argv, saved_env = sys.argv, dict(os.environ)
    try:
        with (
            _stop_after_parse(),
            contextlib.redirect_stderr(stderr),
            contextlib.redirect_stdout(stdout),
            warnings.catch_warnings(),
        ):
            sys.argv = [program, *argv]
            entry(argv) if takes_argv else entry()
    except _Parsed as parsed:
        return parsed.namespace, parsed.extras
    except SystemExit as exit_:
        if exit_.code in (0, None):
            return None, []  # --help
        message = stderr.getvalue().strip().splitlines()
        raise CommandError(message[-1] if message else f"{program} exited with {exit_.code}") from None
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    raise CommandError(f"{program} returned without parsing its arguments")


def check_config(config: str | None, extras: list[str], world_size: int | None = None) -> None:
    """Overrides must be config keys of the right type; a given config file must exist."""
    from megatron_harpe.config import load_config, parse_overrides

    try:
        cfg = load_config(config, parse_overrides(extras))
        if world_size is not None:
            cfg.validate(world_size=world_size, require_backend=False)
    except ValueError as error:
        raise CommandError(str(error)) from None


def _torchrun_world_size(options: list[str]) -> int | None:
    values = {}
    for index, word in enumerate(options):
        key, _, value = word.partition("=")
        if key.replace("_", "-") in ("--nproc-per-node", "--nnodes"):
            values[key.replace("_", "-")] = value or (options[index + 1] if index + 1 < len(options) else "")
    try:
        return int(values.get("--nproc-per-node", "1")) * int(values.get("--nnodes", "1"))
    except ValueError:
        return None


def console_scripts() -> dict[str, str]:
    """`[project.scripts]` of pyproject.toml: command -> "module:function"."""
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle).get("project", {}).get("scripts", {})


def check_python(target: str, argv: list[str], torchrun_options: list[str] | None = None) -> None:
    entry = None
    if target in console_scripts():
        module_name, _, function = console_scripts()[target].partition(":")
        module, program = importlib.import_module(module_name), target
        entry = getattr(module, function)
    elif target.startswith("-m "):
        module_name = target[3:]
        if not module_name.startswith("megatron_harpe"):
            return  # python -m pytest, pip, ...: not ours
        module, program = importlib.import_module(module_name), module_name
    else:
        if not (target == "pretrain_harpe.py" or target.startswith(PYTHON_DIRS)):
            raise CommandError(f"{target}: not a script of this repository")
        if not (REPO / target).is_file():
            raise CommandError(f"{target}: no such file")
        module, program = _load_script(target), target
    namespace, extras = run_parser(module, program, argv, entry)
    if namespace is None:
        return
    config = getattr(namespace, "config", None)
    if extras or isinstance(config, str):
        world_size = None
        if target in ("pretrain_harpe.py", "harpe-train"):
            world_size = namespace.world_size or (
                _torchrun_world_size(torchrun_options) if torchrun_options is not None else 1
            )
        check_config(config if isinstance(config, str) else None, extras, world_size)


def check_command(words: list[str]) -> None:
    program, rest = words[0], words[1:]
    if program in ("python", "python3"):
        if not rest or rest[0] == "-c":
            return
        if rest[0] == "-m":
            check_python(f"-m {rest[1]}", rest[2:])
        elif rest[0].endswith(".py"):
            check_python(rest[0], rest[1:])
    elif program == "torchrun":
        for index, word in enumerate(rest):
            if word == "-m":
                check_python(f"-m {rest[index + 1]}", rest[index + 2 :], rest[:index])
                return
            if word.endswith(".py"):
                check_python(word, rest[index + 1 :], rest[:index])
                return
        raise CommandError("torchrun without a script")
    elif program in console_scripts():
        check_python(program, rest)
    elif program == "bash":
        script = rest[0]
        if not (REPO / script).is_file():
            raise CommandError(f"{script}: no such file")
        if script == "scripts/gpu_check.sh":
            check_python("-m megatron_harpe.gpu_check", rest[1:])
        elif script == "scripts/demo_cpu.sh" and rest[1:]:
            check_config("configs/demo_cpu.yaml", rest[1:])
    elif program == "sbatch":
        scripts = [index for index, word in enumerate(rest) if word.endswith(".sbatch")]
        if not scripts:
            raise CommandError("sbatch without a batch script")
        script = rest[scripts[0]]
        if not (REPO / script).is_file():
            raise CommandError(f"{script}: no such file")
        arguments = rest[scripts[0] + 1 :]
        if script.endswith("train.sbatch"):
            if not arguments:
                raise CommandError("train.sbatch needs a config file")
            check_config(arguments[0], arguments[1:])


def check_names(words: list[str]) -> None:
    """An inline mention such as `python tools/evaluate.py` or `python -m megatron_harpe.launch`:
    the script or module must exist."""
    if words[1] == "-m":
        if importlib.util.find_spec(words[2]) is None:
            raise CommandError(f"module {words[2]} not found")
    elif not (REPO / words[-1]).is_file():
        raise CommandError(f"{words[-1]}: no such file")


def check_documented_command(command: DocCommand) -> None:
    try:
        for words in split_commands(command.text):
            if command.inline and words[0] in ("python", "python3") and len(words) == (3 if words[1] == "-m" else 2):
                check_names(words)
            else:
                check_command(words)
    except CommandError as error:
        raise AssertionError(f"{command}\n  -> {error}") from None


# --- the tests ------------------------------------------------------------------------------

COMMANDS = all_documented_commands()


def test_the_documentation_has_commands_to_check():
    files = {command.file for command in COMMANDS}
    assert len(COMMANDS) > 40 and "README.md" in files, f"found only {len(COMMANDS)} commands in {sorted(files)}"


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.file}:{c.line}" for c in COMMANDS])
def test_documented_command_parses(command: DocCommand, monkeypatch):
    monkeypatch.chdir(REPO)
    check_documented_command(command)


def test_extraction_joins_continuations_and_finds_inline_commands():
    text = "\n".join(
        [
            "Some prose with `python tools/select_bases.py --strategy paper --heads 32` inline,",
            "and a placeholder `python tools/evaluate.py --model DIR ...` that is skipped.",
            "",
            "```bash",
            "OMP_NUM_THREADS=1 python tools/prepare_data.py demo \\",
            "    --workdir work/demo > log.txt 2>&1",
            "```",
            "",
            "    $ nice -n -5 python benchmarks/rotary.py --repeats 5   # a comment",
        ]
    )
    commands = extract_commands(text, "page.md")
    assert [(c.line, c.text) for c in commands] == [
        (1, "python tools/select_bases.py --strategy paper --heads 32"),
        (5, "OMP_NUM_THREADS=1 python tools/prepare_data.py demo --workdir work/demo > log.txt 2>&1"),
        (9, "nice -n -5 python benchmarks/rotary.py --repeats 5   # a comment"),
    ]
    assert split_commands(commands[1].text) == [["python", "tools/prepare_data.py", "demo", "--workdir", "work/demo"]]
    assert split_commands(commands[2].text) == [["python", "benchmarks/rotary.py", "--repeats", "5"]]
    assert split_commands("pip install -e . && bash scripts/demo_cpu.sh") == [
        ["pip", "install", "-e", "."],
        ["bash", "scripts/demo_cpu.sh"],
    ]


@pytest.mark.parametrize(
    "text, complaint",
    [
        (
            (
                "python tools/convert_checkpoint.py hf-to-megatron --input hf --output ckpt "
                "--position configs/demo_cpu.yaml"
            ),
            "unrecognised argument",
        ),  # the README's old step 1: the flag is --config
        (
            "python tools/evaluate.py --model oracle --tokenizer tok.model --task passkey --scoring guess",
            "invalid choice",
        ),
        (
            "torchrun --nproc-per-node 2 pretrain_harpe.py --config configs/demo_cpu.yaml --train.learning_rate 1e-3",
            "learning_rate",
        ),
        ("python pretrain_harpe.py --config configs/demo_cpu.yaml --train.lr fast", "train.lr"),
        ("python tools/plan_memory.py --config configs/no_such.yaml --gpus 8", "not found"),
        ("python tools/no_such_tool.py --help", "no such file"),
        ("sbatch scripts/slurm/train.sbatch configs/demo_cpu.yaml --parallel.tensr 2", "tensr"),
    ],
)
def test_a_wrong_command_fails_naming_file_and_line(text, complaint, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(AssertionError) as failure:
        check_documented_command(DocCommand("docs/page.md", 12, text))
    message = str(failure.value)
    assert message.startswith("docs/page.md:12: ") and complaint in message, message


def test_a_right_command_passes(monkeypatch):
    monkeypatch.chdir(REPO)
    check_documented_command(
        DocCommand(
            "docs/page.md",
            1,
            "python tools/convert_checkpoint.py hf-to-megatron "
            "--input hf --output ckpt --config configs/demo_cpu.yaml --position.base 5e5",
        )
    )


def test_console_scripts_parse_with_their_function(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(
        sys.modules[__name__], "console_scripts", lambda: {"harpe-gpu-check": "megatron_harpe.gpu_check:main"}
    )
    check_documented_command(DocCommand("docs/page.md", 3, "harpe-gpu-check --help"))
    with pytest.raises(AssertionError, match=r"docs/page.md:4: harpe-gpu-check --bogus 1\n  -> .*bogus"):
        check_documented_command(DocCommand("docs/page.md", 4, "harpe-gpu-check --bogus 1"))
