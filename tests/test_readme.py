"""README's two set-up commands exist and CI runs the test command verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [
        line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")
    ]


def test_readme_opens_with_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert "examples/distill_digits.py" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


def test_main_example_exists():
    assert (ROOT / "examples" / "distill_digits.py").exists()


def test_declared_torch_lower_bound_is_the_version_ci_tests():
    """pyproject's ``torch>=X`` is the torch CI installs and runs the suite on, no older."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    bounds = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    assert len(bounds) == 1 and bounds[0].startswith("torch>=")
    declared = bounds[0].removeprefix("torch>=")
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"torch=={declared}" in ci or f"torch=={declared}.0" in ci
    assert f"torch=={declared}" in readme_commands()[1]
