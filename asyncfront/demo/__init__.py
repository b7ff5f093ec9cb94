"""The real-model voice assistant behind ``python -m asyncfront demo``.

Importing this package loads no model library; each stage imports its packages
(pocketsphinx, torch, transformers, rich) when it first runs and raises
:class:`DemoDependencyError` naming what to install when one is missing.
"""

from ._app import STAGES as STAGES
from ._app import DemoOptions as DemoOptions
from ._app import DemoReport as DemoReport
from ._app import ResidencyEvent as ResidencyEvent
from ._app import run_demo as run_demo
from ._deps import DemoDependencyError as DemoDependencyError
from ._deps import missing_packages as missing_packages
from ._index import DocChunk as DocChunk
from ._index import DocIndex as DocIndex
from ._index import chunk_documents as chunk_documents
from ._index import find_docs as find_docs
from ._language import CharTokenizer as CharTokenizer
from ._language import Generation as Generation
from ._language import ReplyModel as ReplyModel
from ._language import default_model_dir as default_model_dir
from ._resident import ResidentMemory as ResidentMemory
from ._speech import SAMPLE_QUESTION as SAMPLE_QUESTION
from ._speech import SAMPLE_TRANSCRIPT as SAMPLE_TRANSCRIPT
from ._speech import Audio as Audio
from ._speech import SpeechRecognizer as SpeechRecognizer
from ._speech import read_wav as read_wav
from ._speech import sample_wav_path as sample_wav_path
from ._synthesis import SpeechSynthesizer as SpeechSynthesizer
from ._synthesis import Synthesis as Synthesis
from ._synthesis import wav_info as wav_info

__all__ = (
    "SAMPLE_QUESTION",
    "SAMPLE_TRANSCRIPT",
    "STAGES",
    "Audio",
    "CharTokenizer",
    "DemoDependencyError",
    "DemoOptions",
    "DemoReport",
    "DocChunk",
    "DocIndex",
    "Generation",
    "ReplyModel",
    "ResidencyEvent",
    "ResidentMemory",
    "SpeechRecognizer",
    "SpeechSynthesizer",
    "Synthesis",
    "chunk_documents",
    "default_model_dir",
    "find_docs",
    "missing_packages",
    "read_wav",
    "run_demo",
    "sample_wav_path",
    "wav_info",
)
