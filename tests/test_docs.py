"""The documentation holds as written: every Python block of README.md and docs/*.md runs, every
``levyattn`` command in them parses (with its presets and settings), every benchmark or
experiment command names a script and options that exist, and the site builds in strict mode."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from levyattn.cli import COMMANDS, build_parser
from levyattn.models import CONFIG_TYPES
from levyattn.training import TrainConfig
from levyattn.training.presets import apply_overrides, get_preset, split_overrides

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = [ROOT / "benchmarks" / "RESULTS.md", ROOT / "experiments" / "RESULTS.md", ROOT / "experiments" / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(language: str) -> list[tuple[str, str]]:
    """(id, code) of every fenced block in ``language`` on the documentation pages."""
    found = []
    for page in PAGES:
        blocks = [code for lang, code in FENCE.findall(page.read_text(encoding="utf-8")) if lang == language]
        found += [(f"{page.relative_to(ROOT)}:{i + 1}", code) for i, code in enumerate(blocks)]
    return found


PYTHON = _blocks("python")
SHELL = _blocks("bash")


def _commands(shell: str) -> list[list[str]]:
    """The commands of a shell block: continuations joined, comments dropped, ``&&`` split."""
    text = shell.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                commands.append(words)
    return commands


def _levyattn_args(words: list[str]) -> list[str] | None:
    """The arguments of a ``levyattn`` command (also ``python -m levyattn``, ``torchrun ... -m
    levyattn``, ``.venv/bin/levyattn``), or None for another program."""
    if Path(words[0]).name == "levyattn":
        return words[1:]
    if "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "levyattn":
        return words[words.index("-m") + 2 :]
    return None


def test_the_pages_have_examples():
    # a floor that fails if the block pattern stops matching, not a count of today's examples
    assert len(PYTHON) >= 10 and len(SHELL) >= 5


@pytest.mark.parametrize("code", [c for _, c in PYTHON], ids=[i for i, _ in PYTHON])
def test_python_block_runs(code, tmp_path, monkeypatch):
    if "transformers" in code and importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers (the hf extra)")
    monkeypatch.chdir(tmp_path)  # whatever a block writes goes to a scratch folder
    exec(compile(code, "<documentation block>", "exec"), {"__name__": "__docs__"})


@pytest.mark.parametrize("shell", [s for _, s in SHELL], ids=[i for i, _ in SHELL])
def test_levyattn_commands_parse(shell, capsys):
    parser = build_parser()
    for words in _commands(shell):
        args = _levyattn_args(words)
        if args is None:
            continue
        try:
            parsed = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"`{shlex.join(words)}` does not parse: {capsys.readouterr().err}")
        name = getattr(parsed, "preset", None)
        if name is not None:  # the preset exists and its model and training take the --set keys
            preset = apply_overrides(get_preset(name), split_overrides(parsed.overrides))
            TrainConfig.from_dict(preset["train"])
            model_fields = {f.name for f in dataclasses.fields(CONFIG_TYPES[preset["model_type"]])}
            assert set(preset["model"]) <= model_fields, f"`{shlex.join(words)}`: unknown model settings"


#: Where a command writes without --out (what its help says), for the commands whose default is computed.
COMPUTED_OUT = {"train": "runs/PRESET", "sweep": "runs/sweep-PRESET", "lens": "lens_results/MODEL"}


def _output_folders() -> set[str]:
    """The folders the pages' ``levyattn`` commands write into, and every command's default --out."""
    folders = set(COMPUTED_OUT.values())
    for name in COMMANDS:
        command = argparse.ArgumentParser()
        importlib.import_module(f"levyattn.cli.{name}").add_arguments(command)
        folders.add(command.get_default("out"))
    parser = build_parser()
    for _, shell in SHELL:
        for words in _commands(shell):
            args = _levyattn_args(words)
            if args is not None and getattr(parser.parse_args(args), "out", None):
                folders.add(parser.parse_args(args).out)
    return {str(Path(f)) for f in folders if f}


def test_output_folders_of_the_documented_commands_are_ignored_by_git():
    """A newcomer who runs the pages' commands in a checkout keeps a clean ``git status``."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    folders = sorted(_output_folders())
    assert {"analysis", "lens_out", "report", "runs/digits-vit-ddp"} <= set(folders)
    for folder in folders:
        assert not Path(folder).is_absolute(), folder
        found = subprocess.run(["git", "check-ignore", "-q", "--no-index", f"{folder}/summary.json"], cwd=ROOT)
        assert found.returncode == 0, f"{folder}/ (written by a documented command) is not in .gitignore"
    tracked = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout == "", f"tracked files that .gitignore matches: {tracked.stdout}"


