"""`fastgpt serve`: the OpenAI-compatible HTTP server (needs the `serve` extra)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

DESCRIPTION = """\
Serve a model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions,
/v1/models), a browser chat page at /, and /health. Concurrent requests decode
together (continuous batching): a new request joins the running batch as soon as
a slot is free; when all --max-batch slots are busy and --max-queue requests
wait, a new one gets 503 with Retry-After at once. Chat uses the model's stored
prompt template (metadata["template"], or --template); a model without one
answers chat requests with a 400. Listens on 127.0.0.1 unless --host says
otherwise; --api-key (or $FASTGPT_API_KEY) requires `Authorization: Bearer KEY`
on /v1/*. Needs: pip install 'fastgpt[serve]'."""


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="PATH",
                   help="model directory (fastgpt, Hugging Face or OpenAI TF layout) or downloaded model name")
    p.add_argument("--random-init", action="store_true",
                   help="treat --model as a preset name and use RANDOM weights (benchmarks only)")
    p.add_argument("--template", default=None, metavar="NAME",
                   help="chat prompt template (alpaca, phi3, none); default: the model's metadata, else none")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the --model argument's last path part)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="sequences decoding together, i.e. KV-cache slots (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="sequences allowed to wait for a slot before new requests get 503 (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("FASTGPT_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $FASTGPT_API_KEY, else none)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                   help="refuse request bodies larger than N bytes with 413 (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", metavar="DTYPE",
                   help="weight dtype: auto, fp32, bf16, fp16 (default auto: bf16 on GPUs and on CPUs that compute "
                        "it natively, else fp32; on CPUs, fastgpt's C kernel keeps 16-bit weights with fp32 "
                        "activations: see `fastgpt generate --help`)")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "triton"],
                   help="kernel backend (default: $FASTGPT_BACKEND or auto = Triton on CUDA)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization for CPU decoding (approximate; see `fastgpt generate --help`)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import FastGPTError

    try:
        import uvicorn

        from ..finetune.templates import get_template
        from ..serve.app import LOOPBACK_HOSTS, ServedModel, ServerOptions, create_app
    except ImportError as err:
        raise FastGPTError(f"the server needs its extra: pip install 'fastgpt[serve]' ({err})") from None
    for name in ("max_batch", "port", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise FastGPTError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise FastGPTError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.port > 65535:
        raise FastGPTError(f"--port must be <= 65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise FastGPTError(f"--threads must be >= 1, got {args.threads}")
    if args.api_key is not None and not args.api_key.strip():
        raise FastGPTError("--api-key is empty")
    if not _is_loopback(args.host) and args.api_key is None:
        print(f"fastgpt serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              f"port can use the model", file=sys.stderr)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model)) or args.model

    def load() -> ServedModel:
        model, metadata, tokenizer = _load_model(args)
        template_name = args.template if args.template is not None else metadata.get("template")
        if template_name is not None and not isinstance(template_name, str):
            raise FastGPTError(f"{args.model}: metadata 'template' must be a string, got {template_name!r}")
        template = None if template_name in (None, "none") else get_template(template_name)
        print(f"fastgpt serve: {name} loaded (context {model.config.context_length}, chat template "
              f"{template.name if template else 'none'}); http://{args.host}:{args.port}/", file=sys.stderr)
        return ServedModel(model, tokenizer, template, name)

    load_error: list[str] = []

    def on_load_error(message: str) -> None:
        load_error.append(message)
        server.should_exit = True

    options = ServerOptions(max_batch=args.max_batch, max_queue=args.max_queue, api_key=args.api_key,
                            max_body_bytes=args.max_body_bytes,
                            allowed_hosts=LOOPBACK_HOSTS if _is_loopback(args.host) else None)
    app = create_app(load, options, on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    print(f"fastgpt serve: loading {args.model} ...", file=sys.stderr)
    server.run()
    if load_error:
        raise FastGPTError(load_error[0])
    if not server.started:
        raise FastGPTError(f"could not listen on {args.host}:{args.port} (see the message above)")
    return 0


def _load_model(args):
    """(model in eval mode, metadata, tokenizer) as `fastgpt generate` loads them."""
    from .. import ops
    from ..runtime import resolve_device, set_threads
    from ..streaming_linear import decoding_dtype, prepare_for_decoding
    from ..tokenizer import Tokenizer, load_tokenizer

    if args.backend:
        ops.set_backend(args.backend)
    device = resolve_device(args.device)
    if device.type == "cpu":
        set_threads(args.threads)  # a batch of sequences is matrix work: every core helps
    dtype = decoding_dtype(args.dtype, device)
    if args.random_init:
        from ..config import preset
        from ..model import GPT
        print(f"fastgpt serve: --random-init: {args.model} with RANDOM weights (the text will be gibberish)",
              file=sys.stderr)
        model, metadata, tokenizer = GPT(preset(args.model)).to(device=device, dtype=dtype), {}, Tokenizer()
    else:
        from ..weights import load_fastgpt, resolve
        model, metadata = load_fastgpt(args.model, device=device, dtype=dtype)
        tokenizer = load_tokenizer(resolve(args.model))  # its own BPE if saved with it, else GPT-2's
    done = prepare_for_decoding(model, args.quantize, None if args.dtype == "auto" else dtype)
    if done:
        print(f"fastgpt serve: {done}", file=sys.stderr)
    return model.eval(), metadata, tokenizer


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
