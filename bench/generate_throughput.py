"""Generation speed: neomesh's KV-cached sampler against Hugging Face GPTNeo on PyTorch.

Both run greedy decoding of the same new-token count after the same prompt, in float32 on this
machine's CPU, with the same weights: a randomly initialised HF GPTNeoForCausalLM at GPT-Neo
125M's shape, copied into our parameter tree through export.py's mapping. Reported per batch
size: new tokens/s (after a warm-up that compiles) and time to first token (a one-token
generation: the prompt pass plus one sampling step), and the ratios ours / HF.

HF runs with whichever of 1 thread and torch's default thread count is faster, probed on a short
generation first: on a shared, busy machine torch's multi-threaded kernels can be several times
slower than one thread, and the peer should be measured at its best.

    PYTHONPATH=. .venv/bin/python bench/generate_throughput.py            # 125M, batches 1 and 8
    PYTHONPATH=. .venv/bin/python bench/generate_throughput.py --small    # a quick check of the script

Then the per-token time by position, neomesh only (HF GPTNeo has no linear attention): a model
with every layer `linear` against the same model with every layer `global`, each decoding new
tokens after prompts of growing length. Linear attention decodes from a running state, so its
time per token should not grow with the position; global attention reads a cache that grows.

Decoding one row streams every weight once per token, so batch 1 is bound by memory bandwidth:
the benchmark measures the bandwidth (machine.py) and reports the fraction of it that the weights'
bytes per token at neomesh's rate reach. --bfloat16 also decodes with decode_precision bfloat16
(half the bytes) and reports its rate and how many greedy tokens agree with float32's.

The last line of the output is one JSON object with every figure; its "machine" names the CPU
and holds the matmul rates and the bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import machine  # noqa: E402
from configs import validate  # noqa: E402
from export import TRANSFORMS, expanded_mapping, get_path, set_path  # noqa: E402
from models import gpt2  # noqa: E402
from sample import generate  # noqa: E402

SHAPE_125M = dict(n_layer=12, n_embd=768, n_head=12, n_ctx=2048, n_vocab=50257, local_attention_radius=256)
SHAPE_SMALL = dict(n_layer=4, n_embd=128, n_head=4, n_ctx=512, n_vocab=2048, local_attention_radius=32)


def build_models(shape: dict):
    """A random HF GPTNeoForCausalLM and our config and params holding the same weights."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    hf_config = GPTNeoConfig(
        vocab_size=shape["n_vocab"], max_position_embeddings=shape["n_ctx"], hidden_size=shape["n_embd"],
        num_layers=shape["n_layer"], num_heads=shape["n_head"], window_size=shape["local_attention_radius"],
        attention_types=[[["global", "local"], shape["n_layer"] // 2]], activation_function="gelu_new",
        embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, layer_norm_epsilon=1e-5,
    )
    hf_model = GPTNeoForCausalLM(hf_config).eval()

    config = validate(dict(shape, attention_types=[[["global", "local"], shape["n_layer"] // 2]],
                           activation_function="gelu", precision="float32"), "bench/generate_throughput.py")
    hf_tensors = {name: t.detach().numpy() for name, t in hf_model.state_dict().items()}
    params = jax.tree.map(lambda x: x, jax.eval_shape(lambda: gpt2.init_params(config, jax.random.key(0))))
    for path, hf_name, transform in expanded_mapping(config):
        our_shape = get_path(params, path).shape
        set_path(params, path, np.ascontiguousarray(TRANSFORMS[transform][1](hf_tensors[hf_name], our_shape)))
    params = jax.device_put(params)
    return hf_model, config, params


def streamed_weight_bytes(params, bytes_per_weight: int = 4) -> int:
    """Bytes of weights one decoding step reads: every parameter (the output projection is the
    token table) but the position table, of which it reads one row."""
    return sum(leaf.size * bytes_per_weight for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if "wpe" not in jax.tree_util.keystr(path))


def time_ours(params, config, prompt, new_tokens: int, repeats: int) -> tuple[float, list[list[int]]]:
    """Best wall time of `repeats` generations (after one that compiles), and the tokens."""
    samples = generate(params, config, prompt, max_new_tokens=new_tokens, temperature=0.0)  # compiles
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        samples = generate(params, config, prompt, max_new_tokens=new_tokens, temperature=0.0)
        best = min(best, time.perf_counter() - start)
    return best, samples.tokens


def time_hf(model, prompt, new_tokens: int, repeats: int) -> tuple[float, list[list[int]]]:
    input_ids = torch.tensor(prompt)
    kwargs = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, use_cache=True, pad_token_id=0)
    with torch.inference_mode():
        model.generate(input_ids, **dict(kwargs, max_new_tokens=2, min_new_tokens=2))  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            output = model.generate(input_ids, **kwargs)
            best = min(best, time.perf_counter() - start)
    return best, output[:, input_ids.shape[1]:].tolist()


TORCH_DEFAULT_THREADS = torch.get_num_threads()


def fastest_torch_threads(model, prompt) -> int:
    """1 or torch's default thread count, whichever generates 16 tokens faster here and now."""
    default = TORCH_DEFAULT_THREADS
    timings = {}
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        timings[threads] = time_hf(model, prompt, 16, 1)[0]
    torch.set_num_threads(min(timings, key=timings.get))
    print("  HF probe, 16 tokens: " + ", ".join(f"{t} thread(s) {s:.2f} s" for t, s in timings.items()))
    return min(timings, key=timings.get)


POSITION_SHAPE = dict(n_layer=4, n_embd=256, n_head=4, n_ctx=2048, n_vocab=4096)


def per_token_by_position(prompts: list[int], new_tokens: int, repeats: int) -> dict:
    """{kind: {prompt length: ms per new token}} for POSITION_SHAPE with every layer `kind`: the
    time of a generation of 65 + new_tokens tokens minus that of 65, over new_tokens (both include
    the same prompt pass, and 64 steps already warm the loop)."""
    rng = np.random.default_rng(1)
    rows = {}
    for kind in ("linear", "global"):
        config = validate(dict(POSITION_SHAPE, attention_types=[[[kind], POSITION_SHAPE["n_layer"]]]),
                          "bench/generate_throughput.py")
        params = gpt2.init_params(config, jax.random.key(0))
        rows[kind] = {}
        for length in prompts:
            prompt = rng.integers(0, config.n_vocab, (1, length)).tolist()
            longer, _ = time_ours(params, config, prompt, 65 + new_tokens, repeats)
            first, _ = time_ours(params, config, prompt, 65, repeats)
            rows[kind][length] = round(1e3 * max(longer - first, 0.0) / new_tokens, 3)
        line = ", ".join(f"after {length} tokens {ms:.2f} ms" for length, ms in rows[kind].items())
        growth = rows[kind][prompts[-1]] / max(rows[kind][prompts[0]], 1e-9)
        print(f"{kind:6s} per new token: {line} | last / first {growth:.2f}x", flush=True)
    return rows


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy generations share (float32 rounding may split them later)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a small model, to check the script quickly")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8], help="batch sizes of the HF comparison (none: skip it)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement; the best counts")
    parser.add_argument("--position_prompts", type=int, nargs="*", default=[64, 512, 1536],
                        help="prompt lengths of the per-token-by-position rows (none: skip them)")
    parser.add_argument("--bfloat16", action="store_true", help="also decode with decode_precision bfloat16")
    parser.add_argument("--no_probe", action="store_true", help="XLA's default dot kernels, unprobed")
    args = parser.parse_args()

    shape = SHAPE_SMALL if args.small else SHAPE_125M
    if not args.no_probe:  # as main.py --predict does, before JAX starts its backend; for the largest batch
        largest = max(args.batches, default=1)
        machine.set_xla_dot_option(validate(dict(shape, predict_batch_size=largest), "bench/generate_throughput.py"),
                                   decoding=True)
    hf_model, config, params = build_models(shape)
    described = machine.describe(rates=True)
    print(f"machine: {json.dumps(described)}")
    bandwidth = described["memory_gb_per_s"] * 1e9
    weight_bytes = streamed_weight_bytes(params)
    print(f"model: {shape}, alternating global/local; float32; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__}")
    print(f"greedy, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, best of {args.repeats}")

    rng = np.random.default_rng(0)
    results = {"model": "125M" if not args.small else "small", "prompt_tokens": args.prompt_tokens,
               "new_tokens": args.new_tokens, "machine": described, "weight_bytes_per_token": weight_bytes}
    def tuned(config, batch: int):
        """The config as main.py --predict runs it at this batch: decode_product probed (machine.tune)."""
        config = config.replace(predict_batch_size=batch)
        return config if args.no_probe else machine.tune(config, decoding=True)

    for batch in args.batches:
        prompt = rng.integers(0, shape["n_vocab"], (batch, args.prompt_tokens)).tolist()
        batch_config = tuned(config, batch)
        ours_s, ours_tokens = time_ours(params, batch_config, prompt, args.new_tokens, args.repeats)
        hf_threads = fastest_torch_threads(hf_model, prompt)
        hf_s, hf_tokens = time_hf(hf_model, prompt, args.new_tokens, args.repeats)
        ours_ttft, _ = time_ours(params, batch_config, prompt, 1, args.repeats)
        hf_ttft, _ = time_hf(hf_model, prompt, 1, args.repeats)
        ours_rate = batch * args.new_tokens / ours_s
        hf_rate = batch * args.new_tokens / hf_s
        agree = min(agreeing_prefix(a, b) for a, b in zip(ours_tokens, hf_tokens))
        print(f"batch {batch}: neomesh {ours_rate:8.1f} new tokens/s, first token {ours_ttft * 1e3:7.1f} ms | "
              f"HF ({hf_threads} thread(s)) {hf_rate:8.1f} new tokens/s, first token {hf_ttft * 1e3:7.1f} ms | "
              f"ratio {ours_rate / hf_rate:.2f}x tokens/s, {hf_ttft / ours_ttft:.2f}x first token | "
              f"greedy tokens agree for the first {agree} of {args.new_tokens}; decode_product {batch_config.decode_product}")
        results[f"batch_{batch}"] = {
            "neomesh_tokens_per_s": round(ours_rate, 2), "hf_tokens_per_s": round(hf_rate, 2),
            "tokens_per_s_ratio": round(ours_rate / hf_rate, 3),
            "neomesh_first_token_ms": round(ours_ttft * 1e3, 2), "hf_first_token_ms": round(hf_ttft * 1e3, 2),
            "first_token_speedup": round(hf_ttft / ours_ttft, 3), "greedy_agreeing_prefix": agree,
            "hf_torch_threads": hf_threads, "decode_product": batch_config.decode_product,
        }
        if batch == 1:
            reached = ours_rate * weight_bytes / bandwidth
            results["batch_1"]["fraction_of_memory_bandwidth"] = round(reached, 3)
            print(f"  batch 1 streams {weight_bytes / 1e6:.0f} MB of float32 weights per token: "
                  f"{ours_rate * weight_bytes / 1e9:.1f} GB/s, {reached:.0%} of the {bandwidth / 1e9:.1f} GB/s measured")
        if args.bfloat16:
            bf16_config = tuned(config.replace(decode_precision="bfloat16"), batch)
            bf16_s, bf16_tokens = time_ours(params, bf16_config, prompt, args.new_tokens, args.repeats)
            bf16_rate = batch * args.new_tokens / bf16_s
            agreeing = sum(agreeing_prefix(a, b) for a, b in zip(bf16_tokens, ours_tokens))
            same = sum(x == y for a, b in zip(bf16_tokens, ours_tokens) for x, y in zip(a, b))
            flags = described["flags"]
            note = "" if flags["avx512_bf16"] or flags["amx_bf16"] else " (this CPU has neither AVX512-BF16 nor AMX)"
            print(f"  decode_precision bfloat16: {bf16_rate:8.1f} new tokens/s ({bf16_rate / ours_rate:.2f}x float32's); "
                  f"greedy tokens agree with float32's for the first {agreeing / batch:.0f} of {args.new_tokens} "
                  f"on average, {same / (batch * args.new_tokens):.0%} of positions equal{note}; "
                  f"decode_product {bf16_config.decode_product}")
            results[f"batch_{batch}"] |= {
                "bfloat16_tokens_per_s": round(bf16_rate, 2), "bfloat16_vs_float32": round(bf16_rate / ours_rate, 3),
                "bfloat16_vs_hf": round(bf16_rate / hf_rate, 3),
                "bfloat16_agreeing_prefix_mean": agreeing / batch,
                "bfloat16_positions_equal": round(same / (batch * args.new_tokens), 3),
                "bfloat16_decode_product": bf16_config.decode_product}
    if args.position_prompts:
        print(f"per-token time by position, {POSITION_SHAPE}, batch 1, 192 new tokens after 64, neomesh only:")
        results["ms_per_token_by_prompt_length"] = per_token_by_position(args.position_prompts, 192, max(args.repeats, 5))
    print(json.dumps(results))


if __name__ == "__main__":
    from main import reuse_freed_memory

    reuse_freed_memory()  # as main.py does; Hugging Face runs in this process under the same allocator
    main()
