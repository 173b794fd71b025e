"""The README's examples run exactly as written."""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


def test_training_loop_example_runs_and_learns():
    code = python_block_after("## Example: a DLB training loop")
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)
    stats = namespace["stats"]
    assert int(stats.n_distilled) == 16  # the previous step's 16 samples are taught
    assert float(stats.ce) < 0.5 * math.log(10)  # well below chance: the model learnt the rule
    assert 0.0 < float(stats.alpha_mean) <= 1.0 and 1.0 <= float(stats.tau_mean) <= 3.0
    assert re.fullmatch(r"loss [\d.]+  ce [\d.]+  kl [\d.]+  alpha_mean [\d.]+  tau_mean [\d.]+\n", printed.getvalue())


def test_readme_test_command_is_the_ci_command():
    ci = (README.parent / ".ci" / "run").read_text()
    command = re.search(r"## Tests\n\n```bash\n(.*?)\n```", README.read_text(), re.DOTALL).group(1)
    assert command in ci.splitlines()
