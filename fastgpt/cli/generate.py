"""`fastgpt generate` (continue one prompt) and `fastgpt chat` (an interactive loop).

Text is printed while it is generated; speed (prefill and decode tokens/s, time to
first token) goes to stderr, so stdout holds only the text.
"""
from __future__ import annotations

import argparse
import sys

GENERATE_DESCRIPTION = """\
Continue a prompt with a GPT-2-family model and stream the text to stdout.
Speed (prefill tokens/s, time to first token, decode tokens/s) is printed to
stderr. --model takes a fastgpt checkpoint directory, a Hugging Face GPT-2
directory, an OpenAI GPT-2 TensorFlow directory, or the name of a model fetched
with `fastgpt download`; with --random-init it is a preset name (gpt2, mini,
tiny, ...) built with RANDOM weights, which only makes sense for speed tests.
A prompt longer than the model's context keeps its last tokens (with a warning);
text longer than the context goes on from its last context_length/2 tokens."""

CHAT_DESCRIPTION = """\
Chat with a model: every line read from stdin is a user turn, the response is
streamed to stdout. If the model's metadata names a prompt template
(metadata["template"], written by `fastgpt finetune instruct`), each turn is
wrapped in it; otherwise the conversation is plain text the model continues.
Commands: /reset forgets the conversation, /exit (or end of input) quits."""


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH",
                   help="model directory (fastgpt, Hugging Face or OpenAI TF layout) or downloaded model name")
    p.add_argument("--random-init", action="store_true",
                   help="treat --model as a preset name and use RANDOM weights (benchmarks only)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, metavar="K",
                   help="sample among the K most likely tokens (default 50; 0 = no limit)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample from the nucleus holding probability P, in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when the text contains STR (not printed); repeatable")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", metavar="DTYPE",  # checked by runtime (torch-free --help)
                   help="weight dtype: auto, fp32, bf16, fp16 (torch's names float32, bfloat16, float16 too). "
                        "auto: bf16 on CUDA and on CPUs that compute bf16 natively (AVX512-BF16, AMX), fp32 on "
                        "other CPUs. On a CPU, every float dtype decodes through fastgpt's C kernel where it "
                        "builds (a C compiler is found): fp16 and bf16 weights are widened to fp32 in registers "
                        "and the activations stay fp32 (except bf16 on AVX512-BF16 CPUs: bf16 dot products, the "
                        "activations rounded to bf16 at each product, twice as fast for prompts), so both 16-bit "
                        "formats are fast for prompts and decoding alike, on any CPU. Without the kernel, bf16 "
                        "on a CPU without bf16 instructions is emulated (~100x slower matmuls; a warning says "
                        "so), fp16 prompts run several times slower without fp16 arithmetic, and fp32 decodes "
                        "through a slab layout when a start-up timing finds it faster")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "triton"],
                   help="kernel backend (default: $FASTGPT_BACKEND or auto = Triton on CUDA)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="CPU decoding with quantized matrices (APPROXIMATE: logits differ from the float "
                        "model's, so greedy text can too). int8: one scale per row, ~4x fewer bytes read per "
                        "token than fp32; through fastgpt's C kernel where it builds (int8 widened to fp32 in "
                        "registers, fp32 activations), else, where the CPU computes bf16 natively, ATen's "
                        "weight-only int8 with bf16 activations, elsewhere fbgemm's dynamic int8 with fp32 "
                        "activations. int4: a scale and zero per group of 32 weights, ~5x fewer bytes, a logit "
                        "error ~8-10x int8's; on the C kernel where it builds (fp32 activations), else on ATen's "
                        "int4 kernel with bf16 activations only where bf16 is native (else fp32)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: the physical cores this process may use, or "
                        "$OMP_NUM_THREADS; a short GEMV timing at start-up falls back to 1 thread when the "
                        "machine is so busy that 1 thread is faster). Batch-1 decoding is a chain of small ops "
                        "that every thread must join, so on a busy machine fewer threads can be faster")
    p.add_argument("--compile", action="store_true",
                   help="run the decode step through torch.compile (a one-off compilation of tens of seconds; "
                        "pays off on GPUs for long generations of small models, where per-op overhead dominates). "
                        "On CPUs where fastgpt's C kernel runs each decode step in one call, the compiled step "
                        "cannot use that call and is slower")
    p.add_argument("--draft", default=None, metavar="PATH",
                   help="speculative decoding: a smaller model with the same tokenizer proposes "
                        "--speculate-k tokens, the model checks them in one pass (greedy text is unchanged; "
                        "sampling keeps the model's distribution); acceptance is reported on stderr")
    p.add_argument("--speculate-k", type=int, default=4, metavar="K",
                   help="tokens proposed per verification pass with --draft or --prompt-lookup (default 4)")
    p.add_argument("--prompt-lookup", action="store_true",
                   help="speculative decoding without a draft model: propose the tokens that followed the "
                        "last words' earlier occurrence in the text (helps when the output copies the prompt)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole window for every token instead of using the KV cache (slow; for checks)")


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="continue a prompt, streaming the text",
                              description=GENERATE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(g)
    g.add_argument("--prompt", default="", help="the text to continue (default: start from <|endoftext|>)")
    g.set_defaults(func=run_generate)

    c = subparsers.add_parser("chat", help="interactive chat: stdin lines in, streamed responses out",
                              description=CHAT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(c)
    c.add_argument("--template", default=None, metavar="NAME",
                   help="prompt template (alpaca, phi3, none); default: the model's metadata, else none")
    c.set_defaults(func=run_chat)


# ---------------------------------------------------------------------- shared setup
def _setup(args):
    """(model, metadata, tokenizer, sampling kwargs) from the parsed arguments."""
    from .. import ops
    from ..errors import FastGPTError
    from ..runtime import measured_threads, resolve_device
    from ..sampling import validate
    from ..streaming_linear import decoding_dtype, prepare_for_decoding
    from ..tokenizer import Tokenizer, load_tokenizer

    top_k = args.top_k or None  # 0 means no limit
    if args.top_k is not None and args.top_k < 0:
        raise FastGPTError(f"--top-k must be >= 0 (0 = no limit), got {args.top_k}")
    try:
        validate(args.temperature, top_k, args.top_p)
    except FastGPTError as err:
        raise FastGPTError("--" + str(err).replace("_", "-", 1)) from None
    if args.max_new_tokens < 0:
        raise FastGPTError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.threads is not None and args.threads < 1:
        raise FastGPTError(f"--threads must be >= 1, got {args.threads}")
    if args.speculate_k < 1:
        raise FastGPTError(f"--speculate-k must be >= 1, got {args.speculate_k}")
    if args.draft and args.prompt_lookup:
        raise FastGPTError("--draft and --prompt-lookup: choose one proposer")
    if args.backend:
        ops.set_backend(args.backend)
    device = resolve_device(args.device)
    if device.type == "cpu":
        measured_threads(args.threads)
    dtype = decoding_dtype(args.dtype, device)

    if args.random_init:
        from ..config import preset
        from ..model import GPT
        cfg = preset(args.model)
        print(f"fastgpt: --random-init: {args.model} with RANDOM weights (the text will be gibberish)",
              file=sys.stderr)
        model, metadata, tokenizer = GPT(cfg).to(device=device, dtype=dtype).eval(), {}, Tokenizer()
    else:
        from ..weights import load_fastgpt, resolve
        model, metadata = load_fastgpt(args.model, device=device, dtype=dtype)
        # its own BPE if saved with it, else GPT-2's (a single weights file, like the book's model.pth, has none)
        from pathlib import Path
        tokenizer = load_tokenizer(None if Path(args.model).expanduser().is_file() else resolve(args.model))
    # an explicit --dtype sets a quantized model's activations; auto: bf16 only where the CPU computes it natively
    done = prepare_for_decoding(model, args.quantize, None if args.dtype == "auto" else dtype)
    draft = None
    if args.draft:
        from ..speculative import check_draft
        from ..weights import load_fastgpt
        draft, _ = load_fastgpt(args.draft, device=device, dtype=dtype)
        check_draft(model, draft)
        prepare_for_decoding(draft)
    if done:  # (after the checks: a bad --draft is a one-line error)
        print(f"fastgpt: {done}", file=sys.stderr)
    speed = dict(compile=args.compile, draft=draft, speculate_k=args.speculate_k, prompt_lookup=args.prompt_lookup)
    sampling = dict(temperature=args.temperature, top_k=top_k, top_p=args.top_p, seed=args.seed, **speed)
    return model, metadata, tokenizer, sampling


def _generate_streaming(model, tokenizer, prompt_ids, args, sampling, stop_strings):
    """Generate for one prompt, printing text to stdout as it comes; returns (Generation, text)."""
    from ..generate import TextStream, generate

    stream = TextStream(tokenizer, stop_strings)
    pieces = []

    def show(_b, token):
        text = stream.push(token)
        if text:
            pieces.append(text)
            sys.stdout.write(text)
            sys.stdout.flush()

    result = generate(model, [prompt_ids], args.max_new_tokens, eos_id=tokenizer.eot_id,
                      stop_strings=stop_strings or None, tokenizer=tokenizer, use_cache=not args.no_cache,
                      on_token=show, **sampling)
    tail = stream.finish()
    pieces.append(tail)
    sys.stdout.write(tail)
    sys.stdout.flush()
    return result, "".join(pieces)


def _print_stats(result) -> None:
    reason = {"eos": "end of text", "stop": "stop string", "length": "max tokens"}[result.finish_reasons[0]]
    speculation = f" | {result.speculation.summary()}" if result.speculation is not None else ""
    print(f"[{result.stats.summary()}{speculation} | stopped at {reason}]", file=sys.stderr)


# ---------------------------------------------------------------------- generate
def run_generate(args) -> int:
    model, _, tokenizer, sampling = _setup(args)
    prompt_ids = tokenizer.encode(args.prompt) or [tokenizer.eot_id]
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    result, _ = _generate_streaming(model, tokenizer, prompt_ids, args, sampling, args.stop)
    sys.stdout.write("\n")
    _print_stats(result)
    return 0


# ---------------------------------------------------------------------- chat
def run_chat(args) -> int:
    from ..errors import FastGPTError

    model, metadata, tokenizer, sampling = _setup(args)
    template_name = args.template if args.template is not None else metadata.get("template")
    if template_name == "none":
        template_name = None
    template, stops = None, list(args.stop)
    if template_name is not None:
        from ..finetune.templates import get_template
        if not isinstance(template_name, str):
            raise FastGPTError(f"{args.model}: metadata 'template' must be a string, got {template_name!r}")
        template = get_template(template_name)
        # A model that starts a new turn on its own has finished its answer.
        stops += [h.strip() for h in (template.instruction, template.response) if h.strip()]
        print(f"fastgpt chat: prompt template {template_name!r}", file=sys.stderr)
    interactive = sys.stdin.isatty()
    history = ""  # the conversation so far, as the model sees it
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break  # end of input
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = ""
            print("(conversation reset)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        turn = template.prompt(line) if template else line + "\n"
        prompt = history + turn
        result, reply = _generate_streaming(model, tokenizer, tokenizer.encode(prompt), args, sampling, stops)
        sys.stdout.write("\n")
        sys.stdout.flush()
        history = prompt + reply + ("<|endoftext|>" if template else "\n")
        _print_stats(result)
    return 0
