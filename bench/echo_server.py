"""The baseline: a bare grpc.aio server implementing TokenBroker with a constant answer (no interceptor, no DB)."""

from __future__ import annotations

import asyncio
import sys

import grpc

from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc

ANSWER = pb.GetOIDCAccessTokenResponse(access_token="bench-token-0123456789", status=pb.TOKEN_STATUS_VALID)
ANSWER.expires_at.FromSeconds(4102444800)


class Echo(pb_grpc.TokenBrokerServicer):
    async def GetOIDCAccessToken(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        return ANSWER


async def main(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_TokenBrokerServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
