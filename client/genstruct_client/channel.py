"""Channel settings: targets, TLS / mutual TLS, bearer token, retries and load balancing."""

from __future__ import annotations

import ipaddress
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

SERVICE_NAME = "genstruct.v1.GenstructService"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of calls refused with a transient code, with exponential backoff and jitter.

    It goes to gRPC as the service config's retryPolicy (gRPC waits a random time between 0
    and the current backoff, and caps `max_attempts` at 5), which retries a call that got no
    response headers: unary calls refused by the server (it sends their x-request-id in the
    trailers only) and calls that failed while connecting. The Genstruct server sends a
    stream's headers at once, so the clients retry GenerateStream until its first message
    themselves, and Generate, GetModelInfo and Health too, so that a call out of time says
    why it was refused (`delay`). Neither retries a stream that has delivered messages:
    `generate_many` resubmits what has no result yet itself.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2  # seconds
    max_backoff: float = 10.0  # seconds
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[grpc.StatusCode, ...] = (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )

    def delay(
        self, code: grpc.StatusCode, attempt: int, deadline: float | None = None
    ) -> float | None:
        """Seconds to wait before trying again after attempt number `attempt` (1-based) failed
        with `code`; None when not to try again (a code not retried, attempts or the
        deadline, a time.monotonic() value, used up)."""
        if code not in self.retryable_codes or attempt >= self.max_attempts:
            return None
        growth = self.backoff_multiplier ** (attempt - 1)
        ceiling = min(self.max_backoff, self.initial_backoff * growth)
        delay = ceiling * random.random()
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
    keepalive_seconds: float | None = 30.0  # pings on idle connections to find dead peers
    extra_options: tuple[tuple[str, str | int], ...] = ()

    @classmethod
    def for_targets(cls, targets: str | Sequence[str], **kwargs: object) -> ChannelConfig:
        """A config whose target is `resolve_target(targets)`."""
        return cls(target=resolve_target(targets), **kwargs)  # type: ignore[arg-type]

    def service_config(self) -> str:
        """The service config JSON: load balancing and the retry policy of every method."""
        config: dict[str, object] = {"loadBalancingConfig": [{self.load_balancing: {}}]}
        if self.retry is not None:
            config["methodConfig"] = [
                {
                    "name": [{"service": SERVICE_NAME}, {"service": HEALTH_SERVICE_NAME}],
                    "retryPolicy": self.retry.to_json(),
                }
            ]
        return json.dumps(config)

    def options(self) -> list[tuple[str, str | int]]:
        """Channel arguments."""
        options: list[tuple[str, str | int]] = [
            ("grpc.service_config", self.service_config()),
            # A service config published in DNS must not override ours.
            ("grpc.service_config_disable_resolution", 1),
            ("grpc.enable_retries", 1 if self.retry is not None else 0),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.primary_user_agent", "genstruct-client"),
            # Find a restarted server within seconds, not gRPC's default of up to 2 minutes.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        if self.keepalive_seconds is not None:
            options += [
                ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 0),
            ]
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
