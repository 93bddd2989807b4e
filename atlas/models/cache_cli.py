"""`python -m atlas cache stats|clear [TASK]`: the model-response cache's store (the task's
`cache.url`, else `$ATLAS_CACHE_URL`, else the state directory's cache.db). Kept apart from
`atlas.models.cache`, which imports LangChain: `atlas --help` stays light."""

from __future__ import annotations

from typing import Any


def add_parser(sub: Any, state: Any) -> None:
    cache = sub.add_parser("cache", help="the model-response cache: how many answers, forget them")
    cache.add_argument("action", choices=("stats", "clear"))
    cache.add_argument(
        "file", nargs="?", metavar="TASK", help="task YAML file (default: $ATLAS_CACHE_URL)"
    )
    state(cache)


def run(args: Any) -> int:
    """`atlas cache stats|clear [TASK]`: the store the task (or `$ATLAS_CACHE_URL`, else the
    state directory's cache.db) uses."""
    from atlas.models.cache import CACHE_FILE, CacheError, cache_url, open_store
    from atlas.runs import state_dir
    from atlas.spec import load_task
    from atlas.tracing.redact import public_url, scrub_text, secret_values

    directory = state_dir(args.state_dir)
    spec = load_task(args.file) if args.file else None
    url = cache_url(spec)
    where = public_url(url) if url else str(directory / CACHE_FILE)
    if url is None and not (directory / CACHE_FILE).exists():
        print(f"cache: {where}: no cache yet (0 responses)")
        return 0
    store = open_store(url, directory)
    try:
        store.check()
        if args.action == "clear":
            print(f"cache: {where}: forgot {store.clear()} responses")
        else:
            print(f"cache: {where}: {store.count()} responses")
    except CacheError:
        raise
    except Exception as exc:
        raise CacheError(f"cache: {where}: {scrub_text(str(exc), secret_values())}") from None
    finally:
        store.close()
    return 0
