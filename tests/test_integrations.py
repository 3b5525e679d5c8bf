"""The snippets of ``docs/integrations.md`` run exactly as printed (issue 14).

Each code block after a ``<!-- test: NAME [requires=a,b] -->`` marker is run in a fresh interpreter in a
temporary folder; a block whose ``requires`` packages are missing is skipped (``pip install -e
'.[integrations]'``; ``make install`` installs them).
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import whiten

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
SNIPPET = re.compile(
    r"<!-- test: (?P<name>[\w-]+)(?: requires=(?P<requires>[\w,.-]+))? -->\n```python\n(?P<code>.*?)```", re.S
)


def snippets() -> dict[str, tuple[list[str], str]]:
    found = {
        m["name"]: ((m["requires"] or "").split(",") if m["requires"] else [], m["code"])
        for m in SNIPPET.finditer(DOC.read_text())
    }
    return found


def test_every_python_block_of_the_page_is_tested():
    text = DOC.read_text()
    assert text.count("```python") == len(snippets()) == 4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf-trainer", "lightning", "fsdp2-dcp", "compile"])
def test_integration_snippet_runs(name, tmp_path):
    requires, code = snippets()[name]
    missing = [pkg for pkg in requires if importlib.util.find_spec(pkg) is None]
    if missing:
        pytest.skip(f"needs {missing}: pip install -e '.[integrations]'")
    script = tmp_path / f"snippet_{name.replace('-', '_')}.py"  # not named like a module it imports
    script.write_text(code)
    # the snippet imports the whiten these tests import, whatever the working folder
    source = str(Path(whiten.__file__).resolve().parents[1])
    path = os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
