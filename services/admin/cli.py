"""``rlhf admin``: inspect and steer model versions through any server's AdminService.

    rlhf admin status
    rlhf admin list [--role policy|reward]
    rlhf admin promote policy VERSION
    rlhf admin rollback policy [VERSION]      # default: the previously promoted version
    rlhf admin pin policy VERSION | rlhf admin unpin policy
    rlhf admin canary policy VERSION 0.1      # 10% of users (sticky); share 0 ends it

The key comes from --api-key or RLHF_API_KEY (scope ``admin``).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from google.protobuf import json_format

from rlhf.lifecycle import ROLES
from rlhf.v1 import admin_pb2, admin_pb2_grpc


def _role(name: str) -> int:
    if name not in ROLES:
        raise argparse.ArgumentTypeError(f"role must be one of {', '.join(ROLES)}")
    return ROLES[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf admin", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default=os.environ.get("RLHF_ADMIN_TARGET", "localhost:50051"),
                        help="host:port of a policy or reward server")  # fmt: skip
    parser.add_argument("--api-key", default=os.environ.get("RLHF_API_KEY", ""))
    parser.add_argument("--timeout", type=float, default=15.0)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("status")
    ls = sub.add_parser("list")
    ls.add_argument("--role", type=_role, default=0)
    for name in ("promote", "pin"):
        p = sub.add_parser(name)
        p.add_argument("role", type=_role)
        p.add_argument("version")
    rb = sub.add_parser("rollback")
    rb.add_argument("role", type=_role)
    rb.add_argument("version", nargs="?", default="")
    up = sub.add_parser("unpin")
    up.add_argument("role", type=_role)
    cn = sub.add_parser("canary")
    cn.add_argument("role", type=_role)
    cn.add_argument("version")
    cn.add_argument("share", type=float)
    return parser


def call(stub: admin_pb2_grpc.AdminServiceStub, args: argparse.Namespace, **kw):
    if args.action == "status":
        return stub.GetStatus(admin_pb2.StatusRequest(), **kw)
    if args.action == "list":
        return stub.ListVersions(admin_pb2.ListVersionsRequest(role=args.role), **kw)
    if args.action == "promote":
        return stub.Promote(admin_pb2.PromoteRequest(role=args.role, version=args.version), **kw)
    if args.action == "rollback":
        return stub.Rollback(admin_pb2.RollbackRequest(role=args.role, version=args.version), **kw)
    if args.action == "pin":
        return stub.Pin(admin_pb2.PinRequest(role=args.role, version=args.version), **kw)
    if args.action == "unpin":
        return stub.Pin(admin_pb2.PinRequest(role=args.role), **kw)
    return stub.SetCanary(
        admin_pb2.CanaryRequest(role=args.role, version=args.version, share=args.share), **kw
    )


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    with grpc.insecure_channel(args.target) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        try:
            reply = call(stub, args, metadata=metadata, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(json_format.MessageToJson(reply, preserving_proto_field_name=True))
    return 0
