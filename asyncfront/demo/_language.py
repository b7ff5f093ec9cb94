"""The reply model: a causal LM built with transformers, from no model hub.

Without a checkpoint the model is a GPT-2 of ``GPT2Config()``'s defaults (12 layers of
width 768, 124 M weights, about 475 MiB of float32) initialised from a fixed seed and
saved once as safetensors in a cache directory: it is untrained, so its reply is
gibberish by design; it exercises the real code path (weights from disk, a KV cache,
token-by-token decoding on the CPU) at a real model's size. Its tokenizer is a
character one: the model's output keeps GPT-2's 50,257 ids and sampling is restricted
to the tokenizer's. ``checkpoint=`` loads any local transformers causal-LM directory
the same way, with its own tokenizer when it ships one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ._deps import import_from, require

__all__ = (
    "CharTokenizer",
    "Generation",
    "DEFAULT_LAYERS",
    "DEFAULT_WIDTH",
    "ReplyModel",
    "TextTokenizer",
    "default_model_dir",
)

ALPHABET = " abcdefghijklmnopqrstuvwxyz.,?!'"
"""The character tokenizer's vocabulary: one id per character (others read as space)."""

_TOKENIZER_FILE = "asyncfront_tokenizer.json"

DEFAULT_LAYERS = 12
"""The untrained demo LM's transformer blocks (``GPT2Config()``'s default)."""

DEFAULT_WIDTH = 768
"""The untrained demo LM's embedding width (``GPT2Config()``'s default)."""


class TextTokenizer(Protocol):
    """What the reply model needs of a tokenizer."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        ...

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``."""
        ...


class CharTokenizer:
    """One token per lower-case character of ``alphabet``; anything else is a space."""

    def __init__(self, alphabet: str = ALPHABET) -> None:
        if len(set(alphabet)) != len(alphabet) or " " not in alphabet:
            raise ValueError(f"alphabet must hold distinct characters and a space: {alphabet!r}")
        self.alphabet = alphabet
        self._ids = {c: i for i, c in enumerate(alphabet)}

    def __len__(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, lower-cased."""
        space = self._ids[" "]
        return [self._ids.get(c, space) for c in text.lower()]

    def decode(self, ids: list[int]) -> str:
        """The characters of ``ids``."""
        return "".join(self.alphabet[i] for i in ids)

    def __repr__(self) -> str:
        return f"<CharTokenizer {len(self)} characters>"


class _HubFreeTokenizer:
    """A transformers tokenizer loaded from a local checkpoint directory."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))


def default_model_dir() -> Path:
    """Where the untrained demo model is saved: ``$XDG_CACHE_HOME/asyncfront/demo-lm``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache) / "asyncfront" / "demo-lm"


@dataclass(frozen=True)
class Generation:
    """A generated reply and how it was produced."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Decoding throughput."""
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("inf")


class ReplyModel:
    """A causal LM and its tokenizer, loaded from local files only."""

    def __init__(self, model: Any, tokenizer: TextTokenizer, path: Path, trained: bool) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.trained = trained
        self.eos_token_id: int | None = (
            getattr(model.config, "eos_token_id", None) if trained else None
        )
        # The character tokenizer names only the first ids of the model's vocabulary.
        self.sampled_ids: int | None = (
            len(tokenizer) if isinstance(tokenizer, CharTokenizer) else None
        )

    @classmethod
    def load(
        cls,
        *,
        checkpoint: str | Path | None = None,
        model_dir: str | Path | None = None,
        layers: int = DEFAULT_LAYERS,
        width: int = DEFAULT_WIDTH,
    ) -> ReplyModel:
        """Load ``checkpoint``, or the untrained demo model (made in ``model_dir`` on first use).

        Raises:
            FileNotFoundError: ``checkpoint`` holds no ``config.json``.
            ValueError: ``layers`` or ``width`` out of range (see :meth:`prepare`).
        """
        from ..models import BUILD_LOCK

        (auto_model,) = import_from("transformers", "AutoModelForCausalLM")
        path, trained, tokenizer = cls.prepare(
            checkpoint=checkpoint, model_dir=model_dir, layers=layers, width=width
        )
        with BUILD_LOCK:  # transformers changes process-global state while it builds
            model = auto_model.from_pretrained(path, local_files_only=True)
        model.eval()
        return cls(model, tokenizer, path, trained)

    @staticmethod
    def prepare(
        *,
        checkpoint: str | Path | None = None,
        model_dir: str | Path | None = None,
        layers: int = DEFAULT_LAYERS,
        width: int = DEFAULT_WIDTH,
    ) -> tuple[Path, bool, TextTokenizer]:
        """The checkpoint directory to load, whether it is trained, and its tokenizer.

        Without ``checkpoint``, the untrained demo model (a GPT-2 of ``layers`` blocks of
        width ``width``, ``GPT2Config()``'s vocabulary and positions) is built and saved
        in ``model_dir`` on first use (under :data:`asyncfront.models.BUILD_LOCK`); later
        calls find the saved files, and a directory holding another shape is rebuilt.
        Nothing here loads the weights: the runtime does
        (``asyncfront.models.from_transformers``).

        Raises:
            FileNotFoundError: ``checkpoint`` holds no ``config.json``.
            ValueError: ``layers`` below 1, or ``width`` not a positive multiple of 64
                (GPT-2's attention heads are 64 wide).
        """
        if layers < 1 or width < 64 or width % 64:
            raise ValueError(
                f"the demo LM needs layers >= 1 and a width that is a positive multiple of "
                f"64, got layers={layers}, width={width}"
            )
        require("torch", "transformers", "safetensors")
        _quiet_transformers()
        if checkpoint is not None:
            path = Path(checkpoint)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path}: not a transformers checkpoint (no config.json)")
            trained = True
        else:
            path = Path(model_dir) if model_dir is not None else default_model_dir()
            if not _holds_untrained(path, layers, width):
                _create_untrained(path, layers, width)
            trained = False
        return path, trained, _load_tokenizer(path)

    @property
    def parameters(self) -> int:
        """The number of weights."""
        return int(sum(p.numel() for p in self.model.parameters()))

    @property
    def layers(self) -> int:
        """The number of transformer blocks."""
        config = self.model.config
        return int(getattr(config, "n_layer", None) or config.num_hidden_layers)

    @property
    def context_length(self) -> int:
        """The longest sequence the model's positions cover."""
        config = self.model.config
        return int(getattr(config, "n_positions", None) or config.max_position_embeddings)

    def generate(
        self, prompt: str, tokens: int, *, temperature: float = 1.0, seed: int = 0
    ) -> Generation:
        """Sample up to ``tokens`` tokens after ``prompt`` with a KV cache (fewer on EOS).

        Raises:
            ValueError: ``tokens`` is below 1 or does not fit the context length.
        """
        import torch

        if not 1 <= tokens < self.context_length:
            raise ValueError(f"tokens must be in 1..{self.context_length - 1}, got {tokens}")
        started = time.perf_counter()
        prompt_ids = self.tokenizer.encode(prompt)[-(self.context_length - tokens) :] or [0]
        generator = torch.Generator().manual_seed(seed)
        out_ids: list[int] = []
        with torch.inference_mode():
            step = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
            for _ in range(tokens):
                logits = step.logits[:, -1, : self.sampled_ids].float() / max(temperature, 1e-5)
                token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
                token_id = int(token.item())
                if token_id == self.eos_token_id:
                    break
                out_ids.append(token_id)
                step = self.model(input_ids=token, use_cache=True, **_cache_of(step))
        return Generation(
            text=self.tokenizer.decode(out_ids),
            token_ids=tuple(out_ids),
            prompt_tokens=len(prompt_ids),
            seconds=time.perf_counter() - started,
        )

    def __repr__(self) -> str:
        state = "trained" if self.trained else "untrained"
        return f"<ReplyModel {self.path} {state} {self.parameters:,} parameters>"


