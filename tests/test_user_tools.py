"""Users' own Python tools: what the model sees, both call paths, timeouts, errors that name the
problem, and references that resolve to the right module even with two tasks in one process."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.tools import BaseTool, StructuredTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from atlas.errors import SpecError, ToolError
from atlas.tools import BUILTIN_TOOLS
from atlas.tools.user import (
    ToolContext,
    ToolSource,
    load_reference,
    register_tool,
    tool,
    unregister_tool,
)

FIXTURES = Path(__file__).parent / "fixtures" / "user_tools"
SHOP = FIXTURES / "shop"
GENEROUS_S = 15.0
"""Upper bound for anything that should take well under a second (shared, noisy machines)."""


@pytest.fixture(autouse=True)
def _forget_tool_modules(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each test imports the fixture modules afresh (and leaves no `tools` in sys.modules)."""
    before = set(sys.modules)
    yield
    roots = (str(FIXTURES), str(tmp_path_factory.getbasetemp()))
    for name in set(sys.modules) - before:
        path = str(getattr(sys.modules[name], "__file__", None) or "")
        if name.startswith("_atlas_tool_") or path.startswith(roots):
            del sys.modules[name]


def context(tmp_path: Path, run_id: str = "run-1") -> ToolContext:
    return ToolContext(
        run_id=run_id,
        workspace=tmp_path / "runs" / run_id / "workspace",
        task_dir=SHOP,
        logger=logging.getLogger("atlas.tools"),
    )


def shop_tool(name: str, tmp_path: Path, **build: Any) -> BaseTool:
    source = load_reference(f"inventory:{name}", search_dirs=[SHOP], file="task.yaml")
    return source.build(context(tmp_path), **build)


def write(folder: Path, name: str, code: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(code))
    return path


