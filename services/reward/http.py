"""The reward server's HTTP/JSON API (scope ``infer``), beside ``RewardService.Score``.

``POST /v1/score`` takes a ``ScoreRequest`` in protobuf's JSON mapping,
``{"prompt": "...", "responses": ["...", ...], "model_version": ""}`` or, for a chat model,
``{"messages": [{"role": "user", "content": "..."}], "responses": [...]}``, runs the
servicer's own ``score`` path (the same checks of the conversation as gRPC) and answers
``{"rewards": [...], "model_version": "..."}``. ``GET /health``:
200 once a reward model is loaded, 503 before (no key). Errors are Google's JSON error with the
HTTP status matching the gRPC one (400, 401, 403, 404, 413, 429, 503).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from rlhf.http import HttpDoor, json_response
from rlhf.http_json import parse_proto, proto_json, read_json
from rlhf.runtime import Scope
from rlhf.v1 import reward_pb2

if TYPE_CHECKING:
    from services.reward.server import RewardServicer

SERVICE = "rlhf.v1.RewardService"


def add_routes(door: HttpDoor, servicer: RewardServicer) -> None:
    async def score(http: web.Request) -> web.Response:
        request = parse_proto(await read_json(http), reward_pb2.ScoreRequest())
        return json_response(proto_json(await servicer.score(request)))

    door.route("POST", "/v1/score", score, scope=Scope.INFER)
    door.health("/health", [SERVICE])