def _cache_of(step: Any) -> dict[str, Any]:
    """The KV cache of a forward pass as the next call's keyword (renamed in transformers 5)."""
    cache = getattr(step, "cache", None)
    if cache is not None:
        return {"cache": cache}
    return {"past_key_values": step.past_key_values}


def _quiet_transformers() -> None:
    """No progress bars or advisory logs from transformers: the demo shows its own."""
    (logging,) = import_from("transformers.utils", "logging")
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _holds_untrained(path: Path, layers: int, width: int) -> bool:
    """Whether ``path`` holds the untrained demo model of this shape, completely saved."""
    try:
        info = json.loads((path / _TOKENIZER_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (
        isinstance(info, dict)
        and info.get("layers") == layers
        and info.get("width") == width
        and (path / "model.safetensors").is_file()
    )


def _create_untrained(path: Path, layers: int, width: int) -> None:
    """Save a GPT-2 with fixed-seed random weights and the character tokenizer.

    The tokenizer's file is written last: a directory without it (an interrupted first
    run) is built again.
    """
    import torch

    from ..models import BUILD_LOCK

    gpt2_config, gpt2_model = import_from("transformers", "GPT2Config", "GPT2LMHeadModel")

    tokenizer = CharTokenizer()
    # GPT2Config()'s vocabulary and positions; a smaller shape only where asked.
    config = gpt2_config(
        n_embd=width, n_layer=layers, n_head=width // 64, bos_token_id=None, eos_token_id=None
    )
    (path / _TOKENIZER_FILE).unlink(missing_ok=True)
    with BUILD_LOCK:  # the seed and transformers' build state are process-global
        torch.manual_seed(0)
        model = gpt2_model(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    del model
    info = {
        "kind": "characters",
        "alphabet": tokenizer.alphabet,
        "trained": False,
        "layers": layers,
        "width": width,
    }
    (path / _TOKENIZER_FILE).write_text(json.dumps(info), encoding="utf-8")


def _load_tokenizer(path: Path) -> TextTokenizer:
    """The character tokenizer saved beside the demo model, or the checkpoint's own."""
    saved = path / _TOKENIZER_FILE
    if saved.is_file():
        return CharTokenizer(json.loads(saved.read_text(encoding="utf-8"))["alphabet"])
    (auto_tokenizer,) = import_from("transformers", "AutoTokenizer")
    return _HubFreeTokenizer(auto_tokenizer.from_pretrained(path, local_files_only=True))