def spec_error(ref: str, search_dirs: list[Path], **kwargs: Any) -> str:
    with pytest.raises(SpecError) as info:
        load_reference(ref, search_dirs=search_dirs, file="task.yaml", **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("task.yaml: ")
    return message


# --- what the model sees ----------------------------------------------------------------------


def test_schema_has_types_optional_fields_and_docstring_descriptions(tmp_path: Path) -> None:
    spec = convert_to_openai_tool(shop_tool("check_stock", tmp_path))["function"]
    assert spec["name"] == "check_stock"
    assert spec["description"] == "Check how many units of an item are in stock."
    params = spec["parameters"]
    assert params["required"] == ["sku"]
    assert params["properties"]["sku"] == {
        "type": "string",
        "description": "The item's stock-keeping unit, e.g. BK-101.",
    }
    assert params["properties"]["warehouse"]["default"] == "main"
    assert params["properties"]["warehouse"]["description"] == "Which warehouse to look in."
    min_qty = params["properties"]["min_qty"]
    assert {"type": "integer"} in min_qty["anyOf"]
    assert min_qty["description"].startswith("Only report the item")


def test_a_function_without_docstring_is_described_by_its_name(tmp_path: Path) -> None:
    spec = convert_to_openai_tool(shop_tool("undocumented", tmp_path))["function"]
    assert spec["description"] == "Tool undocumented"
    assert spec["parameters"]["properties"]["n"]["type"] == "integer"


def test_outputs_are_text_json_or_no_result_and_are_clipped(tmp_path: Path) -> None:
    stock = json.loads(shop_tool("check_stock", tmp_path).invoke({"sku": "BK-101"}))
    assert stock == {"sku": "BK-101", "warehouse": "main", "in_stock": 12, "unit_price": 9.5}
    assert shop_tool("undocumented", tmp_path).invoke({"n": 1}) == "(no result)"
    clipped = shop_tool("big", tmp_path).invoke({})
    assert clipped.startswith("x" * 4000)
    assert clipped.endswith("[6000 more characters cut]")


def test_the_built_tool_says_it_is_python_where_it_came_from_and_side_effects() -> None:
    @tool(side_effects=True)
    def send_mail(to: str) -> str:
        """Send a mail."""
        return f"sent to {to}"

    register_tool(send_mail)
    try:
        built = load_reference("send_mail", search_dirs=[]).build(context(Path("/tmp/unused")))
    finally:
        unregister_tool("send_mail")
    assert built.metadata is not None
    assert built.metadata["atlas.tool.kind"] == "python"
    assert built.metadata["atlas.tool.origin"] == "registered in code"
    assert built.metadata["atlas.tool.side_effects"] is True
    origin = load_reference("inventory:shout", search_dirs=[SHOP]).origin
    assert origin == f"inventory:shout ({SHOP / 'inventory.py'})"


# --- both call paths --------------------------------------------------------------------------


def test_sync_and_async_functions_work_on_both_paths(tmp_path: Path) -> None:
    stock = shop_tool("check_stock", tmp_path)
    reserve = shop_tool("reserve", tmp_path)
    assert json.loads(stock.invoke({"sku": "A1", "warehouse": "east"}))["warehouse"] == "east"
    assert reserve.invoke({"sku": "A1", "qty": 2}) == "reserved 2 x A1"

    async def on_a_loop() -> tuple[str, str]:
        return (
            await stock.ainvoke({"sku": "A1"}),
            await reserve.ainvoke({"sku": "A1", "qty": "3"}),
        )

    got_stock, got_reserve = asyncio.run(on_a_loop())
    assert json.loads(got_stock)["sku"] == "A1"
    assert got_reserve == "reserved 3 x A1"

    async def sync_call_while_a_loop_runs() -> str:
        return reserve.invoke({"sku": "B2", "qty": 1})

    assert asyncio.run(sync_call_while_a_loop_runs()) == "reserved 1 x B2"


def test_a_coroutine_only_langchain_tool_works_on_the_sync_path(tmp_path: Path) -> None:
    fetch = shop_tool("fetch", tmp_path)
    assert fetch.name == "fetch"
    assert fetch.description == "Fetch a URL."
    assert fetch.invoke({"url": "http://127.0.0.1/a"}) == "fetched http://127.0.0.1/a"
    assert asyncio.run(fetch.ainvoke({"url": "u"})) == "fetched u"


def test_a_sync_only_langchain_tool_works_on_the_async_path(tmp_path: Path) -> None:
    shout = shop_tool("shout", tmp_path)
    assert asyncio.run(shout.ainvoke({"text": "hi"})) == "HI"
    assert shout.invoke({"text": "ok"}) == "OK"
    schema = convert_to_openai_tool(shout)["function"]["parameters"]
    assert schema["properties"]["text"]["type"] == "string"


def test_a_wrapped_langchain_tool_makes_one_tool_span_not_two(tmp_path: Path) -> None:
    class Starts(BaseCallbackHandler):
        def __init__(self) -> None:
            self.names: list[str] = []

        def on_tool_start(self, serialized: dict[str, Any], input_str: str, **kw: Any) -> None:
            self.names.append(serialized["name"])

    starts = Starts()
    fetch = shop_tool("fetch", tmp_path)
    fetch.invoke({"url": "u"}, config={"callbacks": [starts]})
    asyncio.run(fetch.ainvoke({"url": "u"}, config={"callbacks": [starts]}))
    assert starts.names == ["fetch", "fetch"]


# --- run context and factories ----------------------------------------------------------------


def test_tool_context_is_injected_and_not_in_the_schema(tmp_path: Path) -> None:
    note = shop_tool("note", tmp_path)
    assert list(convert_to_openai_tool(note)["function"]["parameters"]["properties"]) == ["text"]
    assert note.invoke({"text": "remember"}) == "run-1 atlas.tools.note"
    assert (tmp_path / "runs" / "run-1" / "workspace" / "notes.txt").read_text() == "remember"


def test_tool_context_imported_only_for_type_checkers_still_works(tmp_path: Path) -> None:
    source = load_reference("typed_only:whoami", search_dirs=[SHOP])
    assert source.kind == "function"  # a ToolContext-only function returning str, not a factory
    built = source.build(context(tmp_path, "run-7"))
    assert convert_to_openai_tool(built)["function"]["parameters"]["properties"] == {}
    assert built.invoke({}) == "run-7"


def test_a_factory_is_called_per_run_with_that_runs_context(tmp_path: Path) -> None:
    source = load_reference("inventory:make_counter", search_dirs=[SHOP])
    assert (source.kind, source.name) == ("factory", "counter")
    first = source.build(context(tmp_path, "run-a"))
    second = source.build(context(tmp_path, "run-b"))
    assert first.name == "counter"
    assert first.description == "Count steps taken in this run."
    assert first.invoke({"step": 2}) == "run-a 2"
    assert first.invoke({}) == "run-a 3"
    assert second.invoke({}) == "run-b 1"  # its own state: nothing shared between runs


def test_parallel_calls_from_threads_do_not_interfere(tmp_path: Path) -> None:
    source = load_reference("inventory:echo_slowly", search_dirs=[SHOP])
    runs = {run: source.build(context(tmp_path, run)) for run in ("r1", "r2")}
    jobs = [(run, f"w{i}") for i in range(8) for run in runs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda job: runs[job[0]].invoke({"word": job[1]}), jobs))
    assert answers == [f"{run}:{word}" for run, word in jobs]


