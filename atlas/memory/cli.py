"""`python -m atlas memory ...`: ingest, search, graph, stats, clear.

The store is the memory directory of the state directory (`./.atlas/memory`) unless `--store`
names another, or `--vector-url` / `--graph-uri` name servers. Commands that read never create a
store: a mistyped `--store` is an error, not an empty result.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from atlas.errors import MemoryInputError

EXIT_OK, EXIT_NOT_FOUND, EXIT_INTERRUPTED = 0, 1, 130
READING = ("search", "graph", "stats")
"""Commands that open the stores read-only: they create and write nothing."""


def _k(value: str) -> int:
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k must be a whole number, not {value!r}") from None
    if not 1 <= k <= 50:
        raise argparse.ArgumentTypeError(f"--k must be between 1 and 50, not {k}")
    return k


def add_parser(sub: Any, state: Any) -> None:
    memory = sub.add_parser("memory", help="vector and graph memory: ingest, search, graph, ...")
    msub = memory.add_subparsers(dest="memory_command", metavar="SUBCOMMAND", required=True)

    def store(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", metavar="DIR", help="memory directory (default .atlas/memory)")
        p.add_argument("--vector-url", metavar="URL", help="a Chroma server instead of --store")
        p.add_argument("--graph-uri", metavar="URI", help="a Neo4j server (bolt:// or neo4j://)")
        p.add_argument(
            "--namespace",
            metavar="NS",
            default="default",
            help="memory namespace (default 'default')",
        )
        state(p)

    ingest = msub.add_parser("ingest", help="chunk, embed and store text files or folders")
    ingest.add_argument("paths", nargs="+", metavar="PATH")
    ingest.add_argument("--json", action="store_true")
    store(ingest)

    search = msub.add_parser("search", help="the passages closest in meaning to each query")
    search.add_argument("queries", nargs="+", metavar="QUERY")
    search.add_argument("--k", type=_k, default=5, help="results per query (1-50, default 5)")
    search.add_argument(
        "--kind", choices=("document", "finding", "output"), help="only this kind of passage"
    )
    search.add_argument(
        "--unfinished", action="store_true", help="also passages of runs that have not finished"
    )
    search.add_argument("--json", action="store_true")
    store(search)

    graph = msub.add_parser("graph", help="an entity's relations, and the findings naming it")
    graph.add_argument("entity", metavar="ENTITY")
    graph.add_argument("--to", metavar="OTHER", help="show the paths from ENTITY to OTHER")
    graph.add_argument("--json", action="store_true")
    store(graph)

    stats = msub.add_parser("stats", help="what the stores hold")
    stats.add_argument("--json", action="store_true")
    store(stats)

    clear = msub.add_parser("clear", help="delete everything in the stores")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    store(clear)


def _open(args: argparse.Namespace, *, create: bool) -> Any:
    from atlas.memory.store import Memory
    from atlas.runs import state_dir

    directory = Path(args.store) if args.store else state_dir(args.state_dir) / "memory"
    if args.vector_url and not args.vector_url.startswith(("http://", "https://")):
        raise MemoryInputError(f"--vector-url must be an http(s) URL, not {args.vector_url!r}")
    from atlas.memory.graph import is_server_uri

    if args.graph_uri and not is_server_uri(args.graph_uri):
        raise MemoryInputError("--graph-uri must be a bolt:// or neo4j:// URI")
    from atlas.spec import NAMESPACE_PATTERN

    if not re.match(NAMESPACE_PATTERN, args.namespace):
        raise MemoryInputError(
            f"--namespace {args.namespace!r} is not a namespace: 1-64 letters, digits and "
            "underscores, starting and ending with a letter or digit"
        )
    graph_command = args.memory_command == "graph"
    # Whether the command reads an embedded store in the directory: `graph` reads only the
    # graph store, the others the vector store (and `stats`/`clear` both).
    if graph_command:
        local = not args.graph_uri
    else:
        local = not args.vector_url or (
            args.memory_command in ("stats", "clear") and not args.graph_uri
        )
    if local and not create and not directory.is_dir():
        raise MemoryInputError(
            f"no memory store at {directory} (create one with `python -m atlas memory ingest` "
            "or by running a task)"
        )
    if local and directory.exists() and not directory.is_dir():
        raise MemoryInputError(f"--store {directory} is a file, not a directory")
    return Memory(
        directory.resolve(),
        vector_url=args.vector_url or None,
        graph_uri=args.graph_uri or None,
        read_only=args.memory_command in READING,
        namespace=args.namespace,
        include_unfinished=bool(getattr(args, "unfinished", False)),
    )


def run(args: argparse.Namespace) -> int:
    command = {
        "ingest": _ingest,
        "search": _search,
        "graph": _graph,
        "stats": _stats,
        "clear": _clear,
    }[args.memory_command]
    memory = None
    try:
        memory = _open(args, create=args.memory_command == "ingest")
        return command(memory, args)
    finally:
        if memory is not None:
            memory.close()


def _shown(path: str) -> str:
    """A path as typed, quoted when it holds spaces or control characters."""
    return path if path.isprintable() and " " not in path else repr(path)


def _files(paths: list[str]) -> list[Path]:
    from atlas.tools.documents import TEXT_SUFFIXES

    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise MemoryInputError(f"no such file or folder: {_shown(raw)}")
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
            )
            if not found:
                kinds = ", ".join(sorted(TEXT_SUFFIXES))
                raise MemoryInputError(f"no text files ({kinds}) under {_shown(raw)}")
            files += found
        elif path.suffix.lower() in TEXT_SUFFIXES:
            files.append(path)
        else:
            raise MemoryInputError(
                f"{_shown(raw)}: not a text file (known: {', '.join(sorted(TEXT_SUFFIXES))})"
            )
    return list(dict.fromkeys(files))


class _IngestProgress:
    """`memory: ingesting 1200/5000 chunks` on stderr while a long ingest runs (the store sends
    an update about once a second, none for a short ingest): one line rewritten on a terminal,
    one line per update elsewhere."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.done = 0
        self.total: int | None = None
        self.open_line = False

    def __call__(self, event: dict[str, Any]) -> None:
        self.done, self.total = int(event["done"]), int(event["total"])
        line = f"memory: ingesting {self.done}/{self.total} chunks"
        if self.tty:
            sys.stderr.write(f"\r{line}")
            self.open_line = True
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def end(self) -> None:
        if self.open_line:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.open_line = False


