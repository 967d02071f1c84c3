"""What `serve` checks and says before it serves: the port is free (before minutes of model loading, not
after), a --chat-template compiles and renders."""
from __future__ import annotations

import errno
import socket

from ..tokenizer import Tokenizer

_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
          {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]


def reserve_port(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, held for the server (no other process can take the port while the
    model loads). Raises OSError naming the port and the fix when it is in use or cannot be bound."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise OSError(f"--host {host!r} is not an address this machine can bind: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-closed server's port (TIME_WAIT)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is already in use (another server?): stop it or choose "
                          f"another --port") from None
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def check_chat_template(template: str, tokenizer: Tokenizer | None = None) -> None:
    """A template that does not compile, or fails on a plain conversation, is an error now (ValueError
    naming it), not on every request."""
    if tokenizer is None:
        from ..tokenizer import tiny_tokenizer

        tokenizer = tiny_tokenizer()
    try:
        tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, chat_template=template)
    except ValueError as e:
        raise ValueError(f"--chat-template: {e}") from None
