"""The HTTP endpoints beside the socket (protocol.md, "HTTP beside the socket")."""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .broker import BrokerUnavailable
from .protocol import CloseCause, valid_channel

if TYPE_CHECKING:
    from .app import StableServer

API = "/api/v1"
MAX_CONNECTIONS_LISTED = 1000
CLOSE_CAUSES = frozenset(str(cause) for cause in CloseCause)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _key_ok(server: StableServer, request: Request) -> bool:
    given = request.headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), server.settings.api_key.encode())


def _write_refusal(server: StableServer, request: Request, action: str) -> JSONResponse | None:
    """Actions that change something need the API key, and are off without one."""
    if not server.settings.api_key:
        return _error(403, f"{action} over HTTP is off: set api_key (STABLEWS_API_KEY) to enable it")
    if not _key_ok(server, request):
        return _error(401, "missing or wrong X-API-Key")
    return None


def _admin_refusal(server: StableServer, request: Request) -> JSONResponse | None:
    """Admin views need the API key when one is configured."""
    if server.settings.api_key and not _key_ok(server, request):
        return _error(401, "missing or wrong X-API-Key")
    return None


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is larger than `limit` (read no further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def api_routes(server: StableServer) -> list[BaseRoute]:
    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        if server.ready:
            return JSONResponse({"ready": True})
        reason = "draining" if server.draining else "starting" if not server.started else "broker unavailable"
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)

    async def health(request: Request) -> JSONResponse:
        fleet = server.manager.assess()
        status, reasons = server.service_status(fleet.status, list(fleet.reasons))
        body = {
            "status": status,
            "draining": server.draining,
            "ready": server.ready,
            "reasons": reasons,
            "connections": {
                "total": fleet.total,
                "healthy": fleet.healthy,
                "unhealthy": fleet.unhealthy,
                "stale": fleet.stale,
            },
            "unhealthy_ratio": fleet.unhealthy_ratio,
            "missed_heartbeat_ratio": fleet.missed_heartbeat_ratio,
            "thresholds": {
                "unhealthy_score": server.settings.unhealthy_score,
                "degraded_ratio": server.settings.degraded_ratio,
                "unhealthy_ratio": server.settings.unhealthy_ratio,
            },
        }
        return JSONResponse(body, status_code=503 if status == "unhealthy" else 200)

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(server.stats())

    async def connections(request: Request) -> JSONResponse:
        refusal = _admin_refusal(server, request)
        if refusal:
            return refusal
        try:
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            return _error(400, "limit must be a whole number")
        if not 1 <= limit <= MAX_CONNECTIONS_LISTED:
            return _error(400, f"limit must be between 1 and {MAX_CONNECTIONS_LISTED}")
        wanted = request.query_params.get("health")
        manager = server.manager
        now = manager.clock()
        listed = []
        for conn in manager.live.values():
            view = conn.summary(now)
            if wanted and view["health"]["state"] != wanted:
                continue
            listed.append(view)
            if len(listed) >= limit:
                break
        return JSONResponse({"total": len(manager.live), "returned": len(listed), "connections": listed})

    async def drops(request: Request) -> JSONResponse:
        refusal = _admin_refusal(server, request)
        if refusal:
            return refusal
        recorder = server.telemetry.drops
        try:
            limit = int(request.query_params.get("limit", str(recorder.size)))
        except ValueError:
            return _error(400, "limit must be a whole number")
        if not 1 <= limit <= recorder.size:
            return _error(400, f"limit must be between 1 and {recorder.size} (flight_recorder_size)")
        cause = request.query_params.get("cause") or None
        if cause is not None and cause not in CLOSE_CAUSES:
            return _error(400, f"unknown cause {cause[:40]!r}; causes are {', '.join(sorted(CLOSE_CAUSES))}")
        listed = recorder.records(limit, cause)
        return JSONResponse(
            {"kept": recorder.size, "recorded_total": recorder.recorded_total, "returned": len(listed), "drops": listed}
        )

    async def metrics(request: Request) -> Response:
        exporter = server.telemetry.metrics
        if exporter is None:
            return _error(404, "metrics are off (metrics_enabled = false)")
        body, content_type = exporter.exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    async def connection(request: Request) -> JSONResponse:
        refusal = _admin_refusal(server, request)
        if refusal:
            return refusal
        conn = server.manager.get(request.path_params["conn_id"])
        if conn is None:
            return _error(404, "no such connection (closed records are kept for stale_connection_threshold)")
        return JSONResponse(conn.detail(server.manager.clock()))

    async def disconnect(request: Request) -> JSONResponse:
        """Close one connection with 1000 (normal: the client should not come back on its own)."""
        refusal = _write_refusal(server, request, "closing connections")
        if refusal:
            return refusal
        conn = server.manager.live.get(request.path_params["conn_id"])
        if conn is None or conn.passive:
            return _error(404, "no such live connection")
        conn.close(CloseCause.NORMAL)
        return JSONResponse({"id": conn.id, "state": conn.state.name.lower(), "code": conn.close_code})

    async def publish(request: Request) -> JSONResponse:
        settings = server.settings
        refusal = _write_refusal(server, request, "publishing")
        if refusal:
            return refusal
        body = await _read_body(request, settings.max_message_bytes)
        if body is None:
            return _error(413, f"body exceeds max_message_bytes ({settings.max_message_bytes})")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return _error(400, "body must be JSON: {\"channel\": ..., \"data\": ...}")
        if not isinstance(payload, dict) or "data" not in payload:
            return _error(400, "body must be a JSON object with 'channel' and 'data'")
        channel = payload.get("channel")
        if not valid_channel(channel, server.manager.limits):
            return _error(400, "'channel' must be 1-128 characters of letters, digits and _ . : / -")
        try:
            result = await server.broker.publish(channel, payload["data"])
        except ValueError:
            return _error(400, "'data' must be plain JSON (no NaN or Infinity)")
        except BrokerUnavailable as exc:
            return _error(503, f"broker unavailable: {exc}")
        return JSONResponse({"channel": result.channel, "epoch": result.epoch, "offset": result.offset})

    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route(f"{API}/websocket/health", health),
        Route(f"{API}/websocket/stats", stats),
        Route(f"{API}/websocket/connections", connections),
        Route(f"{API}/websocket/connections/{{conn_id}}", connection),
        Route(f"{API}/websocket/connections/{{conn_id}}", disconnect, methods=["DELETE"]),
        Route(f"{API}/publish", publish, methods=["POST"]),
        Route(f"{API}/websocket/drops", drops),
        Route("/metrics", metrics),
    ]
