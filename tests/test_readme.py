"""The README's two set-up commands stay true: CI runs the test command verbatim, and the
main-job command's onnxtq invocation works as written."""

import re
import shlex

from builders import ROOT

from onnxtq.cli import main


def _commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_the_readme_test_command():
    _, test_command = _commands()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_main_job_runs(tmp_path, monkeypatch):
    main_job, _ = _commands()
    onnxtq_part = main_job.split("&&")[-1].strip()
    argv = shlex.split(onnxtq_part)
    assert argv[0] == "onnxtq"
    argv = [str(ROOT / a) if a.startswith("models/") else a for a in argv[1:]]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    assert (tmp_path / "mnist_cnn.int4.onnx").is_file()
