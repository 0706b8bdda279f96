"""NBD handshake (negotiation phase) as a sans-IO state machine, h11-style.

Nothing here touches a socket.  The caller owns the I/O loop:

    hs = ServerHandshake(catalog)
    while True:
        sock.sendall(hs.data_to_send())
        event = hs.next_event()
        if event is NEED_DATA:
            hs.receive_data(sock.recv(65536))      # b"" means EOF
            continue
        break                                      # ExportSelected / Aborted / ConnectionClosed
    sock.sendall(hs.data_to_send())                # final replies (e.g. the GO ACK)
    transmission(sock, event, initial=hs.trailing_data)

Every event is terminal: the handshake is one negotiation, and the intermediate
options are answered internally.  A RemoteProtocolError means the peer broke
the protocol (or, for the server, asked for something that can only be refused
by hanging up); its ``reason`` is meant for the log line written on close.
The server speaks fixed newstyle, with TLS when given a TLS context (_fast.tls.TlsContext,
OpenSSL's): after NBD_OPT_STARTTLS the records go through the session's memory BIOs, so
receive_data() and data_to_send() carry ciphertext and the caller's loop stays the same;
`tls` is then the session (_fast.tls.TlsSession) the transmission phase goes on with.
"""

from __future__ import annotations

import ssl
import struct
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Protocol

from .constants import (
    IHAVEOPT, NBD_CLISERV_MAGIC, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_NO_ZEROES, NBD_FLAG_READ_ONLY, NBD_FLAG_ROTATIONAL, NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_HANDSHAKE_ZEROES,
    NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION, NBD_INFO_EXPORT, NBD_INFO_NAME,
    NBD_MAX_STRING, NBD_META_ALLOCATION_DEPTH, NBD_META_BASE_ALLOCATION, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK,
    NBD_REP_ERR_INVALID, NBD_REP_ERR_POLICY, NBD_REP_ERR_SHUTDOWN, NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP, NBD_REP_FLAG_ERROR, NBD_REP_INFO, NBD_REP_MAGIC,
    NBD_REP_META_CONTEXT, NBD_REP_SERVER, NBDMAGIC, OPT_NAMES, REP_NAMES,
)

# Option payloads we accept are tiny (names and queries are capped at 4 KiB by
# the spec); anything far beyond that is a client trying to make us buffer.
DEFAULT_MAX_OPTION_LENGTH = 64 * 1024
SUPPORTED_META_CONTEXTS = (NBD_META_BASE_ALLOCATION, NBD_META_ALLOCATION_DEPTH)


class LocalProtocolError(Exception):
    """The caller misused the state machine (a bug on our side)."""


