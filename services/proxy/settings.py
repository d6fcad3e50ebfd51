"""Proxy settings (env prefix TOLLWAY_)."""

from __future__ import annotations

import socket

from pydantic import Field, SecretStr

from schemas.settings import CommonSettings


class ProxySettings(CommonSettings):
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8080
    proxy_instance: str | None = None  # None -> "<hostname>:<port>"; names this replica's event sequence
    max_body_bytes: int = 4 * 1024 * 1024
    upstream_max_connections: int = 512
    # a provider's answer (decompressed too) or a whole stream; the largest embeddings answer is ~80 MB
    upstream_max_body_bytes: int = Field(128 * 1024 * 1024, ge=1024)
    upstream_max_sse_line_bytes: int = Field(1024 * 1024, ge=1024)  # one line of a streamed answer
    event_linger_ms: int = 10
    event_queue_max: int = 100_000
    redis_url: str | None = None  # set -> rate limits shared by every replica through Redis; unset -> in memory
    # signs the Responses API ids the proxy hands out (services/proxy/response_ids.py): the same on every
    # replica; unset -> one made at first start in the data dir (a single replica only)
    responses_id_secret: SecretStr | None = Field(None, min_length=16)

    def instance(self) -> str:
        return self.proxy_instance or f"{socket.gethostname()}:{self.proxy_port}"