TRAIN_PRESET_CALL = re.compile(r"train_preset\([^,]+,\s*[\"']([^\"']+)[\"']")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_a_pages_training_runs_in_turn(page):
    """Run in the order of the page, its ``levyattn train`` commands and ``train_preset`` calls do not
    start a run in a folder that an earlier one filled (refused unless ``--overwrite``)."""
    parser = build_parser()
    folders = set()
    for language, code in FENCE.findall(page.read_text(encoding="utf-8")):
        starts = []  # (what, folder, overwrite) of every run the block starts
        if language == "python":
            starts = [(f"train_preset(..., {f!r})", Path(f), False) for f in TRAIN_PRESET_CALL.findall(code)]
        for words in _commands(code) if language == "bash" else []:
            args = _levyattn_args(words)
            if args and args[0] == "train":
                parsed = parser.parse_args(args)
                if parsed.preset is not None and not parsed.resume:
                    starts.append((shlex.join(words), Path(parsed.out or f"runs/{parsed.preset}"), parsed.overwrite))
        for what, folder, overwrite in starts:
            assert overwrite or folder not in folders, f"{page.name}: `{what}`: {folder} already holds a run"
            folders.add(folder)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_a_pages_commands_read_runs_it_trained(page):
    """A command that reads a run folder (``analyze``, ``translate``, ``generate``, ``train --resume``)
    reads one that a ``levyattn train`` command before it on the same page writes."""
    parser = build_parser()
    shell = "\n".join(code for language, code in FENCE.findall(page.read_text(encoding="utf-8")) if language == "bash")
    trained = set()
    for words in _commands(shell):
        args = _levyattn_args(words)
        if not args:
            continue
        parsed = parser.parse_args(args)
        read = parsed.resume if args[0] == "train" else getattr(parsed, "checkpoint", getattr(parsed, "input", None))
        if read is not None and str(read).startswith("runs/"):
            assert Path(read) in trained, f"{page.name}: `{shlex.join(words)}`: nothing trains {read} before"
        if args[0] == "train" and parsed.preset is not None:
            trained.add(Path(parsed.out or f"runs/{parsed.preset}"))


def _shell_blocks_with_prose() -> list[tuple[str, str, str]]:
    """(id, code, the prose since the previous block) of every bash block on the pages."""
    found = []
    for page in PAGES:
        text, start, count = page.read_text(encoding="utf-8"), 0, 0
        for match in FENCE.finditer(text):
            if match.group(1) == "bash":
                count += 1
                found.append((f"{page.relative_to(ROOT)}:{count}", match.group(2), text[start : match.start()]))
            start = match.end()
    return found


SHELL_WITH_PROSE = _shell_blocks_with_prose()
EMBEDDED_DATA = {"digits", "multiscale", "toy"}  # generated or shipped with scikit-learn: no files, no network


@pytest.mark.parametrize(
    "shell,prose", [(s, p) for _, s, p in SHELL_WITH_PROSE], ids=[i for i, _, _ in SHELL_WITH_PROSE]
)
def test_commands_that_need_data_or_a_model_give_the_offline_alternative(shell, prose):
    """A command that trains on a dataset read from disk names, in its block or the prose before it, a
    preset on embedded data; one that reads a pretrained model (``lens``, ``convert``) says what to run
    offline instead."""
    from levyattn.training.presets import all_presets

    presets = all_presets()
    offline = {name for name, preset in presets.items() if preset["data"].get("dataset") in EMBEDDED_DATA}
    context = prose + shell
    parser = build_parser()
    for words in _commands(shell):
        args = _levyattn_args(words)
        if not args or args[0] not in ("train", "sweep", "lens", "convert"):
            continue
        parsed = parser.parse_args(args)
        if args[0] in ("lens", "convert"):
            assert "offline" in context, f"`{shlex.join(words)}` needs a pretrained model: say what runs offline"
        elif parsed.preset is not None and parsed.preset not in offline:
            assert any(re.search(rf"(?<![\w-]){name}(?![\w-])", context) for name in offline), (
                f"`{shlex.join(words)}` needs its dataset on disk: name a preset on embedded data beside it"
            )


@pytest.mark.parametrize("shell", [s for _, s in SHELL], ids=[i for i, _ in SHELL])
def test_a_resumed_convert_repeats_its_run(shell):
    """``levyattn convert ... --resume`` continues a run only with the same model, text and options (the
    held-out windows and the training windows depend on ``--eval-text``)."""
    converts = [_levyattn_args(w) for w in _commands(shell)]
    converts = [a for a in converts if a and a[0] == "convert"]
    for args in converts:
        if "--resume" in args:
            first = [a for a in converts if "--resume" not in a]
            assert [a for a in args if a != "--resume"] in first, f"{shlex.join(args)} does not repeat its run"


