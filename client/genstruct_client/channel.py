"""Channel settings: targets, TLS / mutual TLS, bearer token, retries, keepalive, balancing."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from genstruct.v1 import genstruct_pb2

SERVICE_NAME = "genstruct.v1.GenstructService"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
# The methods gRPC retries (RetryPolicy): every unary one.
UNARY_METHODS: tuple[tuple[str, str], ...] = (
    *(
        (SERVICE_NAME, method.name)
        for method in genstruct_pb2.DESCRIPTOR.services_by_name["GenstructService"].methods
        if not method.client_streaming and not method.server_streaming
    ),
    (HEALTH_SERVICE_NAME, "Check"),
)
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def honour(backoff: float, retry_delay: float | None, most: float) -> float:
    """The wait before a retry: the backoff drawn, or the server's RetryInfo delay when that
    is longer, though never past `most` (a server cannot stall a client without bound)."""
    if retry_delay is None:
        return backoff
    return max(backoff, min(retry_delay, most))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of calls refused with a transient code, with exponential backoff and jitter.

    Each kind of call is retried in one layer only, never a retry loop inside another. Unary
    calls (Generate, GetModelInfo, Health.Check) are retried by gRPC alone: this goes to it as
    their service config retryPolicy (gRPC waits a random time between 0 and the current
    backoff, caps `max_attempts` at 5, and retries only a call that got no response headers;
    the Genstruct server sends a unary call's headers with its result), with retryThrottling:
    every failed attempt costs a token, every success gives `token_ratio` back, and gRPC does
    not retry while half of `max_tokens` or fewer are left, so a server that refuses
    everything soon gets one attempt per call. Each channel (each client) has its own tokens.
    A deadline that passes while gRPC waits to retry ends the call DEADLINE_EXCEEDED.

    Streams are left out of the service config: the server sends a stream's headers at once,
    after which gRPC retries nothing, so the clients retry GenerateStream until its first
    message themselves (`delay`, `max_attempts` in all), and `generate_many` reopens
    GenerateBatch streams (ResubmitPolicy). Neither retries a stream that delivered messages.

    A refusal that says how long to wait (google.rpc.RetryInfo) is honoured in whichever layer
    retries it: gRPC waits the `grpc-retry-pushback-ms` the server sends with it, and the
    clients' own retries wait at least the delay, up to `max_backoff`.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2  # seconds
    max_backoff: float = 10.0  # seconds
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[grpc.StatusCode, ...] = (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    max_tokens: int = 10  # retryThrottling (gRPC takes a whole number)
    token_ratio: float = 0.1

    def delay(
        self,
        code: grpc.StatusCode,
        attempt: int,
        deadline: float | None = None,
        retry_delay: float | None = None,
    ) -> float | None:
        """Seconds to wait before trying again after attempt number `attempt` (1-based) failed
        with `code`; None when not to try again (a code not retried, attempts or the
        deadline, a time.monotonic() value, used up). `retry_delay` is the server's RetryInfo:
        the wait is at least that, up to max_backoff."""
        if code not in self.retryable_codes or attempt >= self.max_attempts:
            return None
        growth = self.backoff_multiplier ** (attempt - 1)
        ceiling = min(self.max_backoff, self.initial_backoff * growth)
        delay = honour(ceiling * random.random(), retry_delay, self.max_backoff)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay

    def to_json(self) -> dict[str, object]:
        """The `retryPolicy` object of a gRPC service config."""
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff:.3f}s",
            "maxBackoff": f"{self.max_backoff:.3f}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": [code.name for code in self.retryable_codes],
        }

    def throttling_json(self) -> dict[str, object]:
        """The `retryThrottling` object of a gRPC service config."""
        return {"maxTokens": self.max_tokens, "tokenRatio": self.token_ratio}


@dataclass(frozen=True, slots=True)
class Keepalive:
    """HTTP/2 keepalive pings, both ends: what the client sends and what the server accepts.

    The client pings a connection that has calls in flight every `interval` seconds, however
    long they stay silent, and drops it after `timeout` seconds without an answer: a dead peer
    is found in seconds, not when TCP gives up. gRPC's server counts a ping that comes sooner
    after the last than its minimum interval (5 minutes unless set) as a strike and, past
    `max_ping_strikes`, ends the connection with GOAWAY "too_many_pings", failing the calls on
    it. So the Genstruct server takes its options from the very object the client does
    (KEEPALIVE), and the two cannot drift apart. gRPC's client never pings more than once a
    second, whatever `interval` says.
    """

    interval: float = 30.0  # seconds
    timeout: float = 10.0  # seconds
    max_ping_strikes: int = 2

    def client_options(self) -> list[tuple[str, int]]:
        """Channel arguments of the pinging side."""
        return [
            ("grpc.keepalive_time_ms", _ms(self.interval)),
            ("grpc.keepalive_timeout_ms", _ms(self.timeout)),
            # Only connections with calls in flight: the server refuses pings on idle ones.
            ("grpc.keepalive_permit_without_calls", 0),
            # gRPC stops pinging after 2 pings without data unless told otherwise, and a call
            # waiting for a slot, or a unary call being generated, sends no data for minutes.
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def server_options(self) -> list[tuple[str, int]]:
        """Server arguments that accept the pings of `client_options()`."""
        return [
            # Half the client's interval: a ping a little early (timers) is never a strike,
            # and strikes on a silent call are never forgiven (only data sent resets them).
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.interval) // 2),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
            ("grpc.keepalive_permit_without_calls", 0),
        ]


# The pair in force: ChannelConfig pings at this rate, genstruct_service.server accepts it.
KEEPALIVE = Keepalive()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS to the server; with a certificate chain and key, mutual TLS."""

    root_certificates: bytes | None = None  # PEM; None = the system's trust store
    certificate_chain: bytes | None = None  # PEM client certificate, for mutual TLS
    private_key: bytes | None = None  # PEM client key, for mutual TLS
    server_name: str | None = None  # expect this name in the server's certificate

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        """Reads PEM files; `cert` and `key` go together."""
        if (cert is None) != (key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key")
        return cls(
            root_certificates=Path(ca).read_bytes() if ca else None,
            certificate_chain=Path(cert).read_bytes() if cert else None,
            private_key=Path(key).read_bytes() if key else None,
            server_name=server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


def resolve_target(targets: str | Sequence[str]) -> str:
    """One gRPC target from one or several endpoints.

    A single `host:port` or a URI (`dns:///name:port`, `ipv4:a:p,b:q`, `unix:path`) is kept
    as is. Several `host:port` endpoints (a sequence, or one comma-separated string) become
    an `ipv4:` or `ipv6:` address list, which the round_robin policy spreads calls over; they
    must then be IP addresses (for names, use `dns:///name:port`, which resolves them all).
    """
    if isinstance(targets, str):
        if targets.startswith(_SCHEMES):
            return targets
        parts = [part.strip() for part in targets.split(",") if part.strip()]
    else:
        parts = [part.strip() for part in targets if part.strip()]
        if len(parts) == 1 and parts[0].startswith(_SCHEMES):
            return parts[0]
    if not parts:
        raise ValueError("no target given")
    if len(parts) == 1:
        return parts[0]
    families = {_ip_family(part) for part in parts}
    if families == {4}:
        return "ipv4:" + ",".join(parts)
    if families == {6}:
        return "ipv6:" + ",".join(parts)
    raise ValueError(
        f"several targets must all be IPv4 or all IPv6 addresses with ports, got {parts!r}; "
        "for host names use one dns:///name:port target"
    )


def _ip_family(endpoint: str) -> int | None:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target {endpoint!r} is not host:port")
    try:
        return ipaddress.ip_address(host.strip("[]")).version
    except ValueError:
        return None


def target_addresses(target: str) -> int:
    """How many endpoints a target names (1 unless it is an ipv4:/ipv6: list)."""
    if target.startswith(("ipv4:", "ipv6:")):
        return len([part for part in target.split(":", 1)[1].split(",") if part])
    return 1


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """Everything needed to open a channel to one or several Genstruct servers."""

    target: str = DEFAULT_TARGET
    tls: TlsConfig | None = None
    # Sent as `authorization: Bearer <token>` on every call. Without TLS it travels in clear
    # text: fine on loopback (a sidecar), not across a network.
    token: str | None = None
    retry: RetryPolicy | None = field(default_factory=RetryPolicy)
    load_balancing: str = "round_robin"  # or "pick_first"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Keepalive pings while calls are in flight, to find dead peers (see Keepalive); the
    # Genstruct server accepts them down to every KEEPALIVE.interval / 2 seconds.
    keepalive_seconds: float | None = KEEPALIVE.interval
    extra_options: tuple[tuple[str, str | int], ...] = ()

    def service_config(self) -> str:
        """The service config JSON: load balancing, and the retries of the unary methods."""
        config: dict[str, object] = {"loadBalancingConfig": [{self.load_balancing: {}}]}
        if self.retry is not None:
            config["methodConfig"] = [
                {
                    "name": [
                        {"service": service, "method": method}
                        for service, method in UNARY_METHODS
                    ],
                    "retryPolicy": self.retry.to_json(),
                }
            ]
            config["retryThrottling"] = self.retry.throttling_json()
        return json.dumps(config)

    def options(self) -> list[tuple[str, str | int]]:
        """Channel arguments."""
        options: list[tuple[str, str | int]] = [
            ("grpc.service_config", self.service_config()),
            # A service config published in DNS must not override ours.
            ("grpc.service_config_disable_resolution", 1),
            ("grpc.enable_retries", 1 if self.retry is not None else 0),
            # gRPC retries no call whose request is over this (256 KiB unless set), and a
            # document of 100,000 characters can take 400 KB.
            ("grpc.per_rpc_retry_buffer_size", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.primary_user_agent", "genstruct-client"),
            # Find a restarted server within seconds, not gRPC's default of up to 2 minutes.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        if self.keepalive_seconds is not None:
            keepalive = dataclasses.replace(KEEPALIVE, interval=self.keepalive_seconds)
            options += keepalive.client_options()
        if self.tls is not None and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        options.extend(self.extra_options)
        return options

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata sent with every call."""
        if self.token:
            return (("authorization", f"Bearer {self.token}"),)
        return ()


def create_channel(config: ChannelConfig) -> grpc.Channel:
    """A synchronous channel."""
    if config.tls is not None:
        return grpc.secure_channel(config.target, config.tls.credentials(), config.options())
    return grpc.insecure_channel(config.target, config.options())


def create_aio_channel(config: ChannelConfig) -> grpc.aio.Channel:
    """An asyncio channel; create it inside the event loop that uses it."""
    if config.tls is not None:
        return grpc.aio.secure_channel(config.target, config.tls.credentials(), config.options())
    return grpc.aio.insecure_channel(config.target, config.options())