def _ingest(memory: Any, args: argparse.Namespace) -> int:
    files = _files(args.paths)
    started = time.perf_counter()
    progress = _IngestProgress()
    try:
        counts = memory.ingest(files, on_progress=progress)
    except KeyboardInterrupt:
        # Each batch is written whole before the next starts (a write in progress finishes),
        # and the next ingest skips what is stored: nothing is lost by stopping here.
        progress.end()
        done = "" if progress.total is None else f" after {progress.done}/{progress.total} chunks"
        print(
            f"atlas: interrupted{done}; what was written is kept, and the same "
            "`atlas memory ingest` continues from there",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    progress.end()
    took = time.perf_counter() - started
    if args.json:
        print(json.dumps({**counts, "store": memory.vector.where, "seconds": round(took, 2)}))
    else:
        print(
            f"ingested {counts['files']} files: {counts['chunks']} chunks, {counts['written']} new "
            f"or changed, {counts['removed']} stale removed, into {memory.vector.where} "
            f"in {took:.1f} s"
        )
    return EXIT_OK


def _search(memory: Any, args: argparse.Namespace) -> int:
    queries = list(args.queries)
    if any(not q.strip() for q in queries):
        raise MemoryInputError("a query is empty")
    kinds = [args.kind] if args.kind else None
    results = memory.search(queries, args.k, kinds=kinds)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "query": q,
                        "results": [
                            {"text": h.text, "source": h.source, "score": h.score, "kind": h.kind}
                            for h in hits
                        ],
                    }
                    for q, hits in zip(queries, results, strict=True)
                ],
                ensure_ascii=False,
            )
        )
        return EXIT_OK
    for q, hits in zip(queries, results, strict=True):
        print(f"== {q}")
        if not hits:
            print("   (nothing in memory)")
        for rank, h in enumerate(hits, 1):
            text = " ".join(h.text.split())
            print(f"{rank:>2}. [{h.source}] {h.score:.3f} {h.kind}")
            print(f"    {text[:240]}{'...' if len(text) > 240 else ''}")
    return EXIT_OK


def _graph(memory: Any, args: argparse.Namespace) -> int:
    if not args.entity.strip():
        raise MemoryInputError("the entity name is empty")
    if args.to:
        paths = memory.graph.paths(args.entity, args.to)
        if args.json:
            print(
                json.dumps(
                    {
                        "from": args.entity,
                        "to": args.to,
                        "paths": [
                            [{"from": a, "relation": r, "to": b} for a, r, b in p] for p in paths
                        ],
                    },
                    ensure_ascii=False,
                )
            )
        else:
            if not paths:
                print(f"no path between {args.entity!r} and {args.to!r} (up to 3 hops)")
            for p in paths:
                print(p[0][0] + "".join(f" -[{r}]- {b}" for _, r, b in p))
        return EXIT_OK if paths else EXIT_NOT_FOUND
    info = memory.entity(args.entity)
    if args.json:
        print(json.dumps(info, ensure_ascii=False, default=str))
        return EXIT_OK if info["known"] else EXIT_NOT_FOUND
    if not info["known"]:
        print(f"{args.entity!r} is not in the graph ({memory.graph.where})")
        return EXIT_NOT_FOUND
    print(f"{info['entity']}")
    for r in info["relations"]:
        arrow = f"-[{r['relation']}]->" if r["direction"] == "out" else f"<-[{r['relation']}]-"
        print(f"  {arrow} {r['other']}    [{r['source']}]")
    if info["mentioned_in"]:
        print("mentioned in:")
        for m in info["mentioned_in"]:
            print(f"  {m['source']} ({m['kind']}, team {m['team'] or '-'})")
    return EXIT_OK


def _stats(memory: Any, args: argparse.Namespace) -> int:
    stats = memory.stats()
    if args.json:
        print(json.dumps(stats))
        return EXIT_OK
    v, g = stats["vector"], stats["graph"]
    print(f"vector store  {v['store']}  (embedder {v['embedder']})")
    print(
        f"  passages    {v['passages']}: {v['documents']} document chunks, "
        f"{v['findings']} finding chunks, {v['outputs']} output chunks"
        + (f"; {v['pending']} of unfinished runs" if v.get("pending") else "")
    )
    print(f"graph store   {g['store']}")
    print(
        f"  entities    {g['entities']}, relations {g['relations']}, "
        f"findings linked {g['findings']}"
    )
    return EXIT_OK


def _clear(memory: Any, args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise MemoryInputError("clearing memory needs --yes when not run interactively")
        where = f"{memory.vector.where} and {memory.graph.where}"
        answer = input(f"Delete everything in {where}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return EXIT_NOT_FOUND
    counts = memory.clear()
    print(f"deleted {counts['passages']} passages and {counts['entities']} entities")
    return EXIT_OK
