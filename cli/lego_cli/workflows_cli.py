"""`lego workflows list | compile FILE | register FILE`.

FILE is a Python file (every `with Workflow(...)` block it runs, and every `WorkflowSpec` it binds
at top level), a WorkflowSpec
in protobuf JSON, or a ComfyUI API-format JSON (`--format comfyui`, or detected). `compile` checks and
optimises locally and prints the template (or exits 2 with every error on stderr); `register` does the
same, then registers it through the compiler service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import runpy
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from lego.client import GatewayClient
from lego.graph import validate_spec
from lego.grpc_server import channel
from lego.passes import optimise
from lego.store import open_store
from lego.v1 import compiler_pb2, compiler_pb2_grpc
from lego.workflow import collect_workflows
from lego_compiler.comfyui import ComfyUIError, import_comfyui
from lego_compiler.model_map import ModelMapError, load_model_map
from lego_compiler.summary import describe

DEFAULT_GATEWAY = "127.0.0.1:50051"
EXIT_INVALID = 2


class WorkflowFileError(ValueError):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the registered workflows (one JSON line each)")
    listing.add_argument("--gateway", default=DEFAULT_GATEWAY)
    for name, help_text in (
        ("compile", "check and optimise FILE locally; print the template or exit 2 with the errors"),
        ("register", "compile FILE, then register it through the compiler service"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("file", help="a .py file, a WorkflowSpec .json or a ComfyUI API-format .json")
        action.add_argument("--format", choices=["auto", "python", "spec", "comfyui"], default="auto")
        action.add_argument("--name", default="", help="the workflow's name (ComfyUI; default: file stem)")
        action.add_argument("--model-map", type=Path, default=None, help="ComfyUI file names → models")
        if name == "compile":
            action.add_argument("--json", action="store_true", help="print JSON")
        else:
            action.add_argument("--compiler", default="", help="the compiler's HOST:PORT")
            action.add_argument(
                "--store", default="etcd://127.0.0.1:2379", help="else: find the compiler in this store"
            )


def _detect(path: Path, data: Any) -> str:
    if path.suffix == ".py":
        return "python"
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "ir_version" in data:
        return "spec"
    return "comfyui"


def load_specs(path: Path, fmt: str = "auto", name: str = "", model_map: Path | None = None) -> list[Any]:
    """The workflow specs a file defines; raises WorkflowFileError with every problem."""
    if not path.is_file():
        raise WorkflowFileError([f"{path}: no such file"])
    if fmt == "python" or (fmt == "auto" and path.suffix == ".py"):
        with collect_workflows() as built:
            namespace = runpy.run_path(str(path))
        specs = [workflow.to_spec() for workflow in built]
        names = {spec.name for spec in specs}
        specs += [
            value
            for value in namespace.values()
            if isinstance(value, compiler_pb2.WorkflowSpec) and value.name not in names
        ]
        if not specs:
            raise WorkflowFileError([f"{path}: defines no Workflow or WorkflowSpec at top level"])
        return specs
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise WorkflowFileError([f"{path}: not JSON ({error})"]) from None
    if (fmt if fmt != "auto" else _detect(path, data)) == "spec":
        return [json_format.ParseDict(data, compiler_pb2.WorkflowSpec())]
    try:
        return [import_comfyui(data, name or path.stem, load_model_map(model_map))]
    except ComfyUIError as error:
        raise WorkflowFileError(error.errors) from None
    except ModelMapError as error:
        raise WorkflowFileError([str(error)]) from None


def compile_file(args: argparse.Namespace) -> list[compiler_pb2.WorkflowSpec]:
    """Load, validate and optimise; raises WorkflowFileError naming every error of every workflow."""
    specs = load_specs(Path(args.file), args.format, args.name, args.model_map)
    errors = [f"{spec.name}: {error}" for spec in specs for error in validate_spec(spec)]
    if errors:
        raise WorkflowFileError(errors)
    return specs


def _print_summary(spec: compiler_pb2.WorkflowSpec, as_json: bool) -> None:
    optimised = optimise(spec)
    summary = describe(optimised, given_nodes=len(spec.nodes))
    if as_json:
        print(json.dumps(summary))
        return
    print(f"workflow {summary['name']} (IR v{summary['ir_version']}): {summary['node_count']} nodes")
    for model, count in summary["nodes_per_model"].items():
        print(f"  {count:3d}  {model}")
    print(f"  inputs: {', '.join(summary['inputs'])}")
    print(f"  outputs: {', '.join(f'{k} = {v}' for k, v in summary['outputs'].items())}")
    for edge in summary["edges"]:
        print(f"  {edge}")


async def _compiler_address(args: argparse.Namespace) -> str:
    if args.compiler:
        return str(args.compiler)
    from lego import keys

    store = await open_store(args.store)
    try:
        found = await store.get_prefix(keys.SERVICES + "compiler/")
    finally:
        await store.close()
    if not found:
        raise WorkflowFileError([f"no compiler registered in {args.store}; pass --compiler HOST:PORT"])
    return next(iter(found.values())).decode()


async def _register(args: argparse.Namespace, specs: list[compiler_pb2.WorkflowSpec]) -> None:
    address = await _compiler_address(args)
    async with channel(address) as chan:
        stub = compiler_pb2_grpc.CompilerStub(chan)
        for spec in specs:
            reply = await stub.RegisterWorkflow(spec)
            print(
                json.dumps(
                    {"name": reply.name, "nodes": reply.node_count, "per_model": dict(reply.nodes_per_model)}
                )
            )


def _list(args: argparse.Namespace) -> int:
    with GatewayClient(args.gateway) as client:
        for workflow in client.list_workflows().workflows:
            summary = {
                "name": workflow.name,
                "description": workflow.description,
                "nodes": workflow.node_count,
                "inputs": list(workflow.input_names),
            }
            print(json.dumps(summary))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return _list(args)
    try:
        specs = compile_file(args)
        if args.action == "compile":
            for spec in specs:
                _print_summary(spec, args.json)
        else:
            asyncio.run(_register(args, specs))
    except WorkflowFileError as error:
        for message in error.errors:
            print(f"error: {message}", file=sys.stderr)
        return EXIT_INVALID
    except grpc.aio.AioRpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return EXIT_INVALID if error.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    return 0
