"""Bad input at scale: hypothesis writes task files and memory commands no one would write by
hand. None may produce a traceback; each bad one gets exit code 2 and one line that says where."""

from __future__ import annotations

import contextlib
import io
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from atlas import cli
from atlas.spec import TaskSpec

# The task file's own fields, and those of its sections, from the schema itself.
FIELDS = list(TaskSpec.model_fields)
NESTED = {
    name: list(annotation.model_fields)
    for name, field in TaskSpec.model_fields.items()
    if isinstance(annotation := field.annotation, type) and issubclass(annotation, BaseModel)
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(alphabet="\u202e\u200b\ufeff\U0001f600\u0301ßİ\\\"'%{}[]:#&*!|>", max_size=20),
    st.sampled_from(
        [
            "scripted",
            "openai:",
            ":",
            "local:../../etc",
            "research",
            "../..",
            "~",
            "x" * 10_000,
            "1e309",
            "-0",
            "bolt://",
            "http://",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def task_documents(draw: Any) -> Any:
    """Mostly mappings over the real field names (so validation goes deep), sometimes not."""
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return draw(values)
    doc: dict[Any, Any] = {}
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True)):
        if field in NESTED and draw(st.booleans()):
            keys = st.sampled_from([*NESTED[field], "unknown_key"])
            doc[field] = draw(st.dictionaries(keys, values, max_size=4))
        else:
            doc[field] = draw(values)
    if draw(st.booleans()):
        doc[draw(st.text(max_size=10))] = draw(values)
    return doc


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def _check_one_line(code: int, err: str, *, where: str) -> None:
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("atlas: error:") and where in lines[0], lines[0]


@settings(
    max_examples=700,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(doc=task_documents())
def test_fuzzed_task_structures_fail_cleanly(doc: Any, tmp_path: Path) -> None:
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    code, _, err = _run(["validate", str(path)])
    if code == 0:
        return  # hypothesis found a valid task file; nothing to report
    _check_one_line(code, err, where=str(path))
    if isinstance(doc, dict) and doc:
        # A mapping's problem is named by its field path (or the file is empty of a task).
        message = err.split(f"{path}:", 1)[1]
        assert ":" in message, err


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_fuzzed_raw_bytes_fail_cleanly(raw: bytes | str, tmp_path: Path) -> None:
    path = tmp_path / "task.yaml"
    if isinstance(raw, str):
        path.write_text(raw, encoding="utf-8")
    else:
        path.write_bytes(raw)
    code, _, err = _run(["validate", str(path)])
    if code != 0:
        _check_one_line(code, err, where=str(path))


words = st.text(alphabet=string.printable + "éß\u202e\U0001f600", max_size=30)
memory_args = st.one_of(
    st.tuples(
        st.just("search"),
        st.lists(words, min_size=1, max_size=3),
        st.sampled_from(
            [
                [],
                ["--k", "0"],
                ["--k", "x"],
                ["--k", "51"],
                ["--k", "3"],
                ["--kind", "nope"],
                ["--json"],
            ]
        ),
    ),
    st.tuples(st.just("ingest"), st.lists(words, min_size=1, max_size=3), st.just([])),
    st.tuples(
        st.just("graph"),
        st.lists(words, min_size=1, max_size=1),
        st.sampled_from([[], ["--to", ""], ["--json"]]),
    ),
    st.tuples(
        st.sampled_from(["stats", "clear"]),
        st.just([]),
        st.sampled_from([[], ["--vector-url", "ftp://nowhere"], ["--graph-uri", "http://x"]]),
    ),
)


@pytest.fixture(scope="module")
def memory_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from atlas.memory.store import Memory

    store = tmp_path_factory.mktemp("fuzz") / "memory"
    docs = Path(__file__).parent / "fixtures" / "recall_heldout" / "docs"
    memory = Memory(store)
    memory.ingest(sorted(docs.glob("*.md"))[:5], docs)
    memory.close()
    return store


@pytest.fixture(autouse=True, scope="module")
def _passages_kept(memory_store: Path) -> Any:
    yield
    from atlas.memory.store import Memory

    memory = Memory(memory_store)
    assert memory.vector.count() == 5, "a fuzzed command deleted or added passages"
    memory.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=memory_args)
def test_fuzzed_memory_commands_never_crash(case: Any, memory_store: Path) -> None:
    command, positional, options = case
    if command == "ingest":
        assume(not any(Path(p).exists() for p in positional))  # never ingest "/" or "."
    argv = ["memory", command, *positional, *options, "--store", str(memory_store)]
    code, out, err = _run(argv)
    assert "Traceback" not in err + out
    assert code in (0, 1, 2), (argv, code, err)
    if command == "clear":
        # Without --yes and without a terminal, clear refuses: nothing is ever deleted.
        assert code == 2
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("atlas: error:"), err
