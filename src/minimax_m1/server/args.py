"""The server's settings (the `serve` flags past the engine's): who may call, how much one request may ask
for, how long connections and requests may take, how shutdown goes."""
from __future__ import annotations

import dataclasses
import ipaddress
import resource

MiB = 1 << 20
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclasses.dataclass
class ServerArgs:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    reasoning_parser: bool = True
    tool_call_parser: bool = True  # --tool-call-parser minimax_m1 (False: none; forced calls are parsed anyway)
    model_root: str | None = None  # what /v1/models reports as the model's root
    # when bound to loopback, Host headers other than these (any port) are refused: DNS-rebinding protection
    allowed_hosts: list[str] = dataclasses.field(default_factory=list)
    allowed_origins: list[str] = dataclasses.field(default_factory=list)  # CORS; none: no CORS headers
    max_request_bytes: int = 8 * MiB
    max_request_seconds: float | None = 1800.0  # generation time of one request; None: no limit
    max_num_seqs_per_request: int = 256  # prompts x n of one request
    shutdown_timeout: float = 30.0  # SIGTERM: how long in-flight requests may finish before they are aborted
    max_connections: int | None = None  # None: from the open-file limit (see default_max_connections)
    # an idle keep-alive connection is closed after this: longer than clients' own idle expiry (httpx 5 s,
    # aiohttp 15 s), else a client may send a request on a connection just as the server closes it
    timeout_keep_alive: float = 20.0
    timeout_header: float = 10.0  # a connection must send a request's headers within this
    timeout_body: float = 60.0  # and its body within this after the headers
    log_level: str = "info"

    def __post_init__(self):
        positive = ["max_request_bytes", "max_num_seqs_per_request", "shutdown_timeout", "timeout_keep_alive",
                    "timeout_header", "timeout_body"]
        for name in positive + ["max_request_seconds", "max_connections"]:
            value = getattr(self, name)
            if (value is not None or name in positive) and not value > 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {value!r}")
        if self.max_connections is None:
            self.max_connections = default_max_connections()

    @property
    def on_loopback(self) -> bool:
        return is_loopback(self.host)

    def host_names(self) -> set[str] | None:
        """The Host header names accepted (lower case, no port), or None for any: loopback names plus
        --allowed-hosts when bound to loopback or when --allowed-hosts is given, else any."""
        if not (self.on_loopback or self.allowed_hosts) or "*" in self.allowed_hosts:
            return None
        return {h.lower().strip("[]") for h in [*self.allowed_hosts, self.host]} | set(LOOPBACK_NAMES)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_max_connections() -> int:
    """Open connections allowed: the open-file limit less a reserve for the process's own files (model
    shards, the tokenizer, logs), at most 4096. Past it connections are refused, not left to exhaust fds."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(1, min(4096, soft - min(256, soft // 4)))