class RemoteProtocolError(Exception):
    """The peer violated the protocol; ``reason`` is a human-readable log line."""

    def __init__(self, reason: str, reply_type: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply_type = reply_type  # client side: the NBD_REP_ERR_* received


class NEED_DATA:
    """Sentinel (the class itself) returned by next_event() when it needs more bytes."""


def _opt_name(opt: int) -> str:
    return OPT_NAMES.get(opt, f"option {opt}")


# --------------------------------------------------------------------- exports

@dataclass(frozen=True)
class ExportInfo:
    name: str
    size: int
    description: str = ""
    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_write_zeroes: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    can_multi_conn: bool = True
    rotational: bool = False
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        # Enforce the spec's block size rules here so a bad registry entry
        # fails at configuration time, not as a confused client later.
        def pow2(n: int) -> bool:
            return n > 0 and n & (n - 1) == 0

        if not 0 <= self.size < 2**64:
            raise ValueError(f"export size {self.size} does not fit in 64 bits")
        for text in (self.name, self.description):  # both go on the wire as spec strings
            if len(text.encode()) > NBD_MAX_STRING or "\0" in text:
                raise ValueError("export name/description must be <= 4096 bytes without NUL")
        if not (pow2(self.min_block) and self.min_block <= 65536):
            raise ValueError("min_block must be a power of 2 <= 65536")
        if not (pow2(self.preferred_block) and self.preferred_block >= max(self.min_block, 512)):
            raise ValueError("preferred_block must be a power of 2 >= max(min_block, 512)")
        if self.max_block != 0xFFFFFFFF and (
            self.max_block > 0xFFFFFFFF or self.max_block % self.min_block
            or self.max_block < min(self.preferred_block, self.size)
        ):
            raise ValueError("max_block must be 0xffffffff or a multiple of min_block "
                             ">= min(preferred_block, size)")

    def transmission_flags(self, structured_replies: bool = True) -> int:
        """The 16-bit transmission flags word for this export.

        SEND_DF only when structured replies were negotiated: the spec says the
        server MUST leave it clear otherwise.  Write-only features are hidden on
        read-only exports, and FAST_ZERO requires WRITE_ZEROES (spec MUST).
        """
        writable = not self.read_only
        wants = (
            (True, NBD_FLAG_HAS_FLAGS),
            (structured_replies, NBD_FLAG_SEND_DF),
            (self.read_only, NBD_FLAG_READ_ONLY),
            (self.can_flush, NBD_FLAG_SEND_FLUSH),
            (self.can_fua and writable, NBD_FLAG_SEND_FUA),
            (self.rotational, NBD_FLAG_ROTATIONAL),
            (self.can_trim and writable, NBD_FLAG_SEND_TRIM),
            (self.can_write_zeroes and writable, NBD_FLAG_SEND_WRITE_ZEROES),
            (self.can_fast_zero and self.can_write_zeroes and writable, NBD_FLAG_SEND_FAST_ZERO),
            (self.can_multi_conn, NBD_FLAG_CAN_MULTI_CONN),
            (self.can_cache, NBD_FLAG_SEND_CACHE),
        )
        flags = 0
        for enabled, bit in wants:
            if enabled:
                flags |= bit
        return flags


class Catalog(Protocol):
    def lookup(self, name: str) -> ExportInfo | None: ...
    def names(self) -> list[str]: ...


# ---------------------------------------------------------------------- events

@dataclass(frozen=True)
class ExportSelected:
    export: ExportInfo
    structured_replies: bool
    meta_contexts: dict[int, str]
    no_zeroes: bool


@dataclass(frozen=True)
class Aborted:
    pass


@dataclass(frozen=True)
class ConnectionClosed:
    pass


@dataclass(frozen=True)
class Negotiated:
    size: int
    flags: int
    structured_replies: bool
    meta_contexts: dict[int, str]
    block_sizes: tuple[int, int, int] | None  # (minimum, preferred, maximum)
    trailing_data: bytes


@dataclass(frozen=True)
class ExportList:
    names: tuple[str, ...]


# --------------------------------------------------------------------- parsing

class _Invalid(Exception):
    """Malformed option payload: the server answers NBD_REP_ERR_INVALID."""


def _decode_string(raw: bytes) -> str:
    # Spec "string": UTF-8, no NUL, MUST be no longer than 4096 bytes.
    if len(raw) > NBD_MAX_STRING:
        raise _Invalid(f"string longer than {NBD_MAX_STRING} bytes")
    if b"\0" in raw:
        raise _Invalid("string contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid("string is not valid UTF-8") from None


class _Reader:
    """Bounds-checked cursor over one complete option payload."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def _take(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise _Invalid("length field overruns the option data")
        self._pos += n
        return self._data[self._pos - n:self._pos]

    def u16(self) -> int:
        return int.from_bytes(self._take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self._take(4), "big")

    def string(self, n: int) -> str:
        return _decode_string(self._take(n))

    def end(self) -> None:
        if self._pos != len(self._data):
            raise _Invalid("unexpected bytes after the option data")


# ----------------------------------------------------------- shared machinery

class _Handshake:
    """Buffers, EOF handling and the state-table driver shared by both sides."""

    _STATES: dict[str, Callable[[_Handshake], object]] = {}

    def __init__(self) -> None:
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._finished = False
        self._error: RemoteProtocolError | None = None
        self._state = ""

    def receive_data(self, data: bytes) -> None:
        if self._finished:
            raise LocalProtocolError("handshake finished; bytes belong to the transmission phase")
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if data:
            self._in += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the end of negotiation (transmission phase)."""
        if not self._finished:
            raise LocalProtocolError("handshake not finished yet")
        return bytes(self._in)

    def next_event(self) -> object:
        if self._error is not None:
            raise self._error  # like h11: once broken, stays broken
        if self._finished:
            raise LocalProtocolError("handshake already finished")
        try:
            while True:
                result = self._STATES[self._state](self)
                if result is None:  # consumed a message, no event yet: keep going
                    continue
                if result is NEED_DATA:
                    if not self._eof:
                        return NEED_DATA
                    if self._in:
                        raise RemoteProtocolError("peer closed the connection mid-message")
                    result = ConnectionClosed()
                self._finished = True
                return result
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _take(self, n: int) -> bytes | None:
        if len(self._in) < n:
            return None
        chunk = bytes(self._in[:n])
        del self._in[:n]
        return chunk

    def _take_message(self, fmt: str, magic: int, limit: int) -> tuple[tuple, bytes] | None:
        """Consume one ``magic ... length`` header plus payload, or return None.

        Magic and length are checked as soon as the header is in, so a hostile
        length is refused before we buffer its payload.
        """
        size = struct.calcsize(fmt)
        if len(self._in) < size:
            return None
        fields = struct.unpack_from(fmt, self._in)
        if fields[0] != magic:
            raise RemoteProtocolError(f"bad magic 0x{fields[0]:x}, expected 0x{magic:x}")
        if fields[-1] > limit:
            raise RemoteProtocolError(f"{_opt_name(fields[1])} data length {fields[-1]} "
                                      f"exceeds limit {limit}")
        if len(self._in) < size + fields[-1]:
            return None
        data = bytes(self._in[size:size + fields[-1]])
        del self._in[:size + fields[-1]]
        return fields, data


# ---------------------------------------------------------------------- server

def _match_meta_contexts(queries: list[str], listing: bool) -> list[str]:
    """Contexts selected by ``queries`` (LIST when ``listing``, else SET)."""
    if not queries:  # LIST: MUST return everything; SET: MUST select nothing
        return list(SUPPORTED_META_CONTEXTS) if listing else []
    selected: list[str] = []
    for query in queries:
        namespace, colon, leaf = query.partition(":")
        if not (namespace and colon):
            raise _Invalid(f"metadata query {query!r} lacks a namespace")
        for ctx in SUPPORTED_META_CONTEXTS:
            ctx_namespace, _, ctx_leaf = ctx.partition(":")
            # Unknown namespaces and leaves MUST be ignored; the empty leaf
            # ("base:") is a wildcard on LIST and MUST be ignored on SET.
            if namespace == ctx_namespace and (leaf == ctx_leaf or (listing and not leaf)):
                if ctx not in selected:
                    selected.append(ctx)
    return selected


class ServerHandshake(_Handshake):
    """`tls`: a TlsContext to offer NBD_OPT_STARTTLS with (None: NOTLS mode);
    `tls_required`: every option but STARTTLS and ABORT before it gets TLS_REQD.
    `authorize(export name, certificate CN or None)`: None if this client may use the
    export, else why not (NBD_OPT_GO and INFO get NBD_REP_ERR_POLICY saying so;
    NBD_OPT_EXPORT_NAME, which has no error reply, is hung up on)."""

    def __init__(self, catalog: Catalog, *, default_export: str = "",
                 max_option_length: int = DEFAULT_MAX_OPTION_LENGTH,
                 tls: Any = None, tls_required: bool = False,
                 authorize: Callable[[str, str | None], str | None] | None = None) -> None:
        super().__init__()
        self._tls_context = tls
        self._tls_required = tls is not None and tls_required
        self._authorize = authorize
        self.tls: Any = None  # the TlsSession, after STARTTLS
        self._clear_out = b""  # the STARTTLS ACK: plaintext, ahead of the first TLS record
        self._catalog = catalog
        self._default_export = default_export
        self._max_option_length = max_option_length
        self._no_zeroes = False
        self._structured = False
        self._meta: dict[int, str] = {}
        self._meta_export: str | None = None  # canonical name the last SET referred to
        self._shutting_down = False
        self._state = "client_flags"
        self._out += struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                 NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)

    def begin_shutdown(self) -> None:
        """Answer further options (except ABORT) with NBD_REP_ERR_SHUTDOWN, as the spec asks."""
        self._shutting_down = True

    # -- states

    def _read_client_flags(self) -> object:
        raw = self._take(4)
        if raw is None:
            return NEED_DATA
        (flags,) = struct.unpack(">I", raw)
        unknown = flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
        if unknown:  # spec: the server MUST drop the connection
            raise RemoteProtocolError(f"client sent unknown client flags 0x{unknown:x}")
        if not flags & NBD_FLAG_C_FIXED_NEWSTYLE:
            raise RemoteProtocolError("client does not support fixed newstyle")
        self._no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
        self._state = "options"
        return None

    def _read_option(self) -> object:
        msg = self._take_message(">QII", IHAVEOPT, self._max_option_length)
        if msg is None:
            return NEED_DATA
        (_, opt, _), data = msg
        if self._shutting_down and opt != NBD_OPT_ABORT:
            return self._refuse(opt, NBD_REP_ERR_SHUTDOWN, "server is shutting down")
        if self._tls_required and self.tls is None and opt not in (NBD_OPT_STARTTLS, NBD_OPT_ABORT):
            if opt == NBD_OPT_EXPORT_NAME:  # it has no error reply: the spec says hang up
                raise RemoteProtocolError("client sent NBD_OPT_EXPORT_NAME without TLS, which is required")
            return self._refuse(opt, NBD_REP_ERR_TLS_REQD, "TLS is required: use NBD_OPT_STARTTLS first")
        handler = self._OPTIONS.get(opt, ServerHandshake._opt_unsupported)
        try:
            return handler(self, opt, data)
        except _Invalid as exc:  # malformed but framed: say so and keep negotiating
            return self._refuse(opt, NBD_REP_ERR_INVALID, f"{_opt_name(opt)}: {exc}")

    # -- helpers

    def _send_option_reply(self, opt: int, rtype: int, payload: bytes = b"") -> None:
        self._out += struct.pack(">QIII", NBD_REP_MAGIC, opt, rtype, len(payload)) + payload

    def _refuse(self, opt: int, rtype: int, message: str) -> None:
        # Cut on characters, not bytes, so the message stays valid UTF-8 and
        # within the spec's 4096-byte string limit (<= 4 bytes per character).
        self._send_option_reply(opt, rtype, message[:NBD_MAX_STRING // 4].encode())

    def _lookup(self, name: str) -> ExportInfo | None:
        return self._catalog.lookup(name or self._default_export)  # "" = default export

    def _refused(self, export: ExportInfo) -> str | None:
        if self._authorize is None:
            return None
        return self._authorize(export.name, self.tls.peer_cn if self.tls is not None else None)

    def _select(self, export: ExportInfo) -> ExportSelected:
        # BLOCK_STATUS is only allowed if the final SET_META_CONTEXT named the
        # export that is finally selected; otherwise no contexts are active.
        meta = self._meta if self._meta_export == export.name else {}
        return ExportSelected(export, self._structured, dict(meta), self._no_zeroes)

    # -- option handlers (return an event, or None to keep negotiating)

    def _opt_export_name(self, opt: int, data: bytes) -> object:
        try:
            name = _decode_string(data)
        except _Invalid as exc:
            raise RemoteProtocolError(f"NBD_OPT_EXPORT_NAME: {exc}") from None
        export = self._lookup(name)
        if export is None:  # this option cannot fail; the spec says terminate
            raise RemoteProtocolError(f"client requested unknown export {name!r} "
                                      "with NBD_OPT_EXPORT_NAME")
        refused = self._refused(export)
        if refused:
            raise RemoteProtocolError(f"NBD_OPT_EXPORT_NAME {export.name!r}: {refused}")
        self._out += struct.pack(">QH", export.size, export.transmission_flags(self._structured))
        if not self._no_zeroes:
            self._out += bytes(NBD_HANDSHAKE_ZEROES)
        return self._select(export)

    def _opt_abort(self, opt: int, data: bytes) -> object:
        self._send_option_reply(opt, NBD_REP_ACK)  # any data is ignored, per spec
        return Aborted()

    def _opt_list(self, opt: int, data: bytes) -> None:
        if data:
            raise _Invalid("option takes no data")
        for name in self._catalog.names():
            export = self._catalog.lookup(name)
            raw = name.encode()
            description = export.description.encode() if export else b""
            self._send_option_reply(opt, NBD_REP_SERVER,
                                    struct.pack(">I", len(raw)) + raw + description)
        self._send_option_reply(opt, NBD_REP_ACK)

    def _opt_info_or_go(self, opt: int, data: bytes) -> object:
        reader = _Reader(data)
        name = reader.string(reader.u32())
        requests = {reader.u16() for _ in range(reader.u16())}  # unknown ones ignored
        reader.end()
        export = self._lookup(name)
        if export is None:
            return self._refuse(opt, NBD_REP_ERR_UNKNOWN, f"unknown export {name!r}")
        refused = self._refused(export)
        if refused:
            return self._refuse(opt, NBD_REP_ERR_POLICY, refused)

        def info(itype: int, payload: bytes) -> None:
            self._send_option_reply(opt, NBD_REP_INFO, struct.pack(">H", itype) + payload)

        info(NBD_INFO_EXPORT,
             struct.pack(">QH", export.size, export.transmission_flags(self._structured)))
        if NBD_INFO_NAME in requests:
            info(NBD_INFO_NAME, export.name.encode())
        if NBD_INFO_DESCRIPTION in requests and export.description:
            info(NBD_INFO_DESCRIPTION, export.description.encode())
        # Always sent (as nbdkit does): a client that did not ask ignores it,
        # and one that did is bound to honour it.
        info(NBD_INFO_BLOCK_SIZE,
             struct.pack(">III", export.min_block, export.preferred_block, export.max_block))
        self._send_option_reply(opt, NBD_REP_ACK)
        return self._select(export) if opt == NBD_OPT_GO else None

    def _opt_structured_reply(self, opt: int, data: bytes) -> None:
        if data:
            raise _Invalid("option takes no data")
        if self._structured:  # repeated state-changing option: spec allows ERR_INVALID
            raise _Invalid("structured replies already negotiated")
        self._structured = True
        self._send_option_reply(opt, NBD_REP_ACK)

    def _opt_meta_context(self, opt: int, data: bytes) -> None:
        setting = opt == NBD_OPT_SET_META_CONTEXT
        if setting:
            # SET replaces the previous selection even when it fails (spec).
            self._meta, self._meta_export = {}, None
            if not self._structured:
                raise _Invalid("NBD_OPT_STRUCTURED_REPLY must be negotiated first")
        # LIST without structured replies is allowed: the spec only says MAY refuse.
        reader = _Reader(data)
        name = reader.string(reader.u32())
        queries = [reader.string(reader.u32()) for _ in range(reader.u32())]
        reader.end()
        export = self._lookup(name)
        if export is None:
            return self._refuse(opt, NBD_REP_ERR_UNKNOWN, f"unknown export {name!r}")
        contexts = _match_meta_contexts(queries, listing=not setting)
        if setting:  # ids are opaque and per-connection; 1.. in selection order
            self._meta = dict(enumerate(contexts, start=1))
            self._meta_export = export.name
            replies = self._meta.items()
        else:  # LIST replies carry the reserved id 0
            replies = [(0, ctx) for ctx in contexts]
        for ctx_id, ctx in replies:
            self._send_option_reply(opt, NBD_REP_META_CONTEXT,
                                    struct.pack(">I", ctx_id) + ctx.encode())
        self._send_option_reply(opt, NBD_REP_ACK)

    def _opt_starttls(self, opt: int, data: bytes) -> None:
        if self._tls_context is None:
            # NOTLS mode: the spec requires ERR_POLICY (or ERR_UNSUP), never TLS_REQD.
            return self._refuse(opt, NBD_REP_ERR_POLICY, "TLS is not available on this server")
        if data:
            raise _Invalid("option takes no data")
        if self.tls is not None:
            raise _Invalid("TLS is already negotiated")
        self._send_option_reply(opt, NBD_REP_ACK)
        self._clear_out, self._out = bytes(self._out), bytearray()
        self.tls = self._tls_context.server_session()
        # whatever came after the option (the ClientHello, typically) is TLS already
        self.tls.feed(bytes(self._in))
        self._in.clear()
        self._state = "tls_handshake"

    def _tls_handshake(self) -> object:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return NEED_DATA  # the driver turns EOF here into ConnectionClosed
        except ssl.SSLError as exc:
            raise RemoteProtocolError(f"TLS handshake failed: {exc.reason or exc}") from None
        # the spec: option haggling starts over, what was negotiated in clear is forgotten
        self._structured = False
        self._meta, self._meta_export = {}, None
        self._state = "options"
        self._decrypt()
        return None

    def _decrypt(self) -> None:
        """Plaintext the records received so far hold -> the input buffer."""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:  # close_notify: a clean end
                self._eof = True
                return
            except ssl.SSLError as exc:
                self._error = RemoteProtocolError(f"TLS: {exc.reason or exc}")
                return
            if not chunk:
                self._eof = True
                return
            self._in += chunk

    def receive_data(self, data: bytes) -> None:
        if self.tls is None:
            return super().receive_data(data)
        if self._finished:
            raise LocalProtocolError("handshake finished; bytes belong to the transmission phase")
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if not data:
            self._eof = True
            return
        self.tls.feed(data)
        if self._state != "tls_handshake":
            self._decrypt()

    def data_to_send(self) -> bytes:
        if self.tls is None:
            return super().data_to_send()
        if self._out and self._state != "tls_handshake":
            self.tls.write(bytes(self._out))
            self._out.clear()
        out, self._clear_out = self._clear_out + self.tls.outgoing(), b""
        return out

    def _opt_unsupported(self, opt: int, data: bytes) -> None:
        self._refuse(opt, NBD_REP_ERR_UNSUP, f"{_opt_name(opt)} is not supported")

    _OPTIONS = {
        NBD_OPT_EXPORT_NAME: _opt_export_name,
        NBD_OPT_ABORT: _opt_abort,
        NBD_OPT_LIST: _opt_list,
        NBD_OPT_STARTTLS: _opt_starttls,
        NBD_OPT_INFO: _opt_info_or_go,
        NBD_OPT_GO: _opt_info_or_go,
        NBD_OPT_STRUCTURED_REPLY: _opt_structured_reply,
        NBD_OPT_LIST_META_CONTEXT: _opt_meta_context,
        NBD_OPT_SET_META_CONTEXT: _opt_meta_context,
    }
    _STATES = {"client_flags": _read_client_flags, "options": _read_option, "tls_handshake": _tls_handshake}


# ---------------------------------------------------------------------- client

class ClientHandshake(_Handshake):
    """Client side: STRUCTURED_REPLY, SET_META_CONTEXT, then GO (or LIST).

    After a RemoteProtocolError, flush data_to_send() before closing: it then
    holds an NBD_OPT_ABORT, the soft disconnect the spec asks clients to use.
    """

    def __init__(self, export_name: str, *, structured_replies: bool = True,
                 meta_contexts: tuple[str, ...] = (NBD_META_BASE_ALLOCATION,),
                 list_only: bool = False, use_go: bool = True) -> None:
        super().__init__()
        self._name = export_name.encode()
        self._want_structured = structured_replies
        self._want_meta = tuple(meta_contexts)
        self._list_only = list_only
        self._use_go = use_go  # False: straight to NBD_OPT_EXPORT_NAME
        self._no_zeroes = False
        self._structured = False
        self._meta: dict[int, str] = {}
        self._sent: set[int] = set()
        self._pending = 0
        self._export: tuple[int, int] | None = None
        self._block_sizes: tuple[int, int, int] | None = None
        self._names: list[str] = []
        self._state = "greeting"

    def _send_option(self, opt: int, data: bytes = b"") -> None:
        self._out += struct.pack(">QII", IHAVEOPT, opt, len(data)) + data
        self._sent.add(opt)
        self._pending = opt

    def _next_option(self) -> None:
        # One option in flight at a time (spec); order: STRUCTURED_REPLY first
        # because SET_META_CONTEXT depends on it, the ending option last.
        if self._list_only:
            self._send_option(NBD_OPT_LIST)
        elif self._want_structured and NBD_OPT_STRUCTURED_REPLY not in self._sent:
            self._send_option(NBD_OPT_STRUCTURED_REPLY)
        elif self._want_meta and self._structured and NBD_OPT_SET_META_CONTEXT not in self._sent:
            queries = b"".join(struct.pack(">I", len(q)) + q
                               for q in (m.encode() for m in self._want_meta))
            self._send_option(NBD_OPT_SET_META_CONTEXT, struct.pack(">I", len(self._name))
                              + self._name + struct.pack(">I", len(self._want_meta)) + queries)
        elif self._use_go:
            self._send_option(NBD_OPT_GO, struct.pack(">I", len(self._name)) + self._name
                              + struct.pack(">HH", 1, NBD_INFO_BLOCK_SIZE))
        else:
            self._send_option(NBD_OPT_EXPORT_NAME, self._name)
            self._state = "export_name_reply"

    def _fail(self, rtype: int, data: bytes) -> NoReturn:
        self._send_option(NBD_OPT_ABORT)
        message = data.decode("utf-8", "replace")
        raise RemoteProtocolError(f"server answered {_opt_name(self._pending)} with "
                                  f"{REP_NAMES.get(rtype, hex(rtype))}: {message}", rtype)

    def _negotiated(self, size: int, flags: int) -> Negotiated:
        return Negotiated(size, flags, self._structured, dict(self._meta),
                          self._block_sizes, bytes(self._in))

    # -- states

    def _read_greeting(self) -> object:
        raw = self._take(18)
        if raw is None:
            return NEED_DATA
        magic, opt_magic, flags = struct.unpack(">QQH", raw)
        if magic != NBDMAGIC:
            raise RemoteProtocolError(f"bad server magic 0x{magic:x}")
        if opt_magic != IHAVEOPT:
            old = opt_magic == NBD_CLISERV_MAGIC
            raise RemoteProtocolError("server uses oldstyle negotiation" if old
                                      else f"bad server magic 0x{opt_magic:x}")
        if not flags & NBD_FLAG_FIXED_NEWSTYLE:
            raise RemoteProtocolError("server does not support fixed newstyle")
        self._no_zeroes = bool(flags & NBD_FLAG_NO_ZEROES)
        self._out += struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE
                                 | (NBD_FLAG_C_NO_ZEROES if self._no_zeroes else 0))
        self._state = "replies"
        self._next_option()
        return None

    def _read_reply(self) -> object:
        msg = self._take_message(">QIII", NBD_REP_MAGIC, DEFAULT_MAX_OPTION_LENGTH)
        if msg is None:
            return NEED_DATA
        (_, opt, rtype, _), data = msg
        if opt != self._pending:
            raise RemoteProtocolError(f"server replied to {_opt_name(opt)} while "
                                      f"{_opt_name(self._pending)} was pending")
        handler, expected = self._REPLIES[opt]
        if not rtype & NBD_REP_FLAG_ERROR and rtype not in expected:
            raise RemoteProtocolError(f"unexpected {REP_NAMES.get(rtype, rtype)} "
                                      f"in reply to {_opt_name(opt)}")
        try:
            return handler(self, rtype, data)
        except _Invalid as exc:
            raise RemoteProtocolError(f"malformed reply to {_opt_name(opt)}: {exc}") from None

    def _read_export_name_reply(self) -> object:
        raw = self._take(10 if self._no_zeroes else 10 + NBD_HANDSHAKE_ZEROES)
        if raw is None:
            return NEED_DATA
        return self._negotiated(*struct.unpack_from(">QH", raw))

    # -- reply handlers, keyed by the pending option

    def _on_structured_reply(self, rtype: int, data: bytes) -> None:
        # Any error (normally ERR_UNSUP) just means "no structured replies".
        self._structured = rtype == NBD_REP_ACK
        self._next_option()

    def _on_set_meta_context(self, rtype: int, data: bytes) -> None:
        if rtype == NBD_REP_META_CONTEXT:
            reader = _Reader(data)
            ctx_id = reader.u32()
            self._meta[ctx_id] = reader.string(len(data) - 4)
            return None
        if rtype != NBD_REP_ACK:  # spec: on error, disregard contexts already sent
            self._meta = {}
        self._next_option()
        return None

    def _on_go(self, rtype: int, data: bytes) -> object:
        if rtype == NBD_REP_INFO:
            reader = _Reader(data)
            itype = reader.u16()
            if itype == NBD_INFO_EXPORT:
                self._export = (reader.u32() << 32 | reader.u32(), reader.u16())
                reader.end()
            elif itype == NBD_INFO_BLOCK_SIZE:
                self._block_sizes = (reader.u32(), reader.u32(), reader.u32())
                reader.end()
            return None  # other info types MUST be ignored
        if rtype == NBD_REP_ACK:
            if self._export is None:
                raise RemoteProtocolError("server accepted NBD_OPT_GO without NBD_INFO_EXPORT")
            return self._negotiated(*self._export)
        if rtype == NBD_REP_ERR_UNSUP:  # old server: the spec says fall back
            self._use_go = False
            self._next_option()
            return None
        return self._fail(rtype, data)

    def _on_list(self, rtype: int, data: bytes) -> object:
        if rtype == NBD_REP_SERVER:
            reader = _Reader(data)  # name; any rest is a description we ignore
            self._names.append(reader.string(reader.u32()))
            return None
        if rtype == NBD_REP_ACK:
            self._send_option(NBD_OPT_ABORT)  # we only wanted the list: soft disconnect
            return ExportList(tuple(self._names))
        return self._fail(rtype, data)

    # pending option -> (handler, non-error reply types it may legitimately get)
    _REPLIES = {
        NBD_OPT_STRUCTURED_REPLY: (_on_structured_reply, {NBD_REP_ACK}),
        NBD_OPT_SET_META_CONTEXT: (_on_set_meta_context, {NBD_REP_META_CONTEXT, NBD_REP_ACK}),
        NBD_OPT_GO: (_on_go, {NBD_REP_INFO, NBD_REP_ACK}),
        NBD_OPT_LIST: (_on_list, {NBD_REP_SERVER, NBD_REP_ACK}),
    }
    _STATES = {"greeting": _read_greeting, "replies": _read_reply,
               "export_name_reply": _read_export_name_reply}


__all__ = [
    "NEED_DATA", "LocalProtocolError", "RemoteProtocolError", "ExportInfo", "Catalog",
    "ExportSelected", "Aborted", "ConnectionClosed", "Negotiated", "ExportList",
    "ServerHandshake", "ClientHandshake", "DEFAULT_MAX_OPTION_LENGTH",
    "SUPPORTED_META_CONTEXTS",
]
