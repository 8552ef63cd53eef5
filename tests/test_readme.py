"""The README cannot rot: every ```python block runs (on the bundled model), every `moejax`
command of a ```bash/```sh block parses, and the two commands that get a newcomer started
(install, then a decode of the bundled model) are there and the decode runs."""

import re
import shlex
from pathlib import Path

import pytest

from moejax.cli import BUNDLED, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.M | re.S)  # (language, code)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [code for lang, code in BLOCKS if lang in ("bash", "sh", "shell", "console")]
bundled = pytest.mark.skipif(not (ROOT / "checkpoints" / BUNDLED / "config.json").is_file(),
                             reason="bundled checkpoint not present")


def commands(code: str) -> list[list[str]]:
    """Each command of a shell block (continuations joined, `&&` chains split) as argv."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            argv = shlex.split(part, comments=True)
            if argv:
                out.append(argv)
    return out


MOEJAX = [argv for code in SHELL for argv in commands(code) if argv[0] == "moejax"]


def test_readme_has_code_blocks():
    assert PYTHON and SHELL and len(MOEJAX) >= 10


@pytest.mark.parametrize("argv", MOEJAX, ids=lambda a: " ".join(a[1:4]))
def test_every_moejax_command_parses(argv):
    args = build_parser().parse_args(argv[1:])  # argparse exits (code 2) on anything it rejects
    assert callable(args.func)


def test_two_commands_get_a_newcomer_running():
    first = commands(SHELL[0])
    assert len(first) == 2, "the first shell block should be exactly: install, then decode"
    assert first[0][:3] == ["pip", "install", "-e"]
    assert first[1][:2] == ["moejax", "decode"] and "--model" not in first[1]  # the bundled model


@bundled
def test_the_first_decode_runs(capsys):
    argv = commands(SHELL[0])[1][1:]
    i = argv.index("--max-new-tokens")
    argv[i + 1] = "4"  # the README's command, fewer tokens
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("ROMEO:") and len(cap.out.strip()) > len("ROMEO:")
    assert "TPOT" in cap.err and "error" not in cap.err


@bundled
@pytest.mark.parametrize("n", range(len(PYTHON)))
def test_python_block_runs(n, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository's root
    exec(compile(PYTHON[n], f"README.md python block {n}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # the block prints what it shows