def test_pages_quote_the_kernel_build_as_the_code_announces_it():
    """The one-time build of the CPU kernel: the pages give the time its log message gives, and quote
    that message as it is."""
    source = (ROOT / "src" / "levyattn" / "backends" / "fused_cpu.py").read_text(encoding="utf-8")
    message = re.search(r'"(building the CPU kernel once) \(about (\d+) s', source)
    assert message, "the build message of fused_cpu.py is no longer where this test looks"
    quoted = 0
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for seconds in re.findall(r"(?:kernel once|compiled on first use)[^()]*?\(about (\d+) s", text, re.S):
            assert seconds == message.group(2), f"{page.name}: a build of about {seconds} s, the code says"
            quoted += 1
        for line in re.findall(r"`levyattn: ([^`]*?) \.\.\.`", text):
            assert line == message.group(1), f"{page.name} quotes `levyattn: {line} ...`"
    assert quoted >= 2


INLINE_COMMAND = re.compile(r"`((?:levyattn|python -m levyattn) [^`]+)`")


def _inline_commands() -> list[tuple[str, list[str]]]:
    """(id, words) of every ``levyattn ...`` command quoted inline (between single backticks) in the pages."""
    found = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for match in INLINE_COMMAND.finditer(text):
            found.append((f"{page.relative_to(ROOT)}: {match.group(1)}", shlex.split(match.group(1))))
    return found


def _subcommand_options(parser, words: list[str]) -> tuple[str, set[str]] | None:
    """The subcommand named in ``words`` and the option strings its parser takes (None: no subcommand)."""
    import argparse

    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in actions:
        for word in words:
            if word in action.choices:
                return word, set(action.choices[word]._option_string_actions)
    return None


INLINE = _inline_commands()


def test_pages_quote_commands_inline():
    assert len(INLINE) >= 3  # a floor that fails if the inline pattern stops matching


@pytest.mark.parametrize("words", [w for _, w in INLINE], ids=[i for i, _ in INLINE])
def test_inline_commands_name_real_options(words):
    """An inline command may elide its arguments (``...``), but every option it names exists."""
    parser = build_parser()
    found = _subcommand_options(parser, _levyattn_args(words) or [])
    options = {w.split("=")[0] for w in words if w.startswith("--")}
    valid = set(parser._option_string_actions) | (found[1] if found else set())
    unknown = sorted(options - valid)
    assert not unknown, f"`{shlex.join(words)}` names option(s) {unknown} that levyattn {found and found[0]} lacks"


def _script_commands() -> list[tuple[str, list[str]]]:
    """(id, words) of every ``python benchmarks/X.py ...``, ``python experiments/X.py ...`` or
    ``python examples/X.py ...`` command quoted in the pages and the results files."""
    found = []
    for page in PAGES + RESULTS:
        text = page.read_text(encoding="utf-8").replace("\\\n", " ")
        for match in re.finditer(r"python3? ((?:benchmarks|experiments|examples)/\w+\.py)([^`\n]*)", text):
            found.append((f"{page.relative_to(ROOT)}: {match.group(1)}", [match.group(1), *match.group(2).split()]))
    return found


SCRIPTS = _script_commands()


@pytest.mark.parametrize("words", [w for _, w in SCRIPTS], ids=[i for i, _ in SCRIPTS])
def test_script_commands_name_real_scripts_and_options(words):
    script = ROOT / words[0]
    assert script.is_file(), f"{words[0]} does not exist"
    source = script.read_text(encoding="utf-8")
    for option in (w.split("=")[0] for w in words[1:] if w.startswith("--")):
        assert f'"{option}"' in source, f"{words[0]} has no option {option}"


CITED_FILE = re.compile(r"(?:benchmarks|experiments)/(?:results|figures)/[\w./-]+\.(?:json|png)")


def test_results_cite_existing_files():
    for page in RESULTS:
        for path in CITED_FILE.findall(page.read_text(encoding="utf-8")):
            if "NAME" not in path:  # NAME: a placeholder for the preset of the command beside it
                assert (ROOT / path).is_file(), f"{page.relative_to(ROOT)} cites {path}, which does not exist"


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (mkdocs, mkdocstrings) is not installed")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()


# Documents outside the repository that the code must not cite: the pages of docs/ hold them.
EXTERNAL = re.compile(r"FNA_SPEC|FRACTIONAL_LENS|seed-[\w-]+\.md|(?<![\w/])DESIGN\.md")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".txt", ".cpp", ".h", ".json", ".cfg", ".sh"}


def test_nothing_cites_documents_outside_the_repository():
    files = [ROOT / name for name in ("README.md", "pyproject.toml", "mkdocs.yml", ".ci/run")]
    for top in ("src", "tests", "benchmarks", "experiments", "examples", "docs"):
        files += [p for p in (ROOT / top).rglob("*") if p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    cited = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        if path.is_file() and path != Path(__file__).resolve()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if EXTERNAL.search(line)
    ]
    assert not cited, "citations of documents outside the repository:\n" + "\n".join(cited)