# --- failures at call time --------------------------------------------------------------------


def test_a_tool_that_raises_gives_a_one_line_tool_error(tmp_path: Path) -> None:
    explode = shop_tool("explode", tmp_path)
    with pytest.raises(ToolError, match=r"^ValueError: bad n 4 second line$"):
        explode.invoke({"n": 4})
    with pytest.raises(ToolError, match=r"^ValueError: bad n 5 second line$"):
        asyncio.run(explode.ainvoke({"n": 5}))


def test_system_exit_from_a_tool_is_not_swallowed(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        shop_tool("quit_process", tmp_path).invoke({})


def test_a_hung_sync_tool_times_out_on_both_paths(tmp_path: Path) -> None:
    stuck = shop_tool("stuck", tmp_path, default_timeout_s=0.3)
    try:
        for call in (lambda: stuck.invoke({}), lambda: asyncio.run(stuck.ainvoke({}))):
            started = time.monotonic()
            with pytest.raises(ToolError, match=r"tool 'stuck' timed out after 0.3 s"):
                call()
            assert time.monotonic() - started < GENEROUS_S
    finally:
        sys.modules["inventory"].RELEASE.set()


def test_a_hung_async_tool_times_out_on_both_paths(tmp_path: Path) -> None:
    stuck = shop_tool("stuck_async", tmp_path)  # @tool(timeout_s=0.3)
    for call in (lambda: stuck.invoke({}), lambda: asyncio.run(stuck.ainvoke({}))):
        started = time.monotonic()
        with pytest.raises(ToolError, match=r"tool 'stuck_async' timed out after 0.3 s"):
            call()
        assert time.monotonic() - started < GENEROUS_S


# --- failures when the reference is loaded ----------------------------------------------------


def test_an_unannotated_parameter_is_refused_before_any_call(tmp_path: Path) -> None:
    write(tmp_path, "loose.py", "def lookup(sku, n: int = 1) -> str:\n    return sku\n")
    message = spec_error("loose:lookup", [tmp_path])
    assert message == "task.yaml: tool 'loose:lookup': parameter 'sku' has no type annotation"


def test_a_missing_module_is_one_line(tmp_path: Path) -> None:
    message = spec_error("nowhere_mod:lookup", [tmp_path])
    assert "tool 'nowhere_mod:lookup': cannot import module 'nowhere_mod'" in message
    assert "ModuleNotFoundError: No module named 'nowhere_mod'" in message


def test_a_module_that_fails_to_import_names_the_error_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.py", "raise RuntimeError('no database configured')\n")
    message = spec_error("broken:lookup", [tmp_path])
    assert f"cannot import module 'broken' ({path})" in message
    assert message.endswith("RuntimeError: no database configured")
    write(tmp_path, "typo.py", "def lookup(sku: str) -> str:\n    return sku +\n")
    message = spec_error("typo:lookup", [tmp_path])
    assert "SyntaxError: invalid syntax (typo.py, line 2)" in message


def test_a_missing_function_suggests_the_close_one() -> None:
    message = spec_error("inventory:chek_stock", [SHOP])
    assert message.endswith("has no 'chek_stock'; did you mean 'check_stock'?")


def test_an_unknown_name_suggests_builtins_registered_and_written_as_module() -> None:
    known = list(BUILTIN_TOOLS)
    assert spec_error("serch_documents", [], known=known).endswith(
        "unknown tool 'serch_documents'; did you mean 'search_documents'?"
    )
    assert "write a Python tool as module:function" in spec_error("inventory.py:x", [SHOP])


# --- where modules come from ------------------------------------------------------------------


@pytest.mark.parametrize("already_imported", [False, True])
def test_the_module_next_to_the_task_wins_over_one_on_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, already_imported: bool
) -> None:
    body = 'def which() -> str:\n    """Which copy."""\n    return {!r}\n'
    write(tmp_path / "site", "ut_shadow.py", body.format("installed"))
    write(tmp_path / "task", "ut_shadow.py", body.format("next to the task"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    if already_imported:
        import ut_shadow

        assert ut_shadow.which() == "installed"
    source = load_reference("ut_shadow:which", search_dirs=[tmp_path / "task"])
    assert source.build(context(tmp_path)).invoke({}) == "next to the task"
    assert str(tmp_path / "task" / "ut_shadow.py") in source.origin
    assert str(tmp_path / "task") not in sys.path  # put back after the import


def test_two_task_folders_with_same_named_modules_give_two_tools(tmp_path: Path) -> None:
    a = load_reference("tools:where", search_dirs=[FIXTURES / "task_a"])
    b = load_reference("tools:where", search_dirs=[FIXTURES / "task_b"])
    again = load_reference("tools:where", search_dirs=[FIXTURES / "task_a"])
    assert a.build(context(tmp_path)).invoke({}) == "task_a"
    assert b.build(context(tmp_path)).invoke({}) == "task_b"
    assert again.obj is a.obj  # the same file is imported once


def test_folders_without_init_in_two_tasks_give_two_tools(tmp_path: Path) -> None:
    for task in ("one", "two"):
        code = f'def where() -> str:\n    """Which task."""\n    return {task!r}\n'
        write(tmp_path / task / "lib", "tools.py", code)
    built = [
        load_reference("lib.tools:where", search_dirs=[tmp_path / task]).build(context(tmp_path))
        for task in ("one", "two", "one")
    ]
    assert [b.invoke({}) for b in built] == ["one", "two", "one"]


def test_another_tasks_module_is_not_taken_for_an_installed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_reference("tools:where", search_dirs=[FIXTURES / "task_a"])
    message = spec_error("tools:where", [tmp_path])  # no tools.py here, none installed
    assert "ModuleNotFoundError: No module named 'tools'" in message
    write(tmp_path / "site", "tools.py", 'def where() -> str:\n    """Where."""\n    return "site"')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    installed = load_reference("tools:where", search_dirs=[tmp_path])
    assert installed.build(context(tmp_path)).invoke({}) == "site"


def test_a_factory_must_return_a_tool(tmp_path: Path) -> None:
    write(
        tmp_path,
        "odd.py",
        """
        from atlas.tools.user import ToolContext

        def make(ctx: ToolContext):
            return 42
        """,
    )
    source = load_reference("odd:make", search_dirs=[tmp_path])
    with pytest.raises(SpecError, match=r"^tool 'odd:make': its factory returned int, not a"):
        source.build(context(tmp_path))


def test_a_package_next_to_the_task_can_import_itself(tmp_path: Path) -> None:
    write(tmp_path / "acme", "__init__.py", "")
    write(tmp_path / "acme", "helpers.py", "def greet(who: str) -> str:\n    return 'hi ' + who\n")
    write(
        tmp_path / "acme",
        "tools.py",
        '''
        from acme.helpers import greet

        def hello(who: str) -> str:
            """Say hello."""
            return greet(who)
        ''',
    )
    built = load_reference("acme.tools:hello", search_dirs=[tmp_path]).build(context(tmp_path))
    assert built.invoke({"who": "ann"}) == "hi ann"


# --- entry points and tools registered in code ------------------------------------------------


def test_an_entry_point_is_found_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    info = site / "mytools-0.1.dist-info"
    write(info, "METADATA", "Metadata-Version: 2.1\nName: mytools\nVersion: 0.1\n")
    write(info, "entry_points.txt", "[atlas.tools]\nshout = mt_mod:loud\n")
    write(
        site,
        "mt_mod.py",
        'def loud(text: str) -> str:\n    """Shout."""\n    return text.upper()\n',
    )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    source = load_reference("shout", search_dirs=[])
    assert source.origin == "entry point 'shout' (mytools 0.1)"
    assert source.name == "shout"
    assert source.build(context(tmp_path)).invoke({"text": "hey"}) == "HEY"
    assert spec_error("shuot", []).endswith("did you mean 'shout'?")


def test_register_tool_as_decorator_and_call_replaces_and_refuses_builtin_names(
    tmp_path: Path,
) -> None:
    @register_tool(name="lookup_price", timeout_s=5)
    def price(sku: str) -> float:
        """Price of an item."""
        return 9.5

    def price_v2(sku: str) -> float:
        """Price of an item, newer."""
        return 10.0

    async def stock_level(sku: str) -> int:
        """Units in stock."""
        return 3

    shout = StructuredTool.from_function(func=str.upper, name="loud", description="Shout.")
    try:
        assert price("x") == 9.5  # the decorator hands the function back unchanged
        first = load_reference("lookup_price", search_dirs=[])
        assert (first.kind, first.timeout_s) == ("function", 5.0)
        assert first.origin == "registered in code"
        assert first.build(context(tmp_path)).invoke({"sku": "a"}) == "9.5"
        assert register_tool(price_v2, name="lookup_price") is price_v2
        assert (
            load_reference("lookup_price", search_dirs=[])
            .build(context(tmp_path))
            .invoke({"sku": "a"})
            == "10.0"
        )
        register_tool(stock_level)
        assert (
            load_reference("stock_level", search_dirs=[])
            .build(context(tmp_path))
            .invoke({"sku": "a"})
            == "3"
        )
        register_tool(shout)
        assert load_reference("loud", search_dirs=[]).kind == "tool"
        with pytest.raises(SpecError, match="'query_data' is a built-in tool"):
            register_tool(price_v2, name="query_data")
        with pytest.raises(SpecError, match="parameter 'sku' has no type annotation"):
            register_tool(lambda sku: sku, name="bad")
    finally:
        for name in ("lookup_price", "stock_level", "loud"):
            unregister_tool(name)
    assert "unknown tool 'lookup_price'" in spec_error("lookup_price", [])


def test_tool_marks_a_function_without_changing_it() -> None:
    @tool
    def plain(x: int) -> int:
        return x + 1

    @tool(name="renamed", timeout_s=2)
    def other(x: int) -> int:
        return x

    assert plain(1) == 2
    assert other(3) == 3
    register_tool(other)
    try:
        source = load_reference("renamed", search_dirs=[])
        assert isinstance(source, ToolSource)
        assert (source.name, source.timeout_s) == ("renamed", 2.0)
    finally:
        unregister_tool("renamed")


def test_load_and_call_from_many_threads_at_once(tmp_path: Path) -> None:
    def load_and_call(i: int) -> str:
        folder = FIXTURES / ("task_a" if i % 2 else "task_b")
        return (
            load_reference("tools:where", search_dirs=[folder]).build(context(tmp_path)).invoke({})
        )

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(load_and_call, range(12)))
    assert answers == ["task_b" if i % 2 == 0 else "task_a" for i in range(12)]
    assert threading.active_count() < 50
