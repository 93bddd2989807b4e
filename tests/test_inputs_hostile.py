"""A hostile user's task files: the output, the inputs and the model options are checked before
any model call, and every refusal is one line with exit code 2 (issue 12)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atlas.errors import SpecError
from tests.conftest import ROOT, atlas_cli

DOC = "# Notes\n\nThe pilot logged 1,234 trips in its first month.\n"
CSV = "station,trips\nA,10\nB,20\n"


def _task(tmp_path: Path, extra: str = "", *, documents: str = "[docs/*.md]") -> Path:
    """A task folder with one document and one data file; `extra` is appended to task.yaml."""
    folder = tmp_path / "task"
    (folder / "docs").mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    (folder / "docs" / "a.md").write_text(DOC)
    (folder / "data" / "d.csv").write_text(CSV)
    task = folder / "task.yaml"
    body = (
        "task: Write a short brief on the pilot.\n"
        f"inputs:\n  documents: {documents}\n  data: [data/d.csv]\n"
        "tracing: {enabled: false}\n"
        "memory: {enabled: false}\n"
    )
    task.write_text(body + extra)
    return task


def _run(
    task: Path, tmp_path: Path, options: str = ""
) -> tuple[subprocess.CompletedProcess[str], Path]:
    log = tmp_path / "calls.jsonl"
    proc = atlas_cli(
        "run",
        str(task),
        "--model",
        f"scripted?call_log={log}{options}",
        "--state-dir",
        str(tmp_path / "state"),
        "--quiet",
        cwd=task.parent,
        timeout=120,
    )
    return proc, log


def _refused(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def _no_calls(log: Path) -> None:
    assert not log.exists() or log.read_text() == "", "a model was called before the check"


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- 1. the output may not overwrite the task's own files -----------------------------------


@pytest.mark.parametrize("output", ["task.yaml", "docs/a.md", "data/d.csv", "./docs/../task.yaml"])
def test_an_output_that_names_the_task_file_or_an_input_is_refused(
    output: str, tmp_path: Path
) -> None:
    task = _task(tmp_path, f"output: {output}\n")
    victim = (task.parent / output).resolve()
    before = victim.read_bytes()
    _refused(atlas_cli("validate", str(task)), "output")
    proc, log = _run(task, tmp_path)
    _refused(proc, "output", victim.name)
    _no_calls(log)
    assert victim.read_bytes() == before


def test_an_output_that_names_an_input_is_refused_by_the_python_api(tmp_path: Path) -> None:
    from atlas.spec import TaskSpec

    (tmp_path / "notes.md").write_text(DOC)
    with pytest.raises(SpecError, match=r"output.*notes\.md"):
        TaskSpec.from_dict(
            {"task": "t", "inputs": {"documents": ["notes.md"]}, "output": "notes.md"},
            base_dir=tmp_path,
        )


def test_an_output_that_is_an_existing_folder_is_refused(tmp_path: Path) -> None:
    task = _task(tmp_path, "output: docs\n")
    _refused(atlas_cli("validate", str(task)), "output", "directory")


# -- 2. no writing through symlinks ---------------------------------------------------------


@pytest.mark.parametrize("linked", ["file", "folder"])
def test_a_symlinked_output_is_refused(linked: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "brief.md"
    target.write_text("someone else's file\n")
    if linked == "file":
        task = _task(tmp_path, "output: brief.md\n")
        (task.parent / "brief.md").symlink_to(target)
    else:
        task = _task(tmp_path, "output: out/brief.md\n")
        (task.parent / "out").symlink_to(outside)
    _refused(atlas_cli("validate", str(task)), "output", "symlink", "name the real path")
    proc, log = _run(task, tmp_path)
    _refused(proc, "symlink")
    _no_calls(log)
    assert target.read_text() == "someone else's file\n"
    assert sorted(p.name for p in outside.iterdir()) == ["brief.md"]


# -- 3. an unwritable output is found before the work, and the check leaves nothing ---------


@pytest.mark.parametrize(
    "output", ["task.yaml/out.md", "data/d.csv/x/out.md", "/proc/atlas/out.md", "n" * 300 + ".md"]
)
def test_an_unwritable_output_is_refused_before_any_model_call(output: str, tmp_path: Path) -> None:
    task = _task(tmp_path, f"output: {output}\n")
    before = _tree(tmp_path)
    _refused(atlas_cli("validate", str(task)), "output")
    assert _tree(tmp_path) == before, "validate left something behind"
    proc, log = _run(task, tmp_path)
    _refused(proc, "output")
    _no_calls(log)


def test_validate_creates_nothing_for_a_new_output_folder(tmp_path: Path) -> None:
    task = _task(tmp_path, "output: new/deeper/brief.md\n")
    before = _tree(tmp_path)
    proc = atlas_cli("validate", str(task))
    assert proc.returncode == 0, proc.stderr
    assert _tree(tmp_path) == before


# -- 4. globs are bounded -------------------------------------------------------------------


def test_a_glob_matching_too_many_files_is_refused_quickly(tmp_path: Path) -> None:
    from atlas.spec import MAX_MATCHES

    task = _task(tmp_path, documents="['many/**/*.md']")
    many = task.parent / "many" / "sub"
    many.mkdir(parents=True)
    for n in range(MAX_MATCHES + 1):
        (many / f"{n}.md").touch()
    started = time.monotonic()
    err = _refused(atlas_cli("validate", str(task)), "inputs.documents[0]", "narrow the pattern")
    assert f"more than {MAX_MATCHES} files" in err
    assert time.monotonic() - started < 30


def test_a_glob_over_the_whole_disk_ends_quickly(tmp_path: Path) -> None:
    """`/**/*.json` used to follow every symlinked folder (and /proc's loops) for minutes."""
    task = _task(tmp_path, documents="['/**/*.json']")
    started = time.monotonic()
    proc = atlas_cli("validate", str(task), timeout=90)
    assert proc.returncode in (0, 2), proc.stderr[-500:]
    assert "Traceback" not in proc.stderr
    if proc.returncode == 2:
        _refused(proc, "inputs.documents[0]", "narrow the pattern")
    assert time.monotonic() - started < 45


def test_a_glob_that_takes_too_long_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import atlas.spec
    from atlas.spec import load_task

    task = _task(tmp_path, documents="['many/**/*.md']")
    for n in range(600):
        (task.parent / "many" / f"d{n}").mkdir(parents=True)
    monkeypatch.setattr(atlas.spec, "MAX_GLOB_SECONDS", 0.0)
    with pytest.raises(SpecError, match=r"inputs\.documents\[0\].*takes more than.*narrow"):
        load_task(task)


# -- 5. documents: de-duplicated by real path; what is not indexed is a warning -------------


def test_skipped_documents_are_warnings_and_a_symlink_loop_adds_no_copies(tmp_path: Path) -> None:
    from atlas.spec import input_warnings, load_task
    from atlas.tools.documents import DocumentIndex

    task = _task(tmp_path, documents="[docs]")
    docs = task.parent / "docs"
    (docs / "notes.pdf").write_bytes(b"%PDF-1.4 not indexed")
    (docs / "data.bin").write_bytes(b"\x00\x01\x02")
    (docs / "blob.txt").write_bytes(b"text\x00\x00\x00binary")
    (docs / "loop").symlink_to(".")
    proc = atlas_cli("validate", str(task))
    assert proc.returncode == 0, proc.stderr
    assert "1 documents" in proc.stdout and "warning" in proc.stdout, proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    for name in ("notes.pdf", "data.bin", "blob.txt"):
        assert sum(name in line for line in warnings) == 1, proc.stderr
    assert "Traceback" not in proc.stderr

    spec = load_task(task)
    assert len(input_warnings(spec)) == len(warnings)
    index = DocumentIndex.from_paths(spec.document_paths, spec.root)
    assert index.sources == ["docs/a.md"]
    assert len(index.chunks) == 1
    assert len(index.search("pilot trips")) == 1


def test_a_glob_through_a_symlink_loop_lists_each_document_once(tmp_path: Path) -> None:
    from atlas.spec import load_task

    task = _task(tmp_path, documents="['docs/**/*.md']")
    (task.parent / "docs" / "loop").symlink_to(".")
    (task.parent / "docs" / "loop2").symlink_to(".")
    started = time.monotonic()
    spec = load_task(task)
    assert [p.name for p in spec.document_paths] == ["a.md"]
    assert time.monotonic() - started < 5


def test_two_names_for_one_document_index_it_once(tmp_path: Path) -> None:
    from atlas.spec import load_task

    task = _task(tmp_path, documents="[docs/a.md, docs/*.md, ./docs/../docs/a.md]")
    (task.parent / "docs" / "same.md").symlink_to("a.md")
    assert [p.name for p in load_task(task).document_paths] == ["a.md"]


def test_the_index_skips_a_file_it_cannot_read(tmp_path: Path) -> None:
    from atlas.tools.documents import DocumentIndex

    good = tmp_path / "a.md"
    good.write_text(DOC)
    index = DocumentIndex.from_paths([tmp_path / "gone.md", good, good], tmp_path)
    assert index.sources == ["a.md"]
    assert len(index.chunks) == 1


# -- 6. YAML bombs and free-form params -----------------------------------------------------


def _bomb() -> str:
    lines = ["      l0: &l0 [" + ", ".join(['"lol"'] * 9) + "]"]
    for level in range(1, 9):
        refs = ", ".join([f"*l{level - 1}"] * 9)
        lines.append(f"      l{level}: &l{level} [{refs}]")
    return "models:\n  default:\n    model: scripted\n    params:\n" + "\n".join(lines) + "\n"


def _limited(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m atlas ...` with 2 GB of address space: a regression fails, not the machine."""
    limit = 2 * 1024**3

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    return subprocess.run(
        [sys.executable, "-m", "atlas", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=cap,
    )


def test_a_billion_laughs_in_params_is_refused_fast_in_bounded_memory(tmp_path: Path) -> None:
    task = _task(tmp_path, _bomb())
    log = tmp_path / "calls.jsonl"
    for args in (
        ("validate", str(task)),
        ("run", str(task), "--model", f"scripted?call_log={log}", "--state-dir", str(tmp_path)),
    ):
        started = time.monotonic()
        proc = _limited(*args, cwd=ROOT)
        _refused(proc, str(task), "YAML aliases?")
        assert time.monotonic() - started < 5
    _no_calls(log)


def test_params_are_size_bounded(tmp_path: Path) -> None:
    many = "".join(f"      k{n}: {n}\n" for n in range(51))
    task = _task(tmp_path, "models:\n  default:\n    model: openai:gpt-4o\n    params:\n" + many)
    _refused(atlas_cli("validate", str(task)), "models.default.params")
    big = "x" * 20_000
    task = _task(
        tmp_path, f"models:\n  default:\n    model: openai:gpt-4o\n    params: {{k: {big}}}\n"
    )
    err = _refused(atlas_cli("validate", str(task)), "models.default.params")
    assert big not in err


# -- 7. model-string options ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ("&latncy_ms=5", ("unknown option 'latncy_ms' for scripted", "latency_ms")),
        ("&latency_ms=abc", ("option latency_ms: expected a number, got 'abc'",)),
        ("&latency_ms=-5", ("option latency_ms",)),
        ("&fanout=lots", ("option fanout",)),
        ("&behaviour=sulk", ("option behaviour", "cooperative")),
    ],
)
def test_bad_scripted_options_on_the_command_line_are_exit_2(
    options: str, words: tuple[str, ...], tmp_path: Path
) -> None:
    task = _task(tmp_path)
    proc, log = _run(task, tmp_path, options)
    _refused(proc, *words)
    _no_calls(log)


def test_bad_scripted_options_in_a_task_file_are_exit_2(tmp_path: Path) -> None:
    task = _task(tmp_path, "models: {default: 'scripted?latency_ms=abc'}\n")
    _refused(atlas_cli("validate", str(task)), "models.default", "option latency_ms")
    task = _task(tmp_path, "models: {default: {model: scripted, params: {tool_round: 1}}}\n")
    _refused(atlas_cli("validate", str(task)), "models.default", "unknown option 'tool_round'")
    task = _task(tmp_path, "models: {default: 'scripted?latency_ms=0&fanout=2'}\n")
    assert atlas_cli("validate", str(task)).returncode == 0


def test_provider_options_must_be_names_and_small(tmp_path: Path) -> None:
    from atlas.spec import parse_model_string

    task = _task(tmp_path)
    for bad in ("openai:gpt-4o?bad-name=1", f"openai:gpt-4o?stop={'x' * 11_000}"):
        proc = atlas_cli("run", str(task), "--model", bad, "--state-dir", str(tmp_path / "s"))
        err = _refused(proc, "option")
        assert "x" * 100 not in err
    assert parse_model_string("openai:gpt-4o?api_key=sk-test&temperature=0.2")[2] == {
        "api_key": "sk-test",
        "temperature": 0.2,
    }
