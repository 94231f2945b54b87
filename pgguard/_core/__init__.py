# Compiled hot paths: message framing, relay scan. Bytes and layouts only; no policy.
from .framing import FrameError, FrameReader, WriteBuffer
from .relay import MessageScan
from .pipe import Pipe

__all__ = ["FrameError", "FrameReader", "WriteBuffer", "MessageScan", "Pipe"]
