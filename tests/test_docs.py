"""The docs: the site builds with --strict, and the quickstarts run as pasted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def code_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), flags=re.S)


def test_site_builds_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "Influence of training points on test losses" in api  # docstrings rendered


@pytest.mark.parametrize(
    "page", ["quickstart-pytorch.md", "quickstart-tensorflow.md", "quickstart-jax.md"]
)
def test_quickstart_runs(page: str) -> None:
    (block,) = code_blocks(page)
    assert len(block.strip().splitlines()) <= 20
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("framework", ["PyTorch", "TensorFlow / Keras", "JAX"])
def test_the_evaluation_examples_run(framework: str) -> None:
    """Each framework's LDS example on docs/evaluation.md runs as pasted and prints a score."""
    page = (ROOT / "docs" / "evaluation.md").read_text()
    section = page.split(f"## {framework}\n", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"LDS -?\d\.\d\d ± \d\.\d\d", result.stdout), result.stdout


@pytest.mark.parametrize("example", [0, 1], ids=["bert", "gpt2 and its per-token scores"])
def test_the_transformer_examples_run(example: int) -> None:
    """docs/transformers.md: BERT and GPT-2 on all parameters, as pasted (GPT-2 with its sequel)."""
    blocks = code_blocks("transformers.md")
    block = blocks[0] if example == 0 else blocks[1] + "\n" + blocks[2]
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = (
        ["all covered: ['dense', 'elementwise', 'embedding']"]
        if example == 0
        else ["TracIn", "its strongest proponent is"]
    )
    assert all(text in result.stdout for text in expected), result.stdout


def test_fault13_the_readme_use_snippets_run_verbatim() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2
    result = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_distributed_example_runs_on_a_local_cluster() -> None:
    """docs/distributed.md's LocalCluster example runs as pasted (2 workers; all closed after)."""
    pytest.importorskip("distributed")
    (block,) = code_blocks("distributed.md")
    result = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2000,) (5, 3) (5, 2000)" in result.stdout, result.stdout
