# The relay-phase asyncio protocol: forwards each received chunk to the peer transport
# after the compiled scan; Python hooks run only for messages the session asked for.
# cython: language_level=3

from .framing import FrameError
from .relay cimport MessageScan


cdef class Pipe:
    """One direction of an established session, installed with ``set_protocol``.

    Example::

        up_pipe = Pipe(bscan, upstream_transport, client_transport, session, False)
        upstream_transport.set_protocol(up_pipe)
    """

    def __cinit__(self, MessageScan scan, transport, peer, hooks, bint client_side):
        self.scan = scan
        self.transport = transport
        self.peer = peer
        self._peer_write = peer.write
        self._hooks = hooks
        self._client_side = client_side
        self.notify_chunks = False
        self.divert = False

    def set_peer(self, peer):
        self.peer = peer
        self._peer_write = peer.write

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, bytes data):
        cdef list items
        if self._client_side:
            try:
                items = self.scan.feed(data)
            except FrameError as e:
                self._hooks.frame_error(e)
                return
            if not self.divert and len(items) == 1 and type(items[0]) is bytes:
                self._peer_write(items[0])
            else:
                self._hooks.client_items(items)
            return
        if self.divert:
            self._hooks.backend_items(self.scan.feed(data))
            return
        # upstream: the client gets the bytes first, the scan only reads them
        self._peer_write(data)
        items = self.scan.feed(data)
        if items:
            self._hooks.backend_events(items)
        if self.notify_chunks:
            self._hooks.backend_chunk()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        if self._client_side:
            self._hooks.client_gone()
        else:
            self._hooks.upstream_lost(exc)

    def pause_writing(self):
        # our transport's buffer is full: stop reading from the peer
        self.peer.pause_reading()

    def resume_writing(self):
        if not self.peer.is_closing():
            self.peer.resume_reading()
